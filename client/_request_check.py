"""Refuse an obviously invalid request locally, before any traffic.

The check is the executor's own: the request is encoded as it will be signed and
decoded with the protocol's typed decoder, so every constraint of the
``InferenceRequest`` schema (``protocol/_messages.py``: temperature in [0, 2] and not
NaN, ``max_tokens`` ≥ 1, 1 to 1024 messages, a known role, string and list lengths,
image types, seeds, price caps, ...) applies here exactly as it will there, and the
two can never drift apart. What the schema cannot say (the whole request must fit in
one frame) is checked against the same ``MAX_FRAME_SIZE`` the executor enforces.
"""

from __future__ import annotations

import re

import msgspec

from loomnet.protocol import (
    MAX_FRAME_SIZE,
    Envelope,
    InferenceRequest,
    InvalidRequest,
    RequestFrame,
    encode_frame_body,
    encode_payload,
)

__all__ = ["check_request"]

_decoder = msgspec.msgpack.Decoder(InferenceRequest)
#: msgspec's "<what> - at `$.<path>`" error suffix.
_AT = re.compile(r"^(?P<reason>.*) - at `\$\.?(?P<path>[^`]*)`$", re.DOTALL)


def check_request(request: InferenceRequest) -> bytes:
    """Validate ``request`` as its executor will; returns its payload bytes.

    Raises:
        InvalidRequest: a field breaks the schema (``field`` names it, e.g.
            ``"messages[0].role"``), a value cannot be encoded at all, or the request
            is too large for one frame.
    """
    try:
        payload = encode_payload(request)
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"invalid request: it cannot be encoded ({exc})") from None
    try:
        _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT.match(text)
        field = match["path"] if match else None
        reason = match["reason"] if match else text
        raise InvalidRequest(f"invalid request: {field or 'the request'}: {reason}", field=field or None) from None
    # The frame as it will travel, with a signer and signature of their fixed sizes.
    frame = encode_frame_body(RequestFrame(Envelope(payload=payload, signer=bytes(32), sig=bytes(64))))
    if len(frame) > MAX_FRAME_SIZE:
        raise InvalidRequest(
            f"invalid request: its frame is {len(frame)} bytes, over the protocol's maximum of "
            f"{MAX_FRAME_SIZE}; send fewer or smaller messages or images",
            field="messages",
        )
    return payload
