"""The ``/loomnet/infer/1`` stream handler: admit, generate, count, sign, book.

Admission, in order: the request frame arrives in time and decodes; its signature
verifies; its signer is the peer at the other end of the stream (Noise
authenticated that peer, so nobody can spend someone else's signed request); the
replay guard passes it (audience, age, a nonce not seen before; nothing is stored
yet); the executor is not draining; the model is served; the advertised
price is within the request's caps; ``max_tokens`` is within the model's context
window (``MAX_TOKENS_OVER_CONTEXT``); the model supports what the request needs; the
client peer is within its rate limits (``_rate``: ``RATE_LIMITED``, retryable); the
request's worst case is within its ``max_cost`` (``_cost_cap``: ``PRICE_CAP_EXCEEDED``;
without ``max_tokens`` the generation is capped to what ``max_cost`` buys instead); the
nonce is stored (``_remember``: ``REPLAYED_NONCE`` for a copy that raced, ``PEER_LIMIT``
when the peer holds its share of the replay memory, ``OVER_CAPACITY`` when it is full),
last, so a refused request never holds one; a generation slot is free, or comes
within the queue deadline (``_queue``: a full queue or a wait that runs out is
``OVER_CAPACITY``, retryable, with ``retry_after``). Every
refusal is an error frame with a stable code, never a bare reset. While a request
waits for a slot it gets no frame; the server watches its stream meanwhile, so a
client that leaves is dropped from the queue at once.

Then the backend streams (``_relay``): text and reasoning are batched into chunk
frames (a frame costs ~0.2 ms of CPU, so never one per token), a progress chunk goes
out whenever the backend has been silent for ``progress-interval`` seconds, and a
client that leaves is noticed at once and stops the generation. The slot is freed as
soon as the backend is done. Then the executor counts tokens (``_metering``: a
counting step that fails falls back, so a receipt is never lost to a count), signs a
receipt, writes it to its ledger *before* sending it, and waits briefly for the
client's counter-signature, which it books beside the next request (``_acks``). The
wait for a slot watches the client (``_slot_wait``). Both frames a client sends, the
request and the counter-signature, are read by ``_intake``: one deadline for the
whole frame, every byte charged to the byte budgets, so a peer dripping either holds
the handler for one deadline at most. When the answer fails part-way, the
receipt for what was sent rides on the error frame, and a failure to book it never
replaces the original error.

A model with a response cache answers a deterministic request it answered before
without a slot or the backend (``_server_cached``); the lookup comes after every
admission check but the slot. The parts: admission (``_server_admission``), billing
(``_server_billing``), cached answers (``_server_cached``).

What a peer is told is loomnet's words only (``LoomError.peer_message``): library
text, endpoints and configuration go to the operator's log, never into a frame.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
import trio

from loomnet.client import Ledger, P2PStream, TokenCounter
from loomnet.client._frame_io import FrameIO
from loomnet.protocol import (
    INFER_PROTOCOL,
    INFER_SESSION_PROTOCOL,
    NetworkError,
    ProtocolError,
    EndOfStream,
    Envelope,
    ErrorCode,
    InferenceConnection,
    InferenceRequest,
    LoomError,
    Receipt,
    ReceiptFrame,
    RequestFrame,
    RequestRejected,
    ReplayGuard,
    Role,
    SigningKey,
    StreamState,
    generation_fields,
)

from ._catalog import Catalog, CatalogEntry
from ._acks import await_ack
from ._intake import Intake, RequestBudget, SessionIdle
from ._metering import Meter, Output
from ._server_admission import Admission
from ._server_billing import Billing
from ._server_cached import CachedAnswers
from ._metrics import ExecutorMetrics
from ._pool import PoolMember
from ._spend import SpendHold
from ._queue import Slots
from ._slot_wait import wait_for_slot
from ._rate import PeerRateLimiter
from ._relay import ClientGone, relay_answer
from ._response_cache import ResponseCaches, entry_cache_terms
from .backends._base import ChatParams
from .config import ExecutorConfig

__all__ = ["InferenceServer", "ServerStatistics"]

log = logging.getLogger("loomnet.server")

#: what ``_one`` returns when a session is over
_OVER = object()


class ServerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the inference server (trio's ``statistics()`` convention)."""

    #: requests answered with a receipt, and refused or failed ones
    served: int
    refused: int
    #: inference streams handled, of which session streams; session streams open now
    streams: int
    sessions: int
    sessions_open: int
    #: requests that came on a session stream after its first: the stream opens saved
    session_requests: int


