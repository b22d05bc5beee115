"""The response cache on its own (``node/_response_cache.py``): what hits, the key, the
LRU's two bounds, the TTL on trio's clock (autojump), billing, and the config table."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import msgspec
import pytest
import trio

from loomnet.node._response_cache import (
    CachedAnswer,
    CacheStatistics,
    CacheTerms,
    ResponseCache,
    ResponseCaches,
    billed_prices,
    cache_key,
    is_deterministic,
)
from loomnet.node.backends._base import ChatParams, Finished, ReasoningDelta, TextDelta, Usage
from loomnet.node.config import ExecutorConfig, ModelTerms, load_config
from loomnet.protocol import GENERATION_FIELDS, ChatMessage, ConfigError, ResponseFormat, ToolCall, ToolSpec, cost_of

HELLO = [ChatMessage("user", "Say hello.")]
CLIENT_A, CLIENT_B = "12D3KooWClientA", "12D3KooWClientB"


def params(**fields) -> ChatParams:
    return ChatParams(**{"model": "m1", "messages": HELLO, "temperature": 0.0, "seed": 7, **fields})


def answer(text: str = "Hello, world!") -> CachedAnswer:
    return CachedAnswer(text=text, finish_reason="stop", usage=Usage(input_tokens=11, output_tokens=4, source="backend"))


def size_of(key: bytes, stored: CachedAnswer) -> int:
    return len(key) + len(msgspec.msgpack.encode(stored))


# ------------------------------------------------------------------ what hits


@pytest.mark.parametrize(
    ("fields", "deterministic"),
    [
        ({}, True),
        ({"temperature": None}, False),  # unset: the runtime's default, which samples
        ({"temperature": 0.7}, False),
        ({"seed": None}, False),
        ({"temperature": None, "seed": None}, False),
    ],
)
def test_only_temperature_zero_with_a_seed_is_deterministic(fields, deterministic):
    assert is_deterministic(params(**fields)) is deterministic


#: a value other than ``params()``'s for every generation option
CHANGED = {
    "max_tokens": 64,
    "temperature": 0.5,
    "top_p": 0.9,
    "seed": 8,
    "stop": ["\n"],
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "user": "end-user-1",
    "tools": [ToolSpec(name="get_weather")],
    "tool_choice": "auto",
    "response_format": ResponseFormat(type="json_object"),
}


def test_every_generation_option_is_part_of_the_key():
    assert set(CHANGED) == set(GENERATION_FIELDS)  # a new option must join the key (and this table)
    base = cache_key("m1", params(), CLIENT_A)
    keys = {name: cache_key("m1", params(**{name: value}), CLIENT_A) for name, value in CHANGED.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(CHANGED)
    assert cache_key("m1", params(), CLIENT_A) == base  # and it is stable


def test_the_model_messages_and_client_are_part_of_the_key_and_shared_drops_the_client():
    base = cache_key("m1", params(), CLIENT_A)
    assert cache_key("m2", params(), CLIENT_A) != base
    assert cache_key("m1", params(messages=[ChatMessage("user", "Say hello!")]), CLIENT_A) != base
    assert cache_key("m1", params(messages=[*HELLO, ChatMessage("assistant", "Hi")]), CLIENT_A) != base
    assert cache_key("m1", params(), CLIENT_B) != base
    assert cache_key("m1", params(), None) == cache_key("m1", params(), None) != base


def test_the_backend_model_name_is_not_part_of_the_key():
    """The key names the advertised model; the runtime's name for it is the executor's business."""
    assert cache_key("m1", params(model="other-runtime-name"), CLIENT_A) == cache_key("m1", params(), CLIENT_A)


# ------------------------------------------------------------------ bounds and TTL


async def test_an_answer_is_served_until_its_ttl_runs_out(autojump_clock):
    cache = ResponseCache(CacheTerms(ttl=60))
    key = cache_key("m1", params(), CLIENT_A)
    assert cache.get(key, now=trio.current_time()) is None
    assert cache.put(key, answer(), now=trio.current_time())
    await trio.sleep(59)
    assert cache.get(key, now=trio.current_time()) == answer()
    await trio.sleep(1)
    assert cache.get(key, now=trio.current_time()) is None
    stats = cache.statistics()
    assert stats == CacheStatistics(hits=1, misses=2, entries=0, bytes=0, evictions=0, expired=1)


async def test_storing_again_renews_the_ttl_and_replaces_the_answer(autojump_clock):
    cache = ResponseCache(CacheTerms(ttl=10))
    key = cache_key("m1", params(), CLIENT_A)
    cache.put(key, answer("one"), now=trio.current_time())
    await trio.sleep(8)
    cache.put(key, answer("two"), now=trio.current_time())
    await trio.sleep(8)
    assert cache.get(key, now=trio.current_time()) == answer("two")
    assert cache.statistics().entries == 1 and cache.statistics().bytes == size_of(key, answer("two"))


def test_the_least_recently_used_answer_goes_when_the_entries_are_full():
    cache = ResponseCache(CacheTerms(max_entries=2))
    a, b, c = (cache_key("m1", params(seed=seed), CLIENT_A) for seed in (1, 2, 3))
    cache.put(a, answer("a"), now=0)
    cache.put(b, answer("b"), now=0)
    assert cache.get(a, now=1) == answer("a")  # a is now the most recently used
    cache.put(c, answer("c"), now=2)
    assert cache.get(b, now=3) is None
    assert cache.get(a, now=3) == answer("a") and cache.get(c, now=3) == answer("c")
    stats = cache.statistics()
    assert (stats.entries, stats.evictions, stats.bytes) == (2, 1, size_of(a, answer("a")) + size_of(c, answer("c")))


def test_answers_go_oldest_first_until_the_bytes_fit():
    keys = [cache_key("m1", params(seed=seed), CLIENT_A) for seed in range(4)]
    stored = [answer(str(i) * 100) for i in range(4)]
    one = size_of(keys[0], stored[0])
    cache = ResponseCache(CacheTerms(max_bytes=3 * one))
    for key, value in zip(keys[:3], stored[:3]):
        cache.put(key, value, now=0)
    assert cache.statistics().bytes == 3 * one
    cache.put(keys[3], stored[3], now=0)
    assert cache.get(keys[0], now=0) is None and cache.get(keys[3], now=0) == stored[3]
    # a bigger answer pushes out as many as it must
    big = answer("x" * (2 * one))
    assert cache.put(keys[0], big, now=0)
    stats = cache.statistics()
    assert stats.bytes <= 3 * one and stats.entries == 1 and stats.evictions == 4
    assert cache.get(keys[0], now=0) == big


def test_an_answer_bigger_than_max_bytes_is_never_stored():
    key = cache_key("m1", params(), CLIENT_A)
    cache = ResponseCache(CacheTerms(max_bytes=200))
    cache.put(key, answer("small"), now=0)
    assert not cache.put(cache_key("m1", params(seed=9), CLIENT_A), answer("x" * 300), now=0)
    assert cache.get(key, now=0) == answer("small")  # nothing was evicted for it
    assert cache.statistics().entries == 1 and cache.statistics().evictions == 0


def test_statistics_are_a_frozen_snapshot():
    stats = ResponseCache(CacheTerms()).statistics()
    with pytest.raises(AttributeError):
        stats.hits = 5  # type: ignore[misc]


def test_the_registry_makes_a_cache_only_for_models_with_a_table_and_deterministic_requests():
    tables = {"m1": CacheTerms(), "m2": CacheTerms(shared=True)}
    caches = ResponseCaches(tables.get)
    assert caches.lookup("m3", params(), CLIENT_A, now=0) is None  # no table: off
    assert caches.lookup("m1", params(seed=None), CLIENT_A, now=0) is None  # never cached
    first = caches.lookup("m1", params(), CLIENT_A, now=0)
    assert first is not None and first.hit is None
    first.cache.put(first.key, answer(), now=0)
    assert caches.lookup("m1", params(), CLIENT_A, now=1).hit == answer()
    assert caches.lookup("m1", params(), CLIENT_B, now=1).hit is None  # not shared
    shared = caches.lookup("m2", params(), CLIENT_A, now=0)
    shared.cache.put(shared.key, answer(), now=0)
    assert caches.lookup("m2", params(), CLIENT_B, now=1).hit == answer()
    assert set(caches.statistics()) == {"m1", "m2"}
    assert caches.statistics()["m1"].hits == 1 and caches.statistics()["m1"].misses == 2


async def test_a_stored_answer_replays_as_a_backend_stream():
    call = ToolCall(id="c1", name="get_weather", arguments='{"city": "Oslo"}')
    usage = Usage(input_tokens=11, output_tokens=9, source="backend", reasoning_tokens=3)
    stored = CachedAnswer(text="Hi", reasoning="thinking", tool_calls=[call], finish_reason="tool_calls", usage=usage)
    async with stored.replay() as events:
        seen = [event async for event in events]
    assert seen == [ReasoningDelta("thinking"), TextDelta("Hi"), Finished(finish_reason="tool_calls", usage=usage, tool_calls=[call])]


# ------------------------------------------------------------------ billing


def test_billing_normal_discount_and_free():
    assert billed_prices(1_500_000, 3_000_000, CacheTerms()) == (1_500_000, 3_000_000)
    assert billed_prices(1_500_000, 3_000_000, CacheTerms(billing="free")) == (0, 0)
    assert billed_prices(1_500_000, 3_000_000, CacheTerms(billing="discount", discount=0.25)) == (1_125_000, 2_250_000)
    assert billed_prices(1_500_000, 3_000_000, CacheTerms(billing="discount", discount=1.0)) == (0, 0)
    # a price that does not divide evenly is rounded up, never above the offer's
    assert billed_prices(1, 3, CacheTerms(billing="discount", discount=0.5)) == (1, 2)


@pytest.mark.parametrize("discount", [0.0, 0.1, 1 / 3, 0.5, 0.999, 1.0])
def test_a_discounted_cost_follows_from_its_prices_and_is_never_above_the_full_cost(discount):
    full = (1_234_567, 7_654_321)
    price_in, price_out = billed_prices(*full, CacheTerms(billing="discount", discount=discount))
    assert price_in <= full[0] and price_out <= full[1]
    for tokens in [(0, 0), (1, 1), (30, 6), (100_000, 50_000), (3_000_000, 1_000_000)]:
        cost = cost_of(*tokens, price_in, price_out)
        assert cost <= cost_of(*tokens, *full)
        # the exact discount of the exact cost, rounded up, plus at most the prices' rounding
        # (under a micro-credit per million tokens) and its own rounding
        total = tokens[0] * full[0] + tokens[1] * full[1]
        exact = math.ceil(total * (1 - Fraction(discount)) / 1_000_000)
        assert exact <= cost <= exact + 1 + sum(tokens) // 1_000_000


# ------------------------------------------------------------------ config


def test_the_cache_is_off_by_default():
    assert ModelTerms(name="m1").cache is None
    assert ExecutorConfig().terms_for("m1").cache is None


def _load(tmp_path, table: str):
    path = tmp_path / "executor.toml"
    path.write_text(f'[[models]]\nname = "m1"\nprice-out = 2.0\n\n[models.cache]\n{table}\n')
    return load_config(path, environ={})


def test_a_models_cache_table_turns_it_on_with_kebab_case_keys(tmp_path):
    terms = _load(tmp_path, 'ttl = 60.0\nmax-entries = 50\nmax-bytes = 1048576\nbilling = "discount"\ndiscount = 0.25\nshared = true')
    assert terms.models[0].cache == CacheTerms(
        ttl=60.0, max_entries=50, max_bytes=1 << 20, billing="discount", discount=0.25, shared=True
    )
    assert _load(tmp_path, "").models[0].cache == CacheTerms()  # an empty table: on, with the defaults


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ("ttl = 0.0", "cache ttl must be a number of seconds above 0"),
        ("ttl = -5.0", "cache ttl must be a number of seconds above 0"),
        ("ttl = nan", "cache ttl must be a number of seconds above 0"),
        ("ttl = inf", "cache ttl must be a number of seconds above 0"),
        ("max-entries = 0", "cache max-entries must be from 1"),
        ("max-bytes = 0", "cache max-bytes must be from 1"),
        ("max-bytes = 2199023255552", "cache max-bytes must be from 1"),
        ('billing = "half"', "Invalid enum value 'half'"),
        ('billing = "discount"', 'billing = "discount" needs discount, a fraction from 0 to 1'),
        ('billing = "discount"\ndiscount = 1.5', "not 1.5"),
        ('billing = "discount"\ndiscount = -0.1', "not -0.1"),
        ('billing = "discount"\ndiscount = nan', "not nan"),
        ("discount = 0.5", 'cache discount is only used with billing = "discount"'),
        ('billing = "free"\ndiscount = 0.5', 'cache discount is only used with billing = "discount" (billing is "free")'),
        ("tll = 60.0", "unknown field `tll`"),
        ('shared = "yes"', "Expected `bool`"),
    ],
)
def test_every_bad_cache_setting_is_a_config_error_naming_the_key_and_where(tmp_path, table, says):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, table)
    assert says in caught.value.message and "$.models[0].cache" in caught.value.message


ROOT = Path(__file__).resolve().parents[2]


def test_the_commented_out_example_in_the_executor_config_loads_once_uncommented(tmp_path):
    text = (ROOT / "configs" / "executor.toml").read_text()
    assert load_config(ROOT / "configs" / "executor.toml", environ={}).models[0].cache is None  # off as shipped
    start = text.index("# [models.cache]")
    uncommented = text[:start] + re.sub(r"^# ", "", text[start:], flags=re.M)
    path = tmp_path / "executor.toml"
    path.write_text(uncommented)
    terms = load_config(path, environ={}).terms_for("smollm2-135m")
    assert terms.cache == CacheTerms(ttl=300.0, max_entries=1000, max_bytes=32 << 20, billing="free", shared=False)


def test_the_example_in_the_backend_docs_loads(tmp_path):
    text = (ROOT / "docs" / "backends.md").read_text()
    block = re.search(r"## Response cache.*?```toml\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "executor.toml"
    path.write_text(block)
    terms = load_config(path, environ={}).models[0]
    assert terms.cache == CacheTerms(ttl=300.0, max_entries=1000, max_bytes=32 << 20, billing="discount", discount=0.5)
