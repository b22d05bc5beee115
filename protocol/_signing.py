"""Sign bytes, never objects.

A signed message is an :class:`Envelope` ``{payload, signer, sig}`` where ``sig`` covers
a per-kind domain prefix followed by the exact payload bytes. The prefix means a
signature made for one kind of message (say a receipt) can never be replayed as
another (say a request). Readers check the signature over the bytes they received,
and only then decode them: nothing is ever re-encoded to be verified, so two
encoders that disagree on a byte can never make a valid message look forged or the
reverse.
"""

from __future__ import annotations

import enum
import hashlib
from typing import TypeVar

import msgspec

from ._decode_errors import describe_decode_error
from ._errors import ErrorCode, FrameError, MessageDecodeError, SignatureError
from ._identity import SigningKey, peer_id_from_public_key, verify_signature
from ._messages import (
    MAX_ADVERT_SIZE,
    MAX_FRAME_SIZE,
    Advert,
    Envelope,
    InferenceRequest,
    Receipt,
    ReceiptAck,
    encode_payload,
)

__all__ = ["SignedKind", "digest", "open_envelope", "seal"]

T = TypeVar("T", bound=msgspec.Struct)


class SignedKind(enum.Enum):
    """The kinds of signed payload, each with its own domain-separation prefix and the
    largest payload, in bytes, that may be signed or opened under it (``max_payload``)."""

    ADVERT = (b"loomnet/advert/1\n", Advert, MAX_ADVERT_SIZE)
    REQUEST = (b"loomnet/request/1\n", InferenceRequest, MAX_FRAME_SIZE)
    RECEIPT = (b"loomnet/receipt/1\n", Receipt, MAX_FRAME_SIZE)
    RECEIPT_ACK = (b"loomnet/receipt-ack/1\n", ReceiptAck, MAX_FRAME_SIZE)

    def __init__(self, prefix: bytes, message_type: type, max_payload: int) -> None:
        self.prefix = prefix
        self.message_type = message_type
        self.max_payload = max_payload
        self.decoder = msgspec.msgpack.Decoder(message_type)


def digest(data: bytes) -> bytes:
    """sha256, the one hash loomnet uses to bind receipts to requests and text."""
    return hashlib.sha256(data).digest()


def seal(kind: SignedKind, message: msgspec.Struct, key: SigningKey) -> Envelope:
    """Encode ``message`` once and sign those bytes under ``kind``'s prefix.

    Raises:
        TypeError: ``message`` is not ``kind``'s message type.
        FrameError: the payload is over ``kind.max_payload`` bytes (code
            FRAME_TOO_LARGE): no peer would accept it (e.g. an advert of too many models).
    """
    if not isinstance(message, kind.message_type):
        raise TypeError(f"{kind.name} envelopes carry {kind.message_type.__name__}")
    payload = encode_payload(message)
    if len(payload) > kind.max_payload:
        raise FrameError(
            f"a signed {kind.name.lower()} of {len(payload)} bytes is over the {kind.max_payload}-byte maximum",
            code=ErrorCode.FRAME_TOO_LARGE,
        )
    return Envelope(payload=payload, signer=key.public_key, sig=key.sign(kind.prefix + payload))


def open_envelope(kind: SignedKind, envelope: Envelope) -> tuple[object, str]:
    """Verify, then decode. Returns ``(message, signer_peer_id)``.

    Raises:
        SignatureError: the signature does not verify (code BAD_SIGNATURE).
        MessageDecodeError: the signed bytes are not a valid ``kind`` message, or are
            over ``kind.max_payload`` (code FRAME_TOO_LARGE; refused before the
            signature is checked, so an oversized advert costs no verification).
    """
    if len(envelope.payload) > kind.max_payload:
        raise MessageDecodeError(
            f"signed {kind.name.lower()} of {len(envelope.payload)} bytes is over the {kind.max_payload}-byte maximum",
            code=ErrorCode.FRAME_TOO_LARGE,
        )
    if not verify_signature(envelope.signer, envelope.sig, kind.prefix + envelope.payload):
        raise SignatureError(f"{kind.name.lower()} signature does not verify")
    try:
        message = kind.decoder.decode(envelope.payload)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise MessageDecodeError(f"signed {kind.name.lower()} does not decode: {describe_decode_error(exc)}") from None
    return message, peer_id_from_public_key(envelope.signer)
