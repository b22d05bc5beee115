"""Reading a client's request frame: one deadline, and a byte budget per peer.

Two faults this module exists for (issue 7, "slow and heavy peers"):

- The request read timeout used to apply to each read, so a peer that announced a
  maximum-size frame and sent one byte every 8 s held its stream forever. Here the
  whole frame, from the first byte to the last, has one deadline
  (``request-read-timeout``).
- Partly sent frames were buffered without bound across streams: one peer with
  150 streams each holding most of a 1 MiB frame grew the executor by 180 MB. Here
  every byte of an unfinished request is charged to its peer and to the total
  before it is buffered, against ``max-request-bytes-per-peer`` and
  ``max-request-bytes``. The charge is the size the frame's header announces, taken
  as soon as the 4-byte header is in, so a peer is refused before it sends the body,
  not after; it is given back when the frame is complete or the read ends.

A refusal is an error frame with code ``PEER_LIMIT`` (retryable: the peer may try
again once its other requests finish); a late request gets ``REQUEST_TIMEOUT``.
``refuse_stream`` answers a stream the network layer refused because the peer has
too many open (``max-streams-per-peer``).
"""

from __future__ import annotations

import math

import msgspec
import trio

from loomnet.client import P2PStream
from loomnet.protocol import (
    MAX_FRAME_SIZE,
    NEED_DATA,
    ErrorCode,
    ErrorFrame,
    InferenceConnection,
    LoomError,
    RequestRejected,
    Role,
)

__all__ = ["Intake", "IntakeStatistics", "RequestBudget"]

_HEADER = 4  # bytes of a frame's length prefix
_READ_SIZE = 65536  # most bytes taken off the stream per read


class IntakeStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the request intake (trio's ``statistics()`` convention)."""

    #: bytes of unfinished request frames held now, all peers together
    buffered_bytes: int
    #: peers with an unfinished request frame now
    buffered_peers: int
    #: the most ``buffered_bytes`` ever was, and the most one peer ever held
    peak_bytes: int
    peak_peer_bytes: int
    #: requests refused with PEER_LIMIT: over a byte budget, or too many streams
    refused_bytes: int
    refused_streams: int
    #: requests that did not arrive whole before the deadline
    timeouts: int


class RequestBudget:
    """Bytes of unfinished requests, charged per peer and in total.

    Args:
        per_peer: most bytes one peer's unfinished requests may hold.
        total: most bytes all peers' unfinished requests may hold together.
    """

    def __init__(self, *, per_peer: int, total: int) -> None:
        self.per_peer = per_peer
        self.total = total
        self.held = 0
        self.peak = 0
        self.peak_peer = 0
        self._by_peer: dict[str, int] = {}

    def charge(self, peer: str, n: int) -> None:
        """Charge ``n`` more bytes to ``peer``.

        Raises:
            RequestRejected: code ``PEER_LIMIT`` (retryable) if ``peer`` or all
                peers together would hold more than allowed; nothing is charged.
        """
        mine = self._by_peer.get(peer, 0) + n
        if mine > self.per_peer:
            raise RequestRejected(
                f"this peer's unfinished requests would hold {mine} bytes; the limit is {self.per_peer}",
                code=ErrorCode.PEER_LIMIT,
                retryable=True,
            )
        if self.held + n > self.total:
            raise RequestRejected(
                "the executor holds as many unfinished requests as it allows; try again shortly",
                code=ErrorCode.PEER_LIMIT,
                retryable=True,
            )
        self._by_peer[peer] = mine
        self.held += n
        self.peak = max(self.peak, self.held)
        self.peak_peer = max(self.peak_peer, mine)

    def release(self, peer: str, n: int) -> None:
        """Give back ``n`` bytes charged to ``peer``; a peer at zero leaves no entry."""
        if n <= 0:
            return
        left = self._by_peer.get(peer, 0) - n
        if left > 0:
            self._by_peer[peer] = left
        else:
            self._by_peer.pop(peer, None)
        self.held -= n

    @property
    def peers(self) -> int:
        return len(self._by_peer)


class Intake:
    """Reads request frames for an executor's inference server.

    Args:
        read_timeout: seconds for the whole request frame to arrive.
        send_timeout: seconds to write a refusal.
        budget: the byte budget shared by every stream.
    """

    def __init__(self, *, read_timeout: float, send_timeout: float, budget: RequestBudget) -> None:
        self.read_timeout = read_timeout
        self.send_timeout = send_timeout
        self.budget = budget
        self._counts = dict.fromkeys(("refused_bytes", "refused_streams", "timeouts"), 0)

    def statistics(self) -> IntakeStatistics:
        b = self.budget
        return IntakeStatistics(
            buffered_bytes=b.held, buffered_peers=b.peers, peak_bytes=b.peak, peak_peer_bytes=b.peak_peer,
            **self._counts,
        )

    async def read_request(self, stream: P2PStream, conn: InferenceConnection) -> object:
        """Read until ``conn`` yields its first event (the request frame, normally).

        Every byte is charged to ``stream.remote_peer`` before it is buffered, and
        the whole frame must arrive within ``read_timeout`` seconds of the call.

        Returns:
            The first event ``conn`` produces.

        Raises:
            RequestRejected: ``REQUEST_TIMEOUT`` when the deadline passes;
                ``PEER_LIMIT`` when the frame would pass a byte budget.
            ProtocolError: what ``conn`` raises for bad bytes or an early end.
            NetworkError: the stream failed.

        Cancellation: safe; the charge is given back. Bytes yamux had handed over
        may be lost, so a cancelled stream is only good for resetting.
        """
        peer = stream.remote_peer
        charged = 0
        received = 0
        header = b""
        try:
            with trio.move_on_after(self.read_timeout):
                while (event := conn.next_event()) is NEED_DATA:
                    # read no further than this frame: up to the header, then up to its end
                    want = _HEADER - len(header) if len(header) < _HEADER else _frame_end(header) - received
                    data = await stream.receive_some(min(max(want, 1), _READ_SIZE), timeout=math.inf)
                    received += len(data)
                    if len(header) < _HEADER:
                        header += data[: _HEADER - len(header)]
                    due = max(received, _frame_end(header)) if len(header) == _HEADER else received
                    if due > charged:
                        self.budget.charge(peer, due - charged)
                        charged = due
                    conn.receive_data(data)
                return event
            raise RequestRejected(
                f"the request did not arrive within {self.read_timeout:g} s", code=ErrorCode.REQUEST_TIMEOUT
            )
        except RequestRejected as exc:
            key = {ErrorCode.PEER_LIMIT: "refused_bytes", ErrorCode.REQUEST_TIMEOUT: "timeouts"}.get(exc.code)
            if key:
                self._counts[key] += 1
            raise
        finally:
            self.budget.release(peer, charged)

    async def refuse_stream(self, stream: P2PStream) -> None:
        """Answer a stream refused for the peer's stream limit with ``PEER_LIMIT``.

        Never raises: a peer that does not read its refusal simply misses it.
        """
        self._counts["refused_streams"] += 1
        frame = ErrorFrame(
            code=int(ErrorCode.PEER_LIMIT),
            message="this peer has as many requests open as the executor allows; retry once one finishes",
            retryable=True,
        )
        try:
            await stream.send_all(InferenceConnection(Role.EXECUTOR).send(frame), timeout=self.send_timeout)
        except LoomError:
            pass


def _frame_end(header: bytes) -> int:
    """Bytes up to the end of the frame ``header`` announces; an announced size over
    the maximum counts as the header alone (the decoder refuses it unread)."""
    size = int.from_bytes(header, "big")
    return _HEADER + (size if size <= MAX_FRAME_SIZE else 0)
