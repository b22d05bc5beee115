"""Fuzz targets for what a peer sends on the wire: frames, the stream state machine,
frame bodies, signed envelopes of every kind, and adverts through the gossip validator,
the offer table and the adverts stream. See ``targets.py`` for the property."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import strategies as st

from loomnet.client._advert_exchange import MAX_ADVERT_FRAME, AdvertReader
from loomnet.client._offers import OfferTable
from loomnet.client._validator import AdvertValidator, Rejection
from loomnet.protocol import (
    END,
    MAX_FRAME_SIZE,
    NEED_DATA,
    AdvertFrame,
    EndOfStream,
    ErrorCode,
    FrameDecoder,
    FrameError,
    InferenceConnection,
    LoomError,
    MessageDecodeError,
    ProtocolError,
    Role,
    SignatureError,
    SignedKind,
    SigningKey,
    StreamState,
    StreamTruncated,
    decode_frame,
    encode_frame_body,
    encode_payload,
)
from loomnet.protocol._stream import _SENT_BY

from .strategies import KEY, chunked, deepened, messages_of, mutated, mutated_struct_bytes, payloads_of, signed, stream_frames, wire_of

__all__ = ["PROTOCOL_TARGETS", "typed_error"]

_HEADER = 4


def typed_error(exc: BaseException, *allowed: type[LoomError]) -> None:
    """``exc`` is one of the typed errors a decoder documents, with a stable code."""
    assert isinstance(exc, allowed), f"{type(exc).__name__} is not one of {[a.__name__ for a in allowed]}: {exc}"
    assert isinstance(exc.code, ErrorCode), exc
    assert exc.peer_message, exc


# ------------------------------------------------------------------------ framing


def _frames_case() -> st.SearchStrategy[Any]:
    return st.tuples(st.sampled_from([16, 300, MAX_FRAME_SIZE]), wire_of().flatmap(chunked))


def check_framing(case: tuple[int, list[bytes]]) -> None:
    """``FrameDecoder``: frames (non-empty, within ``max_size``), or FrameError /
    StreamTruncated; its buffer never over two maximal frames."""
    max_size, chunks = case
    decoder = FrameDecoder(max_size=max_size)
    try:
        for chunk in [*chunks, b""]:
            decoder.receive_data(chunk)
            assert len(decoder._buffer) <= 2 * (max_size + _HEADER), len(decoder._buffer)
            while (frame := decoder.next_frame()) is not NEED_DATA and frame is not END:
                assert isinstance(frame, bytes) and 0 < len(frame) <= max_size
            if frame is END:
                assert chunk == b""
    except LoomError as exc:
        typed_error(exc, FrameError, StreamTruncated)


def _stream_case() -> st.SearchStrategy[Any]:
    return st.tuples(st.sampled_from(list(Role)), st.booleans(), st.sampled_from([200, 1 << 16]),
                     wire_of(max_frames=6).flatmap(chunked))


def check_stream(case: tuple[Role, bool, int, list[bytes]]) -> None:
    """``InferenceConnection`` (both roles, one-request and session streams): frames the
    peer may send, ``EndOfStream``, or a ProtocolError after which the state is FAILED;
    never more than ``max_stream_bytes`` taken from the peer per request."""
    role, session, max_stream_bytes, chunks = case
    conn = InferenceConnection(role, session=session, max_stream_bytes=max_stream_bytes)
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            assert conn._received <= max_stream_bytes
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, EndOfStream):
                    assert conn.state is StreamState.CLOSED
                    return
                assert _SENT_BY[type(event)] is not role, event
                assert conn.state is not StreamState.FAILED
    except LoomError as exc:
        typed_error(exc, ProtocolError)
        assert conn.state is StreamState.FAILED


def _bodies() -> st.SearchStrategy[bytes]:
    frames = stream_frames()
    return st.one_of(
        st.binary(max_size=400),
        frames.map(encode_frame_body).flatmap(mutated),
        frames.flatmap(mutated_struct_bytes),
        frames.map(encode_frame_body).flatmap(deepened),
    )


def check_frame_body(body: bytes) -> None:
    """``decode_frame``: a frame that re-encodes to an equal frame, or
    MessageDecodeError (MALFORMED_MESSAGE)."""
    try:
        frame = decode_frame(body)
    except LoomError as exc:
        typed_error(exc, MessageDecodeError)
        assert exc.code is ErrorCode.MALFORMED_MESSAGE
        return
    assert decode_frame(encode_frame_body(frame)) == frame  # every bound held: it decodes again


# ---------------------------------------------------------------------- envelopes


def _envelope_case() -> st.SearchStrategy[Any]:
    kinds = st.sampled_from(list(SignedKind))
    return kinds.flatmap(lambda k: st.tuples(st.just(k), payloads_of(k), st.sampled_from(["signed", "other-kind", "forged"])))


def check_envelope(case: tuple[SignedKind, bytes, str]) -> None:
    """``open_envelope``: ``(message of the kind's type, signer)``, or SignatureError /
    MessageDecodeError. A forged or cross-kind signature never opens."""
    kind, payload, how = case
    if how == "signed":
        envelope = signed(kind, payload)
    elif how == "other-kind":
        other = next(k for k in SignedKind if k is not kind)
        envelope = msgspec.structs.replace(signed(other, payload))
    else:
        envelope = msgspec.structs.replace(signed(kind, payload), signer=SigningKey(bytes(32)).public_key)
    from loomnet.protocol import open_envelope

    try:
        message, signer = open_envelope(kind, envelope)
    except LoomError as exc:
        typed_error(exc, SignatureError, MessageDecodeError)
        return
    assert how == "signed", "a signature made for another kind or key opened"
    assert isinstance(message, kind.message_type) and signer == KEY.peer_id
    assert msgspec.msgpack.decode(encode_payload(message), type=kind.message_type) == message


# ------------------------------------------------------------------------ adverts

NOW = 1_000_000.0


def _advert_case() -> st.SearchStrategy[Any]:
    adverts = messages_of(SignedKind.ADVERT).map(
        lambda a: msgspec.structs.replace(a, issued_at=NOW - 1.0, ttl=max(a.ttl, 60.0)))  # fresh: it gets deep
    payloads = st.one_of(adverts.map(encode_payload), payloads_of(SignedKind.ADVERT),
                         adverts.flatmap(mutated_struct_bytes))
    envelopes = payloads.map(lambda p: msgspec.msgpack.encode(signed(SignedKind.ADVERT, p)))
    data = st.one_of(st.binary(max_size=300), envelopes, envelopes.flatmap(mutated), envelopes.flatmap(deepened))
    sender = st.sampled_from(["signer", "none", "other"])
    return st.tuples(st.lists(st.tuples(data, sender), min_size=1, max_size=3), st.floats(NOW - 10, NOW + 10))


def check_advert(case: tuple[list[tuple[bytes, str]], float]) -> None:
    """The gossip validator and the offer table over the same adverts: the validator
    answers a :class:`Rejection` or None and the table ``add`` a bool, never an
    exception; what the validator lets through, a table holding nothing from that
    signer keeps (one holding the same advert refuses the duplicate, by design)."""
    messages, now = case
    validator = AdvertValidator(OfferTable())
    table = OfferTable()  # the table a node fills from the adverts stream (no validator before it)
    for data, who in messages:
        sender = {"signer": KEY.peer_id, "none": None, "other": SigningKey(bytes(32)).peer_id}[who]
        reason = validator.validate(data, sender=sender or KEY.peer_id, now=now) if sender else validator.check(
            data, sender=None, now=now)
        assert reason is None or isinstance(reason, Rejection)
        if reason is None and sender is not None and validator.table.advert_of(sender, now=now) is None:
            assert validator.table.add(data, now=now, sender=sender), "the table refused what its validator passed"
        assert isinstance(table.add(data, now=now, sender=sender), bool)
    assert validator.statistics().remembered <= 1


def _advert_stream_case() -> st.SearchStrategy[Any]:
    frames = st.lists(payloads_of(SignedKind.ADVERT).map(lambda p: AdvertFrame(signed(SignedKind.ADVERT, p))),
                      max_size=3)
    from loomnet.protocol import encode_frame

    wire = st.one_of(frames.map(lambda fs: b"".join(encode_frame(encode_frame_body(f)) for f in fs)), wire_of())
    return st.one_of(wire, wire.flatmap(mutated)).flatmap(chunked)


def check_advert_stream(chunks: list[bytes]) -> None:
    """``AdvertReader`` (``/loomnet/adverts/1``) then the offer table: advert frames or a
    ProtocolError; each advert the table gets is kept or refused, never raised."""
    reader, table = AdvertReader(), OfferTable()
    try:
        for chunk in [*chunks, b""]:
            reader.receive_data(chunk)
            assert len(reader._decoder._buffer) <= 2 * (MAX_ADVERT_FRAME + _HEADER)
            while (event := reader.next_event()) is not NEED_DATA:
                if isinstance(event, EndOfStream):
                    return
                assert isinstance(event, AdvertFrame)
                assert isinstance(table.add(event.envelope, now=NOW, source="peer"), bool)
    except LoomError as exc:
        typed_error(exc, ProtocolError)


PROTOCOL_TARGETS = (
    ("framing", "length-prefixed frames (protocol/_framing.py), any bytes in any chunks", _frames_case(), check_framing),
    ("stream", "the inference stream state machine (protocol/_stream.py), both roles, sessions too", _stream_case(),
     check_stream),
    ("frame-body", "frame bodies through decode_frame: every frame type (protocol/_messages.py)", _bodies(),
     check_frame_body),
    ("envelope", "signed envelopes of every kind: advert, request, receipt, ack (protocol/_signing.py)",
     _envelope_case(), check_envelope),
    ("advert-gossip", "adverts on gossip: the validator (client/_validator.py) and the offer table", _advert_case(),
     check_advert),
    ("advert-stream", "the adverts stream (client/_advert_exchange.py) into the offer table", _advert_stream_case(),
     check_advert_stream),
)
