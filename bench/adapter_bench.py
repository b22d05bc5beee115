"""The HTTP backend adapters' own cost: per token, per request, and connections opened.

Old against new in the same run: the adapters as they were at ``--base`` (a git revision,
loaded from history into ``loomnet.node._bench_base_backends``, beside the working tree's
``loomnet.node.backends``) against the working tree's, alternating, ``--reps`` times,
medians reported. Three measures:

1. **Per token** (``tokens``): each adapter (OpenAI-compatible SSE, Ollama NDJSON,
   Anthropic named-event SSE, Gemini SSE) streams a ``--tokens``-token answer in its
   runtime's framing, one HTTP chunk per event, from memory (an httpx transport, no
   socket, no server: only the adapter is timed). Reported: this process's CPU time per
   token of ``async with backend.stream_chat(p) as events: async for e in events``, old
   and new; the new one read through a background task and channel (``new+hop``: what
   the old adapters' ``trio.as_safe_channel`` cost on top of parsing); and a *floor*:
   ``msgspec.json.decode`` of each event's JSON payload, already split out of the body
   (what parsing alone cannot go below).
2. **Connections** (``connections``): ``--requests`` sequential streamed requests to the
   tests' faithful fakes (hypercorn on loopback); the TCP connections the fake accepted.
3. **Per request** (``request``): short streamed requests (4 tokens) to the OpenAI fake
   served by a *separate process*, so that only the adapter's process is timed: CPU ms
   and wall ms per request, and the connections the server accepted.

Run from the repository root::

    .venv/bin/python bench/adapter_bench.py                    # all three, base = 255f953
    .venv/bin/python bench/adapter_bench.py --only tokens --tokens 4000 --reps 9
    .venv/bin/python bench/adapter_bench.py --base HEAD~3 --json /tmp/adapters.json

Exit status: 1 when the new adapters open more than one connection per ``--requests``
streamed requests, or parse slower per token than the base; 0 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' fakes: tests.node.*

from loomnet.node.backends._base import ChatParams, Finished  # noqa: E402
from loomnet.node.backends._config import BackendConfig  # noqa: E402
from loomnet.protocol import ChatMessage  # noqa: E402

DEFAULT_BASE = "255f953"  #: the last commit before issue 9's adapter work
BASE_PACKAGE = "loomnet.node._bench_base_backends"
HELLO = [ChatMessage(role="user", content="Say hello.")]
ADAPTERS = ("openai", "ollama", "anthropic", "gemini")


# ---------------------------------------------------------------- the two versions


def load_base(rev: str) -> str:
    """Import ``node/backends`` as it was at ``rev`` under :data:`BASE_PACKAGE`; its name."""
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "node/backends/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    folder = Path(tempfile.mkdtemp(prefix="adapter-bench-"))
    for name in names:
        if name.endswith(".py"):
            source = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True,
                                    capture_output=True).stdout
            (folder / Path(name).name).write_bytes(source)
    spec = importlib.util.spec_from_file_location(BASE_PACKAGE, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[BASE_PACKAGE] = module
    spec.loader.exec_module(module)
    return BASE_PACKAGE


def make_backend(package: str, kind: str, endpoint: str, transport: httpx.AsyncBaseTransport | None = None):
    """A backend of ``kind`` from ``package`` (the base's or the working tree's)."""
    if kind == "openai":
        cls = importlib.import_module(f"{package}.openai_compat").OpenAICompatBackend
        config = BackendConfig(provider="vllm", endpoint=endpoint)
    elif kind == "ollama":
        cls = importlib.import_module(f"{package}.ollama").OllamaBackend
        config = BackendConfig(provider="ollama", endpoint=endpoint)
    elif kind == "anthropic":
        cls = importlib.import_module(f"{package}.anthropic").AnthropicBackend
        config = BackendConfig(provider="anthropic", endpoint=endpoint, api_key="sk-ant-SECRET123",
                               models=[MODELS["anthropic"]])
    else:
        cls = importlib.import_module(f"{package}.gemini").GeminiBackend
        config = BackendConfig(provider="gemini", endpoint=endpoint, api_key="sk-ant-SECRET123",
                               models=[MODELS["gemini"]])
    return cls(config, transport=transport)


MODELS = {"openai": "m", "ollama": "llama3.2", "anthropic": "claude-test-1", "gemini": "gemini-test-flash"}


def params(kind: str) -> ChatParams:
    return ChatParams(model=MODELS[kind], messages=HELLO)


# ---------------------------------------------------------------- bodies, in each runtime's framing


def _sse(payload: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def body_chunks(kind: str, tokens: int) -> tuple[list[bytes], list[bytes], str]:
    """(HTTP chunks, the JSON payloads in them, content type) of a ``tokens``-token answer."""
    words = [f" tok{i}" for i in range(tokens)]
    if kind == "openai":
        base = {"id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion.chunk",
                "created": 1_760_000_000, "model": "gpt-4.1-mini-2025-04-14", "system_fingerprint": "fp_44709d6fcb"}

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    "usage": None}

        payloads = [chunk({"role": "assistant", "content": "", "refusal": None})]
        payloads += [chunk({"content": w}) for w in words]
        payloads += [chunk({}, "stop"),
                     {**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": tokens,
                                                      "total_tokens": 11 + tokens}}]
        chunks = [_sse(p) for p in payloads] + [b"data: [DONE]\n\n"]
        return chunks, [json.dumps(p).encode() for p in payloads], "text/event-stream"
    if kind == "ollama":
        stamp = "2026-08-21T10:00:00.123456789Z"
        payloads = [{"model": "llama3.2", "created_at": stamp, "message": {"role": "assistant", "content": w},
                     "done": False} for w in words]
        payloads.append({"model": "llama3.2", "created_at": stamp, "message": {"role": "assistant", "content": ""},
                         "done_reason": "stop", "done": True, "total_duration": 4883583458, "load_duration": 1334875,
                         "prompt_eval_count": 26, "prompt_eval_duration": 342546000, "eval_count": tokens,
                         "eval_duration": 4535599000})
        lines = [json.dumps(p).encode() for p in payloads]
        return [line + b"\n" for line in lines], lines, "application/x-ndjson"
    if kind == "anthropic":
        usage = {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                 "output_tokens": 1}
        message = {"id": "msg_01", "type": "message", "role": "assistant", "content": [], "model": MODELS[kind],
                   "stop_reason": None, "stop_sequence": None, "usage": usage}
        payloads = [{"type": "message_start", "message": message},
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    {"type": "ping"}]
        payloads += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}
                     for w in words]
        payloads += [{"type": "content_block_stop", "index": 0},
                     {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                      "usage": {"output_tokens": tokens}},
                     {"type": "message_stop"}]
        return [_sse(p, p["type"]) for p in payloads], [json.dumps(p).encode() for p in payloads], \
            "text/event-stream; charset=utf-8"
    payloads = []
    for i, w in enumerate(words):
        candidate: dict[str, Any] = {"content": {"parts": [{"text": w}], "role": "model"}, "index": 0}
        if i == tokens - 1:
            candidate["finishReason"] = "STOP"
        payloads.append({"candidates": [candidate],
                         "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": i + 1,
                                           "totalTokenCount": 12 + i},
                         "modelVersion": "gemini-2.5-flash", "responseId": "mxW2aKqkJ9Dg7M8PmLnF2AQ"})
    lines = [json.dumps(p).encode() for p in payloads]
    return [b"data: " + line + b"\r\n\r\n" for line in lines], lines, "text/event-stream"


class _Body(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self):
        for chunk in self._chunks:
            yield chunk


class MemoryTransport(httpx.AsyncBaseTransport):
    """Answers every request with the same streamed body, from memory."""

    def __init__(self, chunks: list[bytes], content_type: str) -> None:
        self.chunks, self.content_type = chunks, content_type

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": self.content_type}, stream=_Body(self.chunks))


async def consume(backend, p: ChatParams) -> Finished:
    """Read one streamed answer; its Finished (the base's own class, for the old adapters)."""
    finished = None
    async with backend.stream_chat(p) as events:
        async for event in events:
            finished = event
    assert type(finished).__name__ == "Finished", finished
    return finished


# ---------------------------------------------------------------- 1. per token


@trio.as_safe_channel
async def _hopped(backend, p: ChatParams):
    """The new adapter's events through a background task and channel, as the old
    adapters' ``trio.as_safe_channel`` handed them over: the hop's share, measured."""
    async with backend.stream_chat(p) as events:
        async for event in events:
            yield event


async def consume_hopped(backend, p: ChatParams) -> Finished:
    finished = None
    async with _hopped(backend, p) as events:
        async for event in events:
            finished = event
    assert type(finished).__name__ == "Finished", finished
    return finished


async def per_token(base: str, tokens: int, reps: int) -> list[dict[str, Any]]:
    rows = []
    for kind in ADAPTERS:
        chunks, payloads, content_type = body_chunks(kind, tokens)
        backends = {name: make_backend(package, kind, "http://bench.invalid", MemoryTransport(chunks, content_type))
                    for name, package in (("old", base), ("new", "loomnet.node.backends"))}
        times: dict[str, list[float]] = {"old": [], "new": [], "hop": [], "floor": []}
        runs = (("old", backends["old"], consume), ("new", backends["new"], consume),
                ("hop", backends["new"], consume_hopped))
        for _, backend, run in runs:  # warm up
            await run(backend, params(kind))
        for _ in range(reps):
            for name, backend, run in runs:
                start = time.process_time()
                finished = await run(backend, params(kind))
                times[name].append((time.process_time() - start) / tokens * 1e6)
                assert finished.finish_reason == "stop", (kind, name, finished)
            start = time.process_time()
            for payload in payloads:
                msgspec.json.decode(payload)
            times["floor"].append((time.process_time() - start) / tokens * 1e6)
        for backend in backends.values():
            await backend.aclose()
        old, new, hop, floor = (statistics.median(times[k]) for k in ("old", "new", "hop", "floor"))
        rows.append({"adapter": kind, "old_us": old, "new_us": new, "new_hop_us": hop, "floor_us": floor,
                     "old_over_new": old / new})
    return rows


# ---------------------------------------------------------------- 2. connections


async def connections(base: str, requests: int) -> list[dict[str, Any]]:
    from tests.node import fake_anthropic, fake_gemini
    from tests.node.asgi_server import CountConnections, serve_app
    from tests.node.fake_anthropic import FakeAnthropic
    from tests.node.fake_gemini import FakeGemini
    from tests.node.fake_ollama import FakeOllama
    from tests.node.fake_openai import FakeOpenAI

    rows = []
    async with trio.open_nursery() as nursery:
        for kind in ADAPTERS:
            row: dict[str, Any] = {"adapter": kind, "requests": requests}
            for name, package in (("old", base), ("new", "loomnet.node.backends")):
                fake = {"openai": lambda: FakeOpenAI(flavour="vllm"), "ollama": FakeOllama,
                        "anthropic": FakeAnthropic, "gemini": FakeGemini}[kind]()
                counter = CountConnections(fake)
                url = await serve_app(nursery, counter)
                endpoint = {"openai": f"{url}/v1", "gemini": url + fake_gemini.PREFIX}.get(kind, url)
                backend = make_backend(package, kind, endpoint)
                assert MODELS["anthropic"] == fake_anthropic.MODEL and MODELS["gemini"] == fake_gemini.MODEL
                for _ in range(requests):
                    await consume(backend, params(kind))
                await backend.aclose()
                row[f"{name}_connections"] = len(counter.connections)
            rows.append(row)
        nursery.cancel_scope.cancel()
    return rows


# ---------------------------------------------------------------- 3. per request, server in another process

_SERVER = """
import sys, trio
sys.path.insert(0, {root!r})
from tests.node.asgi_server import CountConnections, serve_app
from tests.node.fake_openai import FakeOpenAI

async def main():
    counter = CountConnections(FakeOpenAI(flavour="vllm"))
    async with trio.open_nursery() as nursery:
        print(await serve_app(nursery, counter), flush=True)
        while (line := await trio.to_thread.run_sync(sys.stdin.readline)):
            print(len(counter.connections), flush=True)
        nursery.cancel_scope.cancel()

trio.run(main)
"""


async def per_request(base: str, requests: int, reps: int) -> dict[str, Any]:
    server = subprocess.Popen([sys.executable, "-c", _SERVER.format(root=str(ROOT))], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdin is not None
        url = server.stdout.readline().strip()

        def accepted() -> int:
            server.stdin.write("count\n")
            server.stdin.flush()
            return int(server.stdout.readline())

        backends = {name: make_backend(package, "openai", f"{url}/v1")
                    for name, package in (("old", base), ("new", "loomnet.node.backends"))}
        cpu: dict[str, list[float]] = {"old": [], "new": []}
        wall: dict[str, list[float]] = {"old": [], "new": []}
        opened: dict[str, list[int]] = {"old": [], "new": []}
        for name in ("old", "new"):
            await consume(backends[name], params("openai"))
        for _ in range(reps):
            for name in ("old", "new"):
                before = accepted()
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                for _ in range(requests):
                    await consume(backends[name], params("openai"))
                cpu[name].append((time.process_time() - start_cpu) / requests * 1e3)
                wall[name].append((time.perf_counter() - start_wall) / requests * 1e3)
                opened[name].append(accepted() - before)
        for backend in backends.values():
            await backend.aclose()
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=10)
    return {"requests": requests, **{f"{name}_cpu_ms": statistics.median(cpu[name]) for name in cpu},
            **{f"{name}_wall_ms": statistics.median(wall[name]) for name in wall},
            **{f"{name}_connections": statistics.median(opened[name]) for name in opened}}


# ---------------------------------------------------------------- main


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, Callable[[Any], str]]]) -> str:
    head = "  ".join(f"{title:>14}" for title, _, _ in columns)
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append("  ".join(f"{fmt(row[key]):>14}" for _, key, fmt in columns))
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    base = load_base(args.base)
    result: dict[str, Any] = {"base": args.base}
    failed = False
    print(f"adapters at {args.base} (old) against the working tree (new); medians of {args.reps} runs\n")
    if args.only in (None, "tokens"):
        rows = await per_token(base, args.tokens, args.reps)
        result["tokens"] = rows
        print(f"1. stream parsing, CPU µs per token ({args.tokens} tokens, one chunk per event, from memory)")
        print(table(rows, [("adapter", "adapter", str), ("old µs", "old_us", "{:.1f}".format),
                           ("new µs", "new_us", "{:.1f}".format), ("new+hop µs", "new_hop_us", "{:.1f}".format),
                           ("floor µs", "floor_us", "{:.2f}".format), ("old/new", "old_over_new", "{:.2f}x".format)]))
        print("   new+hop: the new adapter read through a task and channel (trio.as_safe_channel), as the old")
        print("   adapters handed events over; floor: msgspec.json.decode of each event's payload, split out\n")
        failed |= any(row["new_us"] > row["old_us"] for row in rows)
    if args.only in (None, "connections"):
        rows = await connections(base, args.requests)
        result["connections"] = rows
        print(f"2. TCP connections the fake accepted for {args.requests} sequential streamed requests")
        print(table(rows, [("adapter", "adapter", str), ("old", "old_connections", str),
                           ("new", "new_connections", str)]))
        print()
        failed |= any(row["new_connections"] > 1 for row in rows)
    if args.only in (None, "request"):
        row = await per_request(base, args.requests, args.reps)
        result["request"] = row
        print(f"3. OpenAI-compatible adapter, short streamed requests to a fake in another process "
              f"(blocks of {args.requests})")
        titles = {"cpu_ms": "CPU ms/request", "wall_ms": "wall ms/request", "connections": "new TCP conns"}
        print(table([{"what": titles[what], **{k: row[f"{k}_{what}"] for k in ("old", "new")}} for what in titles],
                    [("", "what", str), ("old", "old", "{:.2f}".format), ("new", "new", "{:.2f}".format)]))
        print(f"   new TCP conns: connections the server accepted per block of {args.requests} (after a warm-up)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help="git revision of the old adapters (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per streamed answer (per-token bench)")
    parser.add_argument("--requests", type=int, default=50, help="sequential requests per block")
    parser.add_argument("--reps", type=int, default=7, help="repetitions, medians reported")
    parser.add_argument("--only", choices=("tokens", "connections", "request"), help="run one part")
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args()))
