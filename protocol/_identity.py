"""Ed25519 identities and their libp2p peer ids, computed without libp2p.

A node's signing key is its libp2p identity key, so a message's signer *is* a peer
id: ``peer_id = base58btc(identity-multihash(protobuf(PublicKey{Ed25519, pub32})))``,
which always starts ``12D3KooW``. Computing it here keeps ``protocol/`` free of
libp2p while letting an executor compare a request's signer with the peer at the
other end of its stream.
"""

from __future__ import annotations

import functools

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ._errors import ConfigError, SignatureError

__all__ = ["SigningKey", "peer_id_from_public_key", "public_key_from_peer_id", "verify_signature"]

# identity multihash (0x00), length 36 (0x24), protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
_B58 = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return (b"1" * pad + bytes(reversed(out))).decode("ascii")


def _b58decode(text: str) -> bytes:
    n = 0
    for ch in text.encode("ascii", "replace"):
        if ch not in _B58_INDEX:
            raise ValueError("not base58")
        n = n * 58 + _B58_INDEX[ch]
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * pad + body


#: Peer ids remembered: every request, receipt and ack names its signer by a key,
#: usually one of a few peers'; a peer sending new keys only evicts.
_KEY_CACHE = 4096


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (``12D3KooW...``) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise SignatureError(f"an Ed25519 public key is 32 bytes, not {len(public_key)}")
    return _peer_id(bytes(public_key))


@functools.lru_cache(maxsize=_KEY_CACHE)
def _peer_id(public_key: bytes) -> str:
    # base58 of 38 bytes in Python is ~15 us, three times per request (issue 9)
    return _b58encode(_PEER_ID_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 public key inside a peer id; ``SignatureError`` if it has none."""
    if len(peer_id) > 64:
        raise SignatureError("peer id too long")
    try:
        raw = _b58decode(peer_id)
    except ValueError:
        raise SignatureError(f"peer id {peer_id[:60]!r} is not base58") from None
    if len(raw) != 38 or not raw.startswith(_PEER_ID_PREFIX):
        raise SignatureError(f"peer id {peer_id[:60]!r} is not an Ed25519 peer id")
    return raw[len(_PEER_ID_PREFIX):]


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is ``public_key``'s Ed25519 signature of ``data``."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class SigningKey:
    """An Ed25519 private key held as its 32-byte seed (the libp2p host key too)."""

    __slots__ = ("_key", "public_key", "peer_id")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ConfigError("an Ed25519 seed is 32 bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        #: Raw 32-byte public key.
        self.public_key: bytes = self._key.public_key().public_bytes_raw()
        #: The libp2p peer id of this key.
        self.peer_id: str = peer_id_from_public_key(self.public_key)

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed. Handle like a password."""
        return self._key.private_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``; returns the 64-byte signature."""
        return self._key.sign(data)

    def __repr__(self) -> str:  # never show the seed
        return f"SigningKey(peer_id={self.peer_id!r})"
