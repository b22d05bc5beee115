import os
import stat

import pytest

from loomnet.client import load_or_create_identity
from loomnet.protocol import ConfigError, ErrorCode


def test_created_once_with_mode_0600_and_stable(tmp_path):
    path = tmp_path / "sub" / "identity.key"
    key = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    assert load_or_create_identity(path).peer_id == key.peer_id


def test_loose_permissions_are_refused(tmp_path):
    path = tmp_path / "identity.key"
    load_or_create_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as info:
        load_or_create_identity(path)
    assert info.value.code == ErrorCode.IDENTITY_INVALID
    assert "chmod 600" in info.value.message


def test_wrong_size_is_refused(tmp_path):
    path = tmp_path / "identity.key"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as info:
        load_or_create_identity(path)
    assert info.value.code == ErrorCode.IDENTITY_INVALID
