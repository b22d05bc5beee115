"""A long text is counted slice by slice, in at most two worker threads at once, so
counting never holds a big list of token ids (the memory an executor booking many long
receipts at once kept for good, found by ``bench/slow_peers.py``), and the count stays
exactly tiktoken's count of the whole text.
"""

from __future__ import annotations

import threading
import time
import tracemalloc

import pytest
import trio
from hypothesis import given, settings, strategies as st

from loomnet.client import _tokens
from loomnet.client._tokens import TokenCounter, _count_slice, _slices

ENCODINGS = ("cl100k_base", "o200k_base")
#: what a text may be made of: words, every kind of space, digits, punctuation,
#: contractions, accents and combining marks, CJK, emoji, a lone surrogate
PIECES = st.sampled_from([
    "word", "Word", "WORD", "é", "e\u0301", "naïve", "日本語", "漢", "😀", "👍🏽", "12", "3", "12345", "'s", "'LL",
    " ", "  ", "\t", "\n", "\r\n", " \n", "\u00a0", "\u3000", ".", ",", "!?", "...", "-", "/", "(", "\ud800", "x",
])  # fmt: skip
TEXTS = st.lists(PIECES, max_size=80).map("".join)


@pytest.fixture(scope="module")
def counter(tmp_path_factory) -> TokenCounter:
    counter = TokenCounter(tmp_path_factory.mktemp("tiktoken"))
    for name in ENCODINGS:
        assert counter.load(name)
    return counter


@settings(max_examples=400, deadline=None)
@given(text=TEXTS, size=st.integers(min_value=1, max_value=24))
def test_slices_rebuild_the_text_and_their_counts_add_up_to_the_whole_count(counter, text, size):
    pieces = list(_slices(text, size))
    assert "".join(pieces) == text
    for name in ENCODINGS:
        encoder = counter._encodings[name]
        assert sum(_count_slice(encoder, p) for p in pieces) == _count_slice(encoder, text), name


def test_a_long_text_is_cut_into_bounded_slices_where_it_allows():
    prose = ("lorem ipsum " * 85 + "dolor") * 2000  # what bench/slow_peers.py's firehose writes
    pieces = list(_slices(prose, 64 * 1024))
    assert "".join(pieces) == prose and max(map(len, pieces)) <= 64 * 1024 and len(pieces) > 30
    assert list(_slices("x" * 100, 10)) == ["x" * 100]  # no cut point: counted whole


def test_counting_a_long_text_holds_no_list_of_all_its_token_ids(counter):
    text = ("lorem ipsum " * 85 + "dolor") * 2000  # 2 MiB: ~344 000 tokens, ~14 MiB as a list of ints
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        tokens, source = counter.count(text)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert source == "tiktoken" and tokens == len(counter._encodings["cl100k_base"].encode_ordinary(text))
    assert peak < 3 * 2**20, f"counting 2 MiB of text allocated {peak / 2**20:.1f} MiB at its peak"


async def test_at_most_two_worker_threads_count_at_once(counter, monkeypatch):
    inside, most = 0, 0
    lock = threading.Lock()
    count = counter.count

    def slow_count(text, model=None):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.05)
        with lock:
            inside -= 1
        return count(text, model)

    monkeypatch.setattr(counter, "count", slow_count)
    long = "word " * _tokens.INLINE_CHARS  # too long to count on the spot
    results: list[tuple[int, str]] = []

    async def one() -> None:
        results.append(await counter.acount(long))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(one)
    assert results == [count(long)] * 8
    assert most == _tokens._COUNT_THREADS == 2
