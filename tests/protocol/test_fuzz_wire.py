"""Fuzzing what a peer sends on an inference stream: frames, the stream state machine,
frame bodies of every type and signed envelopes of every kind (``fuzz/protocol_targets.py``
holds the strategies and the properties; ``fuzz/run.py`` runs them for longer).

Each test is a CI-sized run (the ``loomnet-ci`` hypothesis profile) of one target:
random bytes and valid messages with one field mutated, truncated, extended or nested
thousands deep, cut into arbitrary chunks. Every input decodes or raises loomnet's own
typed error with a stable code, and the buffers stay within their caps.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given

from fuzz.strategies import KEY, signed
from fuzz.targets import CI, TARGETS
from loomnet.protocol import (
    ChunkFrame,
    ErrorCode,
    MessageDecodeError,
    SignedKind,
    decode_frame,
    encode_frame_body,
    open_envelope,
)


@CI
@given(TARGETS["framing"].strategy)
def test_frames_from_any_bytes_in_any_chunks(case):
    TARGETS["framing"].check(case)


@CI
@given(TARGETS["stream"].strategy)
def test_the_stream_state_machine_from_any_bytes_either_role_and_sessions(case):
    TARGETS["stream"].check(case)


@CI
@given(TARGETS["frame-body"].strategy)
def test_frame_bodies_of_every_type_mutated(body):
    TARGETS["frame-body"].check(body)


@CI
@given(TARGETS["envelope"].strategy)
def test_envelopes_of_every_kind_signed_forged_or_cross_kind(case):
    TARGETS["envelope"].check(case)


# the shapes the fuzzer found or aims at, kept as plain examples


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_a_frame_with_an_unknown_field_nested_thousands_deep_is_malformed(depth):
    body = bytearray(encode_frame_body(ChunkFrame(seq=0, text="hi")))
    body[0] += 1  # one more map entry: an unknown field, skipped by msgspec, recursively
    body += msgspec.msgpack.encode("zz") + b"\x91" * depth + b"\xc0"
    with pytest.raises(MessageDecodeError) as info:
        decode_frame(bytes(body))
    assert info.value.code == ErrorCode.MALFORMED_MESSAGE


@pytest.mark.parametrize("kind", list(SignedKind))
def test_a_validly_signed_payload_nested_thousands_deep_is_malformed(kind):
    envelope = signed(kind, b"\x81\xa2zz" + b"\x91" * 50_000 + b"\xc0")
    with pytest.raises(MessageDecodeError) as info:
        open_envelope(kind, envelope)
    assert info.value.code == ErrorCode.MALFORMED_MESSAGE and KEY.peer_id
