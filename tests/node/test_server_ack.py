"""The wait for a client's counter-signature is one deadline, and its bytes are charged.

Review of issue 7 (§0b, §3): after its receipt a peer announced a 1 MiB acknowledgement
frame, sent ~500 KB of it and then dripped one byte a second. The ack wait applied
``ack-timeout`` to each read, so the handler, its stream slot and the bytes (charged to
no budget) were held as long as the drip went on. The real ``InferenceServer`` over
in-memory streams, under a mock clock, so every time below is exact.
"""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from loomnet.protocol import (
    MAX_FRAME_SIZE,
    AckFrame,
    ReceiptAck,
    ReceiptFrame,
    SignedKind,
    digest,
    seal,
)

from ..limits import fail_after
from .memory_stream import stream_pair
from .server_harness import ClientEnd, Finished, Harness, ScriptedBackend, TextDelta, Usage, events, warm_tokens

ACK_TIMEOUT = 5.0


@pytest.fixture
def clock():
    warm_tokens()
    return trio.testing.MockClock(autojump_threshold=0.25)


async def served_until_receipt(nursery: trio.Nursery, tmp_path):
    """A server answering one request; returns (harness, client end, receipt frame, done event)."""
    usage = Usage(input_tokens=5, output_tokens=2, source="backend")
    backend = ScriptedBackend(events(TextDelta("Hello!"), Finished(finish_reason="stop", usage=usage)))
    harness = await Harness.start(tmp_path, [backend], ledger=":memory:", ack_timeout=ACK_TIMEOUT)
    client_stream, executor_stream = stream_pair(harness.client_key.peer_id, harness.executor_key.peer_id)
    end = ClientEnd(client_stream, harness.client_key)
    done = trio.Event()

    async def serve() -> None:
        await harness.server.handle(executor_stream)
        done.set()

    nursery.start_soon(serve)
    await end.send_request(harness.request("m1"))
    while not isinstance(frame := await end.next_frame(), ReceiptFrame):
        pass
    return harness, end, frame, done


def ack_bytes(end: ClientEnd, receipt: ReceiptFrame) -> bytes:
    ack = ReceiptAck(receipt_digest=digest(receipt.envelope.payload), accepted_at=time.time(), client_output_tokens=2)
    return end.conn.send(AckFrame(seal(SignedKind.RECEIPT_ACK, ack, end.key)))


@fail_after(600)
async def test_an_ack_dripped_byte_by_byte_meets_one_deadline(tmp_path, clock):
    async with trio.open_nursery() as nursery:
        harness, end, receipt, done = await served_until_receipt(nursery, tmp_path)
        got_receipt = trio.current_time()
        data = ack_bytes(end, receipt)
        held = []

        async def drip() -> None:
            for i in range(len(data)):  # one byte a second: each read is "in time"
                await end.stream.send_all(data[i : i + 1], timeout=5)
                await trio.sleep(1.0)
                held.append(harness.server.intake.statistics().buffered_bytes)

        nursery.start_soon(drip)
        await done.wait()
        released_after = trio.current_time() - got_receipt
        nursery.cancel_scope.cancel()
    assert released_after == pytest.approx(ACK_TIMEOUT)  # per read, it was ~len(data) s
    assert len(data) > 100 and max(held) >= 4  # the bytes were charged while they dripped
    stats = harness.server.intake.statistics()
    assert stats.timeouts == 1 and stats.buffered_bytes == 0
    row = await harness.server.ledger.get(digest(receipt.envelope.payload))
    assert row is not None and row.ack_payload is None  # too late: not booked


@fail_after(600)
async def test_a_huge_ack_header_is_refused_before_its_body(tmp_path, clock):
    async with trio.open_nursery() as nursery:
        harness, end, receipt, done = await served_until_receipt(nursery, tmp_path)
        got_receipt = trio.current_time()
        # the review's input: a 1 MiB ack frame announced, ~500 KB of it sent at once
        await end.stream.send_all(MAX_FRAME_SIZE.to_bytes(4, "big") + b"\x00" * 512_000, timeout=5)
        await done.wait()
        released_after = trio.current_time() - got_receipt
    assert released_after < 1.0
    assert harness.server.intake.statistics().peak_bytes < 1000  # the request's bytes, not the ack's


@fail_after(600)
async def test_an_honest_ack_is_still_booked(tmp_path, clock):
    async with trio.open_nursery() as nursery:
        harness, end, receipt, done = await served_until_receipt(nursery, tmp_path)
        await end.stream.send_all(ack_bytes(end, receipt), timeout=5)
        await end.stream.close()
        await done.wait()
    row = await harness.server.ledger.get(digest(receipt.envelope.payload))
    assert row is not None and row.ack_payload is not None
