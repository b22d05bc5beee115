"""Admitting a request, and refusing it: the checks of the request frame that come
before anything is generated (signature, signer = the stream's peer, audience, age and
a known nonce, the drain, the model, its backends, the price caps, ``max_tokens``
within the model's context window), the last step of admission (``_remember``: the
nonce is stored, once every other check passed), and the error frame a refusal or a
failure becomes (loomnet's words only, with a partial answer's receipt).

A mixin of :class:`~loomnet.node._server.InferenceServer` (its ``catalog``,
``replay``, ``clock``, ``draining`` and ``config``).
"""

from __future__ import annotations

import math

from loomnet.client import P2PStream
from loomnet.protocol import (
    ErrorCode,
    ErrorFrame,
    InferenceConnection,
    InferenceRequest,
    LoomError,
    RequestFrame,
    RequestRejected,
    SignedKind,
    StreamState,
    encode_frame,
    encode_frame_body,
    open_envelope,
)

from ._catalog import CatalogEntry

__all__ = ["Admission"]

#: the longest ``retry_after`` an error frame carries (seconds; the frame's schema limit)
_MAX_RETRY_AFTER = 86400.0


def _wire_seconds(value: object) -> float | None:
    """A ``retry_after`` as the error frame's schema allows it: a number within
    ``[0, 86400]`` s, or None for anything else (NaN, ±inf, not a number). An error's
    ``retry_after`` may come from a runtime; sent as it was, ``inf`` made the whole frame
    undecodable, and the peer saw a malformed frame instead of the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return min(max(float(value), 0.0), _MAX_RETRY_AFTER)


class Admission:
    """See the module doc."""

    def _admit(self, stream: P2PStream, frame: object) -> tuple[bytes, InferenceRequest, CatalogEntry]:
        if not isinstance(frame, RequestFrame):  # pragma: no cover - the state machine allows nothing else
            raise RequestRejected("expected a request frame", code=ErrorCode.UNEXPECTED_FRAME)
        request, signer = open_envelope(SignedKind.REQUEST, frame.envelope)
        assert isinstance(request, InferenceRequest)
        if signer != stream.remote_peer:
            raise RequestRejected(
                "request is signed by another peer than the one sending it", code=ErrorCode.SIGNER_MISMATCH
            )
        # audience, age, a nonce known already: nothing is remembered yet. The nonce is
        # stored last (``_remember``), once every other check passed: a request refused
        # for anything else must not hold a slot of the replay memory
        self.replay.fresh(request, now=self.clock())
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
        if request.max_tokens is not None and 0 < offer.context_length < request.max_tokens:
            raise RequestRejected(
                f"max_tokens {request.max_tokens} is above the context window of {offer.name!r} "
                f"({offer.context_length} tokens)",
                code=ErrorCode.MAX_TOKENS_OVER_CONTEXT,
                retryable=True,
            )
        return frame.envelope.payload, request, entry

    def _remember(self, request: InferenceRequest, peer: str) -> None:
        """The last step of admission: the request's nonce is checked again and stored
        (no ``await`` between the check and the store, so of copies that raced past
        ``_admit`` exactly one runs). Last, so that a request refused for its rate, its
        model, its price... never holds a slot of the replay memory.

        Raises:
            RequestRejected: ``REPLAYED_NONCE``; ``OVER_CAPACITY`` (the memory is full);
                ``PEER_LIMIT`` (``peer`` holds its share of it), both retryable.
        """
        self.replay.remember(request, now=self.clock(), peer=peer)

    async def _send_error(self, stream: P2PStream, conn: InferenceConnection, exc: LoomError) -> None:
        frame = ErrorFrame(  # a peer gets loomnet's words only; exc.message went to the log
            code=int(exc.code),
            message=exc.peer_message[:2000],
            retryable=exc.retryable,
            retry_after=_wire_seconds(getattr(exc, "retry_after", None)),
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
