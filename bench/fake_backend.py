"""An instant OpenAI-compatible backend for benches: it answers as fast as it can.

Run it in a process of its own (``python bench/fake_backend.py --port 0``; it prints
``READY http://127.0.0.1:<port>/v1``), so its CPU is metered apart from the executor's
and the client's. It stands in for vLLM (the ``vllm`` provider profile) and speaks the
wire facts of A1 (``shared/reference/backend-wire-facts.md``):

* ``POST /v1/chat/completions`` with ``"stream": true``: ``text/event-stream`` over
  HTTP/1.1 chunked encoding, one ``data: {chunk}\\n\\n`` event per chunk and per write
  (as runtimes do, one token each): first ``delta: {"role": "assistant", "content": ""}``,
  then one ``delta: {"content": " hi"}`` per token, then ``delta: {}`` with the
  ``finish_reason`` (``length`` when ``max_tokens`` tokens were sent), then, only when
  ``stream_options.include_usage`` asks, a usage chunk with ``"choices": []`` (and
  ``"usage": null`` on every other chunk, as OpenAI does), then ``data: [DONE]``.
  The answer has ``max_tokens`` tokens (``max_completion_tokens`` too), else
  ``--tokens``. ``--token-interval`` paces them (seconds; 0: as fast as it can).
* the same without ``stream``: one ``chat.completion`` object with ``usage``.
* ``GET /v1/models``: ``{"object": "list", "data": [{"id", "object": "model", ...}]}``.
* ``GET /health`` (200, as vLLM), ``POST /tokenize`` (vLLM: ``count`` of words).
* ``GET /bench/stats``: requests, connections opened, streams (for connection reuse).

Keep-alive is honoured (``Connection: close`` too); a request with a body must carry
``Content-Length`` (httpx always does). Every answer is built from strings made once
per request, so the fake spends some tens of microseconds of CPU per request and a
few per token: it is not what a bench measures.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import msgspec
import trio

CREATED = 1_760_000_000
TOKEN = " hi"
_decode = msgspec.json.Decoder().decode


class Stats:
    requests = 0
    connections = 0
    streams = 0
    tokens = 0


def _chunk(body: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(body), body)


def stream_events(request_id: str, model: str, tokens: int, usage: bool, prompt_tokens: int, finish: str) -> tuple[bytes, bytes, bytes]:
    """(first event, one token's event, the end: finish, usage, [DONE]), each already
    framed as HTTP chunks."""
    head = (
        f'data: {{"id":"{request_id}","object":"chat.completion.chunk","created":{CREATED},'
        f'"model":{json.dumps(model)},"system_fingerprint":"fp_bench","choices":['
    )
    tail = ',"usage":null}\n\n' if usage else "}\n\n"
    first = head + '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]' + tail
    token = head + f'{{"index":0,"delta":{{"content":{json.dumps(TOKEN)}}},"logprobs":null,"finish_reason":null}}]' + tail
    end = head + f'{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{finish}"}}]' + tail
    out = [_chunk(end.encode())]
    if usage:
        counts = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
        out.append(_chunk((head + "]" + f',"usage":{json.dumps(counts)}}}\n\n').encode()))
    out.append(_chunk(b"data: [DONE]\n\n"))
    out.append(b"0\r\n\r\n")
    return _chunk(first.encode()), _chunk(token.encode()), b"".join(out)


def _response(status: int, body: bytes, content_type: bytes = b"application/json", close: bool = False) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 411: b"Length Required"}.get(status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
        % (status, reason, content_type, len(body), b"connection: close\r\n" if close else b"")
    ) + body


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
)


class Fake:
    def __init__(self, models: list[str], default_tokens: int, interval: float, per_write: int) -> None:
        self.models = models
        self.default_tokens = default_tokens
        self.interval = interval
        self.per_write = max(1, per_write)
        self.counter = 0

    async def serve(self, stream: trio.SocketStream) -> None:
        Stats.connections += 1
        buf = b""
        try:
            while True:
                while (end := buf.find(b"\r\n\r\n")) < 0:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf[:end].decode("latin-1"), buf[end + 4 :]
                request_line, *header_lines = head.split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                close = headers.get("connection", "").lower() == "close"
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    await stream.send_all(_response(411, b'{"error":"send content-length"}', close=True))
                    return
                length = int(headers.get("content-length", "0") or 0)
                while len(buf) < length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                Stats.requests += 1
                await self.answer(stream, method, path.split("?", 1)[0], body, close)
                if close:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def answer(self, stream: trio.SocketStream, method: str, path: str, body: bytes, close: bool) -> None:
        if path in ("/v1/chat/completions", "/chat/completions") and method == "POST":
            await self.chat(stream, body, close)
        elif path in ("/v1/models", "/models") and method == "GET":
            data = [{"id": m, "object": "model", "created": CREATED, "owned_by": "bench", "max_model_len": 32768}
                    for m in self.models]  # fmt: skip
            await stream.send_all(_response(200, json.dumps({"object": "list", "data": data}).encode(), close=close))
        elif path == "/health" and method == "GET":
            await stream.send_all(_response(200, b"", close=close))
        elif path == "/tokenize" and method == "POST":
            request = _decode(body) if body else {}
            words = str(request.get("prompt") or request.get("content") or "").split()
            answer = {"count": len(words), "max_model_len": 32768, "tokens": list(range(len(words)))}
            await stream.send_all(_response(200, json.dumps(answer).encode(), close=close))
        elif path == "/bench/stats":
            stats = {k: getattr(Stats, k) for k in ("requests", "connections", "streams", "tokens")}
            await stream.send_all(_response(200, json.dumps(stats).encode(), close=close))
        else:
            error = {"error": {"message": f"no route {method} {path}", "type": "invalid_request_error", "param": None, "code": None}}
            await stream.send_all(_response(404, json.dumps(error).encode(), close=close))

    async def chat(self, stream: trio.SocketStream, body: bytes, close: bool) -> None:
        try:
            request = _decode(body)
            model = request["model"]
            messages = request["messages"]
        except (msgspec.DecodeError, KeyError, TypeError):
            error = {"error": {"message": "model and messages are required", "type": "invalid_request_error", "param": None, "code": None}}
            await stream.send_all(_response(400, json.dumps(error).encode(), close=close))
            return
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        tokens = int(limit) if limit else self.default_tokens
        finish = "length" if limit else "stop"
        prompt_tokens = sum(len(str(m.get("content") or "").split()) + 4 for m in messages if isinstance(m, dict))
        self.counter += 1
        request_id = f"chatcmpl-bench{self.counter}"
        if not request.get("stream"):
            answer = {
                "id": request_id, "object": "chat.completion", "created": CREATED, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": TOKEN * tokens},
                             "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens},
            }  # fmt: skip
            await stream.send_all(_response(200, json.dumps(answer).encode(), close=close))
            Stats.tokens += tokens
            return
        usage = bool((request.get("stream_options") or {}).get("include_usage"))
        first, token, end = stream_events(request_id, model, tokens, usage, prompt_tokens, finish)
        Stats.streams += 1
        await stream.send_all(_STREAM_HEAD + (b"connection: close\r\n" if close else b"") + b"\r\n" + first)
        interval, per_write = self.interval, self.per_write
        batch = token * per_write
        sent = 0
        while sent < tokens:
            n = min(per_write, tokens - sent)
            await stream.send_all(batch if n == per_write else token * n)
            sent += n
            Stats.tokens += n
            if interval:
                await trio.sleep(interval * n)
        await stream.send_all(end)


async def main_async(args: argparse.Namespace) -> None:
    fake = Fake(args.model, args.tokens, args.token_interval, args.events_per_write)
    listeners = await trio.open_tcp_listeners(args.port, host=args.host)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, fake.serve, listeners)
        print(f"READY http://{args.host}:{port}/v1", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    stats = {k: getattr(Stats, k) for k in ("requests", "connections", "streams", "tokens")}
    print(f"fake backend stopped: {json.dumps(stats)}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--model", action="append", help="a model to list (repeatable; default bench-fake)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens in an answer when the request sets no max_tokens")
    parser.add_argument("--token-interval", type=float, default=0.0, help="seconds between tokens (0: as fast as it can)")
    parser.add_argument("--events-per-write", type=int, default=1, help="token events per socket write (1: as runtimes do)")
    args = parser.parse_args(argv)
    args.model = args.model or ["bench-fake"]
    trio.run(main_async, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
