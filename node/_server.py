"""The ``/loomnet/infer/1`` stream handler: admit, generate, count, sign, book.

Admission, in order: the request frame arrives in time and decodes; its signature
verifies; its signer is the peer at the other end of the stream (Noise
authenticated that peer, so nobody can spend someone else's signed request); the
replay guard passes it (audience, age, nonce); the model is served; the advertised
price is within the request's caps; a generation slot is free. Every refusal is an
error frame with a stable code, never a bare reset.

Then the backend streams; text is batched into chunk frames (a frame costs ~0.2 ms
of CPU, so never one per token). At the end the executor counts tokens, signs a
receipt, writes it to its ledger *before* sending it, and waits briefly for the
client's counter-signature, which it books too.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import trio

from loomnet.client import Ledger, P2PStream, TokenCounter
from loomnet.protocol import (
    NEED_DATA,
    BackendError,
    NetworkError,
    AckFrame,
    ChunkFrame,
    ErrorCode,
    ErrorFrame,
    InferenceConnection,
    InferenceRequest,
    LoomError,
    NetworkTimeout,
    ReceiptAck,
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
    open_envelope,
)

from ._catalog import Catalog, CatalogEntry
from ._intake import Intake, RequestBudget
from ._metering import Meter, Output
from .backends._base import ChatParams, Finished, TextDelta
from .config import ExecutorConfig

__all__ = ["InferenceServer"]

log = logging.getLogger("loomnet.server")

_MAX_DELTAS_PER_CHUNK = 32


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
    ) -> None:
        self.key = key
        self.config = config
        self.catalog = catalog
        self.ledger = ledger
        self.tokens = tokens or TokenCounter()
        self.clock = clock
        self.meter = Meter(key, ledger, self.tokens, clock=lambda: self.clock())
        self.replay = ReplayGuard(key.peer_id, max_age=config.max_request_age, max_skew=config.max_clock_skew)
        self.slots = trio.CapacityLimiter(config.capacity)
        self._on_load_change = on_load_change
        budget = RequestBudget(per_peer=config.max_request_bytes_per_peer, total=config.max_request_bytes)
        self.intake = Intake(read_timeout=config.request_read_timeout, send_timeout=config.ack_timeout, budget=budget)
        self.served = 0
        self.refused = 0

    @property
    def load(self) -> int:
        return self.slots.borrowed_tokens

    async def handle(self, stream: P2PStream) -> None:
        """Serve one stream. Never raises: every failure is answered or logged."""
        conn = InferenceConnection(Role.EXECUTOR)
        try:
            envelope_payload, request, entry = await self._admit(stream, conn)
            await self._serve(stream, conn, envelope_payload, request, entry)
        except LoomError as exc:
            self.refused += 1
            log.info("request from %s ended with %s", stream.remote_peer, exc)
            await self._send_error(stream, conn, exc)
        except Exception:  # a bug must not kill the node, and the client deserves a code
            self.refused += 1
            log.exception("internal error serving %s", stream.remote_peer)
            await self._send_error(stream, conn, LoomError("internal error", code=ErrorCode.INTERNAL))

    # ---------------------------------------------------------------- admission

    async def _next_event(self, stream: P2PStream, conn: InferenceConnection, timeout: float):
        while (event := conn.next_event()) is NEED_DATA:
            conn.receive_data(await stream.receive_some(timeout=timeout))
        return event

    async def _admit(self, stream: P2PStream, conn: InferenceConnection) -> tuple[bytes, InferenceRequest, CatalogEntry]:
        frame = await self.intake.read_request(stream, conn)  # one deadline, a byte budget per peer
        if not isinstance(frame, RequestFrame):  # pragma: no cover - the state machine allows nothing else
            raise RequestRejected("expected a request frame", code=ErrorCode.UNEXPECTED_FRAME)
        request, signer = open_envelope(SignedKind.REQUEST, frame.envelope)
        assert isinstance(request, InferenceRequest)
        if signer != stream.remote_peer:
            raise RequestRejected(
                "request is signed by another peer than the one sending it", code=ErrorCode.SIGNER_MISMATCH
            )
        self.replay.check(request, now=self.clock())
        entry = self.catalog.lookup(request.model)
        if entry is None:
            served = ", ".join(o.name for o in self.catalog.offers)
            raise RequestRejected(
                f"model {request.model!r} is not served here (serving: {served})", code=ErrorCode.UNKNOWN_MODEL
            )
        if not self.catalog.is_up(entry.backend):
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
    ) -> None:
        params = ChatParams(
            model=entry.backend_model,
            messages=list(request.messages),
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            seed=request.seed,
            tools=list(request.tools),
            tool_choice=request.tool_choice,
            response_format=request.response_format,
        )
        missing = params.needs() - set(entry.offer.capabilities)
        if missing:
            raise RequestRejected(
                f"model {entry.offer.name!r} does not support {', '.join(sorted(missing))}",
                code=ErrorCode.UNSUPPORTED_FEATURE,
            )
        output = Output()
        book = functools.partial(
            self.meter.book, request_payload=request_payload, client=stream.remote_peer, entry=entry, params=params
        )
        # A slot is held while the backend generates, not while the receipt is settled:
        # a client's next request must not be refused because its last ack is in flight.
        try:
            self.slots.acquire_on_behalf_of_nowait(conn)
        except trio.WouldBlock:
            raise RequestRejected("all generation slots are busy", code=ErrorCode.OVER_CAPACITY, retryable=True) from None
        self._on_load_change()
        try:
            finished = await self._generate(stream, conn, entry, params, output)
        except BackendError as exc:
            if output.chunks:  # the client got part of an answer: bill exactly that, and say so
                exc.receipt, _ = await book(output=output, finish_reason="error", usage=None)
                self.served += 1
            raise
        except NetworkError:
            if output.chunks:  # the client left mid-stream: book what it was sent
                await book(output=output, finish_reason="client_gone", usage=None)
            raise
        finally:
            self.slots.release_on_behalf_of(conn)
            self._on_load_change()
        envelope, receipt_digest = await book(output=output, finish_reason=str(finished.finish_reason), usage=finished.usage)
        self.served += 1
        await stream.send_all(conn.send(ReceiptFrame(envelope)), timeout=self.config.ack_timeout)
        await self._await_ack(stream, conn, receipt_digest)

    async def _generate(
        self, stream: P2PStream, conn: InferenceConnection, entry: CatalogEntry, params: ChatParams, output: Output
    ) -> Finished:
        """Run the backend, batching text into chunk frames; returns its Finished event."""
        pending: list[str] = []
        finished: Finished | None = None
        timeout = self.config.ack_timeout

        async def flush(tool_calls: list | None = None) -> None:
            text = "".join(pending)
            pending.clear()
            if text or tool_calls:
                frame = ChunkFrame(seq=len(output.chunks), text=text, tool_calls=tool_calls or [])
                await stream.send_all(conn.send(frame), timeout=timeout)
                output.chunks.append(text)
                output.tool_calls.extend(tool_calls or [])

        last_flush = trio.current_time()
        try:
            async with entry.backend.stream_chat(params) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        pending.append(event.text)
                        if (
                            trio.current_time() - last_flush >= self.config.chunk_interval
                            or len(pending) >= _MAX_DELTAS_PER_CHUNK
                        ):
                            await flush()
                            last_flush = trio.current_time()
                    elif isinstance(event, Finished):
                        finished = event
        except BackendError:
            await flush()  # what the backend produced before failing still goes out, and is billed
            raise
        if finished is None:  # pragma: no cover - backends always finish or raise
            raise BackendError("backend ended without finishing", code=ErrorCode.BACKEND_ERROR)
        await flush(list(finished.tool_calls))
        return finished

    async def _await_ack(self, stream: P2PStream, conn: InferenceConnection, receipt_digest: bytes) -> None:
        """Book the client's counter-signature if it comes soon; it is optional."""
        try:
            event = await self._next_event(stream, conn, self.config.ack_timeout)
        except LoomError:
            return
        if not isinstance(event, AckFrame):
            return
        try:
            ack, signer = open_envelope(SignedKind.RECEIPT_ACK, event.envelope)
        except LoomError as exc:
            log.info("bad receipt acknowledgement from %s: %s", stream.remote_peer, exc)
            return
        assert isinstance(ack, ReceiptAck)
        if signer == stream.remote_peer and ack.receipt_digest == receipt_digest:
            with trio.CancelScope(shield=True):
                await self.ledger.record_ack(receipt_digest, event.envelope)
