"""Hostile clients on session streams (``/loomnet/infer/2``): the bounds a one-request
stream had (one deadline per frame, the stream ends when a frame is not whole in time,
every byte held charged to the budgets) must hold on a session too (review of issue 9).

The real ``InferenceServer`` over in-memory streams, under trio's autojump clock.
"""

from __future__ import annotations


import pytest
import trio
import trio.testing

from loomnet.protocol import (
    NEED_DATA,
    EndOfStream,
    ErrorCode,
    ProtocolError,
    ErrorFrame,
    InferenceConnection,
    ReceiptFrame,
    RequestFrame,
    Role,
    SignedKind,
    encode_frame,
    encode_frame_body,
    seal,
)

from .memory_stream import stream_pair
from .server_harness import HELLO, Finished, Harness, ScriptedBackend, TextDelta, events, warm_tokens


@pytest.fixture(autouse=True)
def _tokens():
    warm_tokens()


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0.5)


async def start(tmp_path, backend=None, **settings) -> Harness:
    backend = backend or ScriptedBackend(events(TextDelta("Hel"), TextDelta("lo"), Finished(finish_reason="stop")))
    return await Harness.start(tmp_path, [backend], ledger=":memory:", **settings)


async def test_a_session_that_never_sends_a_request_ends_after_the_request_deadline(tmp_path, autojump_clock):
    # On a one-request stream, a peer that sends nothing is dropped after
    # request-read-timeout. On a session the REQUEST_TIMEOUT error frame took the
    # machine IDLE -> IDLE, so the handler read again with a fresh deadline, forever:
    # a peer held its stream slots (and a handler task each) for free, for ever.
    harness = await start(tmp_path, request_read_timeout=10.0, session_idle_timeout=60.0)
    client, executor = harness.session()
    done = trio.Event()

    async def serve():
        await harness.server.handle(executor)
        done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with trio.move_on_after(300):
                await done.wait()
            nursery.cancel_scope.cancel()
        assert done.is_set(), "the handler still serves a session that sent nothing for 300 s"
        assert harness.server.statistics().sessions_open == 0
    finally:
        await harness.aclose()


async def test_a_request_not_whole_in_time_ends_the_session_and_holds_no_uncharged_bytes(tmp_path, autojump_clock):
    # A header announcing a large frame, most of its body, then nothing. After
    # request-read-timeout the intake gives the charge back (buffered_bytes 0) and
    # answers REQUEST_TIMEOUT, but the session went on: the state machine's decoder
    # still held the partial frame, charged to nobody, and every later read started a
    # new deadline and a new (misread) header. One peer could hold ~1 MiB per stream
    # past max-request-bytes, and drip a frame for ever.
    harness = await start(tmp_path, request_read_timeout=10.0, session_idle_timeout=60.0)
    client, executor = harness.session()
    done = trio.Event()
    announced = 1 << 20

    async def serve():
        await harness.server.handle(executor)
        done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.send_all(announced.to_bytes(4, "big") + b"\x00" * (announced - 1), timeout=5)
            await trio.sleep(5)
            assert harness.server.intake.statistics().buffered_bytes == announced + 3  # charged while it arrives
            await trio.sleep(10)  # past request-read-timeout
            # the charge was given back, yet the handler still holds the partial frame
            charged = harness.server.intake.statistics().buffered_bytes
            with trio.move_on_after(120):
                await done.wait()
            nursery.cancel_scope.cancel()
        assert done.is_set() or charged > 0, "the session holds a partial frame charged to no budget"
        assert done.is_set(), "a request that did not arrive whole in time did not end the session"
    finally:
        await harness.aclose()


