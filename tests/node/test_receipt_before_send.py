"""The executor writes a receipt to its ledger *before* it sends it, on every path.

The promise behind ``kill -9`` safety (issue 13): any receipt a client holds is in the
executor's ledger, because the write (WAL, ``synchronous=FULL``) completes before the
frame carrying the receipt leaves. ``tests/e2e/test_kill9.py`` shows it end to end, but
only a kill that lands between send and write catches a reordering, which it did one
run in three. Here the executor's stream itself checks, deterministically: whenever the
server sends a frame carrying a receipt (a ``ReceiptFrame``, or an ``ErrorFrame`` with
the partial answer's receipt), the receipt's digest must already be in the executor's
ledger (a real SQLite file), at that moment, before the bytes are handed to the stream.

Paths: a whole answer (``/loomnet/infer/1``), a session's answers (``/loomnet/infer/2``),
a cached answer, a backend failing after its first chunk (``BACKEND_ERROR`` with a
receipt) and a drain that runs out mid-answer (``SHUTTING_DOWN`` with a receipt). A
client that left (``client_gone``) is sent nothing, so it has no path here.
"""

from __future__ import annotations

import math

import trio
from loomnet.client import Ledger
from loomnet.node._response_cache import CacheTerms
from loomnet.node.config import ModelTerms
from loomnet.protocol import (
    NEED_DATA,
    BackendError,
    ChatMessage,
    ChunkFrame,
    ErrorCode,
    ErrorFrame,
    FrameDecoder,
    InferenceConnection,
    ReceiptFrame,
    Role,
    decode_frame,
    digest,
)

from ..limits import fail_after
from .memory_stream import MemoryP2PStream, stream_pair
from .server_harness import (
    ClientEnd,
    Finished,
    Harness,
    ScriptedBackend,
    TextDelta,
    Usage,
    events,
    next_frame,
)

USAGE = Usage(input_tokens=11, output_tokens=4, source="backend")


class Watched:
    """The executor's end of a stream that, before passing bytes on, decodes the frames
    the server writes and checks each receipt among them against ``ledger``: ``seen``
    lists ``(frame kind, receipt digest, in the ledger already)``."""

    def __init__(self, inner: MemoryP2PStream, ledger: Ledger) -> None:
        self._inner = inner
        self._ledger = ledger
        self._decoder = FrameDecoder()
        self.seen: list[tuple[str, bytes, bool]] = []

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    async def send_all(self, data: bytes, *, timeout: float) -> None:
        self._decoder.receive_data(data)
        while (body := self._decoder.next_frame()) is not NEED_DATA:
            frame = decode_frame(body)
            envelope = None
            if isinstance(frame, ReceiptFrame):
                envelope = frame.envelope
            elif isinstance(frame, ErrorFrame) and frame.receipt is not None:
                envelope = frame.receipt
            if envelope is not None:
                receipt_digest = digest(envelope.payload)
                booked = await self._ledger.get(receipt_digest) is not None
                self.seen.append((type(frame).__name__, receipt_digest, booked))
        await self._inner.send_all(data, timeout=timeout)


async def ask(harness: Harness, *, until_chunk=None, **fields) -> tuple[Watched, ClientEnd]:
    """One request on ``/loomnet/infer/1`` through a ``Watched`` stream; ``until_chunk``
    is called once the first chunk arrived (then the answer is read on to its end)."""
    client_stream, executor_stream = stream_pair(harness.client_key.peer_id, harness.executor_key.peer_id)
    watched = Watched(executor_stream, harness.server.ledger)
    end = ClientEnd(client_stream, harness.client_key)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.server.handle, watched)
        await end.send_request(harness.request("m1", **fields))
        if until_chunk is not None:
            await end.read_answer(until=lambda a: bool(a.chunks))
            until_chunk()
        await end.read_answer()
    return watched, end


def booked_first(watched: Watched, kind: str, count: int = 1) -> None:
    assert [(k, booked) for k, _, booked in watched.seen] == [(kind, True)] * count, watched.seen


