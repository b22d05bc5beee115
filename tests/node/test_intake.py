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
    big = header(MAX_FRAME_SIZE) + b"x" * 100  # announces its whole budget, and never finishes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(intake.read_request, DripStream(big), conn())
        await trio.testing.wait_all_tasks_blocked()
        stats = intake.statistics()
        assert stats.announced_bytes == MAX_FRAME_SIZE + 4 and stats.buffered_bytes == len(big)  # what is held
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
    assert stats.refused_bytes == 1 and stats.peak_peer_bytes < 1000  # held, not announced
    assert stats.buffered_bytes == stats.announced_bytes == stats.buffered_peers == 0  # the cancelled read gave back


@fail_after(60)
async def test_identities_sending_only_headers_do_not_fill_the_total(autojump_clock):
    # The review's lockout at the default bounds: 22 free identities x 3 streams, each a
    # 4-byte header announcing 1 MiB. Charged at the announced size they "held" 66 MiB of
    # the 64 MiB total with 264 bytes, and every honest request was refused.
    intake = make_intake()
    async with trio.open_nursery() as nursery:
        for i in range(22):
            for _ in range(3):
                nursery.start_soon(intake.read_request, DripStream(header(MAX_FRAME_SIZE), peer=f"sybil-{i}"), conn())
        await trio.testing.wait_all_tasks_blocked()
        stats = intake.statistics()
        assert stats.buffered_bytes == 22 * 3 * 4 and stats.buffered_peers == 22
        assert stats.announced_bytes == 22 * 3 * (MAX_FRAME_SIZE + 4)  # each within its own budget
        honest = await intake.read_request(DripStream(request_frame(5_000), peer="honest"), conn())
        assert isinstance(honest, RequestFrame)
        nursery.cancel_scope.cancel()
    stats = intake.statistics()
    assert stats.refused_bytes == 0 and stats.evicted == 0 and stats.buffered_bytes == stats.announced_bytes == 0


@fail_after(60)
async def test_when_the_total_is_full_the_oldest_frame_makes_room(autojump_clock):
    # Sybils with real bytes: two identities hold ~1 MiB each, filling the total. An
    # honest request arriving then is read; the frame arriving the longest is dropped.
    total = 2 * MIB + 1000
    intake = make_intake(per_peer=2 * MIB, total=total)
    outcomes: dict[str, object] = {}

    async def hold(peer: str) -> None:
        try:
            await intake.read_request(DripStream(header(MIB) + b"s" * (MIB - 10), peer=peer), conn())
        except RequestRejected as exc:
            outcomes[peer] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, "sybil-old")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, "sybil-new")
        await trio.testing.wait_all_tasks_blocked()
        assert intake.statistics().buffered_bytes == 2 * (MIB - 6)
        honest = await intake.read_request(DripStream(request_frame(5_000), peer="honest"), conn())
        assert isinstance(honest, RequestFrame)
        await trio.testing.wait_all_tasks_blocked()
        assert list(outcomes) == ["sybil-old"]  # the newer one is still held
        assert outcomes["sybil-old"].code == ErrorCode.PEER_LIMIT and outcomes["sybil-old"].retryable
        assert intake.statistics().buffered_bytes == MIB - 6
        nursery.cancel_scope.cancel()
    stats = intake.statistics()
    assert stats.evicted == 1 and stats.peak_bytes <= total and stats.buffered_bytes == 0


@fail_after(60)
async def test_all_peers_together_never_hold_more_than_the_total(autojump_clock):
    total = 3 * MIB
    intake = make_intake(per_peer=2 * MIB, total=total)
    dropped = 0

    async def one(peer: str) -> None:
        nonlocal dropped
        try:  # 1 MiB announced, all but 4 bytes of it sent, 64 KiB every 0.1 s
            await intake.read_request(DripStream(header(MIB) + b"z" * (MIB - 4), peer=peer, step=65536, every=0.1), conn())
        except RequestRejected as exc:
            assert exc.code == ErrorCode.PEER_LIMIT
            dropped += 1

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, f"peer-{i}")
            await trio.sleep(0.5)
        await trio.sleep(2.5)  # all of them sent all they will send (1.6 s each), none timed out
        assert intake.statistics().buffered_bytes <= total
        nursery.cancel_scope.cancel()
    stats = intake.statistics()
    assert stats.peak_bytes <= total and stats.buffered_bytes == 0
    assert dropped == stats.evicted >= 10 - 3


@fail_after(60)
async def test_a_frame_announcing_more_than_its_kind_allows_is_refused_unread(autojump_clock):
    intake = make_intake()
    stream = DripStream(header(MAX_FRAME_SIZE) + b"a" * 500_000)
    with pytest.raises(FrameError) as info:
        await intake.read_frame(stream, conn(), timeout=2.0, what="acknowledgement", max_size=64 * 1024)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE and stream.read == 4
    assert intake.statistics().buffered_bytes == 0


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


def test_the_budget_bounds_announced_bytes_per_peer_and_held_bytes_in_total():
    budget = RequestBudget(per_peer=100, total=150)
    a1, a2, b = (budget.open(peer, trio.CancelScope()) for peer in ("a", "a", "b"))
    budget.promise(a1, 60)
    with pytest.raises(RequestRejected):
        budget.promise(a2, 41)  # a's frames would announce 101
    budget.promise(a2, 40)
    budget.promise(b, 90)
    assert budget.announced == 190  # over the total: announcing costs nothing there
    budget.hold(a1, 60)
    budget.hold(b, 80)
    assert budget.held == 140 and budget.peers == 2
    budget.hold(a2, 20)  # 160 > 150: the oldest other frame (a1) is dropped
    assert a1.evicted and a1.scope.cancel_called and not b.evicted and budget.held == 100
    with pytest.raises(RequestRejected):
        budget.hold(a1, 70)  # a dropped frame takes nothing more
    for claim in (a1, a2, b):
        budget.close(claim)
    assert budget.held == budget.announced == budget.peers == 0
    assert budget.peak == 140 and budget.peak_peer == 80 and budget.evicted == 1
    assert math.isfinite(budget.peak)