async def test_a_request_pipelined_during_the_answer_ends_the_session(tmp_path, autojump_clock):
    # The client sends its next request while the answer streams. The executor's
    # watcher (wait_client_left) reads one byte of it, answers UNEXPECTED_FRAME, and
    # the error frame took the session back to IDLE: the handler went on reading the
    # rest of that request with its first byte gone, its length prefix misread.
    # docs/protocol.md: a protocol violation ends the session.
    slow = ScriptedBackend(events(TextDelta("a"), 2.0, TextDelta("b"), Finished(finish_reason="stop")))
    harness = await start(tmp_path, slow, request_read_timeout=10.0)
    client, executor = harness.session()
    conn = InferenceConnection(Role.CLIENT, session=True)
    done = trio.Event()

    async def serve():
        await harness.server.handle(executor)
        done.set()

    async def next_event():
        while (event := conn.next_event()) is NEED_DATA:
            conn.receive_data(await client.receive_some(timeout=30))
        return event

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.send_all(conn.send(RequestFrame(seal(SignedKind.REQUEST, harness.request("m1", HELLO), harness.client_key))), timeout=5)
            await next_event()  # the first chunk
            second = RequestFrame(seal(SignedKind.REQUEST, harness.request("m1", HELLO), harness.client_key))
            await client.send_all(encode_frame(encode_frame_body(second)), timeout=5)  # pipelined
            error = await next_event()
            assert isinstance(error, ErrorFrame) and error.code == ErrorCode.UNEXPECTED_FRAME
            with trio.move_on_after(60):
                await done.wait()
            nursery.cancel_scope.cancel()
        assert done.is_set(), "the session went on after a protocol violation, a byte of the stream lost"
    finally:
        await harness.aclose()


