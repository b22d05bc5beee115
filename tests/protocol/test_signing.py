import msgspec
import pytest
from hypothesis import given, strategies as st

from loomnet.protocol import (
    ChatMessage,
    Envelope,
    InferenceRequest,
    SigningKey,
    MessageDecodeError,
    SignatureError,
    SignedKind,
    digest,
    open_envelope,
    seal,
)


def test_seal_then_open_round_trips(make_request, client_key):
    request = make_request()
    envelope = seal(SignedKind.REQUEST, request, client_key)
    opened, signer = open_envelope(SignedKind.REQUEST, envelope)
    assert opened == request
    assert signer == client_key.peer_id


def test_kind_prefix_separates_domains(make_request, client_key):
    envelope = seal(SignedKind.REQUEST, make_request(), client_key)
    with pytest.raises(SignatureError):
        open_envelope(SignedKind.RECEIPT, envelope)


def test_signature_covers_exact_bytes_not_reencoding(make_request, client_key):
    # Same message, payload with an extra unknown field appended by a "newer" peer: the
    # signature is over the bytes received, so it verifies and the field is skipped.
    request = make_request()
    as_dict = msgspec.to_builtins(request, builtin_types=(bytes,))
    as_dict["future_field"] = [1, 2, 3]
    payload = msgspec.msgpack.encode(as_dict)
    envelope = Envelope(
        payload=payload,
        signer=client_key.public_key,
        sig=client_key.sign(SignedKind.REQUEST.prefix + payload),
    )
    opened, _ = open_envelope(SignedKind.REQUEST, envelope)
    assert opened == request


def test_valid_signature_over_garbage_is_a_decode_error(client_key):
    payload = b"\xc1 not msgpack"
    envelope = Envelope(payload=payload, signer=client_key.public_key, sig=client_key.sign(SignedKind.RECEIPT.prefix + payload))
    with pytest.raises(MessageDecodeError):
        open_envelope(SignedKind.RECEIPT, envelope)


def test_seal_refuses_the_wrong_type(make_request, client_key):
    with pytest.raises(TypeError):
        seal(SignedKind.RECEIPT, make_request(), client_key)


def test_digest_is_sha256():
    assert digest(b"").hex().startswith("e3b0c442")


_KEY = SigningKey(bytes(range(1, 33)))
_REQUEST = InferenceRequest(
    audience=SigningKey(bytes(32)).peer_id,
    nonce=b"n" * 16,
    created_at=5.0,
    model="m",
    messages=[ChatMessage("user", "hi")],
)


@given(data=st.data())
def test_any_flipped_bit_fails_verification(data):
    envelope = seal(SignedKind.REQUEST, _REQUEST, _KEY)
    blob = bytearray(envelope.payload + envelope.signer + envelope.sig)
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    p = len(envelope.payload)
    tampered = Envelope(payload=bytes(blob[:p]), signer=bytes(blob[p:p + 32]), sig=bytes(blob[p + 32:]))
    with pytest.raises(SignatureError):
        open_envelope(SignedKind.REQUEST, tampered)
