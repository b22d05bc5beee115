"""Reading a client's frames: one deadline per frame, and byte budgets for what is held.

Every frame an executor reads from a peer (the request, and after the receipt the
client's acknowledgement) goes through :meth:`Intake.read_frame`. The faults this
module exists for (issue 7, "slow and heavy peers", and its review):

- A read timeout applied to each read, so a peer that announced a maximum-size frame
  and sent one byte every 8 s held its stream forever (the request; then, after the
  receipt, the acknowledgement the same way). Here each frame, from its first byte to
  its last, has one deadline (``request-read-timeout`` for a request, ``ack-timeout``
  for an acknowledgement).
- Partly sent frames were buffered without bound across streams. Here every byte held
  of an unfinished frame is charged to its peer and to the total
  (``max-request-bytes-per-peer``, ``max-request-bytes``).

What is charged, and why two measures
-------------------------------------
*Per peer*, a frame is charged the size its 4-byte header **announces** (a promise),
as soon as the header is in: a peer whose unfinished frames would announce more than
its own budget is refused before it sends a body. A peer that sends headers only
spends its own budget, nobody else's.

*In total*, a frame is charged the bytes **actually received and held**. Charging the
announced size here let a few free identities sending nothing but headers (16 bytes
from 2 identities against small bounds, 256 bytes from 22 at the defaults) fill the
total and lock every honest client out; now headers cost what they are, 4 bytes.

A Sybil with real bytes (many identities, each within its own budget, together
holding ``max-request-bytes``) must not lock honest clients out either: when a charge
would pass the total, the frames that have been arriving the **longest** are dropped
to make room (``PEER_LIMIT``, retryable; counted in ``evicted``). An honest request
arrives in one round trip, so to crowd it out a peer must deliver
``max-request-bytes`` of newer bytes while it arrives; a frame held open to occupy
memory is the oldest soon enough. docs/network.md has the whole argument.

A refusal is an error frame with code ``PEER_LIMIT`` (retryable: the peer may try
again once its other requests finish); a late request gets ``REQUEST_TIMEOUT``.
``refuse_stream`` answers a stream the network layer refused because the peer has
too many open (``max-streams-per-peer``).
"""

from __future__ import annotations


import msgspec
import trio

from loomnet.client import P2PStream
from loomnet.client._frame_io import FrameIO, FrameReadTimeout
from loomnet.protocol import (
    MAX_FRAME_SIZE,
    ErrorCode,
    ErrorFrame,
    FrameError,
    InferenceConnection,
    LoomError,
    RequestRejected,
    Role,
)

__all__ = ["Intake", "IntakeStatistics", "RequestBudget", "SessionIdle"]

_HEADER = 4  # bytes of a frame's length prefix


class IntakeStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the frame intake (trio's ``statistics()`` convention)."""

    #: bytes of unfinished frames held now (received, not yet a whole frame), all peers
    buffered_bytes: int
    #: peers holding bytes of an unfinished frame now
    buffered_peers: int
    #: bytes the headers of the unfinished frames announce, all peers together (each
    #: peer's share is what ``max-request-bytes-per-peer`` bounds)
    announced_bytes: int
    #: the most ``buffered_bytes`` ever was, and the most one peer ever held
    peak_bytes: int
    peak_peer_bytes: int
    #: frames refused with PEER_LIMIT: over a byte budget (evicted ones included), or
    #: too many streams
    refused_bytes: int
    refused_streams: int
    #: frames that did not arrive whole before their deadline
    timeouts: int
    #: unfinished frames dropped to make room for newer ones when the total was full
    evicted: int = 0


class _Claim:
    """One frame being read: what its peer announced, what is held, how to stop it."""

    __slots__ = ("peer", "promised", "held", "scope", "evicted")

    def __init__(self, peer: str, scope: trio.CancelScope) -> None:
        self.peer = peer
        self.promised = 0  # bytes the header announces (header included); until it is in, what came
        self.held = 0  # bytes received and held
        self.scope = scope
        self.evicted = False


class RequestBudget:
    """Bytes of unfinished frames: announced ones per peer, held ones in total.

    Args:
        per_peer: most bytes one peer's unfinished frames may announce together.
        total: most bytes all peers' unfinished frames may hold together; past it
            the oldest frames are dropped (see the module doc).
    """

    def __init__(self, *, per_peer: int, total: int) -> None:
        self.per_peer = per_peer
        self.total = total
        self.held = 0
        self.announced = 0
        self.peak = 0
        self.peak_peer = 0
        self.evicted = 0
        self._promised: dict[str, int] = {}
        self._held_by_peer: dict[str, int] = {}
        self._frames: dict[str, int] = {}  # unfinished frames per peer
        #: frames being read, oldest first (dicts keep insertion order)
        self._claims: dict[int, _Claim] = {}

    @property
    def peers(self) -> int:
        """Peers holding bytes of an unfinished frame now."""
        return sum(1 for held in self._held_by_peer.values() if held)

    def open(self, peer: str, scope: trio.CancelScope) -> _Claim:
        """Start a frame for ``peer``; ``scope`` is cancelled if the frame is evicted."""
        claim = _Claim(peer, scope)
        self._claims[id(claim)] = claim
        self._frames[peer] = self._frames.get(peer, 0) + 1
        self._promised.setdefault(peer, 0)
        self._held_by_peer.setdefault(peer, 0)
        return claim

    def promise(self, claim: _Claim, size: int) -> None:
        """Raise ``claim``'s announced size to ``size`` bytes.

        Raises:
            RequestRejected: ``PEER_LIMIT`` (retryable) if the peer's unfinished frames
                would announce more than ``per_peer``; nothing changes.
        """
        self._check(claim)
        more = size - claim.promised
        if more <= 0:
            return
        mine = self._promised[claim.peer] + more
        if mine > self.per_peer:
            raise RequestRejected(
                f"this peer's unfinished requests would hold {mine} bytes; the limit is {self.per_peer}",
                code=ErrorCode.PEER_LIMIT,
                retryable=True,
            )
        self._promised[claim.peer] = mine
        self.announced += more
        claim.promised = size

    def hold(self, claim: _Claim, size: int) -> None:
        """Raise what ``claim`` holds to ``size`` bytes, dropping the oldest other frames
        if the total would pass ``total``.

        Raises:
            RequestRejected: ``PEER_LIMIT`` (retryable) if ``claim`` itself was dropped,
                or (never with sane bounds) if it alone would pass the total.
        """
        self._check(claim)
        more = size - claim.held
        if more <= 0:
            return
        if self.held + more > self.total:
            self._evict_for(claim, more)
        claim.held = size
        self.held += more
        mine = self._held_by_peer[claim.peer] + more
        self._held_by_peer[claim.peer] = mine
        self.peak = max(self.peak, self.held)
        self.peak_peer = max(self.peak_peer, mine)

    def close(self, claim: _Claim) -> None:
        """The frame is whole, refused or abandoned: give back all it was charged."""
        if self._claims.pop(id(claim), None) is not None:  # an evicted one was released already
            self._release(claim)

    # ------------------------------------------------------------------ inside

    def _check(self, claim: _Claim) -> None:
        if claim.evicted:
            raise _evicted()

    def _evict_for(self, claimant: _Claim, more: int) -> None:
        for victim in list(self._claims.values()):  # oldest first
            if self.held + more <= self.total:
                return
            if victim is claimant or victim.held == 0:
                continue
            del self._claims[id(victim)]
            self._release(victim)
            victim.evicted = True
            victim.scope.cancel()
            self.evicted += 1
        if self.held + more > self.total:
            raise RequestRejected(
                "the executor holds as many unfinished requests as it allows; try again shortly",
                code=ErrorCode.PEER_LIMIT,
                retryable=True,
            )

    def _release(self, claim: _Claim) -> None:
        """Give back ``claim``'s charges; the caller has taken it out of ``_claims``."""
        peer = claim.peer
        self.held -= claim.held
        self._held_by_peer[peer] -= claim.held
        self._promised[peer] -= claim.promised
        self.announced -= claim.promised
        claim.held = claim.promised = 0
        self._frames[peer] -= 1
        if not self._frames[peer]:  # a peer with nothing unfinished leaves no entry
            for table in (self._frames, self._promised, self._held_by_peer):
                del table[peer]


class SessionIdle(Exception):
    """A session stream sent no next request within its idle timeout: it is over.
    Not a ``LoomError``: nothing went wrong, and nothing is sent back."""


def _evicted() -> RequestRejected:
    return RequestRejected(
        "the executor was short of room for unfinished requests and dropped this one, the longest in arriving; "
        "retry",
        code=ErrorCode.PEER_LIMIT,
        retryable=True,
    )


class Intake:
    """Reads the frames of an executor's inference streams.

    Args:
        read_timeout: seconds for a whole request frame to arrive.
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
            buffered_bytes=b.held, buffered_peers=b.peers, announced_bytes=b.announced, peak_bytes=b.peak, peak_peer_bytes=b.peak_peer,
            evicted=b.evicted, **self._counts,
        )

    async def read_request(
        self, stream: P2PStream, conn: InferenceConnection, *, idle_timeout: float | None = None
    ) -> object:
        """The next event of a stream (the request frame, normally), whole within
        ``read_timeout``.

        Args:
            idle_timeout: a session stream between requests: seconds its next request
                may take to *begin*; ``read_timeout`` then counts from its first byte.
                Passing it with nothing sent raises :class:`SessionIdle`.

        See :meth:`read_frame`, which this is with the request's deadline.
        """
        return await self.read_frame(stream, conn, timeout=self.read_timeout, what="request", idle_timeout=idle_timeout)

    async def read_frame(
        self,
        stream: P2PStream,
        conn: InferenceConnection,
        *,
        timeout: float,
        what: str,
        max_size: int = MAX_FRAME_SIZE,
        idle_timeout: float | None = None,
    ) -> object:
        """Read until ``conn`` yields its next event (one frame, or the stream's end).

        Every byte is charged to ``stream.remote_peer`` as it is buffered (module doc),
        and the whole frame must arrive within ``timeout`` seconds of the call (of its
        first byte, with ``idle_timeout``), however slowly it drips.

        Args:
            timeout: seconds for the whole frame.
            what: what the frame is, for the messages ("request", "acknowledgement").
            max_size: most body bytes a frame may announce here (at most the protocol's
                ``MAX_FRAME_SIZE``); a header announcing more is refused unread.
            idle_timeout: seconds the frame's first byte may take (a session waiting
                for its next request); None: ``timeout`` covers everything.

        Returns:
            The next event ``conn`` produces.

        Raises:
            SessionIdle: ``idle_timeout`` passed with no byte sent (not an error: the
                session is simply over).
            RequestRejected: ``REQUEST_TIMEOUT`` when the deadline passes;
                ``PEER_LIMIT`` when the frame would pass a byte budget, or was dropped
                to make room for newer ones.
            FrameError: ``FRAME_TOO_LARGE``, the header announced more than ``max_size``.
            ProtocolError: what ``conn`` raises for bad bytes or an early end.
            NetworkError: the stream failed.

        Cancellation: safe; the charge is given back. Bytes yamux had handed over
        may be lost, so a cancelled stream is only good for resetting.
        """
        try:
            return await self._read(stream, conn, timeout, what, max_size, idle_timeout)
        except RequestRejected as exc:
            key = {ErrorCode.PEER_LIMIT: "refused_bytes", ErrorCode.REQUEST_TIMEOUT: "timeouts"}.get(exc.code)
            if key:
                self._counts[key] += 1
            raise

    async def _read(
        self,
        stream: P2PStream,
        conn: InferenceConnection,
        timeout: float,
        what: str,
        max_size: int,
        idle_timeout: float | None,
    ) -> object:
        now = trio.current_time()
        idle_deadline = None if idle_timeout is None else now + idle_timeout
        with trio.CancelScope() as scope:  # the budget drops an evicted frame by cancelling it
            claim = self.budget.open(stream.remote_peer, scope)

            def charge(data: bytes, header: bytes, received: int) -> None:
                if len(header) == _HEADER and received - len(data) < _HEADER:  # the header just came whole
                    size = int.from_bytes(header, "big")
                    if max_size < size <= MAX_FRAME_SIZE:
                        raise FrameError(
                            f"the {what} frame announces {size} bytes; at most {max_size} are accepted",
                            code=ErrorCode.FRAME_TOO_LARGE,
                        )
                self.budget.promise(claim, max(received, _frame_end(header)) if len(header) == _HEADER else received)
                self.budget.hold(claim, received)

            try:
                return await FrameIO(stream, conn).next_event(
                    deadline=now + timeout, exact=True, idle_deadline=idle_deadline, on_data=charge
                )
            except FrameReadTimeout as exc:
                if exc.received == 0 and idle_timeout is not None:
                    raise SessionIdle(f"no request within {idle_timeout:g} s") from None
            finally:
                self.budget.close(claim)
        if claim.evicted:
            raise _evicted()
        raise RequestRejected(f"the {what} did not arrive within {timeout:g} s", code=ErrorCode.REQUEST_TIMEOUT)

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
