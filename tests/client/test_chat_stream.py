"""One chat stream against a scripted executor over memory streams: deltas, receipts booked
on every path, and deadlines that are real deadlines (trio's autojump clock, no sleeps).
"""

import contextlib
import logging
import math

import pytest
import trio

from loomnet.client import Done, ReasoningDelta, TextDelta, ToolCallsDelta, Usage
from loomnet.protocol import (
    AckFrame,
    ChunkFrame,
    ErrorCode,
    NetworkTimeout,
    ProtocolError,
    ReceiptError,
    RemoteError,
    SignedKind,
    SigningKey,
    ToolCall,
    digest,
    open_envelope,
    seal,
)

from ..limits import fail_after
from .fake_executor import FakeExecutor, chat_stream, make_client


@pytest.fixture
async def client(tmp_path):
    client = await make_client(tmp_path)
    try:
        yield client
    finally:
        await client.ledger.aclose()


async def run_chat(client, executor, script, *, collect="events", **options):
    """Run ``script(executor)`` as the executor while the client chats; returns
    (deltas, stream, frames the client sent after the answer)."""
    stream = chat_stream(client, executor, **options)
    deltas, after = [], []

    async def play():
        await executor.read_request()
        await script(executor)
        after.extend(await executor.read_rest())

    error = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(play)
        try:
            await stream.open()
            source = stream.events() if collect == "events" else stream
            async for delta in source:
                deltas.append(delta)
        except Exception as exc:  # raised below, as itself rather than in a group
            error = exc
            nursery.cancel_scope.cancel()
        finally:
            await stream.aclose()
    if error is not None:
        raise error
    return deltas, stream, after


# ----------------------------------------------------------------- the answer


@fail_after(30)
async def test_reasoning_streams_as_its_own_delta_and_progress_yields_nothing(client):
    call = ToolCall(id="c1", name="lookup", arguments='{"q": "colours"}')

    async def script(ex):
        await ex.chunk()  # progress
        await ex.chunk(reasoning="The user wants colours. ")
        await ex.chunk()  # progress
        await ex.chunk(reasoning="Three will do.", text="Red, ")
        await ex.chunk(text="green and blue.", tool_calls=[call])
        await ex.finish()

    executor = FakeExecutor()
    deltas, stream, after = await run_chat(client, executor, script)
    *deltas, done = deltas
    assert deltas == [
        ReasoningDelta("The user wants colours. "),
        ReasoningDelta("Three will do."),
        TextDelta("Red, "),
        TextDelta("green and blue."),
        ToolCallsDelta([call]),
    ]
    result = stream.result
    # the last event: who served, the usage and the verified receipt
    assert isinstance(done, Done) and done.receipt == result.receipt
    assert (done.executor, done.model) == (executor.key.peer_id, "tiny") == (result.executor, result.model)
    assert done.usage == Usage(input_tokens=12, output_tokens=result.receipt.output_tokens,
                               reasoning_tokens=result.receipt.reasoning_tokens,
                               tool_call_tokens=result.receipt.tool_call_tokens, cost=result.receipt.cost)
    assert result.text == "Red, green and blue." and result.reasoning == "The user wants colours. Three will do."
    assert result.tool_calls == [call]
    assert result.receipt.chunks == 5 and result.receipt.reasoning_tokens > 0
    # accepted, booked, counter-signed, and the counter-signature went back
    entry = await client.ledger.get(digest(result.receipt_envelope.payload))
    assert (entry.status, entry.dispute_reason) == ("accepted", None) and entry.ack_payload
    [ack] = after[:1]
    assert isinstance(ack, AckFrame) and ack.envelope.payload == entry.ack_payload


@fail_after(30)
async def test_iterating_the_stream_yields_only_text(client):
    async def script(ex):
        await ex.chunk(reasoning="Thinking about it.")
        await ex.chunk()
        await ex.chunk(text="Hello!")
        await ex.finish()

    deltas, stream, _ = await run_chat(client, FakeExecutor(), script, collect="text")
    assert deltas == ["Hello!"]
    assert stream.result.reasoning == "Thinking about it."


# --------------------------------------------------------------- the receipts


async def booked(client):
    return await client.ledger.entries()


@pytest.mark.parametrize(
    ("receipt_fields", "why"),
    [
        # 10 000 output tokens billed for six bytes of text
        (dict(output_tokens=10_000), "for the visible text"),
        # reasoning billed as streamed, but none was
        (dict(output_tokens=40, reasoning_tokens=30), "streamed reasoning"),
        # hidden reasoning over this client's limit (see the config below)
        (dict(output_tokens=6 + 5_000, hidden_reasoning_tokens=5_000), "limit of 4096"),
    ],
)
@fail_after(30)
async def test_a_receipt_the_client_rejects_is_booked_as_disputed_and_never_acknowledged(tmp_path, receipt_fields, why):
    client = await make_client(tmp_path, max_hidden_reasoning_tokens=4096)

    async def script(ex):
        await ex.chunk(text="Hello!")
        await ex.finish(**receipt_fields)

    executor = FakeExecutor()
    try:
        with pytest.raises(ReceiptError) as info:
            await run_chat(client, executor, script)
        assert info.value.code == ErrorCode.RECEIPT_MISMATCH and why in info.value.message
        [entry] = await booked(client)
        assert entry.status == "disputed" and why in entry.dispute_reason
        assert entry.ack_payload is None
        assert entry.receipt_payload == executor.receipt(**receipt_fields).payload  # the executor's exact bytes
    finally:
        await client.ledger.aclose()


