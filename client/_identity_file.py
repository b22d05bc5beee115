"""The node identity on disk: a 32-byte Ed25519 seed, readable by its owner only.

The same key is the libp2p host key and the message signing key, so losing it
changes the node's peer id and leaking it lets anyone sign as the node. It is
created on first run with mode 0600 (atomically: O_EXCL, so two processes starting
at once cannot both write one) and refused later if anyone else can read it, the
way ssh refuses a private key with loose permissions.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from loomnet.protocol import ConfigError, ErrorCode, SigningKey

__all__ = ["load_or_create_identity"]

_SEED_SIZE = 32


def load_or_create_identity(path: str | os.PathLike) -> SigningKey:
    """Load the identity at ``path``, creating it (mode 0600) if it does not exist.

    Raises:
        ConfigError: (code IDENTITY_INVALID) the file is unreadable, of the wrong
            size, or readable by group or others.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return _load(path)
        seed = os.urandom(_SEED_SIZE)
        with os.fdopen(fd, "wb") as f:
            f.write(seed)
            f.flush()
            os.fsync(f.fileno())
        return SigningKey(seed)
    except OSError as exc:
        raise ConfigError(f"cannot use identity file {path}: {exc.strerror}", code=ErrorCode.IDENTITY_INVALID) from exc


def _load(path: Path) -> SigningKey:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"identity file {path} is accessible by others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}",
            code=ErrorCode.IDENTITY_INVALID,
        )
    seed = path.read_bytes()
    if len(seed) != _SEED_SIZE:
        raise ConfigError(
            f"identity file {path} holds {len(seed)} bytes, not a {_SEED_SIZE}-byte Ed25519 seed",
            code=ErrorCode.IDENTITY_INVALID,
        )
    return SigningKey(seed)
