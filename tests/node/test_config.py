import re
from pathlib import Path

import pytest

from loomnet.node.backends._registry import HOSTED_PROVIDERS, PROVIDERS, canonical_provider, make_backend
from loomnet.node.config import ExecutorConfig, load_config
from loomnet.protocol import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: every example but the gateway's (``gateway*.toml``: tests/node/test_cli_gateway.py loads those)
EXECUTOR_CONFIGS = sorted(p for p in CONFIGS.glob("*.toml") if not p.name.startswith("gateway"))


def secrets_for(path) -> dict[str, str]:
    """Dummy values for every ${VAR} a config refers to."""
    return {name: f"dummy-{name}" for name in re.findall(r"\$\{(\w+)\}", path.read_text())}


@pytest.mark.parametrize("path", EXECUTOR_CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads_and_builds_its_backends(path):
    config = load_config(path, environ=secrets_for(path))
    assert isinstance(config, ExecutorConfig)
    for backend in config.effective_backends:
        built = make_backend(backend, embedded=config.embedded)
        assert built.kind == canonical_provider(backend.provider)
        assert built.on_premise == (built.kind not in HOSTED_PROVIDERS)
        if backend.api_key:  # the secret came from the environment, and never shows
            assert backend.api_key.startswith("dummy-") and backend.api_key not in repr(backend)


def test_example_configs_cover_every_provider():
    providers = set()
    for path in EXECUTOR_CONFIGS:
        providers |= {canonical_provider(b.provider) for b in load_config(path, environ=secrets_for(path)).effective_backends}
    assert providers == set(PROVIDERS)


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
        ("[[models]]\nname = 'm'\nprice-in = -1", "price-in must be a number from 0"),
        ("[[models]]\nname = 'm'\nprice-out = nan", "price-out must be a number from 0"),
        ("[[models]]\nname = 'm'\nprice-out = inf", "price-out must be a number from 0"),
        ("[[models]]\nname = 'm'\nprice-in = 1e13", "price-in must be a number from 0"),
        ("[embedded]\nthreds = 2", "threds"),
        ("listen = [", "TOML"),
        ("list-models-timeout = 0", "list-models-timeout must be positive"),
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


def test_backends_secrets_and_provider_model_names(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[[backends]]\nprovider = "openai"\napi-key = "${MY_KEY}"\nmodels = ["openai:gpt-4o-mini"]\n'
        '[[models]]\nname = "openai:gpt-4o-mini"\nprice-in = 0.15\n'
        '[[models]]\nname = "gpt-4o-mini"\nprice-in = 9.0\n'
    )
    config = load_config(path, environ={"MY_KEY": "sk-live-123456"})
    [backend] = config.backends
    assert backend.api_key == "sk-live-123456" and "sk-live-123456" not in repr(backend)
    assert config.terms_for("gpt-4o-mini", "openai").price_in == 0.15  # provider:model wins
    assert config.terms_for("gpt-4o-mini", "ollama").price_in == 9.0
    built = make_backend(backend)
    assert built.config.models == ["gpt-4o-mini"]  # the provider prefix is stripped for the adapter


def test_unset_secret_is_an_error_naming_the_variable(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[backends]]\nprovider = "anthropic"\napi-key = "${NOPE_KEY}"\nmodels = ["m"]\n')
    with pytest.raises(ConfigError, match="NOPE_KEY"):
        load_config(path, environ={})


def test_on_premise_only_refuses_hosted_backends(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('on-premise-only = true\n[[backends]]\nprovider = "groq"\napi-key = "k"\nmodels = ["m"]\n')
    with pytest.raises(ConfigError, match="on-premise-only"):
        load_config(path, environ={})
    path.write_text('on-premise-only = true\n[[backends]]\nprovider = "ollama"\n')
    assert load_config(path, environ={}).on_premise_only


def test_unknown_provider_is_a_start_up_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[backends]]\nprovider = "olama"\n')
    with pytest.raises(ConfigError, match="unknown provider 'olama'"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="unknown provider"):
        load_config(None, environ={"LLM_PROVIDER": "gpt"})


def test_llm_zero_config_variables():
    config = load_config(None, environ={
        "LLM_PROVIDER": "lmstudio", "LLM_ENDPOINT": "http://127.0.0.1:1234/v1", "LLM_MODEL": "qwen",
        "LLM_API_KEY": "lm-studio", "LLM_TIMEOUT_SECONDS": "12.5", "LLM_MAX_RETRIES": "4",
    })
    [backend] = config.backends
    assert (backend.provider, backend.endpoint, backend.models, backend.timeout, backend.max_retries) == (
        "lmstudio", "http://127.0.0.1:1234/v1", ["qwen"], 12.5, 4)
    embedded = load_config(None, environ={
        "LLM_MODEL_PATH": "/models/x.gguf", "LLM_CONTEXT_SIZE": "4096", "LLM_THREADS": "1",
        "LLM_MAX_TOKENS": "64", "LLM_TEMPERATURE": "0.5",
    })
    assert embedded.effective_backends[0].provider == "embedded"
    e = embedded.embedded
    assert (e.model_path, e.context_size, e.threads, e.max_tokens, e.temperature) == ("/models/x.gguf", 4096, 1, 64, 0.5)


def test_operator_settings_from_the_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[operator]\nhost = "127.0.0.1"\nport = 9000\n')
    env = {"LOOMNET_OPERATOR_HOST": "0.0.0.0", "LOOMNET_OPERATOR_ADMIN_TOKEN": "token-from-env-0123456789"}
    config = load_config(path, environ=env)
    assert (config.operator.host, config.operator.port) == ("0.0.0.0", 9000)  # the file's port stays
    assert config.operator.admin_token == "token-from-env-0123456789"
    assert "token-from-env" not in repr(config.operator)
    assert load_config(None, environ={"LOOMNET_OPERATOR_PORT": "8499"}).operator.port == 8499