@fail_after(30)
async def test_reasoning_other_than_streamed_is_disputed(client):
    async def script(ex):
        await ex.chunk(reasoning="I think.", text="Yes.")
        ex.sent_reasoning[:] = ["I thought something else."]  # the receipt covers other reasoning
        await ex.finish()

    with pytest.raises(ReceiptError) as info:
        await run_chat(client, FakeExecutor(), script)
    assert info.value.code == ErrorCode.RECEIPT_MISMATCH
    [entry] = await booked(client)
    assert entry.status == "disputed" and "other reasoning" in entry.dispute_reason


@fail_after(30)
async def test_a_receipt_that_does_not_verify_is_logged_and_not_booked(client, caplog):
    impostor = SigningKey(b"i" * 32)

    async def script(ex):
        await ex.chunk(text="Hello!")
        good = ex.receipt()
        receipt, _ = open_envelope(SignedKind.RECEIPT, good)
        from loomnet.protocol import ReceiptFrame

        await ex.send(ReceiptFrame(seal(SignedKind.RECEIPT, receipt, impostor)))

    with caplog.at_level(logging.WARNING, logger="loomnet.client"), pytest.raises(ReceiptError) as info:
        await run_chat(client, FakeExecutor(), script)
    assert info.value.code == ErrorCode.RECEIPT_INVALID
    assert await booked(client) == []
    assert any("not booked" in r.message for r in caplog.records)


@fail_after(30)
async def test_a_partial_receipt_comes_with_the_executors_error(client):
    async def script(ex):
        await ex.chunk(text="one ")
        await ex.chunk(text="two ")
        await ex.fail(ErrorCode.BACKEND_ERROR, "the model's runtime failed", with_receipt=True)

    with pytest.raises(RemoteError) as info:
        await run_chat(client, FakeExecutor(), script)
    error = info.value
    assert error.code == ErrorCode.BACKEND_ERROR and error.retryable
    assert error.result.text == "one two " and error.result.receipt.finish_reason == "error"
    [entry] = await booked(client)
    assert entry.status == "accepted" and entry.receipt_digest == digest(error.result.receipt_envelope.payload)


@fail_after(30)
async def test_a_disputed_partial_receipt_leaves_the_executors_error_to_the_caller(client):
    async def script(ex):
        await ex.chunk(text="one ")
        ex.sent_text[:] = ["one two three "]  # the receipt covers more than was streamed
        await ex.fail(ErrorCode.BACKEND_ERROR, "the model's runtime failed", with_receipt=True)

    with pytest.raises(RemoteError) as info:
        await run_chat(client, FakeExecutor(), script)
    assert info.value.code == ErrorCode.BACKEND_ERROR and info.value.result is None
    assert isinstance(info.value.__cause__, ReceiptError)
    [entry] = await booked(client)
    assert entry.status == "disputed" and "other text" in entry.dispute_reason


# ---------------------------------------------------------------- the deadlines


async def timed_out(client, executor, script) -> tuple[NetworkTimeout, float]:
    """Run a chat that must end in NetworkTimeout; returns it and when it came, in
    seconds after the request was sent."""
    stream = chat_stream(client, executor)
    sent_at = math.nan

    async def play():
        nonlocal sent_at
        await executor.read_request()
        sent_at = trio.current_time()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # the client reset
            await script(executor)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(play)
        try:
            await stream.open()
            with pytest.raises(NetworkTimeout) as info:
                async for delta in stream.events():
                    assert delta is None, "no delta may arrive in these scripts"
        finally:
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert executor.client_end.reset_called  # the executor is told to stop
    return info.value, trio.current_time() - sent_at


@fail_after(100_000)
async def test_a_drip_of_one_byte_every_59_s_trips_the_first_byte_deadline(client, autojump_clock):
    executor = FakeExecutor()

    async def script(ex):
        await ex.drip(ex.raw(ChunkFrame(seq=0, text="Hello there, slowly.")), every=59)

    error, elapsed = await timed_out(client, executor, script)
    assert error.code == ErrorCode.NETWORK_TIMEOUT and error.retryable
    assert "first-byte deadline (60 s)" in error.message
    assert 60 <= elapsed < 61


