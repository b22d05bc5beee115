"""Slow readers: a peer that asks for an answer and never reads it, and one that reads it
one byte a second, hold a bounded amount of the executor's memory for a bounded time,
and the generation behind them is stopped; an honest client is served meanwhile.

What bounds them, end to end over real py-libp2p on 127.0.0.1 (``node/_relay.py``):

- memory: a write goes no further than the reader's yamux flow-control window (what the
  peer grants; here ~2 MiB went out before the cut, into the peer's buffers, not the
  executor's); past it the write waits. While the sender waits, the pump holds at most
  one batch (``_MAX_DELTAS_PER_CHUNK`` deltas or ``_MAX_CHARS_PER_CHUNK`` characters)
  and then waits too, so the backend is read no further: a stream costs the executor
  one frame being written plus one batch, whatever the answer's length (asserted:
  what the backend produced less what was written whole is at most ``IN_HAND``);
- time: every chunk frame must be written within ``send_timeout`` (the executor's
  ``ack-timeout``). A peer that reads nothing lets the window shut; one reading a byte
  a second opens it a byte a second (yamux gives back what is read), far too slow for
  a frame. Either way the write runs out of time, the relay ends with ``ClientGone``,
  the backend's stream is closed (the generation stops) and the executor books a
  ``client_gone`` receipt for the frames that were written whole.

The flood version, an executor process's RSS under many such peers and a request
flood while an honest client keeps being served, is ``test_slow_peer_flood_leaves_rss_flat``
below (``LOOMNET_FLOOD_SECONDS=60`` for the long run).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio
from loomnet.node.backends._base import ChatParams
from loomnet.protocol import ChatMessage, LoomError, Receipt

from ..node.server_harness import Finished, TextDelta, Usage
from .bad_input_kit import (
    HI,
    Hostile,
    Instant,
    framed,
    start_executor,
    start_honest,
    wait_until,
)

pytestmark = pytest.mark.integration

#: the executor's ``ack-timeout`` here: the deadline of each chunk frame's write, seconds
SEND_TIMEOUT = 2.0
#: what a flooded answer is made of: 1 KiB deltas, without end
DELTA = "lorem ipsum " * 85 + "dolor"  # 1 025 characters
FLOOD = [ChatMessage("user", "flood me")]
#: what the executor may have taken from the backend and not yet written whole: one
#: frame being written (a full batch, 64 Ki characters at most) and one batch pending
IN_HAND = 2 * 64 * 1024 + 32 * len(DELTA)


class Firehose(Instant):
    """An instant backend that, asked to ``flood``, streams ``DELTA`` without end
    (``produced``: characters yielded; ``entered``/``exited``: generations begun and
    stopped); any other prompt gets ``Hello.``."""

    def __init__(self) -> None:
        super().__init__()
        self.produced = 0
        plain = self.script

        async def script(params: ChatParams):
            if params.messages[-1].content != FLOOD[0].content:
                async for event in plain(params):
                    yield event
                return
            while True:
                self.produced += len(DELTA)
                yield TextDelta(DELTA)
                await trio.lowlevel.checkpoint()
            yield Finished(finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1))  # pragma: no cover

        self.script = script


async def never_reads(stream) -> None:
    await trio.sleep_forever()


async def reads_a_byte_a_second(stream) -> None:
    while await stream.receive_some(1, timeout=30):
        await trio.sleep(1.0)


@pytest.mark.parametrize("reader", [never_reads, reads_a_byte_a_second], ids=["never-reads", "one-byte-a-second"])
async def test_a_slow_reader_holds_bounded_memory_for_a_bounded_time_and_its_generation_stops(
    nursery, tmp_path, reader
):
    backend = Firehose()
    executor = await start_executor(nursery, tmp_path, backend, ack_timeout=SEND_TIMEOUT, capacity=2)
    honest = await start_honest(nursery, tmp_path, executor)
    booked: list[str] = []  # the text each receipt of a flooded answer was booked for
    book = executor.server._book

    async def spy(**booking):
        if booking["output"].text.startswith(DELTA):
            booked.append(booking["output"].text)
        return await book(**booking)

    executor.server._book = spy
    hostile = await Hostile.start(nursery, executor)
    stream = await hostile.open()
    await stream.send_all(framed(hostile.sealed(hostile.request(messages=FLOOD))), timeout=5)
    reading = trio.CancelScope()

    async def read() -> None:
        with reading:
            try:
                await reader(stream)
            except LoomError:
                pass  # the executor cut the stream

    nursery.start_soon(read)
    started = trio.current_time()
    await wait_until(lambda: backend.entered == 1)

    # an honest client is served while the slow reader holds its stream
    with trio.fail_after(30):
        result = await honest.chat(HI, max_tokens=4)
    assert result.text == "Hello."

    # the executor cuts the slow reader within a few write deadlines, and the generation stops
    await wait_until(lambda: backend.exited == 2, timeout=8 * SEND_TIMEOUT)
    held = trio.current_time() - started
    assert held < 8 * SEND_TIMEOUT, f"the slow reader held its stream {held:.1f} s"
    produced = backend.produced
    await trio.sleep(0.5)
    assert backend.produced == produced, "the backend went on after the stream was cut"
    # what the executor took from the backend and did not write whole: one frame, one batch
    await wait_until(lambda: booked)
    [written] = booked
    assert 0 < len(written) and produced - len(written) <= IN_HAND, (produced, len(written), IN_HAND)
    await wait_until(lambda: executor.server.load == 0 and executor.server.active == 0)
    assert executor.server.intake.statistics().buffered_bytes == 0

    # its receipt covers what was written whole: client_gone, on the executor's side only
    entries = await executor.server.ledger.entries()
    [gone] = [e for e in entries if e.client == hostile.node.peer_id]
    receipt = msgspec.msgpack.decode(gone.receipt_payload, type=Receipt)
    assert receipt.finish_reason == "client_gone" and gone.status == "unacknowledged"
    assert receipt.output_digest == hashlib.sha256(written.encode()).digest() and receipt.output_tokens >= 1
    reading.cancel()
    await stream.reset()


SLOW_PEERS = Path(__file__).resolve().parents[2] / "bench" / "slow_peers.py"


def test_slow_peer_flood_leaves_rss_flat(tmp_path):
    """``bench/slow_peers.py`` for ``LOOMNET_FLOOD_SECONDS`` (15 s in CI; 60 for the long
    run): slow readers and a request flood against an executor process, whose RSS must
    stay within the bench's bound after the warm-up while an honest client is served in
    every third of the run."""
    seconds = float(os.environ.get("LOOMNET_FLOOD_SECONDS", "15"))
    record = tmp_path / "flood.json"
    run = subprocess.run(
        [sys.executable, str(SLOW_PEERS), "--seconds", str(seconds), "--json", str(record)],
        check=False, capture_output=True, text=True, timeout=seconds + 180,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    facts = json.loads(record.read_text())
    assert facts["alive"] and facts["honest_failed"] == [] and all(facts["served_each_third"])
    assert facts["slow_streams"] > 0 and facts["flood_requests"] > 0
