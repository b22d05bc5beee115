"""Hypothesis strategies for what a hostile peer (or a broken runtime) can send.

Two kinds, both needed: *random bytes* find what no one thought of, and *structure-aware*
inputs (a valid message with one field mutated, truncated, extended, a valid frame
sequence with a byte flipped) get past the first length check or signature and reach
the code behind it, where random bytes almost never go.

Every strategy here is pure data: no clock, no I/O. The targets (``fuzz/targets.py``)
feed them to the decoders.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
from hypothesis import strategies as st

from loomnet.protocol import (
    AckFrame,
    Advert,
    AdvertFrame,
    ChatMessage,
    ChunkFrame,
    Envelope,
    ErrorFrame,
    InferenceRequest,
    ModelOffer,
    Receipt,
    ReceiptAck,
    ReceiptFrame,
    RequestFrame,
    SignedKind,
    SigningKey,
    ToolCall,
    encode_frame,
    encode_frame_body,
    encode_payload,
)

__all__ = [
    "HOSTILE_FLOATS",
    "HOSTILE_INTS",
    "KEY",
    "chunked",
    "deepened",
    "hostile_value",
    "messages_of",
    "mutated",
    "mutated_struct_bytes",
    "payloads_of",
    "signed",
    "stream_frames",
    "wire_of",
]

#: the one key hostile peers sign with (signing is real: the point is to get past it)
KEY = SigningKey(bytes(range(7, 39)))

#: numbers at and past every edge the schema has (msgpack carries -2**63 .. 2**64-1)
HOSTILE_INTS = [
    -(1 << 63), -(1 << 31) - 1, -1, 0, 1, 65535, 65536, (1 << 20), (1 << 20) + 1, (1 << 31) - 1, 1 << 31,
    (1 << 31) + 1, (1 << 32), (1 << 62), (1 << 62) + 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
]
HOSTILE_FLOATS = [math.nan, -math.nan, math.inf, -math.inf, -0.0, -1e-300, 5e-324, 1e11, 1e11 + 1e-4, 86400.0,
                  86400.000001, 1e308, -1e308, 2.0000001, -2.0000001]

_ints = st.one_of(st.sampled_from(HOSTILE_INTS), st.integers(-(1 << 63), (1 << 64) - 1))
_floats = st.one_of(st.sampled_from(HOSTILE_FLOATS), st.floats(allow_nan=True, allow_infinity=True))


def hostile_value() -> st.SearchStrategy[Any]:
    """Any value msgpack can carry, weighted to the numbers at the schema's edges."""
    leaf = st.one_of(
        _ints, _floats, st.booleans(), st.none(), st.text(max_size=40), st.binary(max_size=64),
        st.just("x" * 600), st.just(b"\x00" * 70),
    )
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8)


names = st.text(min_size=1, max_size=12)
_seconds = st.floats(0.0, 1e10, allow_nan=False)


def _offer() -> st.SearchStrategy[ModelOffer]:
    return st.builds(
        ModelOffer, name=names, aliases=st.lists(names, max_size=2), categories=st.lists(st.text(max_size=8), max_size=2),
        context_length=st.integers(0, 1 << 31), price_in=st.integers(0, 1 << 62), price_out=st.integers(0, 1 << 62),
        on_premise=st.booleans(), tokens_per_second=st.floats(0.0, 1e7),
    )


def messages_of(kind: SignedKind) -> st.SearchStrategy[msgspec.Struct]:
    """Valid messages of one signed kind."""
    digest = st.binary(min_size=32, max_size=32)
    tokens = st.integers(0, 1 << 31)
    micro = st.integers(0, 1 << 62)
    if kind is SignedKind.ADVERT:
        return st.builds(
            Advert, seq=st.integers(0, 1 << 62), issued_at=_seconds, ttl=st.floats(0.001, 86400.0),
            addrs=st.lists(st.just("/ip4/127.0.0.1/tcp/1"), max_size=2), models=st.lists(_offer(), max_size=3),
            capacity=st.integers(0, 1 << 20), load=st.integers(0, 1 << 20), on_premise=st.booleans(),
        )
    if kind is SignedKind.REQUEST:
        return st.builds(
            InferenceRequest, audience=names, nonce=st.binary(min_size=16, max_size=32), created_at=_seconds,
            model=names, messages=st.lists(st.builds(ChatMessage, role=st.sampled_from(["user", "system"]),
                                                     content=st.text(max_size=30)), min_size=1, max_size=3),
            max_tokens=st.none() | st.integers(1, 1 << 20), temperature=st.none() | st.floats(0.0, 2.0),
            max_price_in=st.none() | micro, max_price_out=st.none() | micro, max_cost=st.none() | micro,
        )
    if kind is SignedKind.RECEIPT:
        return st.builds(
            Receipt, request_digest=digest, client=names, model=names, input_tokens=tokens, output_tokens=tokens,
            count_source=st.sampled_from(["backend", "tokenizer", "tiktoken", "estimate"]), price_in=micro,
            price_out=micro, cost=micro, output_digest=digest, chunks=tokens, finish_reason=st.text(max_size=10),
            issued_at=_seconds, reasoning_tokens=tokens, cached=st.booleans(),
        )
    return st.builds(ReceiptAck, receipt_digest=digest, accepted_at=_seconds, client_output_tokens=tokens)


