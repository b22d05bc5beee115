"""The executor's limits on what peers may hold: keys, defaults, overrides and refusals."""

import pytest

from loomnet.client import P2PConfig
from loomnet.client._p2p_yamux import WINDOW as YAMUX_WINDOW
from loomnet.node.config import ExecutorConfig, load_config
from loomnet.protocol import MAX_FRAME_SIZE, ConfigError

KEYS = {
    "max-connections": 64,
    "max-connections-per-peer": 2,
    "max-streams-per-peer": 3,
    "max-request-bytes-per-peer": 2 * MAX_FRAME_SIZE,
    "max-request-bytes": 8 * MAX_FRAME_SIZE,
    "max-unread-bytes-per-connection": 2 << 20,
    "max-unread-bytes": 4 << 20,
}


def test_defaults_hold_one_maximal_request_per_peer_and_more_in_total():
    config = ExecutorConfig()
    assert config.max_connections_per_peer >= 1 and config.max_streams_per_peer >= 1
    assert MAX_FRAME_SIZE + 4 <= config.max_request_bytes_per_peer <= config.max_request_bytes
    assert config.max_unread_bytes_per_connection <= config.max_unread_bytes


def test_keys_are_kebab_case_in_toml_and_overridable_from_the_environment(tmp_path):
    path = tmp_path / "executor.toml"
    path.write_text("".join(f"{key} = {value}\n" for key, value in KEYS.items()))
    config = load_config(path, environ={"LOOMNET_MAX_STREAMS_PER_PEER": "5"})
    assert config.max_connections == 64 and config.max_connections_per_peer == 2
    assert config.max_streams_per_peer == 5  # the environment wins
    assert config.max_request_bytes == 8 * MAX_FRAME_SIZE and config.max_unread_bytes == 4 << 20


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("max-connections", 0, "max-connections must be at least 1"),
        ("max-connections-per-peer", 0, "max-connections-per-peer must be at least 1"),
        ("max-streams-per-peer", -1, "max-streams-per-peer must be at least 1"),
        ("max-streams-per-connection", 0, "max-streams-per-connection must be at least 1"),
        ("session-idle-timeout", 0, "session-idle-timeout must be positive"),
        ("max-request-bytes-per-peer", MAX_FRAME_SIZE, "must hold one maximal request"),
        ("max-request-bytes", MAX_FRAME_SIZE + 4, "at least max-request-bytes-per-peer"),
        ("max-unread-bytes-per-connection", 1000, f"at least {YAMUX_WINDOW}"),
        ("max-unread-bytes", 1 << 20, "at least max-unread-bytes-per-connection"),
        ("max-connection", 3, "unknown field"),
    ],
)
def test_bad_limits_are_config_errors_naming_the_key(tmp_path, key, value, says):
    path = tmp_path / "executor.toml"
    path.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert says in info.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"max_connections": 0},
        {"max_connections_per_peer": 0},
        {"max_streams_per_connection": 0},
        {"max_streams_per_peer": 0},
        {"max_unread_bytes_per_connection": 1000},
        {"max_unread_bytes": 1 << 20},
    ],
)
def test_network_limits_are_checked_where_they_are_built(fields):
    with pytest.raises(ValueError):
        P2PConfig(**fields)
