"""Per-client-peer rate limits (``node/_rate.py``): pure, with time as an argument.

The limiter takes ``now`` instead of reading a clock, so these tests step time
explicitly (the mock-clock equivalent of trio's autojump clock for sans-IO code).
"""

from __future__ import annotations

import pytest

from loomnet.node._rate import PeerRateLimiter, RateLimited
from loomnet.protocol import ErrorCode


def test_a_peer_gets_its_requests_per_minute_then_waits_exactly_for_the_next():
    limiter = PeerRateLimiter(requests_per_minute=3, tokens_per_minute=0)
    for _ in range(3):
        limiter.admit("alice", now=100.0)
    with pytest.raises(RateLimited) as info:
        limiter.admit("alice", now=100.0)
    assert info.value.code == ErrorCode.RATE_LIMITED and info.value.retryable
    assert info.value.retry_after == 20.0  # one request refills every 60/3 s
    with pytest.raises(RateLimited):
        limiter.admit("alice", now=119.9)
    limiter.admit("alice", now=120.0)
    limiter.admit("bob", now=120.0)  # limits are per peer
    assert limiter.statistics().refused_requests == 2


def test_tokens_are_charged_as_billed_and_a_debt_is_repaid_before_the_next_request():
    limiter = PeerRateLimiter(requests_per_minute=0, tokens_per_minute=600)
    limiter.admit("alice", now=0.0)
    limiter.charge("alice", 900, now=1.0)  # one answer overdrew the minute's 600 by 300
    with pytest.raises(RateLimited) as info:
        limiter.admit("alice", now=1.0)
    # 10 tokens a second repay -300 and reach +1 in 30.1 s
    assert info.value.retry_after == 30.1 and "600 tokens per minute" in info.value.message
    with pytest.raises(RateLimited):
        limiter.admit("alice", now=30.0)
    limiter.admit("alice", now=31.1)
    assert limiter.statistics().refused_tokens == 2


def test_with_both_limits_off_nothing_is_refused_or_held():
    limiter = PeerRateLimiter(requests_per_minute=0, tokens_per_minute=0)
    for n in range(1000):
        limiter.admit(f"peer-{n}", now=0.0)
        limiter.charge(f"peer-{n}", 10**6, now=0.0)
    assert limiter.statistics().peers == 0


def test_peers_whose_buckets_refilled_are_dropped():
    limiter = PeerRateLimiter(requests_per_minute=60, tokens_per_minute=6000)
    for n in range(500):
        limiter.admit(f"peer-{n}", now=0.0)
    limiter.charge("heavy", 18000, now=0.0)  # in debt for 2 minutes past a full bucket's
    assert limiter.statistics().peers == 501
    limiter.admit("late", now=61.0)  # the sweep runs: every light peer is full again
    assert limiter.statistics().peers == 2  # the indebted one and the new one
    limiter.admit("later", now=200.0)
    assert limiter.statistics().peers == 1


def test_at_most_max_peers_are_held_and_the_least_recently_seen_goes_first():
    limiter = PeerRateLimiter(requests_per_minute=1, tokens_per_minute=0, max_peers=3)
    for peer in ("a", "b", "c"):
        limiter.admit(peer, now=0.0)
    with pytest.raises(RateLimited):
        limiter.admit("a", now=1.0)  # "a" is now the most recently seen
    limiter.admit("d", now=2.0)  # "b" makes room
    assert limiter.statistics().peers == 3
    limiter.admit("b", now=3.0)  # forgotten, so a fresh bucket (the price of the bound)
    with pytest.raises(RateLimited):
        limiter.admit("a", now=3.0)  # still held, still limited
