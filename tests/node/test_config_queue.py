"""The executor's slot, queue and rate-limit keys: defaults, overrides, per-model terms, refusals."""

import pytest

from loomnet.node._catalog import Catalog
from loomnet.node.config import ExecutorConfig, ModelTerms, load_config
from loomnet.protocol import ConfigError

from .server_harness import ScriptedBackend, events
from .test_config import CONFIGS


def test_defaults_queue_briefly_well_under_a_clients_first_byte_deadline_and_limit_generously():
    config = ExecutorConfig()
    assert config.capacity == 1 and config.max_queue == 8
    assert 0 < config.queue_timeout <= 30  # the client's first-byte deadline is 60 s by default
    assert config.peer_requests_per_minute == 600 and config.peer_tokens_per_minute == 0  # 0 = no limit


def test_the_example_config_states_them():
    config = load_config(CONFIGS / "executor.toml", environ={})
    assert (config.max_queue, config.queue_timeout) == (8, 20.0)
    assert (config.peer_requests_per_minute, config.peer_tokens_per_minute) == (600, 0)


def test_they_load_from_toml_and_the_environment(tmp_path):
    path = tmp_path / "executor.toml"
    path.write_text(
        "capacity = 4\nmax-queue = 2\nqueue-timeout = 5\npeer-requests-per-minute = 30\npeer-tokens-per-minute = 9000\n"
        '[[models]]\nname = "llama3.2"\ncapacity = 1\nmax-queue = 0\n'
    )
    config = load_config(path, environ={"LOOMNET_QUEUE_TIMEOUT": "7.5", "LOOMNET_PEER_TOKENS_PER_MINUTE": "100"})
    assert (config.capacity, config.max_queue, config.queue_timeout) == (4, 2, 7.5)
    assert (config.peer_requests_per_minute, config.peer_tokens_per_minute) == (30, 100)
    assert (config.models[0].capacity, config.models[0].max_queue) == (1, 0)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("max-queue = -1", "max-queue cannot be negative"),
        ("queue-timeout = -0.5", "queue-timeout cannot be negative"),
        ("queue-timeout = nan", "queue-timeout cannot be negative"),
        ("peer-requests-per-minute = -1", "peer-requests-per-minute cannot be negative"),
        ("peer-tokens-per-minute = -5", "peer-tokens-per-minute cannot be negative"),
        ("max-queu = 3", "unknown field"),
        ('capacity = 2\n[[models]]\nname = "m"\ncapacity = 3', "capacity 3 is above the executor's capacity 2"),
        ('[[models]]\nname = "m"\ncapacity = 0', "capacity must be at least 1"),
        ('[[models]]\nname = "m"\nmax-queue = -2', "max-queue cannot be negative"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(tmp_path, text, says):
    path = tmp_path / "executor.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert says in str(info.value) and str(path) in str(info.value)


async def test_each_catalog_entry_carries_its_models_limits_or_the_executors():
    config = ExecutorConfig(capacity=3, max_queue=5, models=[ModelTerms(name="m1", capacity=1, max_queue=2)])
    script = events()
    catalog = await Catalog.build([ScriptedBackend(script, model="m1"), ScriptedBackend(script, model="m2")], config)
    limits = {e.offer.name: (e.capacity, e.max_queue) for e in catalog.entries}
    assert limits == {"m1": (1, 2), "m2": (3, 5)}