@fail_after(100_000)
async def test_the_idle_deadline_covers_a_whole_frame_not_each_read(client, autojump_clock):
    executor = FakeExecutor()

    async def script(ex):
        await ex.chunk()  # a first frame, at once
        await ex.drip(ex.raw(ChunkFrame(seq=1, text="and then slowly")), every=29)

    error, elapsed = await timed_out(client, executor, script)
    assert "idle deadline (30 s)" in error.message
    assert 30 <= elapsed < 31


@fail_after(100_000)
async def test_progress_chunks_keep_an_answer_alive_until_the_first_content_deadline(client, autojump_clock):
    executor = FakeExecutor()

    async def script(ex):
        while True:  # a backend thinking silently, for ever (or an executor stalling)
            await trio.sleep(7)
            await ex.chunk()

    error, elapsed = await timed_out(client, executor, script)
    # alive (and accepted as such) past the first-byte and idle deadlines, but an attempt
    # with nothing but progress ends at the first-content deadline, so another is tried
    assert "first-content deadline (300 s" in error.message and error.retryable
    assert 300 <= elapsed < 301
    assert executor.chunks == 300 // 7


@fail_after(100_000)
async def test_progress_chunks_carry_a_slow_thinker_to_its_answer(client, autojump_clock):
    executor = FakeExecutor()

    async def script(ex):
        for _ in range(40):  # 200 s of silence: past the first-byte and the idle deadline
            await trio.sleep(5)
            await ex.chunk()
        # From here the clock runs in real time: the ledger and the token counter work
        # in threads, which an autojump clock would read as everyone asleep.
        autojump_clock.autojump_threshold = math.inf
        autojump_clock.rate = 1.0
        await ex.chunk(text="Hello!")
        await ex.finish()

    deltas, stream, _ = await run_chat(client, executor, script)
    assert deltas[:-1] == [TextDelta("Hello!")] and isinstance(deltas[-1], Done)
    assert stream.result.receipt.chunks == 41
    assert (await client.ledger.get(digest(stream.result.receipt_envelope.payload))).status == "accepted"


@fail_after(100_000)
async def test_time_the_caller_spends_between_deltas_is_not_the_executors(client, autojump_clock):
    executor = FakeExecutor()

    async def play():
        await executor.read_request()
        await executor.chunk(text="one ")
        await executor.chunk(text="two ")
        await trio.sleep_forever()

    stream = chat_stream(client, executor)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(play)
        await stream.open()
        events = stream.events()
        try:
            assert await events.__anext__() == TextDelta("one ")
            await trio.sleep(45)  # longer than the idle deadline: a slow caller, not a slow executor
            assert await events.__anext__() == TextDelta("two ")  # already here: no timeout
            with pytest.raises(NetworkTimeout, match="idle deadline"):
                await events.__anext__()
        finally:
            await events.aclose()
            await stream.aclose()
            nursery.cancel_scope.cancel()


@pytest.fixture
async def out_of_time(tmp_path):
    """A client whose total deadline passes at once. (Its ledger closes here, outside the
    test's clock limit: an autojump clock reads a worker thread as everyone asleep.)"""
    client = await make_client(tmp_path, total_timeout=0.0)
    try:
        yield client
    finally:
        await client.ledger.aclose()


@fail_after(100_000)
async def test_the_total_deadline_bounds_the_whole_request(out_of_time, autojump_clock):
    stream = chat_stream(out_of_time, FakeExecutor())
    try:
        with pytest.raises(NetworkTimeout, match="deadline"):
            await stream.open()
            async for _ in stream.events():
                pass
    finally:
        await stream.aclose()


@pytest.fixture
async def small_answers(tmp_path):
    client = await make_client(tmp_path, max_answer_bytes=4096)
    try:
        yield client
    finally:
        await client.ledger.aclose()


@pytest.mark.parametrize("part", ["text", "reasoning", "tool_calls"])
@fail_after(60)
async def test_an_answer_over_the_clients_byte_bound_ends_the_stream(small_answers, part):
    # a hostile executor may stream without end until the total deadline; the client
    # holds at most max_answer_bytes of it, whatever part it comes in
    async def script(ex):
        for i in range(64):
            piece = "x" * 100
            if part == "tool_calls":
                await ex.chunk(tool_calls=[ToolCall(id=f"c{i}", name="f", arguments='{"a": "' + piece + '"}')])
            else:
                await ex.chunk(**{part: piece})
        await ex.finish()

    with pytest.raises(ProtocolError) as info:
        await run_chat(small_answers, FakeExecutor(), script)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE and "max_answer_bytes" in info.value.message


@fail_after(60)
async def test_progress_chunks_are_counted_not_kept(client):
    async def script(ex):
        for _ in range(500):
            await ex.chunk()
        await ex.chunk(text="Hi")
        await ex.finish()

    deltas, stream, _ = await run_chat(client, FakeExecutor(), script)
    assert stream.result.text == "Hi" and stream.result.receipt.chunks == 501
    assert stream._answer._texts == ["Hi"]  # 500 progress chunks cost a counter, not a list entry each
