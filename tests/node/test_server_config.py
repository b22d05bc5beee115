"""The executor's settings for long silences and counting (``progress-interval``, ``count-timeout``)."""

import pytest

from loomnet.node.config import load_config
from loomnet.protocol import ConfigError

from .test_config import CONFIGS


def test_defaults_keep_progress_well_under_a_clients_idle_deadline():
    config = load_config(None, environ={})
    assert 0 < config.progress_interval <= 5 and config.count_timeout == 5.0


def test_the_example_config_states_them():
    config = load_config(CONFIGS / "executor.toml", environ={})
    assert (config.progress_interval, config.count_timeout) == (3.0, 5.0)


def test_they_load_from_toml_and_the_environment(tmp_path):
    path = tmp_path / "executor.toml"
    path.write_text("progress-interval = 1.5\ncount-timeout = 2\n")
    assert load_config(path, environ={}).progress_interval == 1.5
    config = load_config(None, environ={"LOOMNET_PROGRESS_INTERVAL": "0.5", "LOOMNET_COUNT_TIMEOUT": "9"})
    assert (config.progress_interval, config.count_timeout) == (0.5, 9.0)


@pytest.mark.parametrize("key", ["progress-interval", "count-timeout"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_non_positive_value_is_a_config_error_naming_the_key(tmp_path, key, value):
    path = tmp_path / "bad.toml"
    path.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert key in str(info.value) and str(path) in str(info.value)
