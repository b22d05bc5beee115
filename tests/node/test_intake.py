"""The request intake without a network: one deadline per request frame, a byte budget per peer.

A fake stream plays the peer; trio's autojump clock makes a peer that drips one byte
every 8 s cost no real time. Each test fails against the per-read timeout and the
unbounded buffering that ``node/_intake.py`` replaced.
"""

from __future__ import annotations

import math
import os

import pytest
import trio

from loomnet.node._intake import Intake, RequestBudget
from loomnet.protocol import (
    MAX_FRAME_SIZE,
    NEED_DATA,
    Envelope,
    ErrorCode,
    ErrorFrame,
    FrameDecoder,
    FrameError,
    InferenceConnection,
    NetworkTimeout,
    RequestFrame,
    RequestRejected,
    Role,
    StreamTruncated,
    decode_frame,
    encode_frame,
    encode_frame_body,
)

from ..limits import fail_after

READ_TIMEOUT = 10.0  # s
MIB = 1 << 20


class DripStream:
    """A peer that sends ``data`` in pieces of ``step`` bytes, one every ``every`` seconds.

    ``receive_some`` honours ``max_bytes`` (the intake must not read past its frame)
    and, like ``P2PStream``, raises ``NetworkTimeout`` when one read waits longer
    than its ``timeout``: a per-read deadline never fires for this peer.
    """

    def __init__(self, data: bytes, *, step: int | None = None, every: float = 0.0, peer: str = "peer-a", eof: bool = False):
        self.remote_peer = peer
        self._data = data
        self._step = step or len(data) or 1
        self._every = every
        self._eof = eof
        self.read = 0  # bytes handed to the intake
        self.sent: list[bytes] = []

    async def receive_some(self, max_bytes: int = 65536, *, timeout: float) -> bytes:
        if self.read >= len(self._data) and self._eof:
            return b""
        with trio.move_on_after(timeout) as scope:
            if self.read >= len(self._data):
                await trio.sleep_forever()
            await trio.sleep(self._every)
        if scope.cancelled_caught:
            raise NetworkTimeout("receive: deadline passed")
        piece = self._data[self.read : self.read + min(self._step, max_bytes)]
        self.read += len(piece)
        return piece

    async def send_all(self, data: bytes, *, timeout: float) -> None:
        self.sent.append(data)


def request_frame(size: int = 200) -> bytes:
    """A request frame whose body is about ``size`` bytes (the intake does not verify signatures)."""
    envelope = Envelope(payload=os.urandom(max(size - 120, 1)), signer=bytes(32), sig=bytes(64))
    return encode_frame(encode_frame_body(RequestFrame(envelope)))


def header(size: int) -> bytes:
    return size.to_bytes(4, "big")


def make_intake(*, per_peer: int = 4 * MIB, total: int = 64 * MIB) -> Intake:
    return Intake(read_timeout=READ_TIMEOUT, send_timeout=1.0, budget=RequestBudget(per_peer=per_peer, total=total))


def conn() -> InferenceConnection:
    return InferenceConnection(Role.EXECUTOR)


@fail_after(3600)
async def test_a_dripping_peer_meets_one_deadline_for_the_whole_frame(autojump_clock):
    intake = make_intake()
    # announces a maximum-size frame, then one byte every 8 s: each read is "in time"
    stream = DripStream(header(MAX_FRAME_SIZE) + b"x" * 1000, step=1, every=8.0)
    start = trio.current_time()
    with pytest.raises(RequestRejected) as info:
        await intake.read_request(stream, conn())
    assert info.value.code == ErrorCode.REQUEST_TIMEOUT
    assert trio.current_time() - start == pytest.approx(READ_TIMEOUT)
    assert stream.read == 1  # one byte in 10 s: the first arrives at 8 s, the next would at 16 s
    stats = intake.statistics()
    assert stats.timeouts == 1 and stats.buffered_bytes == 0 and stats.buffered_peers == 0


