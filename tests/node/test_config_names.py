"""Names the executor's config must keep addressable: every backend's name passes the
admin routes' one rule (so ``/admin/backends/<name>`` reaches it), and no model's alias
is already another name (a model's, an alias, a category, ``cheapest``/``fastest``),
which clients could never reach. Each refusal is a typed ConfigError with a stable code."""

from __future__ import annotations

import json

import pytest

from loomnet.node._config_terms import BACKEND_NAME_RULE, NameTaken, alias_clash, backend_name_problem
from loomnet.node.config import ExecutorConfig, ModelTerms, load_config
from loomnet.protocol import ConfigError, ErrorCode


def toml(tmp_path, text: str):
    path = tmp_path / "executor.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["a/b", "has space", "x" * 65, "caf\u00e9", "evil\x1b[31m", "..%2F"])
def test_a_backend_name_the_admin_routes_could_not_reach_is_refused_at_load(tmp_path, name):
    path = toml(tmp_path, f'[[backends]]\nname = {json.dumps(name)}\nprovider = "ollama"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.code == ErrorCode.CONFIG_INVALID
    assert str(path) in info.value.message and BACKEND_NAME_RULE in info.value.message
    assert repr(name[:80]) in info.value.message  # it names the backend


def test_a_backend_without_a_name_is_known_by_its_provider_which_passes(tmp_path):
    config = load_config(toml(tmp_path, '[[backends]]\nprovider = "ollama"\n\n[[backends]]\nname = "desk-2.a_b"\n'
                                        'provider = "vllm"\nendpoint = "http://127.0.0.1:1/v1"\n'), environ={})  # fmt: skip
    assert [b.label for b in config.backends] == ["ollama", "desk-2.a_b"]


def test_the_name_rule_says_why():
    assert backend_name_problem("desk") is None and backend_name_problem("a.b_c-9") is None
    for bad in ("a/b", None, 7, ""):
        assert BACKEND_NAME_RULE in backend_name_problem(bad)


MODELS = '''
[[models]]
name = "llama3.2"
aliases = ["llama"]
categories = ["coding"]

[[models]]
name = "qwen"
'''


@pytest.mark.parametrize("alias, why", [
    ("llama3.2", "the name of model 'llama3.2'"),
    ("LLAMA3.2", "the name of model 'llama3.2'"),  # clients match names case-insensitively
    ("llama", "an alias of model 'llama3.2'"),
    ("coding", "a category"),
    ("Fast", "the built-in category 'fast'"),
    ("cheapest", "the route keyword 'cheapest'"),
    ("fastest", "the route keyword 'fastest'"),
    ("category:x", "starts with 'category:'"),
])  # fmt: skip
def test_an_alias_that_is_already_a_name_is_refused_at_load(tmp_path, alias, why):
    path = toml(tmp_path, MODELS + f'aliases = ["{alias}"]\n')
    with pytest.raises(NameTaken) as info:
        load_config(path, environ={})
    assert info.value.code == ErrorCode.NAME_TAKEN and isinstance(info.value, ConfigError)
    assert why in info.value.message and f"alias {alias!r}" in info.value.message and "'qwen'" in info.value.message
    assert str(path) in info.value.message


def test_aliases_that_name_only_their_model_load(tmp_path):
    config = load_config(toml(tmp_path, MODELS + 'aliases = ["q", "Q", "qwen"]\ncategories = ["fast"]\n'), environ={})
    assert [m.aliases for m in config.models] == [["llama"], ["q", "Q", "qwen"]]


def test_a_provider_prefixed_model_is_known_by_its_plain_name_too():
    models = [ModelTerms(name="ollama:llama3.2"), ModelTerms(name="qwen", aliases=["llama3.2"])]
    assert "the name of model 'ollama:llama3.2'" in alias_clash(models)
    assert "the name of model 'm1'" in alias_clash([ModelTerms(name="qwen", aliases=["M1"])], offered=["m1"])
    with pytest.raises(NameTaken):
        ExecutorConfig(models=models)  # built in code, not loaded: the same check


def _model_toml(**fields) -> str:
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
    return f'[[backends]]\nname = "desk"\nprovider = "ollama"\n\n[[models]]\nname = "m1"\n{lines}\n'


def _advert_bounds():
    """The advert schema's bounds, read from the protocol itself (never copied)."""
    import msgspec

    from loomnet.protocol import ModelOffer

    fields = {f.name: f.type for f in msgspec.inspect.type_info(ModelOffer).fields}
    return fields["aliases"], fields["categories"]


@pytest.mark.parametrize("fields", [
    {"aliases": [f"a{i}" for i in range(_advert_bounds()[0].max_length + 1)]},  # one alias too many
    {"aliases": ["x" * (_advert_bounds()[0].item_type.max_length + 1)]},  # an alias too long
    {"aliases": [""]},
    {"aliases": ["zero\u200bwidth"]},  # a zero-width space (Cf)
    {"aliases": ["line\u2028sep"]},  # a line separator (Zl)
    {"aliases": ["tab\there"]},
    {"categories": [f"c{i}" for i in range(_advert_bounds()[1].max_length + 1)]},
    {"categories": ["y" * (_advert_bounds()[1].item_type.max_length + 1)]},
    {"categories": [""]},
    {"categories": ["para\u2029sep"]},
])  # fmt: skip
def test_terms_an_advert_could_not_carry_are_refused_at_load(tmp_path, fields):
    with pytest.raises(ConfigError) as info:
        load_config(toml(tmp_path, _model_toml(**fields)), environ={})
    assert info.value.code == ErrorCode.CONFIG_INVALID and "'m1'" in info.value.message


@pytest.mark.parametrize("name", ["zero\u200bwidth", "x" * 129])
def test_a_model_name_an_advert_could_not_carry_is_refused_at_load(tmp_path, name):
    text = f'[[backends]]\nname = "desk"\nprovider = "ollama"\n\n[[models]]\nname = {json.dumps(name)}\n'
    with pytest.raises(ConfigError) as info:
        load_config(toml(tmp_path, text), environ={})
    assert info.value.code == ErrorCode.CONFIG_INVALID


def test_terms_at_the_advert_limits_load_and_make_a_valid_advert(tmp_path):
    import msgspec

    from loomnet.protocol import ModelOffer

    aliases, categories = _advert_bounds()
    fields = {"aliases": [f"{i:03d}" + "a" * (aliases.item_type.max_length - 3) for i in range(aliases.max_length)],
              "categories": [f"{i:02d}" + "c" * (categories.item_type.max_length - 2)
                             for i in range(categories.max_length)]}  # fmt: skip
    (terms,) = load_config(toml(tmp_path, _model_toml(**fields)), environ={}).models
    offer = ModelOffer(name=terms.name, aliases=terms.aliases, categories=terms.categories)
    assert msgspec.json.decode(msgspec.json.encode(offer), type=ModelOffer) == offer