def signed(kind: SignedKind, payload: bytes, key: SigningKey = KEY) -> Envelope:
    """``payload`` signed as a hostile peer would: any bytes, no size or type check."""
    return Envelope(payload=payload, signer=key.public_key, sig=key.sign(kind.prefix + payload))


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with one edit: a bit flipped, cut short, extended, a slice removed,
    repeated or replaced. Empty input grows."""
    if not data:
        return draw(st.binary(min_size=1, max_size=16))
    how = draw(st.sampled_from(["flip", "truncate", "extend", "delete", "repeat", "replace", "same"]))
    at = draw(st.integers(0, len(data) - 1))
    if how == "flip":
        return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1:]
    if how == "truncate":
        return data[:at]
    if how == "extend":
        return data + draw(st.binary(min_size=1, max_size=64))
    end = draw(st.integers(at, min(len(data), at + 64)))
    if how == "delete":
        return data[:at] + data[end:]
    if how == "repeat":
        return data[:end] + data[at:end] * draw(st.integers(1, 4)) + data[end:]
    if how == "replace":
        return data[:at] + draw(st.binary(max_size=16)) + data[end:]
    return data


@st.composite
def mutated_struct_bytes(draw: st.DrawFn, message: msgspec.Struct) -> bytes:
    """``message`` encoded with one field set to a hostile value, removed, or joined by
    an unknown field (a valid message's neighbourhood, at the msgpack level)."""
    fields = msgspec.to_builtins(message, builtin_types=(bytes,))
    assert isinstance(fields, dict)
    keys = sorted(fields)
    how = draw(st.sampled_from(["set", "set", "set", "drop", "add"]))
    if how == "set" and keys:
        fields[draw(st.sampled_from(keys))] = draw(hostile_value())
    elif how == "drop" and keys:
        del fields[draw(st.sampled_from(keys))]
    else:
        fields[draw(st.text(max_size=10))] = draw(hostile_value())
    return msgspec.msgpack.encode(fields)


def _with_field(encoded: bytes, key: bytes, value: bytes) -> bytes:
    """A msgpack map's bytes with one more entry (``key`` and ``value`` already encoded)."""
    head = encoded[0]
    if 0x80 <= head < 0x8F:
        return bytes([head + 1]) + encoded[1:] + key + value
    if head == 0xDE:
        count = int.from_bytes(encoded[1:3], "big") + 1
        return b"\xde" + count.to_bytes(2, "big") + encoded[3:] + key + value
    return encoded + value  # not a map we can grow: trailing bytes, which is hostile too


@st.composite
def deepened(draw: st.DrawFn, encoded: bytes) -> bytes:
    """A message (a msgpack map) joined by an unknown field nested thousands deep (a
    decoder recursing into what it skips blows Python's stack) or a known field
    replaced by such a value."""
    depth = draw(st.sampled_from([200, 1000, 5000, 50_000]))
    value = draw(st.sampled_from([b"\x91" * depth + b"\xc0", b"\x81\xa1a" * depth + b"\xc0"]))
    key = msgspec.msgpack.encode(draw(st.sampled_from(["zz-new", "payload", "seq", "text", "models", "envelope"])))
    return _with_field(encoded, key, value)


def payloads_of(kind: SignedKind) -> st.SearchStrategy[bytes]:
    """Bytes where a signed ``kind`` payload goes: random, a valid message, a valid
    message with one field made hostile, or its bytes mutated."""
    valid = messages_of(kind)
    return st.one_of(
        st.binary(max_size=300),
        valid.map(encode_payload),
        valid.flatmap(mutated_struct_bytes),
        valid.map(encode_payload).flatmap(mutated),
        valid.map(encode_payload).flatmap(deepened),
    )


def _envelopes() -> st.SearchStrategy[Envelope]:
    random_env = st.builds(Envelope, payload=st.binary(max_size=64), signer=st.binary(min_size=32, max_size=32),
                           sig=st.binary(min_size=64, max_size=64))
    kinds = st.sampled_from(list(SignedKind))
    return st.one_of(random_env, kinds.flatmap(lambda k: payloads_of(k).map(lambda p: signed(k, p))))


def stream_frames() -> st.SearchStrategy[Any]:
    """Valid frames of every type (valid as frames; their envelopes may hold anything)."""
    env = _envelopes()
    return st.one_of(
        st.builds(ChunkFrame, seq=st.integers(0, 3), text=st.text(max_size=20), reasoning=st.text(max_size=5),
                  tool_calls=st.lists(st.builds(ToolCall, id=st.text(max_size=5), name=names), max_size=1)),
        st.builds(ErrorFrame, code=st.integers(0, 65535), message=st.text(max_size=20), retryable=st.booleans(),
                  retry_after=st.none() | st.floats(0.0, 86400.0)),
        st.builds(RequestFrame, env), st.builds(ReceiptFrame, env), st.builds(AckFrame, env),
        st.builds(AdvertFrame, env),
    )


@st.composite
def wire_of(draw: st.DrawFn, max_frames: int = 5) -> bytes:
    """A stream's bytes: random, valid frames in a row, or those with one edit, or
    valid frames whose bodies are mutated messages (each still length-prefixed)."""
    frames = draw(st.lists(stream_frames(), max_size=max_frames))
    bodies = [encode_frame_body(f) for f in frames]
    how = draw(st.sampled_from(["random", "valid", "mutated", "bodies"]))
    if how == "random":
        return draw(st.binary(max_size=600))
    if how == "bodies" and frames:
        at = draw(st.integers(0, len(frames) - 1))
        bodies[at] = draw(mutated_struct_bytes(frames[at]) | mutated(bodies[at]) | deepened(bodies[at]))
    wire = b"".join(encode_frame(b) if b else b"" for b in bodies)
    return draw(mutated(wire)) if how == "mutated" else wire


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points into non-empty pieces, as a network delivers it."""
    if not data:
        return []
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12))))
    edges = [0, *[c for c in cuts if 0 < c < len(data)], len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]
