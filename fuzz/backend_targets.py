"""Fuzz targets for what a runtime behind an executor sends back: the SSE and NDJSON
framing (``node/backends/_framing.py``) and each adapter's whole parse of a body
(OpenAI-compatible SSE, Ollama NDJSON, Anthropic's named events, Gemini SSE; streamed,
whole answers and error bodies), fed any bytes in any chunks over an in-memory httpx
transport. The property: events, or a ``BackendError`` with a stable code; nothing
else, and within a deadline. See ``targets.py``."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio
from hypothesis import strategies as st

from loomnet.node.backends import _framing
from loomnet.node.backends._base import ChatParams, Completion, Finished, ReasoningDelta, TextDelta
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends._framing import NDJSONDecoder, SSEDecoder, SSEEvent
from loomnet.node.backends.anthropic import AnthropicBackend
from loomnet.node.backends.gemini import GeminiBackend
from loomnet.node.backends.ollama import OllamaBackend
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.protocol import BackendError, ChatMessage, LoomError

from .protocol_targets import typed_error
from .strategies import chunked, mutated

__all__ = ["ADAPTERS", "BACKEND_TARGETS", "HELLO", "VALID_BODIES"]

#: seconds one adapter example may take before it counts as a hang
ADAPTER_DEADLINE = 10.0

# -------------------------------------------------------------------- raw framing

_SSE_LINES = [b"data: {}", b"data:[DONE]", b"event: message_stop", b": ping", b"error: {\"x\":1}", b"id: 7",
              b"retry: 10", b"data", b"", b"\r", b"data: \xff\xfe", b"event:\xc3"]


def _sse_like() -> st.SearchStrategy[bytes]:
    """Bytes that look like SSE: known field lines, blank lines, CRLF and stray bytes."""
    line = st.one_of(st.sampled_from(_SSE_LINES), st.binary(max_size=20))
    ending = st.sampled_from([b"\n", b"\r\n", b"\r", b""])
    return st.lists(st.tuples(line, ending).map(lambda t: t[0] + t[1]), max_size=12).map(b"".join)


def _framing_case() -> st.SearchStrategy[Any]:
    body = st.one_of(st.binary(max_size=400), _sse_like(), _sse_like().flatmap(mutated))
    return st.tuples(st.sampled_from(["sse", "ndjson"]), st.sampled_from([8, 64, _framing.MAX_LINE]),
                     body.flatmap(chunked))


def check_framing(case: tuple[str, int, list[bytes]]) -> None:
    """SSE / NDJSON decoders: what they make of a body does not depend on how it was
    cut; a line or an event over ``max_line`` is a ``BackendError``; nothing they hold
    between chunks passes the cap."""
    kind, max_line, chunks = case
    make = (lambda: SSEDecoder(max_line=max_line)) if kind == "sse" else (lambda: NDJSONDecoder(max_line=max_line))

    def run(pieces: list[bytes]) -> tuple[list[Any], str | None]:
        decoder, out = make(), []
        try:
            for piece in pieces:
                out += decoder.feed(piece)
                assert decoder.held() <= max_line, (decoder.held(), max_line)
            out += decoder.end()
        except LoomError as exc:
            typed_error(exc, BackendError)
            return out, exc.code.name
        for item in out:
            assert isinstance(item, SSEEvent if kind == "sse" else bytes)
        return out, None

    cut, cut_error = run(chunks)
    whole, whole_error = run([b"".join(chunks)] if chunks else [])
    if cut_error is None and whole_error is None:
        assert cut == whole, "the events depend on where the body was cut"


# -------------------------------------------------------------------- adapters

HELLO = [ChatMessage("user", "Say hello.")]


def _sse(*events: tuple[str | None, dict[str, Any] | str]) -> bytes:
    out = b""
    for name, data in events:
        if name:
            out += b"event: " + name.encode() + b"\n"
        out += b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n"
    return out


#: a valid streamed answer per provider, from reference/backend-wire-facts.md
VALID_BODIES: dict[str, bytes] = {
    "openai": _sse(
        (None, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]}),
        (None, {"choices": [{"index": 0, "delta": {"reasoning_content": "hm", "tool_calls": [
            {"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{\"a\""}}]}}]}),
        (None, {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2}}),
        (None, "[DONE]"),
    ),
    "ollama": b"".join(json.dumps(line).encode() + b"\n" for line in (
        {"model": "m", "message": {"role": "assistant", "content": "Hel", "thinking": "hm"}, "done": False},
        {"model": "m", "message": {"role": "assistant", "content": "lo", "tool_calls": [
            {"function": {"name": "f", "arguments": {"a": 1}}}]}, "done": False},
        {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
         "prompt_eval_count": 5, "eval_count": 2},
    )),
    "anthropic": _sse(
        ("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        ("content_block_start", {"type": "content_block_start", "index": 1,
                                 "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": "{\"a\":1}"}}),
        ("ping", {"type": "ping"}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"}),
    ),
    "gemini": _sse(
        (None, {"candidates": [{"content": {"parts": [{"text": "Hel"}, {"text": "hm", "thought": True}]}}]}),
        (None, {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {"a": 1}}}]},
                                "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7}}),
    ),
}

#: bodies no runtime sends but a broken or hostile one could: deep nesting, a bare
#: value where an object goes, numbers past every range, invalid UTF-8
_ODD_PAYLOADS = [b"[" * 5000, b"{\"a\":" * 5000, b"1e999999", b"-1e999999", b"NaN", b"Infinity", b"null", b"[]",
                 b"\"x\"", b"{\"choices\": 5}", b"{\"usage\": {\"prompt_tokens\": 1e400}}", b"\xff\xfe\xfd",
                 b"{\"error\": " + b"[" * 3000 + b"}", b"{\"prompt_eval_count\": -99999999999999999999999}"]


def _odd_body(provider: str) -> st.SearchStrategy[bytes]:
    payload = st.sampled_from(_ODD_PAYLOADS)
    if provider == "ollama":
        return payload.map(lambda p: p + b"\n")
    return st.tuples(st.sampled_from([b"", b"event: message_start\n", b"event: error\n"]), payload).map(
        lambda t: t[0] + b"data: " + t[1] + b"\n\n")


@st.composite
def _json_mutation(draw: st.DrawFn, provider: str) -> bytes:
    """A valid body with one JSON value somewhere in one event replaced."""
    leaf = st.one_of(st.integers(-(1 << 70), 1 << 70), st.floats(), st.text(max_size=8), st.none(), st.booleans())
    value = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                         max_leaves=6)

    body = VALID_BODIES[provider]
    sep = b"\n" if provider == "ollama" else b"\n\n"
    events = [e for e in body.split(sep) if e]
    at = draw(st.integers(0, len(events) - 1))
    head, _, payload = events[at].rpartition(b"data: ") if provider != "ollama" else (b"", b"", events[at])
    try:
        obj = json.loads(payload)
    except ValueError:
        return body
    node = obj
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        if not isinstance(node[key], (dict, list)) or not node[key]:
            node[key] = draw(value)
            break
        node = node[key]
    else:
        if isinstance(node, dict):
            node[draw(st.text(max_size=6))] = draw(value)
    new = json.dumps(obj, allow_nan=True).encode()
    events[at] = head + (b"data: " if provider != "ollama" else b"") + new
    return sep.join(events) + sep


def _bodies(provider: str) -> st.SearchStrategy[bytes]:
    valid = st.just(VALID_BODIES[provider])
    return st.one_of(st.binary(max_size=300), valid, valid.flatmap(mutated), _json_mutation(provider),
                     _odd_body(provider))


ADAPTERS = {
    "openai": (OpenAICompatBackend, "openai"),
    "ollama": (OllamaBackend, "ollama"),
    "anthropic": (AnthropicBackend, "anthropic"),
    "gemini": (GeminiBackend, "gemini"),
}


def _adapter_case(provider: str) -> st.SearchStrategy[Any]:
    return st.tuples(
        st.sampled_from(["stream", "stream", "stream", "chat", "models"]),
        st.sampled_from([200, 200, 200, 200, 400, 404, 429, 500, 529]),
        _bodies(provider).flatmap(chunked),
    )


def _check_adapter(provider: str, case: tuple[str, int, list[bytes]]) -> None:
    """One adapter's stream (or whole answer, or model list) over a body: its events
    then one Finished, or a BackendError; within :data:`ADAPTER_DEADLINE`."""
    operation, status, chunks = case
    cls, kind = ADAPTERS[provider]

    async def body():
        for chunk in chunks:
            yield chunk

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body(), headers={"content-type": "text/event-stream"})

    async def run() -> None:
        config = BackendConfig(provider=kind, endpoint="http://fuzz.invalid", api_key="k", models=["m"], max_retries=0)
        async with cls(config, transport=httpx.MockTransport(handle)) as backend:
            params = ChatParams(model="m", messages=HELLO)
            if operation == "stream":
                finished = 0
                async with backend.stream_chat(params) as events:
                    async for event in events:
                        assert finished == 0, "an event after Finished"
                        assert isinstance(event, (TextDelta, ReasoningDelta, Finished)), event
                        finished += isinstance(event, Finished)
                assert finished == 1
            elif operation == "chat":
                assert isinstance(await backend.chat(params), Completion)
            else:
                assert isinstance(await backend.list_models(), list)

    async def bounded() -> None:
        with trio.fail_after(ADAPTER_DEADLINE):
            try:
                await run()
            except LoomError as exc:
                typed_error(exc, BackendError)

    trio.run(bounded)


def _adapter_target(provider: str) -> tuple[str, str, st.SearchStrategy[Any], Any]:
    return (f"backend-{provider}", f"the {provider} adapter's parse of any body (node/backends)",
            _adapter_case(provider), lambda case: _check_adapter(provider, case))


BACKEND_TARGETS = (
    ("backend-framing", "SSE and NDJSON framing (node/backends/_framing.py), any bytes in any chunks",
     _framing_case(), check_framing),
    *(_adapter_target(p) for p in ADAPTERS),
)