async def _refused_then_served(harness: Harness, client, conn, frame: bytes, refuse) -> tuple[ErrorFrame, list]:
    """Send ``frame``'s first half, let ``refuse()`` make the executor refuse it, then
    send the rest (it was merely late); returns the refusal and what came after it."""
    await client.send_all(frame[: len(frame) // 2], timeout=5)
    await refuse()

    async def next_event():
        while (event := conn.next_event()) is NEED_DATA:
            conn.receive_data(await client.receive_some(timeout=30))
        return event

    refusal = await next_event()
    await client.send_all(frame[len(frame) // 2:], timeout=5)  # the rest, late
    after: list = []
    with trio.move_on_after(30):
        try:
            while not isinstance(event := await next_event(), EndOfStream):
                after.append(event)
        except ProtocolError as exc:  # e.g. a chunk while the client's machine is idle
            after.append(exc)
    await trio.sleep(5)  # whatever the executor does with the rest, it has done
    return refusal, after


async def test_a_request_refused_for_its_deadline_is_never_served_afterwards(tmp_path, autojump_clock):
    # A client on a slow link: its request is not whole within request-read-timeout and
    # the executor answers REQUEST_TIMEOUT. The session went on with the partial frame in
    # the decoder; the rest arrived, the frame completed, and the executor generated,
    # billed (a receipt in its ledger) and streamed an answer to a request it had told the
    # client it refused, on a session the client now holds as idle: the client's next
    # request there reads that answer as its own.
    harness = await start(tmp_path, request_read_timeout=10.0)
    client, executor = harness.session()
    conn = InferenceConnection(Role.CLIENT, session=True)
    signed = RequestFrame(seal(SignedKind.REQUEST, harness.request("m1", HELLO), harness.client_key))
    frame = conn.send(signed)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.server.handle, executor)
            refusal, after = await _refused_then_served(harness, client, conn, frame, lambda: trio.sleep(11))
            nursery.cancel_scope.cancel()
        assert isinstance(refusal, ErrorFrame) and refusal.code == ErrorCode.REQUEST_TIMEOUT
        assert after == [], f"after the refusal the executor sent {after!r}"
        assert harness.server.statistics().served == 0, "a request refused as late was served (and billed) after all"
        assert await harness.server.ledger.entries() == []
    finally:
        await harness.aclose()


async def test_a_request_evicted_from_the_budget_is_never_served_afterwards(tmp_path, autojump_clock):
    # The same through the byte budget: another peer's bytes fill max-request-bytes, the
    # oldest unfinished frame (this client's) is dropped with PEER_LIMIT (retryable, so
    # the client tries again: a second run), and the rest of the dropped frame completes
    # it in the session's decoder: the executor serves it after all.
    limit = (1 << 20) + 4
    harness = await start(tmp_path, request_read_timeout=10.0, max_request_bytes=limit, max_request_bytes_per_peer=limit)
    client, executor = harness.session()
    flooder, flooded = stream_pair("12D3KooWFlooderFlooderFlooderFlooderFlooderFlood", harness.executor_key.peer_id)
    conn = InferenceConnection(Role.CLIENT, session=True)
    signed = RequestFrame(seal(SignedKind.REQUEST, harness.request("m1", [HELLO[0]] * 40), harness.client_key))
    frame = conn.send(signed)

    async def flood():
        await flooder.send_all((1 << 20).to_bytes(4, "big") + b"\x00" * ((1 << 20) - 1), timeout=5)
        await trio.sleep(1)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.server.handle, executor)
            nursery.start_soon(harness.server.handle, flooded)
            refusal, after = await _refused_then_served(harness, client, conn, frame, flood)
            nursery.cancel_scope.cancel()
        assert isinstance(refusal, ErrorFrame) and refusal.code == ErrorCode.PEER_LIMIT
        assert harness.server.intake.statistics().evicted >= 1
        assert after == [], f"after the refusal the executor sent {after!r}"
        assert harness.server.statistics().served == 0, "a request dropped with PEER_LIMIT was served (and billed) after all"
        assert await harness.server.ledger.entries() == []
    finally:
        await harness.aclose()


# ------------------------------------------------------------------ attacks that held


async def test_an_ack_and_the_next_request_in_one_write_are_both_taken_and_a_replay_across_protocols_is_refused(
    tmp_path, autojump_clock
):
    from loomnet.protocol import AckFrame, ReceiptAck, digest

    harness = await start(tmp_path)
    client, executor = harness.session()
    conn = InferenceConnection(Role.CLIENT, session=True)

    async def answer(c, s):
        while True:
            while (event := c.next_event()) is NEED_DATA:
                c.receive_data(await s.receive_some(timeout=30))
            if isinstance(event, (ReceiptFrame, ErrorFrame)):
                return event

    first = RequestFrame(seal(SignedKind.REQUEST, harness.request("m1", HELLO), harness.client_key))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.server.handle, executor)
            await client.send_all(conn.send(first), timeout=5)
            receipt = await answer(conn, client)
            assert isinstance(receipt, ReceiptFrame)
            ack = ReceiptAck(receipt_digest=digest(receipt.envelope.payload), accepted_at=1.0, client_output_tokens=2)
            data = conn.send(AckFrame(seal(SignedKind.RECEIPT_ACK, ack, harness.client_key)))
            data += conn.send(RequestFrame(seal(SignedKind.REQUEST, harness.request("m1", HELLO), harness.client_key)))
            await client.send_all(data, timeout=5)  # one write
            assert isinstance(await answer(conn, client), ReceiptFrame)
            # the first request again, on a one-request stream: the replay guard is shared
            single, single_executor = stream_pair(harness.client_key.peer_id, harness.executor_key.peer_id)
            nursery.start_soon(harness.server.handle, single_executor)
            one = InferenceConnection(Role.CLIENT)
            await single.send_all(one.send(first), timeout=5)
            replayed = await answer(one, single)
            assert isinstance(replayed, ErrorFrame) and replayed.code == ErrorCode.REPLAYED_NONCE
            await client.close()
        assert harness.server.statistics().served == 2
        with trio.fail_after(10):
            while len(await harness.server.ledger.entries(status="acknowledged")) < 1:
                await trio.sleep(0.1)
    finally:
        await harness.aclose()
