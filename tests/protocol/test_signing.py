import msgspec
import pytest
from hypothesis import given, strategies as st

from loomnet.protocol import (
    Advert,
    ChatMessage,
    Envelope,
    ErrorCode,
    FrameError,
    ModelOffer,
    InferenceRequest,
    SigningKey,
    MessageDecodeError,
    SignatureError,
    SignedKind,
    digest,
    open_envelope,
    seal,
)
from loomnet.protocol._messages import MAX_ADVERT_SIZE


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


def _fat_advert(models: int) -> Advert:
    offers = [ModelOffer(name=f"model-{i}-" + "x" * 100, aliases=[f"alias-{k}-" + "y" * 110 for k in range(32)])
              for i in range(models)]
    return Advert(seq=1, issued_at=5.0, ttl=30.0, models=offers)


def test_an_advert_has_a_small_maximum_that_honest_adverts_fit():
    # 256 models (the schema's maximum) as honest executors name them fit with room
    models = [ModelOffer(name=f"m{i}-".ljust(48, "x"), aliases=[f"a{i}-{k}".ljust(32, "y") for k in range(2)],
                         categories=["balanced", "fast", "quality"], capabilities=["tools", "json", "vision"],
                         context_length=131072, price_in=150_000, price_out=600_000, tokens_per_second=87.5)
              for i in range(256)]
    honest = Advert(seq=1, issued_at=5.0, ttl=30.0, addrs=["/ip4/192.168.1.20/tcp/40123/p2p/" + _KEY.peer_id] * 4,
                    models=models)
    envelope = seal(SignedKind.ADVERT, honest, _KEY)
    assert SignedKind.ADVERT.max_payload == MAX_ADVERT_SIZE == 128 * 1024
    assert 64 * 1024 < len(envelope.payload) < MAX_ADVERT_SIZE
    assert open_envelope(SignedKind.ADVERT, envelope) == (honest, _KEY.peer_id)


def test_seal_refuses_an_advert_over_the_maximum():
    with pytest.raises(FrameError) as info:
        seal(SignedKind.ADVERT, _fat_advert(40), _KEY)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE and "maximum" in info.value.message


def _advert_payload_of(size: int) -> bytes:
    """A schema-valid advert payload of exactly ``size`` bytes (padded with a field
    from a "newer" peer, which readers skip)."""
    base = msgspec.to_builtins(Advert(seq=1, issued_at=5.0, ttl=30.0))
    pad = size - len(msgspec.msgpack.encode({**base, "future": b""}))
    for extra in range(5):  # msgpack's bin header grows with the length
        payload = msgspec.msgpack.encode({**base, "future": b"p" * (pad - extra)})
        if len(payload) == size:
            return payload
    raise AssertionError(size)


@pytest.mark.parametrize("size", [MAX_ADVERT_SIZE, MAX_ADVERT_SIZE + 1, 900_000])
def test_open_refuses_a_validly_signed_advert_over_the_maximum(size):
    payload = _advert_payload_of(size)
    envelope = Envelope(payload=payload, signer=_KEY.public_key, sig=_KEY.sign(SignedKind.ADVERT.prefix + payload))
    if size <= MAX_ADVERT_SIZE:
        assert open_envelope(SignedKind.ADVERT, envelope)[1] == _KEY.peer_id
        return
    with pytest.raises(MessageDecodeError) as info:
        open_envelope(SignedKind.ADVERT, envelope)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE and str(MAX_ADVERT_SIZE) in info.value.message


def test_the_size_is_checked_before_the_signature():
    garbage = Envelope(payload=b"\x00" * (MAX_ADVERT_SIZE + 1), signer=_KEY.public_key, sig=bytes(64))
    with pytest.raises(MessageDecodeError) as info:  # not SignatureError: no verification spent on it
        open_envelope(SignedKind.ADVERT, garbage)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_other_kinds_keep_the_frame_maximum(make_request, client_key):
    big = make_request(messages=[ChatMessage("user", "x" * (200 * 1024))])
    envelope = seal(SignedKind.REQUEST, big, client_key)
    assert len(envelope.payload) > MAX_ADVERT_SIZE
    assert open_envelope(SignedKind.REQUEST, envelope)[0] == big
