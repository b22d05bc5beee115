"""The client's counter-signature of a receipt: read it, check it, book it beside the
next request.

The ack is optional (a client may vanish once it has its receipt, and the receipt stands
on its own), so nothing here raises. It is read like a request (``Intake.read_frame``):
one deadline, ``ack-timeout``, for the whole frame, its bytes charged to the byte
budgets, and on a one-request stream a header announcing more than ``MAX_ACK_FRAME``
refused unread, so a peer dripping a huge "ack" holds nothing for long. On a session
stream the frame may be the next request instead (the client skipped its ack), so it
may be as large as a request; the budgets and the deadline bound it the same way.

Booking waits for an fsync'd write (1-4 ms), which held every next request of a
session back (issue 9): the booking runs in the session handler's nursery, beside the
next request, shielded so a shutdown does not drop it.
"""

from __future__ import annotations

import logging

import trio

from loomnet.client import Ledger, P2PStream
from loomnet.protocol import (
    MAX_FRAME_SIZE,
    AckFrame,
    Envelope,
    InferenceConnection,
    LoomError,
    ReceiptAck,
    RequestFrame,
    SignedKind,
    open_envelope,
)

from ._intake import Intake

__all__ = ["MAX_ACK_FRAME", "await_ack"]

log = logging.getLogger("loomnet.server")

#: Most body bytes an acknowledgement frame may announce. A signed ``ReceiptAck`` is
#: about 200 bytes; this leaves room for fields later versions append.
MAX_ACK_FRAME = 64 * 1024


async def await_ack(
    intake: Intake,
    ledger: Ledger,
    stream: P2PStream,
    conn: InferenceConnection,
    receipt_digest: bytes,
    bookings: trio.Nursery,
    *,
    timeout: float,
) -> object | None:
    """Read the client's next frame after a receipt (within ``timeout`` seconds) and
    book it in ``bookings`` when it is the ack of ``receipt_digest``, signed by the
    stream's peer.

    Returns:
        The frame when it is the next request of a session (the client skipped the
        ack), else None (an ack, the end of the stream, a failure: all logged).
    """
    max_size = MAX_FRAME_SIZE if conn.session else MAX_ACK_FRAME
    try:
        event = await intake.read_frame(stream, conn, timeout=timeout, what="acknowledgement", max_size=max_size)
    except LoomError as exc:
        log.debug("no receipt acknowledgement from %s: %s", stream.remote_peer, exc)
        return None
    if isinstance(event, RequestFrame):
        return event
    if not isinstance(event, AckFrame):
        return None
    try:
        ack, signer = open_envelope(SignedKind.RECEIPT_ACK, event.envelope)
    except LoomError as exc:
        log.info("bad receipt acknowledgement from %s: %s", stream.remote_peer, exc)
        return None
    assert isinstance(ack, ReceiptAck)
    if signer == stream.remote_peer and ack.receipt_digest == receipt_digest:
        bookings.start_soon(_book_ack, ledger, receipt_digest, event.envelope)
    return None


async def _book_ack(ledger: Ledger, receipt_digest: bytes, ack: Envelope) -> None:
    """Book a counter-signature; shielded (a shutdown does not drop it), never raises."""
    with trio.CancelScope(shield=True):
        try:
            await ledger.record_ack(receipt_digest, ack)
        except LoomError as exc:
            log.error("could not book the acknowledgement of a receipt: %s", exc)
