"""The replay guard's two steps and its per-peer share (``protocol/_replay.py``).

``fresh`` remembers nothing, so a request refused after it (for its rate, model,
price...) holds no nonce; ``remember`` checks and stores in one step, so of copies
that raced past ``fresh`` exactly one is stored; and one peer holds at most
``per_peer`` nonces (``PEER_LIMIT``), while other peers are unaffected. The end-to-end
attack this closes: ``tests/e2e/test_nonce_memory.py``.
"""

from __future__ import annotations

import functools
import os
import random

import pytest
from loomnet.protocol import (
    ChatMessage,
    ErrorCode,
    InferenceRequest,
    ReplayGuard,
    RequestRejected,
)
from loomnet.protocol._replay import NonceShareExceeded

AUDIENCE = "12D3KooWExecutor"


def request(created_at: float = 1000.0) -> InferenceRequest:
    return InferenceRequest(audience=AUDIENCE, nonce=os.urandom(16), created_at=created_at, model="m1",
                            messages=[ChatMessage("user", "hi")], max_tokens=4)  # fmt: skip


def code(step) -> ErrorCode | None:
    try:
        step()
    except RequestRejected as exc:
        return exc.code
    return None


def test_fresh_remembers_nothing():
    guard = ReplayGuard(AUDIENCE, capacity=3)
    for _ in range(100):
        guard.fresh(request(), now=1000.0)
    assert len(guard) == 0 and guard.held_by("a") == 0


def test_a_remembered_nonce_is_refused_at_both_steps():
    guard = ReplayGuard(AUDIENCE)
    first = request()
    guard.fresh(first, now=1000.0)
    guard.remember(first, now=1000.0, peer="a")
    assert code(lambda: guard.fresh(first, now=1001.0)) == ErrorCode.REPLAYED_NONCE
    assert code(lambda: guard.remember(first, now=1001.0, peer="a")) == ErrorCode.REPLAYED_NONCE
    assert code(lambda: guard.remember(first, now=1001.0, peer="b")) == ErrorCode.REPLAYED_NONCE


def test_of_copies_that_raced_past_fresh_exactly_one_is_remembered():
    guard = ReplayGuard(AUDIENCE)
    same = request()
    for _ in range(10):  # ten copies in flight, none stored yet
        guard.fresh(same, now=1000.0)
    codes = [code(lambda: guard.remember(same, now=1000.0, peer="a")) for _ in range(10)]
    assert codes == [None] + [ErrorCode.REPLAYED_NONCE] * 9
    assert len(guard) == 1


def test_one_peer_holds_at_most_its_share_and_others_are_unaffected():
    guard = ReplayGuard(AUDIENCE, max_age=10.0, capacity=10, per_peer=4)
    for i in range(4):
        guard.remember(request(created_at=100.0 + i), now=100.0 + i, peer="greedy")
    with pytest.raises(NonceShareExceeded) as info:
        guard.remember(request(created_at=104.0), now=104.0, peer="greedy")
    assert info.value.code == ErrorCode.PEER_LIMIT and info.value.retryable
    assert info.value.retry_after == pytest.approx(6.0)  # its oldest (created 100) goes at 110
    assert guard.held_by("greedy") == 4
    for i in range(4):  # others: their own shares
        guard.remember(request(created_at=104.0), now=104.0, peer=f"other{i}")
    assert len(guard) == 8
    # the greedy peer's share comes back as its nonces expire (and not before)
    assert code(lambda: guard.remember(request(created_at=109.9), now=109.9, peer="greedy")) == ErrorCode.PEER_LIMIT
    guard.remember(request(created_at=110.5), now=110.5, peer="greedy")
    assert guard.held_by("greedy") == 4  # the one created at 100 went (expired at 110 < 110.5)


def test_the_whole_memory_stays_bounded_and_is_refused_when_full():
    guard = ReplayGuard(AUDIENCE, max_age=10.0, capacity=6, per_peer=2)
    for i in range(3):
        for _ in range(2):
            guard.remember(request(), now=1000.0, peer=f"p{i}")
    assert code(lambda: guard.remember(request(), now=1000.0, peer="p9")) == ErrorCode.OVER_CAPACITY
    assert len(guard) == 6


def test_the_default_share_is_a_twentieth_of_the_memory():
    assert ReplayGuard(AUDIENCE).per_peer == 5000
    assert ReplayGuard(AUDIENCE, capacity=10).per_peer == 1


def test_peers_books_match_the_memory_under_random_traffic():
    """Expiry keeps the per-peer books and the memory in step: a random mix of peers,
    ages and clock steps; at every step each peer holds what is in memory for it."""
    rng = random.Random(13)
    guard = ReplayGuard(AUDIENCE, max_age=5.0, max_skew=1.0, capacity=50, per_peer=12)
    stored: list[tuple[float, str]] = []
    now = 1000.0
    for _ in range(3000):
        now += rng.random() * 0.3
        peer = f"p{rng.randrange(6)}"
        created = now - rng.random() * 5.0
        if code(functools.partial(guard.remember, request(created_at=created), now=now, peer=peer)) is None:
            stored.append((created + 5.0, peer))
        live = [p for expiry, p in stored if expiry >= now]
        assert len(guard) == len(live) <= 50
        for name in {f"p{i}" for i in range(6)}:
            assert guard.held_by(name) == live.count(name) <= 12