class InferenceServer(Admission, CachedAnswers, Billing):
    """Serves inference streams for one executor."""

    def __init__(
        self,
        key: SigningKey,
        config: ExecutorConfig,
        catalog: Catalog,
        ledger: Ledger,
        *,
        tokens: TokenCounter | None = None,
        on_load_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        metrics: ExecutorMetrics | None = None,
    ) -> None:
        self.key = key
        self.config = config
        self.catalog = catalog
        self.ledger = ledger
        self.tokens = tokens or TokenCounter()
        self.clock = clock
        self.meter = Meter(key, ledger, self.tokens, clock=lambda: self.clock(), count_timeout=config.count_timeout)
        self.replay = ReplayGuard(key.peer_id, max_age=config.max_request_age, max_skew=config.max_clock_skew)
        self.slots = Slots(capacity=config.capacity, queue_timeout=config.queue_timeout, on_change=on_load_change)
        self.rate = PeerRateLimiter(
            requests_per_minute=config.peer_requests_per_minute, tokens_per_minute=config.peer_tokens_per_minute
        )
        budget = RequestBudget(per_peer=config.max_request_bytes_per_peer, total=config.max_request_bytes)
        self.intake = Intake(read_timeout=config.request_read_timeout, send_timeout=config.ack_timeout, budget=budget)
        #: per-model answer caches (``[models.cache]``); ``caches.statistics()`` per model
        self.caches = ResponseCaches(lambda model: entry_cache_terms(config, catalog.lookup(model)))
        self.served = 0
        self.refused = 0
        #: shutting down: new requests are refused (SHUTTING_DOWN), those admitted finish
        self.draining = False
        #: requests admitted and not finished (generating, queued, booking)
        self.active = 0
        #: set when a drain runs out of time: answers end at a frame boundary with
        #: SHUTTING_DOWN and a receipt for what was sent (``relay_answer``)
        self.abort = trio.Event()
        #: per advertised model: (receipts, input tokens, output tokens) since start, and
        #: the EWMA of its time to first token, seconds (``_status``)
        self.counts: dict[str, tuple[int, int, int]] = {}
        self.ttft: dict[str, float] = {}
        self.metrics = metrics if metrics is not None else ExecutorMetrics(models=lambda: catalog.by_name())
        self._streams = self._sessions = self._sessions_open = self._session_requests = 0

    def _count(self, model: str, receipt: Receipt, ttft: float | None) -> None:
        served, tokens_in, tokens_out = self.counts.get(model, (0, 0, 0))
        self.counts[model] = (served + 1, tokens_in + receipt.input_tokens, tokens_out + receipt.output_tokens)
        if ttft is not None:
            mean = self.ttft.get(model)
            self.ttft[model] = ttft if mean is None else mean + 0.3 * (ttft - mean)

    @property
    def load(self) -> int:
        """Requests generating now plus those waiting for a slot (what the advert says)."""
        return self.slots.running + self.slots.queued

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            served=self.served, refused=self.refused, streams=self._streams, sessions=self._sessions,
            sessions_open=self._sessions_open, session_requests=self._session_requests,
        )

    async def handle(self, stream: P2PStream) -> None:
        """Serve one stream: one request (``/loomnet/infer/1``) or a session of requests
        one after another (``/loomnet/infer/2``). Never raises: every failure is
        answered or logged.

        A session goes on after a receipt (its acknowledgement booked) and after an
        error frame that leaves the stream sound (a refusal, a failed generation); it
        ends when the client ends it between requests, sends no next request within
        ``session-idle-timeout``, or anything leaves the stream unsound (a protocol
        violation, a frame that did not come whole in time, a client that left).
        """
        session = getattr(stream, "protocol", INFER_PROTOCOL) == INFER_SESSION_PROTOCOL
        conn = InferenceConnection(Role.EXECUTOR, session=session)
        self._streams += 1
        if session:
            self._sessions += 1
            self._sessions_open += 1
        try:
            # acks are booked beside the next request, not before it: an fsync'd write
            # (1-4 ms) held every next request of a session back (issue 9); the nursery
            # still waits for each booking before the handler ends (shielded, bounded)
            async with trio.open_nursery() as bookings:
                frame: object | None = None
                while True:
                    frame = await self._one(stream, conn, frame, bookings)
                    if not session or frame is _OVER or not (
                        conn.state is StreamState.IDLE or isinstance(frame, RequestFrame)
                    ):
                        return
        finally:
            if session:
                self._sessions_open -= 1

    async def _one(
        self, stream: P2PStream, conn: InferenceConnection, frame: object | None, bookings: trio.Nursery
    ) -> object | None:
        """Read (unless ``frame`` came already) and serve one request; returns the frame
        the client sent after its receipt when that was its next request, ``_OVER`` when
        the session is over (ended by the client, or idle), else None."""
        whole = frame is not None
        try:
            if frame is None:
                idle = self.config.session_idle_timeout if conn.requests else None
                frame = await self.intake.read_request(stream, conn, idle_timeout=idle)
                whole = True
            if isinstance(frame, EndOfStream):  # a session ended between requests
                return _OVER
            if conn.requests > 1:
                self._session_requests += 1
            request_payload, request, entry = self._admit(stream, frame)
            self.active += 1
            try:
                return await self._serve(stream, conn, request_payload, request, entry, bookings)
            finally:
                self.active -= 1
        except SessionIdle:
            return _OVER
        except LoomError as exc:
            self.refused += 1
            self.metrics.refused(exc.code)
            log.info("request from %s ended with %s", stream.remote_peer, exc)
            if not isinstance(exc, ClientGone):  # nobody is left to read it
                await self._send_error(stream, conn, exc)
            if isinstance(exc, (ProtocolError, NetworkError)):
                # the stream itself failed (bytes that break the protocol, a byte read by a
                # watcher and dropped, a client gone): nothing after it can be trusted
                return _OVER
        except Exception:  # a bug must not kill the node, and the client deserves a code
            self.refused += 1
            self.metrics.refused(ErrorCode.INTERNAL)
            log.exception("internal error serving %s", stream.remote_peer)
            await self._send_error(stream, conn, LoomError("internal error", code=ErrorCode.INTERNAL))
        if not whole:
            # refused while its frame was being read (late, over a byte budget, evicted):
            # the rest of that frame may still come, and no byte after it can be told
            # apart from it, so the session is over (the client opens a new stream). A
            # first request that never came whole ends it too, as on a one-request stream
            return _OVER
        return None

    # ---------------------------------------------------------------- admission

    # ------------------------------------------------------------------ serving

    async def _serve(
        self,
        stream: P2PStream,
        conn: InferenceConnection,
        request_payload: bytes,
        request: InferenceRequest,
        entry: CatalogEntry,
        bookings: trio.Nursery,
    ) -> object | None:
        """Generate, book and send the receipt; returns what ``_await_ack`` returns."""
        admitted = trio.current_time()
        params = ChatParams(model=entry.backend_model, messages=list(request.messages), **generation_fields(request))
        missing = params.needs() - set(entry.offer.capabilities)
        if missing:
            raise RequestRejected(
                f"model {entry.offer.name!r} does not support {', '.join(sorted(missing))}",
                code=ErrorCode.UNSUPPORTED_FEATURE,
            )
        peer = stream.remote_peer
        self.rate.admit(peer, now=trio.current_time())  # RATE_LIMITED
        params = await self._cap_cost(request, entry, params)  # PRICE_CAP_EXCEEDED
        self._remember(request, peer)  # REPLAYED_NONCE, OVER_CAPACITY, PEER_LIMIT: the nonce is stored last
        output = Output()
        served: list[PoolMember] = []  # the pool member that answered (``_pool``)

        def book(*, entry: CatalogEntry = entry, **outcome: object) -> Awaitable[tuple[Envelope, bytes, Receipt]]:
            """Book with the backend that served: its tokenizer counts what it produced,
            its provider's charge is booked with the receipt."""
            by, counted, charged = entry, params, {}
            if served:
                member = served[-1]
                by = msgspec.structs.replace(entry, backend=member.backend, backend_model=member.backend_model)
                counted = msgspec.structs.replace(params, model=member.backend_model)
                charged = {"backend": member.name, "charge": functools.partial(self.catalog.charge, member)}
            return self._book(request_payload=request_payload, client=peer, entry=by, params=counted,
                              max_cost=request.max_cost, **charged, **outcome)  # fmt: skip

        # the response cache (``_response_cache``): a hit is answered without a slot or the backend
        cache = self.caches.lookup(entry.offer.name, params, peer, now=trio.current_time())
        if cache is not None and cache.hit is not None:
            return await self._serve_cached(stream, conn, entry, cache, book, bookings)
        holds: list[SpendHold] = []  # worst cases held against providers' spend budgets until booked
        if entry.pool is not None:
            worst = functools.partial(self._worst_provider_cost, entry, params)
            open_events = functools.partial(entry.pool.stream_chat, params, served, holds=holds, worst_case=worst)
        else:
            open_events = functools.partial(entry.backend.stream_chat, params)
        # A slot is held while the backend generates, not while the receipt is counted and
        # settled: a client's next request must not wait because its last ack is in flight.
        lane = self.slots.lane(entry.offer.name, capacity=entry.capacity, max_queue=entry.max_queue)
        slot = await wait_for_slot(self.slots, lane, stream)
        failure: Exception | None = None
        started = trio.current_time()
        try:
            finished = await relay_answer(
                stream,
                conn,
                open_events,
                output,
                chunk_interval=self.config.chunk_interval,
                progress_interval=self.config.progress_interval,
                send_timeout=self.config.ack_timeout,
                abort=self.abort,
            )
        except Exception as exc:  # settled below, once the slot is free
            failure = exc
        finally:
            slot.release()
        elapsed = trio.current_time() - started
        ttft = None if output.first_content_at is None else output.first_content_at - admitted
        try:
            if failure is not None:
                error = await self._settle_failure(failure, output, book)
                if not output.has_content:  # no receipt bills it; each provider that took it still read the prompt
                    for member in dict.fromkeys(served):
                        await self._charge_unbilled(member, entry, params)
                self.metrics.request_done(entry.offer.name, error.code, ttft=ttft,
                                          duration=trio.current_time() - admitted)  # fmt: skip
                raise error
            finish_reason = str(finished.finish_reason)
            envelope, receipt_digest, receipt = await book(output=output, finish_reason=finish_reason,
                                                           usage=finished.usage)  # fmt: skip
        finally:
            for hold in holds:  # the real charges are booked now
                hold.release()
        if cache is not None:  # a complete answer, booked: the response cache may keep it
            cache.store(output, finished, now=trio.current_time())
        self.catalog.note_speed(entry.offer.name, receipt.output_tokens, elapsed)
        return await self._deliver(stream, conn, entry, envelope, receipt_digest, receipt, output, admitted, bookings)

    async def _deliver(self, stream: P2PStream, conn: InferenceConnection, entry: CatalogEntry, envelope: Envelope,
                       receipt_digest: bytes, receipt: Receipt, output: Output, admitted: float,
                       bookings: trio.Nursery) -> object | None:  # fmt: skip
        """A booked answer: counted (status, metrics), its receipt sent, its ack awaited."""
        ttft = None if output.first_content_at is None else output.first_content_at - admitted
        self._count(entry.offer.name, receipt, ttft)
        self.metrics.request_done(entry.offer.name, None, ttft=ttft, duration=trio.current_time() - admitted,
                                  input_tokens=receipt.input_tokens, output_tokens=receipt.output_tokens)  # fmt: skip
        self.served += 1
        await FrameIO(stream, conn).send(ReceiptFrame(envelope), timeout=self.config.ack_timeout)
        return await await_ack(
            self.intake, self.ledger, stream, conn, receipt_digest, bookings, timeout=self.config.ack_timeout
        )
