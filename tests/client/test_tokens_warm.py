"""Token counting without start-up stalls: a client loads tiktoken's encoding in the
background once it has started, a counter never loads an encoding twice, and a short
text is counted on the spot instead of in a worker thread.
"""

from __future__ import annotations

import threading

import pytest
import trio

from loomnet.client import ClientConfig, _tokens, open_client
from loomnet.client._tokens import INLINE_CHARS, TokenCounter


class Spy:
    """Wraps a loaded encoder: notes the thread of every count."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.threads: list[int] = []

    def encode_ordinary(self, text: str) -> list[int]:
        self.threads.append(threading.get_ident())
        return self.encoder.encode_ordinary(text)


@pytest.fixture
def loaded_counter(tmp_path) -> tuple[TokenCounter, Spy]:
    counter = TokenCounter(tmp_path)
    assert counter.load("cl100k_base")
    spy = Spy(counter._encodings["cl100k_base"])
    counter._encodings["cl100k_base"] = spy
    return counter, spy


async def test_a_short_text_is_counted_on_the_spot_once_loaded(loaded_counter):
    counter, spy = loaded_counter
    here = threading.get_ident()
    assert await counter.acount("hello world") == (2, "tiktoken")
    text = "x " * (INLINE_CHARS // 2)
    assert await counter.acount(text, "llama3") == counter.count(text)
    assert spy.threads == [here] * 3  # no worker-thread hop
    assert counter.count_nowait("hello world") == (2, "tiktoken")


async def test_a_long_text_or_an_encoding_not_loaded_goes_to_a_worker_thread(loaded_counter, tmp_path):
    counter, spy = loaded_counter
    long_text = "word " * (INLINE_CHARS // 5 + 1)
    with pytest.raises(trio.WouldBlock):
        counter.count_nowait(long_text)
    assert await counter.acount(long_text) == (INLINE_CHARS // 5 + 2, "tiktoken")
    assert spy.threads == [spy.threads[0]] and spy.threads[0] != threading.get_ident()

    fresh = TokenCounter(tmp_path / "fresh")
    with pytest.raises(trio.WouldBlock):
        fresh.count_nowait("hi")  # would load cl100k_base: ~0.2 s
    assert not fresh.loaded("cl100k_base")
    assert await fresh.acount("hello world") == (2, "tiktoken")
    assert fresh.loaded("cl100k_base") and fresh.loads == 1


async def test_callers_during_a_load_wait_for_it_and_never_load_again(tmp_path, monkeypatch):
    release, started = threading.Event(), threading.Event()
    builds: list[str] = []
    real = _tokens._tiktoken_encoding

    def slow(name, cache_dir):
        builds.append(name)
        started.set()
        release.wait(30)
        return real(name, cache_dir)

    monkeypatch.setattr(_tokens, "_tiktoken_encoding", slow)
    counter = TokenCounter(tmp_path)
    results: list[tuple[int, str]] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, counter.load, "cl100k_base")
            await trio.to_thread.run_sync(started.wait)
            for _ in range(3):
                nursery.start_soon(lambda: _append(results, counter.acount("hello world")))
            await trio.sleep(0.2)
            assert results == [] and builds == ["cl100k_base"]  # they wait for the load in flight
            release.set()
    assert results == [(2, "tiktoken")] * 3 and builds == ["cl100k_base"] and counter.loads == 1


async def _append(results: list, awaitable) -> None:
    results.append(await awaitable)


@pytest.mark.integration
async def test_open_client_loads_the_encoding_in_the_background_after_starting(tmp_path, monkeypatch):
    release = threading.Event()
    loads: list[tuple[str, int]] = []
    real = _tokens._tiktoken_encoding

    def held(name, cache_dir):
        loads.append((name, threading.get_ident()))
        release.wait(30)
        return real(name, cache_dir)

    monkeypatch.setattr(_tokens, "_tiktoken_encoding", held)
    config = ClientConfig(data_dir=str(tmp_path), discover_local=False)
    with trio.fail_after(60):
        async with open_client(config) as client:
            # the client started without waiting for the load, which runs in a worker thread
            assert not client.tokens.loaded("cl100k_base")
            while not loads:
                await trio.sleep(0.01)
            assert loads[0] == ("cl100k_base", loads[0][1]) and loads[0][1] != threading.get_ident()
            release.set()
            # the first count waits for that same load, then never loads again
            assert await client.tokens.acount("hello world") == (2, "tiktoken")
            assert await client.tokens.acount("hello world", "mistral-7b") == (2, "tiktoken")
            assert client.tokens.loads == 1 and len(loads) == 1
