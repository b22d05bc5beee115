"""``loomnet gateway``'s configuration: the example file, secrets, refusals."""

import re
from pathlib import Path

import pytest

from loomnet.client.gateway import GatewayConfig, GatewayKey
from loomnet.node._cli_gateway import load_gateway_config
from loomnet.protocol import ConfigError, ErrorCode

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def secrets_for(path) -> dict[str, str]:
    return {name: f"dummy-secret-value-{name}" for name in re.findall(r"\$\{(\w+)\}", path.read_text())}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("gateway*.toml")), ids=lambda p: p.name)
def test_example_gateway_config_loads_and_hides_its_keys(path):
    environ = secrets_for(path)
    config = load_gateway_config(path, environ=environ)
    assert isinstance(config, GatewayConfig) and config.host == "127.0.0.1"
    assert [k.name for k in config.keys] == ["alice", "ci-bot"]
    assert config.keys[0].budget.amount == 5_000_000 and config.keys[1].budget is None
    for key in config.keys:  # each came from the environment, and never shows
        assert key.key.startswith("dummy-secret-value-LOOMNET_GATEWAY_KEY_")
        assert key.key not in repr(config) and key.key not in repr(config.keys)


def test_no_file_means_defaults():
    config = load_gateway_config(None, environ={})
    assert config.host == "127.0.0.1" and config.port == 8400 and config.keys == []


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_unset_key_variable_is_named(tmp_path):
    path = write(tmp_path, '[[keys]]\nname = "a"\nkey = "${NOT_SET_ANYWHERE}"\n')
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE") as info:
        load_gateway_config(path, environ={})
    assert info.value.code == ErrorCode.CONFIG_INVALID


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('[[keys]]\nname = "a"\nkey = "short-secret"\n', "keys[0].key"),  # under 16 characters
        ('[[keys]]\nname = "bad name!"\nkey = "0123456789abcdef-x"\n', "keys[0].name"),
        ('port = 70000\n', "port"),
        ('prot = 80\n', "prot"),
        ('[client]\nofer-timeout = 1\n', "ofer-timeout"),
        ('[[keys]]\nname = "a"\nkey = "0123456789abcdef-x"\n[[keys]]\nname = "a"\nkey = "0123456789abcdef-y"\n',
         "unique"),
        ('[[keys]]\nname = "a"\nkey = "0123456789abcdef-x"\n[[keys]]\nname = "b"\nkey = "0123456789abcdef-x"\n',
         "same secret"),
        ("max-body-bytes = 10\n", "max-body-bytes"),
        ("port = [", "not valid TOML"),
    ],
)
def test_bad_configs_name_the_key_and_never_the_secret(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_gateway_config(write(tmp_path, text), environ={})
    assert fragment in str(info.value)
    assert "0123456789abcdef" not in str(info.value) and "short-secret" not in str(info.value)


def test_a_key_never_shows_in_repr():
    key = GatewayKey(name="alice", key="a-very-secret-key-123")
    assert "a-very-secret-key-123" not in repr(key) and "alice" in repr(key)