@fail_after(30)
async def test_a_whole_answers_receipt_is_in_the_ledger_before_it_is_sent(tmp_path):
    harness = await Harness.start(tmp_path, [ScriptedBackend(events(TextDelta("Hello"), Finished(finish_reason="stop")))])
    try:
        watched, end = await ask(harness)
    finally:
        await harness.aclose()
    assert end.answer.receipt is not None and end.answer.text == "Hello"
    booked_first(watched, "ReceiptFrame")
    assert watched.seen[0][1] == digest(end.answer.receipt_envelope.payload)


@fail_after(30)
async def test_a_cached_answers_receipt_is_in_the_ledger_before_it_is_sent(tmp_path):
    backend = ScriptedBackend(events(TextDelta("Hello"), Finished(finish_reason="stop", usage=USAGE)))
    models = [ModelTerms(name="m1", price_in=1.5, price_out=3.0, cache=CacheTerms())]
    harness = await Harness.start(tmp_path, [backend], models=models)
    try:
        first, _ = await ask(harness, temperature=0.0, seed=7)
        second, end = await ask(harness, temperature=0.0, seed=7)
    finally:
        await harness.aclose()
    assert backend.entered == 1 and end.answer.receipt is not None and end.answer.receipt.cached
    booked_first(first, "ReceiptFrame")
    booked_first(second, "ReceiptFrame")


@fail_after(30)
async def test_a_partial_receipt_on_a_backend_error_is_in_the_ledger_before_it_is_sent(tmp_path):
    async def script(params):
        yield TextDelta("one two ")
        raise BackendError("the runtime crashed", code=ErrorCode.BACKEND_ERROR, retryable=True)

    harness = await Harness.start(tmp_path, [ScriptedBackend(script)])
    try:
        watched, end = await ask(harness)
    finally:
        await harness.aclose()
    assert end.answer.error is not None and end.answer.error.code == ErrorCode.BACKEND_ERROR
    assert end.answer.error_receipt is not None and end.answer.text == "one two "
    booked_first(watched, "ErrorFrame")


@fail_after(30)
async def test_a_partial_receipt_on_shutting_down_is_in_the_ledger_before_it_is_sent(tmp_path):
    harness = await Harness.start(tmp_path, [ScriptedBackend(events(TextDelta("one "), 3600.0, TextDelta("never")))])
    try:  # the drain runs out of time mid-answer: the answer ends with SHUTTING_DOWN and a receipt
        watched, end = await ask(harness, until_chunk=harness.server.abort.set)
    finally:
        await harness.aclose()
    assert end.answer.error is not None and end.answer.error.code == ErrorCode.SHUTTING_DOWN
    assert end.answer.error_receipt is not None and end.answer.text == "one "
    booked_first(watched, "ErrorFrame")


@fail_after(30)
async def test_each_receipt_of_a_session_is_in_the_ledger_before_it_is_sent(tmp_path):
    async def script(params):
        if params.messages[-1].content == "fail":
            yield TextDelta("half ")
            raise BackendError("the runtime crashed", code=ErrorCode.BACKEND_ERROR, retryable=True)
        yield TextDelta("Hello")
        yield Finished(finish_reason="stop")

    harness = await Harness.start(tmp_path, [ScriptedBackend(script)])
    client, executor = harness.session()
    watched = Watched(executor, harness.server.ledger)
    conn = InferenceConnection(Role.CLIENT, session=True)
    kinds = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.server.handle, watched)
            for text in ("hi", "fail", "hi"):
                await client.send_all(harness.request_frame(conn, messages=[ChatMessage("user", text)]), timeout=10)
                while not isinstance(event := await next_frame(client, conn, timeout=math.inf), (ReceiptFrame, ErrorFrame)):
                    assert isinstance(event, ChunkFrame)
                kinds.append(type(event).__name__)
                # no ack: the next request ends the wait for it
            await client.close()
    finally:
        await harness.aclose()
    assert kinds == ["ReceiptFrame", "ErrorFrame", "ReceiptFrame"]
    assert [(k, booked) for k, _, booked in watched.seen] == [(k, True) for k in kinds], watched.seen
