import os

import pytest

from loomnet.protocol import (
    SignatureError,
    SigningKey,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)


def test_peer_id_is_the_libp2p_ed25519_form(executor_key):
    assert executor_key.peer_id.startswith("12D3KooW")
    assert len(executor_key.peer_id) == 52
    assert public_key_from_peer_id(executor_key.peer_id) == executor_key.public_key


def test_known_vector():
    # the RFC 8032 test-1 seed; its libp2p peer id as py-libp2p computes it
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = SigningKey(seed)
    assert key.public_key.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert peer_id_from_public_key(key.public_key) == key.peer_id


@pytest.mark.parametrize("bad", ["", "0OIl", "12D3KooW", "Qm" + "1" * 44, "x" * 65])
def test_bad_peer_ids_raise_signature_error(bad):
    with pytest.raises(SignatureError):
        public_key_from_peer_id(bad)


def test_sign_and_verify(executor_key, client_key):
    sig = executor_key.sign(b"data")
    assert verify_signature(executor_key.public_key, sig, b"data")
    assert not verify_signature(client_key.public_key, sig, b"data")
    assert not verify_signature(executor_key.public_key, sig, b"datb")
    assert not verify_signature(executor_key.public_key, sig[:10], b"data")


def test_repr_never_shows_the_seed(executor_key):
    assert executor_key.seed.hex() not in repr(executor_key)
    assert "peer_id" in repr(executor_key)


def test_seed_must_be_32_bytes():
    with pytest.raises(Exception) as info:
        SigningKey(b"short")
    assert info.value.code.name == "CONFIG_INVALID"


def test_peer_ids_are_remembered_within_a_bound_and_stay_right() -> None:
    """The peer-id cache (base58 costs ~15 us, three times per request) never answers
    for the wrong key, and a peer sending ever new keys cannot grow it."""
    from loomnet.protocol._identity import _KEY_CACHE, _b58encode, _peer_id, _PEER_ID_PREFIX

    keys = [os.urandom(32) for _ in range(_KEY_CACHE + 50)]
    for key in keys + keys[:10] + [bytearray(keys[0]), memoryview(keys[1])]:
        assert peer_id_from_public_key(key) == _b58encode(_PEER_ID_PREFIX + bytes(key))
    assert _peer_id.cache_info().currsize <= _KEY_CACHE
