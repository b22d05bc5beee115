from pathlib import Path

import pytest

from loomnet.node.config import ExecutorConfig, load_config
from loomnet.protocol import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    config = load_config(path, environ={})
    assert isinstance(config, ExecutorConfig)


def test_example_executor_config_values():
    config = load_config(CONFIGS / "executor.toml", environ={})
    assert config.listen == ["/ip4/0.0.0.0/tcp/4001"]
    assert config.terms_for("smollm2-135m").aliases == ["smollm2", "smol"]
    assert config.embedded.threads == 2


def test_defaults_need_no_file():
    config = load_config(None, environ={})
    assert config.capacity == 1 and config.models == []


def test_environment_overrides(tmp_path):
    config = load_config(
        None,
        environ={"LOOMNET_LISTEN": "/ip4/127.0.0.1/tcp/0, /ip4/127.0.0.1/tcp/5", "LOOMNET_CAPACITY": "3",
                 "LOOMNET_DATA_DIR": str(tmp_path)},
    )
    assert config.listen == ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/5"]
    assert config.capacity == 3 and config.data_dir == str(tmp_path)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("capasity = 2", "capasity"),
        ("capacity = 'many'", "capacity"),
        ("capacity = 0", "capacity"),
        ("advert-interval = 60\nadvert-ttl = 30", "advert-ttl"),
        ("[[models]]\nname = 'm'\nprice-in = -1", "negative"),
        ("[embedded]\nthreds = 2", "threds"),
        ("listen = [", "TOML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml", environ={})
