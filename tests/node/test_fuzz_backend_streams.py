"""Fuzzing what a runtime sends an executor: the SSE and NDJSON framing, and each
adapter's whole parse of a body (OpenAI-compatible SSE, Ollama NDJSON, Anthropic's
named events, Gemini SSE; streamed answers, whole answers, model lists and error
bodies) over random bytes and valid bodies with one JSON value replaced, cut into
arbitrary chunks. Every body gives events and one ``Finished``, or a ``BackendError``.
Strategies and properties: ``fuzz/backend_targets.py``; longer runs: ``fuzz/run.py``.

The bodies travel over ``httpx.MockTransport``: what is fuzzed is the parsing, and a
loopback server per example would cost a hundred times more for nothing it tests.
"""

from __future__ import annotations

import time

import httpx
import pytest
from hypothesis import given

from fuzz.backend_targets import ADAPTERS, HELLO
from fuzz.targets import CI, TARGETS
from loomnet.node.backends._base import ChatParams
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends._framing import LineSplitter, NDJSONDecoder, SSEDecoder
from loomnet.node.backends._http import request_json
from loomnet.protocol import BackendError, ErrorCode


@CI
@given(TARGETS["backend-framing"].strategy)
def test_sse_and_ndjson_framing_from_any_bytes_in_any_chunks(case):
    TARGETS["backend-framing"].check(case)


@pytest.mark.parametrize("provider", sorted(ADAPTERS))
def test_each_adapter_parses_any_body_into_events_or_a_backend_error(provider):
    target = TARGETS[f"backend-{provider}"]
    CI(given(target.strategy)(target.check))()


# the shapes the fuzzer found, kept as plain examples


async def _stream(provider: str, body: bytes, operation: str = "stream") -> None:
    cls, kind = ADAPTERS[provider]
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    config = BackendConfig(provider=kind, endpoint="http://fuzz.invalid", api_key="k", models=["m"], max_retries=0)
    async with cls(config, transport=transport) as backend:
        params = ChatParams(model="m", messages=HELLO)
        if operation == "chat":
            await backend.chat(params)
            return
        async with backend.stream_chat(params) as events:
            async for _ in events:
                pass


@pytest.mark.parametrize("operation", ["stream", "chat"])
@pytest.mark.parametrize("provider", sorted(ADAPTERS))
async def test_json_nested_thousands_deep_from_a_runtime_is_a_backend_error(provider, operation):
    # found by fuzz/run.py: json.loads and msgspec raise RecursionError, not ValueError,
    # for deep nesting, and every adapter caught only ValueError around a runtime's JSON
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    body = deep + b"\n" if provider == "ollama" or operation == "chat" else b"data: " + deep + b"\n\n"
    with pytest.raises(BackendError) as info:
        await _stream(provider, body, operation)
    assert info.value.code in ErrorCode


def test_tool_arguments_nested_thousands_deep_from_a_peer_are_a_bad_request():
    # the executor parses the peer's tool arguments and schemas (request_json): deep
    # nesting raised RecursionError there, not the BAD_REQUEST a peer's bad JSON gets
    with pytest.raises(BackendError) as info:
        request_json("[" * 100_000, "the arguments of tool call 'f'")
    assert info.value.code == ErrorCode.BAD_REQUEST and "not valid JSON" in info.value.peer_message


def test_an_event_of_data_lines_without_its_blank_line_is_refused_at_the_cap():
    decoder = SSEDecoder(max_line=1000)
    with pytest.raises(BackendError) as info:
        for _ in range(200):  # each line short, the event unbounded before
            decoder.feed(b"data: " + b"x" * 50 + b"\n")
            assert decoder.held() <= 1000
    assert info.value.code == ErrorCode.BACKEND_ERROR


@pytest.mark.parametrize("make", [LineSplitter, NDJSONDecoder, SSEDecoder])
def test_a_long_line_trickled_in_small_pieces_costs_linear_time(make):
    # 2 MiB in 100-byte pieces: joining the pending bytes to every piece copied ~20 GB
    # (minutes of CPU); appending to a buffer copies each byte about once (milliseconds).
    # 10 s is a bound no machine misses with the fix and none meets without it.
    decoder = make()
    piece = b"x" * 100
    started = time.monotonic()
    for _ in range(20_000):
        assert decoder.feed(piece) == []
    assert time.monotonic() - started < 10.0
    assert decoder.held() == 2_000_000
