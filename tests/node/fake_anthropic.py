"""A faithful fake of the Anthropic Messages API, an ASGI app for ``serve_app``.

It checks what the real API checks that our adapter could get wrong (``x-api-key``,
``anthropic-version``, required ``model`` / ``max_tokens`` / ``messages``, roles that
alternate, no ``system`` role, a known model), records every request, and answers as
the wire facts (A6) describe: named SSE events without ``[DONE]``, ``ping`` events,
``message_start`` input usage with a placeholder output count, a cumulative
``output_tokens`` in ``message_delta``, errors as ``{"type": "error", "error": {...}}``.
Extended thinking comes first, as a ``thinking`` block (``thinking_delta`` events, then
a ``signature_delta``; whole: ``{"type": "thinking", "thinking", "signature"}``), or as a
``redacted_thinking`` block (``data`` only, no text). A refused prompt is HTTP 200 with
``stop_reason: "refusal"`` and no content.

Generation options: a top-level field the Messages API does not document is a 400 (the
API forbids extra inputs), as is a ``metadata`` key other than ``user_id``. The text
ends where one of ``stop_sequences`` first appears (the sequence left out), with
``stop_reason: "stop_sequence"`` and the matched ``stop_sequence``. With
``exclusive_sampling`` (newer models) ``temperature`` and ``top_p`` together are a 400.

Configure it per test by setting attributes; faults are opt-in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import trio

from .asgi_server import DropConnection, read_json, send_chunk, send_json, start_stream
from .fake_stop import cut_at_stop

KEY = "sk-ant-SECRET123"
MODEL = "claude-test-1"
#: the Messages request's top-level fields (wire facts A6)
FIELDS = frozenset({"model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k",
                    "tools", "tool_choice", "thinking", "metadata", "service_tier", "stream"})
BOTH = "`temperature` and `top_p` cannot both be specified for this model. Please use only one."


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: dict


@dataclass
class Failure:
    """One error response, served in order before any normal answer."""

    status: int
    type: str
    message: str = "something went wrong"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeAnthropic:
    key: str = KEY
    url: str = ""  #: set by the fixture once served
    requests: list[Recorded] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    models: dict[str, int] = field(default_factory=lambda: {MODEL: 200_000})  #: id -> max_input_tokens
    # the answer
    text: list[str] = field(default_factory=lambda: ["Hello", ", world", "!"])
    #: (id, name, input JSON fragments) of tool_use blocks after the text
    tool_calls: list[tuple[str, str, list[str]]] = field(default_factory=list)
    #: extended thinking, a block before the text
    thinking: list[str] = field(default_factory=list)
    redacted_thinking: bool = False
    stop_reason: str = "end_turn"
    input_tokens: int = 12
    output_tokens: int = 7
    cache_creation: int = 3
    cache_read: int = 5
    #: message_delta carries its usage (the cumulative output count)
    delta_usage: bool = True
    # stream faults
    error_event: str | None = None  #: error type sent after the first text delta
    error_message: str = "Overloaded"  #: its message
    drop_after_first_delta: bool = False
    omit_message_stop: bool = False
    #: body text sent after message_stop, before the body ends
    after_stop: list[str] = field(default_factory=list)
    #: after message_stop (and ``after_stop``), keep the body open until ``release`` is set
    hold_after_stop: bool = False
    release: trio.Event = field(default_factory=trio.Event)
    first_byte_delay: float = 0.0  #: seconds before the response starts
    #: a newer model: ``temperature`` and ``top_p`` together are refused
    exclusive_sampling: bool = False

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    async def __call__(self, scope, receive, send) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        body = await read_json(receive) if scope["method"] == "POST" else {}
        self.requests.append(Recorded(scope["method"], scope["path"], scope["query_string"].decode(), headers, body))
        if self.first_byte_delay:
            await trio.sleep(self.first_byte_delay)
        if (problem := self._check(scope, headers, body)) is not None:
            return await _error(send, problem)
        if self.failures:
            return await _error(send, self.failures.pop(0))
        if scope["method"] == "GET" and scope["path"] == "/v1/models":
            data = [self._model(m) for m in self.models]
            page = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
            return await send_json(send, 200, page)
        if scope["method"] == "GET" and scope["path"].startswith("/v1/models/"):
            return await send_json(send, 200, self._model(scope["path"].rsplit("/", 1)[1]))
        pieces, matched = cut_at_stop(self.text, body.get("stop_sequences"))
        stop_reason = "stop_sequence" if matched is not None else self.stop_reason
        if body.get("stream"):
            return await self._stream(send, body["model"], pieces, stop_reason, matched)
        content = [{"type": "thinking", "thinking": "".join(self.thinking), "signature": "EqQBCgIYAh=="}]
        content = content if self.thinking else []
        content += [{"type": "redacted_thinking", "data": "EmwKAhgBEgy3va=="}] if self.redacted_thinking else []
        content += [{"type": "text", "text": "".join(pieces)}] if pieces else []
        for call_id, name, fragments in self.tool_calls:
            arguments = json.loads("".join(fragments) or "{}")
            content.append({"type": "tool_use", "id": call_id, "name": name, "input": arguments})
        message = self._message(body["model"], content, stop_reason)
        message["usage"]["output_tokens"] = self.output_tokens
        message["stop_sequence"] = matched
        await send_json(send, 200, message, {"request-id": "req_1"})

    def _check(self, scope, headers: dict[str, str], body: dict) -> Failure | None:
        if headers.get("x-api-key") != self.key:
            return Failure(401, "authentication_error", "invalid x-api-key")
        if headers.get("anthropic-version") != "2023-06-01":
            return Failure(400, "invalid_request_error", "anthropic-version: header is required")
        if scope["path"].startswith("/v1/models/") and scope["path"].rsplit("/", 1)[1] not in self.models:
            return Failure(404, "not_found_error", "model not found")
        if scope["method"] == "GET":
            return None
        if scope["path"] != "/v1/messages":
            return Failure(404, "not_found_error", f"Not Found: {scope['path']}")
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                return Failure(400, "invalid_request_error", f"{name}: Field required")
        roles = [m.get("role") for m in body["messages"]]
        if any(role not in ("user", "assistant") for role in roles):
            return Failure(400, "invalid_request_error", "messages: roles must be user or assistant")
        if any(a == b for a, b in zip(roles, roles[1:])):
            return Failure(400, "invalid_request_error", "messages: roles must alternate between user and assistant")
        if body["model"] not in self.models:
            return Failure(404, "not_found_error", f"model: {body['model']}")
        extra = sorted(set(body) - FIELDS) + [f"metadata.{k}" for k in sorted(set(body.get("metadata") or {}) - {"user_id"})]
        if extra:
            return Failure(400, "invalid_request_error", f"{extra[0]}: Extra inputs are not permitted")
        if self.exclusive_sampling and "temperature" in body and "top_p" in body:
            return Failure(400, "invalid_request_error", BOTH)
        return None

    def _model(self, model_id: str) -> dict:
        return {"type": "model", "id": model_id, "display_name": model_id, "created_at": "2026-01-01T00:00:00Z",
                "max_input_tokens": self.models[model_id], "max_tokens": 64_000}

    def _message(self, model: str, content: list, stop_reason: str | None) -> dict:
        usage = {"input_tokens": self.input_tokens, "cache_creation_input_tokens": self.cache_creation,
                 "cache_read_input_tokens": self.cache_read, "output_tokens": 1}
        return {"id": "msg_1", "type": "message", "role": "assistant", "content": content, "model": model,
                "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}

    async def _stream(self, send, model: str, pieces: list[str], stop_reason: str, matched: str | None) -> None:
        await start_stream(send, "text/event-stream; charset=utf-8")

        async def event(data: dict) -> None:
            await send_chunk(send, f"event: {data['type']}\ndata: {json.dumps(data)}\n\n")

        await event({"type": "message_start", "message": self._message(model, [], None)})
        await event({"type": "ping"})
        index = 0
        if self.thinking:
            block = {"type": "thinking", "thinking": ""}
            await event({"type": "content_block_start", "index": index, "content_block": block})
            for piece in self.thinking:
                delta = {"type": "thinking_delta", "thinking": piece}
                await event({"type": "content_block_delta", "index": index, "delta": delta})
            delta = {"type": "signature_delta", "signature": "EqQBCgIYAh=="}
            await event({"type": "content_block_delta", "index": index, "delta": delta})
            await event({"type": "content_block_stop", "index": index})
            index += 1
        if self.redacted_thinking:
            block = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va=="}
            await event({"type": "content_block_start", "index": index, "content_block": block})
            await event({"type": "content_block_stop", "index": index})
            index += 1
        if pieces:
            block = {"type": "text", "text": ""}
            await event({"type": "content_block_start", "index": index, "content_block": block})
            for n, piece in enumerate(pieces):
                delta = {"type": "text_delta", "text": piece}
                await event({"type": "content_block_delta", "index": index, "delta": delta})
                if n == 0 and self.error_event:
                    body = {"type": "error", "error": {"type": self.error_event, "message": self.error_message}}
                    await send_chunk(send, f"event: error\ndata: {json.dumps(body)}\n\n", more=False)
                    return
                if n == 0 and self.drop_after_first_delta:
                    raise DropConnection
                await event({"type": "ping"})
            await event({"type": "content_block_stop", "index": index})
            index += 1
        for call_id, name, fragments in self.tool_calls:
            block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
            await event({"type": "content_block_start", "index": index, "content_block": block})
            for fragment in ["", *fragments]:
                delta = {"type": "input_json_delta", "partial_json": fragment}
                await event({"type": "content_block_delta", "index": index, "delta": delta})
            await event({"type": "content_block_stop", "index": index})
            index += 1
        delta = {"stop_reason": stop_reason, "stop_sequence": matched}
        usage = {"usage": {"output_tokens": self.output_tokens}} if self.delta_usage else {}
        await event({"type": "message_delta", "delta": delta, **usage})
        if not self.omit_message_stop:
            await event({"type": "message_stop"})
        for text in self.after_stop:
            await send_chunk(send, text)
        if self.hold_after_stop:
            await self.release.wait()
        await send_chunk(send, b"", more=False)


async def _error(send, failure: Failure) -> None:
    body = {"type": "error", "error": {"type": failure.type, "message": failure.message}, "request_id": "req_1"}
    await send_json(send, failure.status, body, failure.headers)