@fail_after(60)
async def test_a_request_in_pieces_is_read_and_its_charge_given_back(autojump_clock):
    intake = make_intake()
    data = request_frame(50_000)
    stream = DripStream(data + b"trailing bytes of the ack", step=7_000, every=0.5)
    event = await intake.read_request(stream, conn())
    assert isinstance(event, RequestFrame)
    assert stream.read == len(data)  # nothing past the frame was taken off the stream
    stats = intake.statistics()
    assert stats.buffered_bytes == 0 and stats.peak_bytes == len(data) and stats.peak_peer_bytes == len(data)


@fail_after(60)
async def test_a_peer_is_refused_at_the_header_once_its_budget_is_spent(autojump_clock):
    intake = make_intake(per_peer=MAX_FRAME_SIZE + 4)
    big = header(MAX_FRAME_SIZE) + b"x" * 100  # holds its whole budget, and never finishes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(intake.read_request, DripStream(big), conn())
        await trio.testing.wait_all_tasks_blocked()
        assert intake.statistics().buffered_bytes == MAX_FRAME_SIZE + 4
        second = DripStream(header(1000) + b"y" * 1000)
        with pytest.raises(RequestRejected) as info:
            await intake.read_request(second, conn())
        assert info.value.code == ErrorCode.PEER_LIMIT and info.value.retryable
        assert second.read == 4  # refused on the header, before its body was read
        # another peer is not affected by this one's budget
        other = await intake.read_request(DripStream(request_frame(), peer="peer-b"), conn())
        assert isinstance(other, RequestFrame)
        nursery.cancel_scope.cancel()
    stats = intake.statistics()
    assert stats.refused_bytes == 1 and stats.peak_peer_bytes <= MAX_FRAME_SIZE + 4
    assert stats.buffered_bytes == 0 and stats.buffered_peers == 0  # the cancelled read gave its charge back


@fail_after(60)
async def test_all_peers_together_stay_within_the_total(autojump_clock):
    total = 3 * MIB
    intake = make_intake(per_peer=2 * MIB, total=total)
    refused = 0

    async def one(peer: str) -> None:
        nonlocal refused
        try:
            await intake.read_request(DripStream(header(MIB) + b"z" * 5000, peer=peer), conn())
        except RequestRejected as exc:
            assert exc.code == ErrorCode.PEER_LIMIT
            refused += 1

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, f"peer-{i}")
        await trio.testing.wait_all_tasks_blocked()
        assert refused == 10 - 2  # two frames of 1 MiB + 4 fit in 3 MiB
        nursery.cancel_scope.cancel()
    stats = intake.statistics()
    assert stats.peak_bytes <= total and stats.buffered_bytes == 0


@fail_after(60)
async def test_bad_bytes_still_get_their_protocol_errors(autojump_clock):
    intake = make_intake()
    with pytest.raises(FrameError) as info:
        await intake.read_request(DripStream(header(2 * MAX_FRAME_SIZE) + b"x" * 100), conn())
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(StreamTruncated):
        await intake.read_request(DripStream(header(1000) + b"x" * 10, eof=True), conn())
    assert intake.statistics().buffered_bytes == 0


@fail_after(60)
async def test_a_refused_stream_is_told_peer_limit(autojump_clock):
    intake = make_intake()
    stream = DripStream(b"")
    await intake.refuse_stream(stream)
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(stream.sent))
    body = decoder.next_frame()
    assert body is not NEED_DATA
    frame = decode_frame(body)
    assert isinstance(frame, ErrorFrame) and frame.code == ErrorCode.PEER_LIMIT and frame.retryable
    assert intake.statistics().refused_streams == 1


def test_budget_charges_and_releases_per_peer():
    budget = RequestBudget(per_peer=100, total=150)
    budget.charge("a", 60)
    budget.charge("b", 60)
    with pytest.raises(RequestRejected):
        budget.charge("a", 41)  # over a's 100
    with pytest.raises(RequestRejected):
        budget.charge("c", 31)  # over the total of 150
    assert budget.held == 120 and budget.peers == 2
    budget.release("a", 60)
    budget.release("b", 60)
    assert budget.held == 0 and budget.peers == 0 and budget.peak == 120 and budget.peak_peer == 60
    assert math.isfinite(budget.peak)
