"""The ``/loomnet/infer/1`` stream handler: admit, generate, count, sign, book.

Admission, in order: the request frame arrives in time and decodes; its signature
verifies; its signer is the peer at the other end of the stream (Noise
authenticated that peer, so nobody can spend someone else's signed request); the
replay guard passes it (audience, age, nonce); the model is served; the advertised
price is within the request's caps; the model supports what the request needs; the
client peer is within its rate limits (``_rate``: ``RATE_LIMITED``, retryable); the
request's worst case is within its ``max_cost`` (``_cost_cap``: ``PRICE_CAP_EXCEEDED``;
without ``max_tokens`` the generation is capped to what ``max_cost`` buys instead); a
generation slot is free, or comes within the queue deadline (``_queue``: a full queue
or a wait that runs out is ``OVER_CAPACITY``, retryable, with ``retry_after``). Every
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

A model with a response cache (``[models.cache]``, ``_response_cache``) answers a
deterministic request it answered before without a slot or the backend: the lookup
comes after every admission check but the slot, the stored answer streams through the
same relay, and the receipt says ``cached``. A completed, booked answer is stored.

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
    ErrorFrame,
    InferenceConnection,
    InferenceRequest,
    LoomError,
    Receipt,
    ReceiptFrame,
    RequestFrame,
    RequestRejected,
    ReplayGuard,
    Role,
    SignedKind,
    SigningKey,
    StreamState,
    encode_frame,
    encode_frame_body,
    generation_fields,
    open_envelope,
)

from ._catalog import Catalog, CatalogEntry
from ._cost_cap import check_worst_case
from ._counting import CountingChain
from ._acks import await_ack
from ._intake import Intake, RequestBudget, SessionIdle
from ._metering import Meter, Output
from ._metrics import ExecutorMetrics
from ._pool import PoolMember
from ._spend import SpendHold
from ._queue import Slots
from ._slot_wait import wait_for_slot
from ._rate import PeerRateLimiter
from ._relay import ClientGone, relay_answer
from ._response_cache import CacheLookup, ResponseCaches, entry_cache_terms
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


class InferenceServer:
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

    def _admit(self, stream: P2PStream, frame: object) -> tuple[bytes, InferenceRequest, CatalogEntry]:
        if not isinstance(frame, RequestFrame):  # pragma: no cover - the state machine allows nothing else
            raise RequestRejected("expected a request frame", code=ErrorCode.UNEXPECTED_FRAME)
        request, signer = open_envelope(SignedKind.REQUEST, frame.envelope)
        assert isinstance(request, InferenceRequest)
        if signer != stream.remote_peer:
            raise RequestRejected(
                "request is signed by another peer than the one sending it", code=ErrorCode.SIGNER_MISMATCH
            )
        self.replay.check(request, now=self.clock())
        if self.draining:
            raise RequestRejected("this executor is shutting down; try another", code=ErrorCode.SHUTTING_DOWN,
                                  retryable=True)  # fmt: skip
        entry = self.catalog.lookup(request.model)
        if entry is None:
            served = ", ".join(o.name for o in self.catalog.offers)
            raise RequestRejected(
                f"model {request.model!r} is not served here (serving: {served})", code=ErrorCode.UNKNOWN_MODEL
            )
        if not self.catalog.available(entry):
            raise RequestRejected(
                f"the runtime behind {request.model!r} is down; try another executor",
                code=ErrorCode.BACKEND_UNAVAILABLE,
                retryable=True,
            )
        offer = entry.offer
        if (request.max_price_in is not None and offer.price_in > request.max_price_in) or (
            request.max_price_out is not None and offer.price_out > request.max_price_out
        ):
            raise RequestRejected(
                f"price {offer.price_in}/{offer.price_out} micro-credits per million tokens (in/out) "
                f"is above the cap {request.max_price_in}/{request.max_price_out}",
                code=ErrorCode.PRICE_CAP_EXCEEDED,
            )
        return frame.envelope.payload, request, entry

    async def _send_error(self, stream: P2PStream, conn: InferenceConnection, exc: LoomError) -> None:
        frame = ErrorFrame(  # a peer gets loomnet's words only; exc.message went to the log
            code=int(exc.code),
            message=exc.peer_message[:2000],
            retryable=exc.retryable,
            retry_after=getattr(exc, "retry_after", None),
            receipt=getattr(exc, "receipt", None),
        )
        try:
            if conn.state in (StreamState.IDLE, StreamState.OPEN):
                data = conn.send(frame)
            elif conn.state is StreamState.FAILED:
                # the peer broke the protocol; still say why, once, then give up
                data = encode_frame(encode_frame_body(frame))
            else:
                return
            await stream.send_all(data, timeout=self.config.ack_timeout)
        except LoomError:
            pass

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
        self._count(entry.offer.name, receipt, ttft)
        self.metrics.request_done(entry.offer.name, None, ttft=ttft, duration=trio.current_time() - admitted,
                                  input_tokens=receipt.input_tokens, output_tokens=receipt.output_tokens)  # fmt: skip
        self.served += 1
        await FrameIO(stream, conn).send(ReceiptFrame(envelope), timeout=self.config.ack_timeout)
        return await await_ack(
            self.intake, self.ledger, stream, conn, receipt_digest, bookings, timeout=self.config.ack_timeout
        )

    async def _serve_cached(
        self, stream: P2PStream, conn: InferenceConnection, entry: CatalogEntry, cache: CacheLookup,
        book: Callable[..., Awaitable[tuple[Envelope, bytes, Receipt]]], bookings: trio.Nursery,
    ) -> object | None:
        """Answer from the response cache: the stored answer streams as chunk frames (the
        relay's batching and client watch, no slot, no backend); the receipt says
        ``cached``, is counted from the stored usage and priced per the model's ``billing``."""
        assert cache.hit is not None
        book = functools.partial(book, entry=cache.billed(entry), cached=True)
        output = Output()
        admitted = trio.current_time()
        try:
            finished = await relay_answer(
                stream, conn, cache.hit.replay, output, chunk_interval=self.config.chunk_interval,
                progress_interval=self.config.progress_interval, send_timeout=self.config.ack_timeout,
                abort=self.abort,
            )
        except Exception as exc:  # the client left or broke the protocol: bill what it got
            error = await self._settle_failure(exc, output, book)
            self.metrics.request_done(entry.offer.name, error.code, duration=trio.current_time() - admitted)
            raise error from None
        finish_reason = str(finished.finish_reason)
        envelope, receipt_digest, receipt = await book(output=output, finish_reason=finish_reason, usage=finished.usage)
        ttft = None if output.first_content_at is None else output.first_content_at - admitted
        self._count(entry.offer.name, receipt, ttft)
        self.metrics.request_done(entry.offer.name, None, ttft=ttft, duration=trio.current_time() - admitted,
                                  input_tokens=receipt.input_tokens, output_tokens=receipt.output_tokens)  # fmt: skip
        self.served += 1
        await FrameIO(stream, conn).send(ReceiptFrame(envelope), timeout=self.config.ack_timeout)
        return await await_ack(
            self.intake, self.ledger, stream, conn, receipt_digest, bookings, timeout=self.config.ack_timeout
        )

    async def _cap_cost(self, request: InferenceRequest, entry: CatalogEntry, params: ChatParams) -> ChatParams:
        """Check the request's worst case against its ``max_cost`` (``_cost_cap``); returns
        the params to run, with ``max_tokens`` capped where the request set none.

        The prompt is counted only when there is a cap and a price: tokenizing costs time
        (up to ``count-timeout`` with the model's own tokenizer).

        Raises:
            RequestRejected: ``PRICE_CAP_EXCEEDED``, not retryable.
        """
        offer = entry.offer
        if request.max_cost is None or not (offer.price_in or offer.price_out):
            return params
        chain = CountingChain(entry.backend, params.model, self.tokens, budget=self.config.count_timeout)
        prompt = await chain.prompt(params)
        max_tokens = check_worst_case(
            max_cost=request.max_cost, prompt_tokens=prompt.tokens, max_tokens=params.max_tokens,
            context_length=offer.context_length, price_in=offer.price_in, price_out=offer.price_out,
        )
        return params if max_tokens is None else msgspec.structs.replace(params, max_tokens=max_tokens)

    async def _book(self, **booking: object) -> tuple[Envelope, bytes, Receipt]:
        """Book a receipt (``Meter.book``) and charge its tokens to the client's rate limit."""
        envelope, receipt_digest = await self.meter.book(**booking)  # type: ignore[arg-type]
        receipt = msgspec.msgpack.decode(envelope.payload, type=Receipt)
        self.rate.charge(receipt.client, receipt.input_tokens + receipt.output_tokens, now=trio.current_time())
        return envelope, receipt_digest, receipt

    def _worst_provider_cost(self, entry: CatalogEntry, params: ChatParams, member: PoolMember) -> int:
        """What ``member``'s provider would charge at most for this request: a prompt
        estimate that errs high (a token per 3 bytes, 16 per message for the template)
        and every token ``max_tokens`` allows (else the model's context), at its price."""
        charge = self.catalog.charges.get(member.name)
        if charge is None:
            return 0
        prompt = sum(len(m.content.encode()) // 3 + 16 for m in params.messages)
        output = params.max_tokens or entry.offer.context_length or 4096
        return charge.cost(prompt, output)

    async def _charge_unbilled(self, member: PoolMember, entry: CatalogEntry, params: ChatParams) -> None:
        """What ``member``'s provider charges for a request that ended before any content
        (the client left, or the stream failed): the prompt it read, counted here (its
        tokenizer, else tiktoken), added to its spend and booked in the ledger
        (``provider_charges``), so the spend budget sees every answer the operator paid
        for. Free backends, and failures to count or book, cost nothing more (logged)."""
        if self.catalog.charges.get(member.name) is None:
            return
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.count_timeout + 5):
                chain = CountingChain(member.backend, member.backend_model, self.tokens, budget=self.config.count_timeout)
                prompt = await chain.prompt(msgspec.structs.replace(params, model=member.backend_model))
                cost = self.catalog.charge(member, prompt.tokens, 0)
                if cost:
                    await self.ledger.record_provider_charge(backend=member.name, model=entry.offer.name,
                                                             input_tokens=prompt.tokens, output_tokens=0, cost=cost,
                                                             now=self.clock())  # fmt: skip
        except Exception:  # noqa: BLE001 - never replace the request's own error
            log.exception("could not book what backend %s charged for an unbilled request", member.name)

    async def _settle_failure(
        self, failure: Exception, output: Output, book: Callable[..., Awaitable[tuple[Envelope, bytes, Receipt]]]
    ) -> LoomError:
        """Book a receipt for what the client was sent before ``failure``; returns the error
        to answer with (the original one: an error while booking is only logged).

        Only content is billed: a stream that carried progress chunks alone gets no receipt.
        The receipt of a client that left is booked on this side only ("client_gone");
        otherwise it rides on the error frame ("error").
        """
        if isinstance(failure, LoomError):
            error = failure
        else:  # a bug in an adapter: the log gets everything, the peer a code
            log.error("generation failed with an unexpected error", exc_info=failure)
            error = LoomError(f"internal error: {type(failure).__name__}", code=ErrorCode.INTERNAL)
        if not output.has_content:
            return error
        gone = isinstance(failure, ClientGone)
        try:
            envelope, _, _ = await book(output=output, finish_reason="client_gone" if gone else "error", usage=None)
        except Exception:  # noqa: BLE001 - never replace the original error
            log.exception("could not book the partial receipt after %s", error)
            return error
        self.served += 1
        if not gone:
            error.receipt = envelope  # type: ignore[attr-defined]  # _send_error sends it
        return error
