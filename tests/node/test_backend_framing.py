"""SSE and NDJSON framing (sans-IO), the bounded drain, and lenient typed payloads.

The decoders must give the same events whatever the chunking (one chunk, byte by byte,
a CRLF split across chunks, a multi-byte UTF-8 character split across chunks), bound
every line, and keep the old iterators' rules (comments skipped, ``error:`` lines,
an event without its blank line at the body's end). The payload decoder must keep the
adapters' old leniency: odd shapes never raise, they read as absent.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import trio

from loomnet.node.backends import _framing
from loomnet.node.backends._framing import NDJSONDecoder, SSEDecoder, SSEEvent, drain
from loomnet.node.backends._openai_answers import StreamParser, _Delta
from loomnet.node.backends._openai_profiles import PROFILES
from loomnet.node.backends._payloads import lenient, typed
from loomnet.node.backends._base import ReasoningDelta, TextDelta
from loomnet.protocol import BackendError

SSE_BODY = (
    b": OPENROUTER PROCESSING\r\n\r\n"
    b"data: {\"a\": \"h\xc3\xa9llo\"}\r\n\r\n"
    b"event: content_block_delta\ndata: {\"b\": 1}\n\n"
    b"id: 7\nretry: 10\ndata:no-space\n\n"
    b"data: line one\ndata: line two\n\n"
    b"error: {\"message\": \"boom\"}\n\n"
    b"data: [DONE]"  # no blank line: the body's end completes it
)
SSE_EVENTS = [
    SSEEvent("message", b"{\"a\": \"h\xc3\xa9llo\"}"),
    SSEEvent("content_block_delta", b"{\"b\": 1}"),
    SSEEvent("message", b"no-space"),
    SSEEvent("message", b"line one\nline two"),
    SSEEvent("error", b"{\"message\": \"boom\"}"),
    SSEEvent("message", b"[DONE]"),
]


def chunked(body: bytes, size: int) -> list[bytes]:
    return [body[i:i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_sse_events_are_the_same_whatever_the_chunking(size):
    decoder = SSEDecoder()
    events = [e for chunk in chunked(SSE_BODY, size) for e in decoder.feed(chunk)] + decoder.end()
    assert events == SSE_EVENTS


EVENT_CHUNKS = [b"data: a\n\n", b"data:b\r\n\r\n", b"data: c\r\n\n", b"event: e\n", b"data: d\n\n",
                b"data: x\ndata: y\n\n", b": c\n\n", b"data:\n\n", b"data: \n\n", b"data: z\n\r\n",
                b"event: f\ndata: {}\n\n", b"data: g\r\r\n\n", b"data: h\n", b"\n", b"data: i\n\n\n\n"]


def test_sse_one_event_a_chunk_reads_as_the_same_body_byte_by_byte():
    """Each event its own chunk (what a server's flush gives: the fast path) or the same
    bytes one at a time (line by line): the same events."""
    per_event, per_byte = SSEDecoder(), SSEDecoder()
    fast = [e for chunk in EVENT_CHUNKS for e in per_event.feed(chunk)] + per_event.end()
    slow = [e for byte in chunked(b"".join(EVENT_CHUNKS), 1) for e in per_byte.feed(byte)] + per_byte.end()
    assert fast == slow
    assert [e.data for e in fast][:4] == [b"a", b"b", b"c", b"d"] and fast[3].event == "e"


def test_sse_end_of_an_empty_or_finished_body_adds_nothing():
    decoder = SSEDecoder()
    assert decoder.end() == []
    assert decoder.feed(b"data: x\n\n") == [SSEEvent("message", b"x")]
    assert decoder.end() == []


def test_sse_event_name_without_data_is_forgotten_at_the_blank_line():
    decoder = SSEDecoder()
    assert decoder.feed(b"event: ping\n\ndata: x\n\n") == [SSEEvent("message", b"x")]


@pytest.mark.parametrize("decoder", [SSEDecoder, NDJSONDecoder])
def test_a_line_over_the_limit_is_an_error_not_a_buffer(decoder, monkeypatch):
    monkeypatch.setattr(_framing, "MAX_LINE", 100)
    d = decoder()
    d.feed(b"x" * 60)
    with pytest.raises(BackendError, match="over 100 bytes"):
        d.feed(b"x" * 60)


def test_a_long_line_within_the_limit_arrives_whole(monkeypatch):
    monkeypatch.setattr(_framing, "MAX_LINE", 100)
    d = NDJSONDecoder()
    assert d.feed(b"y" * 90) == []
    assert d.feed(b"\n") == [b"y" * 90]


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_ndjson_lines_skip_blanks_and_keep_the_last_line(size):
    body = b"{\"a\": 1}\n\n  \r\n{\"b\": \"\xe2\x82\xac\"}\r\n{\"c\": 3}"
    d = NDJSONDecoder()
    lines = [line for chunk in chunked(body, size) for line in d.feed(chunk)] + d.end()
    assert [msgspec.json.decode(line) for line in lines] == [{"a": 1}, {"b": "€"}, {"c": 3}]


async def chunks_of(*parts: bytes, then: Exception | None = None, hang: bool = False) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if then is not None:
        raise then
    if hang:
        await trio.sleep_forever()


async def test_drain_reads_a_body_to_its_end():
    assert await drain(chunks_of(b"0" * 10, b"1" * 10), limit=20) is True


async def test_drain_gives_up_past_its_byte_limit():
    assert await drain(chunks_of(b"0" * 10, b"1" * 11), limit=20) is False


async def test_drain_gives_up_past_its_time_limit(autojump_clock):
    start = trio.current_time()
    assert await drain(chunks_of(b"x", hang=True), seconds=3.0) is False
    assert trio.current_time() - start == pytest.approx(3.0)


async def test_drain_takes_a_failed_read_as_the_end_of_trying():
    assert await drain(chunks_of(b"x", then=httpx.ReadError("reset"))) is False


# ---------------------------------------------------------------- typed payloads


class Inner(msgspec.Struct):
    text: str | None = None
    n: Any = None


class Outer(msgspec.Struct):
    name: str | None = None
    inner: Inner | None = None
    items: list[Inner] | None = None
    anything: Any = None


OUTER = msgspec.json.Decoder(Outer)


def test_typed_reads_a_well_formed_payload():
    data = b'{"name": "a", "inner": {"text": "t", "n": 1}, "items": [{"text": "u"}], "skipped": [1, 2]}'
    assert typed(OUTER, data) == Outer(name="a", inner=Inner("t", 1), items=[Inner("u")])


@pytest.mark.parametrize(("data", "expected"), [
    (b'{"name": 5, "anything": 5}', Outer(anything=5)),  # a field of the wrong type reads as absent
    (b'{"inner": {"text": 5, "n": "x"}}', Outer(inner=Inner(n="x"))),  # ... also nested
    (b'{"inner": "no object"}', Outer()),
    (b'{"items": [1, {"text": 2, "n": 3}, "x", {"text": "ok"}]}', Outer(items=[Inner(n=3), Inner("ok")])),
    (b'{"items": {"text": "t"}}', Outer()),  # not a list
    (b'{"name": "h\xffllo"}', Outer(name="h\ufffdllo")),  # invalid UTF-8 replaced, as before
    (b'{"anything": NaN}', None),  # json's NaN, as before (checked below)
])
def test_typed_keeps_what_fits_of_an_odd_payload(data, expected):
    got = typed(OUTER, data)
    if expected is None:
        assert got is not None and math.isnan(got.anything)
    else:
        assert got == expected


@pytest.mark.parametrize("data", [b"5", b'"text"', b"[1, 2]", b"null"])
def test_typed_json_that_is_not_an_object_is_none(data):
    assert typed(OUTER, data) is None


@pytest.mark.parametrize("data", [b"", b"{", b"nope", b"[" * 100_000])
def test_typed_not_json_is_a_value_error(data):
    with pytest.raises(ValueError):
        typed(OUTER, data)


def test_lenient_never_raises_for_an_object():
    assert lenient({"inner": {"inner": 1}, "items": None, "name": None}, Outer) == Outer(inner=Inner())


# ---------------------------------------------------------------- the OpenAI parser on odd chunks


def test_every_profiles_reasoning_fields_are_delta_fields():
    fields = set(_Delta.__struct_fields__)
    for name, profile in PROFILES.items():
        assert set(profile.reasoning_fields) <= fields, name


@pytest.mark.parametrize(("chunk", "events"), [
    (b'{"choices": [{"delta": {"content": "a"}}]}', (TextDelta("a"),)),
    (b'{"choices": [{"index": 1, "delta": {"content": "a"}}]}', ()),  # another choice
    (b'{"choices": [{"index": null, "delta": {"content": "a"}}]}', ()),
    (b'{"choices": [5, {"delta": {"content": "a", "reasoning_content": "r"}}]}',
     (ReasoningDelta("r"), TextDelta("a"))),
    (b'{"choices": [{"delta": {"content": 5, "reasoning_content": "r"}}]}', (ReasoningDelta("r"),)),
    (b'{"choices": [{"delta": {"content": ["part"]}}]}', ()),
    (b'{"choices": [{"delta": "odd", "finish_reason": "stop"}]}', ()),
    (b'{"choices": null, "usage": "odd"}', ()),
    (b'{"choices": {"content": "a"}}', ()),
    (b'[1, 2]', ()),
])
def test_openai_parser_reads_odd_chunks_as_before(chunk, events):
    parser = StreamParser(PROFILES["llamacpp"])
    assert parser.feed("message", chunk) == events
    assert parser.chunks == 1


def test_openai_parser_odd_tool_fragments_are_skipped_and_args_objects_kept():
    parser = StreamParser(PROFILES["openai"])
    parser.feed("message", b'{"choices": [{"delta": {"tool_calls": [7, {"index": 0, "id": "c1", '
                           b'"function": {"name": "f", "arguments": "{\\"x\\""}}]}}]}')
    parser.feed("message", b'{"choices": [{"delta": {"tool_calls": [{"index": 0, "function": '
                           b'{"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]}')
    parser.feed("message", b'{"choices": [{"delta": {"tool_calls": [{"id": "c2", "function": '
                           b'{"name": "g", "arguments": {"y": 2}}}]}}]}')
    finished = parser.finished()
    assert [(c.id, c.name, c.arguments) for c in finished.tool_calls] == [
        ("c1", "f", '{"x": 1}'), ("c2", "g", '{"y": 2}')]
    assert finished.finish_reason == "tool_calls"


@pytest.mark.parametrize("data", [b"[DONE]", b" [DONE] "])
def test_openai_parser_done(data):
    parser = StreamParser(PROFILES["openai"])
    assert parser.feed("message", data) == () and parser.done and parser.chunks == 0


def test_openai_parser_not_json_and_error_chunks():
    parser = StreamParser(PROFILES["openai"])
    with pytest.raises(BackendError, match="not JSON"):
        parser.feed("message", b"{oops")
    with pytest.raises(BackendError, match="stream failed: quota"):
        parser.feed("message", b'{"error": {"message": "quota"}}')
    with pytest.raises(BackendError, match="stream failed: late"):
        parser.feed("message", b'{"x_groq": {"error": "late"}}')
    with pytest.raises(BackendError, match="stream failed: not json"):
        parser.feed("error", b"not json")
