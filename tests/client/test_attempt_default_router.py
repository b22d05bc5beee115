"""The interim router and health table (``_simple_router``) a client uses until the real
ones are wired into ``_routing.dispatch_parts``: every route filter, the ranking, and the
circuit breaker's bench and probe. (Goes with ``_simple_router`` when that is retired.)
"""

import random

import msgspec
import pytest

from loomnet.client._route import RequestShape, Route
from loomnet.client._simple_router import CountingHealth, ScanRouter, offer_matches
from loomnet.protocol import Advert, ModelOffer, SigningKey

from .fake_executor import offer_of

A, B, C = (SigningKey(bytes([n]) * 32) for n in (11, 12, 13))
SMOL = ModelOffer(name="smollm2-135m", aliases=["smol"], categories=["fast"], context_length=8192,
                  price_in=1_000_000, price_out=2_000_000, capabilities=["chat", "tools"], tokens_per_second=120.0)  # fmt: skip
SHAPE = RequestShape(prompt_tokens=1000, max_tokens=1000)


def rank(offers, route, health=None):
    router = ScanRouter(lambda: offers)
    return [c.offer.executor for c in router.rank(route, SHAPE, health or CountingHealth(), now=0.0, rng=random.Random(1))]


@pytest.mark.parametrize(
    ("route", "passes"),
    [
        (Route(model="SMOL"), True),
        (Route(model="ollama:smollm2-135m"), True),  # provider:model: the part after the colon
        (Route(model="other"), False),
        (Route(category="fast"), True),
        (Route(category="quality"), False),
        (Route(max_price_in=1_000_000, max_price_out=2_000_000), True),
        (Route(max_price_out=1_999_999), False),
        (Route(capabilities=frozenset({"tools"})), True),
        (Route(capabilities=frozenset({"vision"})), False),
        (Route(min_context=8192), True),
        (Route(min_context=8193), False),
        (Route(on_premise_only=True), True),
        (Route(no_retention_only=True), True),
        (Route(pinned=frozenset({A.peer_id})), True),
        (Route(pinned=frozenset({B.peer_id})), False),
        (Route(excluded=frozenset({A.peer_id})), False),
    ],
)
def test_every_filter(route, passes):
    assert offer_matches(offer_of(A, SMOL), route) is passes


def test_hosted_and_retaining_executors_are_filtered_out_on_request():
    hosted = msgspec.structs.replace(
        offer_of(A, SMOL), advert=Advert(seq=1, issued_at=0.0, ttl=60.0, models=[SMOL], on_premise=False)
    )
    keeps = msgspec.structs.replace(
        offer_of(A, SMOL), advert=Advert(seq=1, issued_at=0.0, ttl=60.0, models=[SMOL], prompt_retention="30d")
    )
    assert not offer_matches(hosted, Route(on_premise_only=True)) and offer_matches(hosted, Route())
    assert not offer_matches(keeps, Route(no_retention_only=True)) and offer_matches(keeps, Route())


def test_best_is_the_cheapest_worst_case_and_fastest_the_advertised_speed():
    dear = offer_of(A, msgspec.structs.replace(SMOL, price_out=9_000_000, tokens_per_second=400.0))
    cheap = offer_of(B, SMOL)
    unmeasured = offer_of(C, msgspec.structs.replace(SMOL, price_out=1_000_000, tokens_per_second=0.0))
    assert rank([dear, cheap, unmeasured], Route()) == [C.peer_id, B.peer_id, A.peer_id]
    assert rank([dear, cheap, unmeasured], Route(strategy="fastest")) == [A.peer_id, B.peer_id, C.peer_id]


def test_the_breaker_benches_after_three_failures_then_lets_one_probe_through():
    health = CountingHealth(failures_to_bench=3, bench_seconds=30.0)
    offers = [offer_of(A, SMOL), offer_of(B, msgspec.structs.replace(SMOL, price_out=3_000_000))]
    for now in (1.0, 2.0, 3.0):
        health.started(A.peer_id, "smollm2-135m", now=now)
        health.failed(A.peer_id, "smollm2-135m", now=now)
    assert health.benched(A.peer_id, now=32.9) and rank(offers, Route(), health) == [B.peer_id]
    assert not health.benched(A.peer_id, now=33.0)  # the probe
    health.started(A.peer_id, "smollm2-135m", now=33.0)
    health.failed(A.peer_id, "smollm2-135m", now=34.0)  # the probe failed: benched again at once
    assert health.benched(A.peer_id, now=34.0)
    assert not health.benched(A.peer_id, now=64.0)
    health.started(A.peer_id, "smollm2-135m", now=64.0)
    health.finished(A.peer_id, "smollm2-135m", output_tokens=10, seconds=1.0, now=65.0)  # closed again
    health.failed(A.peer_id, "smollm2-135m", now=66.0)
    assert not health.benched(A.peer_id, now=66.0) and health.in_flight(A.peer_id, "smollm2-135m") == 0
