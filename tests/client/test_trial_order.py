"""The order the attempt loop tries the router's candidates in (``_attempt.trial_order``).

Review of issue 8: fresh identities are free, so a flood of unknown executors that
undercut a working one by a little filled every attempt of a request (each unknown,
so never benched) and the executor that had served this client was never tried.
"""

import random

from loomnet.client._attempt import trial_order
from loomnet.client._health import ExecutorHealth
from loomnet.client._offers import OfferTable
from loomnet.client._route import RequestShape, Route
from loomnet.client._router import OfferRouter
from loomnet.protocol import Advert, ModelOffer, SignedKind, SigningKey, seal

NOW = 1_000.0
T = 50.0
SHAPE = RequestShape(prompt_tokens=100, max_tokens=200)


def add(table, i, *models):
    k = SigningKey((i + 1).to_bytes(32, "big"))
    assert table.add(seal(SignedKind.ADVERT, Advert(seq=1, issued_at=NOW, ttl=600.0, models=list(models)), k), now=NOW)
    return k.peer_id


def setup(sybils: int, *, failed: bool):
    table = OfferTable()
    health = ExecutorHealth(on_success=table.mark_used)
    honest = add(table, 0, ModelOffer(name="m", price_in=100_000, price_out=100_000))
    health.started(honest, "m", now=T - 5)
    health.first_token(honest, "m", ttft=0.2, now=T - 5)
    health.finished(honest, "m", output_tokens=200, seconds=2.0, now=T - 5)
    for i in range(1, sybils + 1):
        sybil = add(table, i, ModelOffer(name="m", price_in=90_000, price_out=90_000))
        if failed:  # refused at once, under the breaker's threshold
            health.started(sybil, "m", now=T - 1)
            health.failed(sybil, "m", now=T - 1)
    ranked = OfferRouter(table).rank(Route.parse("m"), SHAPE, health, now=T, rng=random.Random(1), wall=NOW)
    return honest, health, ranked


def test_executors_that_failed_last_go_after_the_rest():
    honest, health, ranked = setup(3, failed=True)
    assert ranked[0].offer.executor != honest  # the router ranks by cost alone
    assert trial_order(ranked, health, 3, now=T)[0].offer.executor == honest


def test_a_flood_of_unknown_identities_leaves_the_last_attempt_to_one_that_served():
    honest, health, ranked = setup(5, failed=False)
    first = [c.offer.executor for c in trial_order(ranked, health, 3, now=T)[:3]]
    assert first[2] == honest and honest not in [c.offer.executor for c in ranked[:3]]


def test_the_router_order_stands_when_one_that_served_is_among_the_first():
    honest, health, ranked = setup(1, failed=False)
    assert [c.offer.executor for c in trial_order(ranked, health, 3, now=T)] == [c.offer.executor for c in ranked]
