"""A model's backend pool (``node/_pool``) and each member's circuit breaker
(``node/_breaker``), on trio's autojump clock with in-memory runtimes: the strategies
distribute as specified, a failure before the first event moves on to the next member at
once, one after it never does, retries never multiply, breakers bench and re-admit."""

from __future__ import annotations

from collections import Counter
from contextlib import asynccontextmanager

import pytest
import trio

from loomnet.node._breaker import BreakerSettings, CircuitBreaker
from loomnet.node._catalog import Catalog
from loomnet.node._pool import BackendPool, PoolMember
from loomnet.node.backends._base import Backend, ChatParams, Finished, ModelInfo, TextDelta
from loomnet.node.backends._retry_budget import current_retry_budget
from loomnet.node.config import ExecutorConfig, ModelTerms, PoolBackend
from loomnet.protocol import BackendError, ChatMessage, ErrorCode

PARAMS = ChatParams(model="m", messages=[ChatMessage("user", "hi")])
BREAKER = BreakerSettings(failures=2, window=10.0, cooldown=5.0)


class Runtime(Backend):
    """An in-memory runtime: answers ``text``, or fails as told; counts what it saw."""

    def __init__(self, kind: str = "ollama", *, models=("m",), on_premise: bool = True) -> None:
        self.kind, self.models, self.on_premise = kind, list(models), on_premise
        self.fail_before: BackendError | None = None  # raised before the first event
        self.fail_after_first: BackendError | None = None  # raised after the first event
        self.hold: trio.Event | None = None  # the answer waits for it after the first event
        self.asked: list[str] = []  # the model names asked for
        self.budgets: list[tuple[int, bool] | None] = []  # the retry budget each request saw
        self.in_flight = 0

    @asynccontextmanager
    async def stream_chat(self, params):
        self.asked.append(params.model)
        budget = current_retry_budget()
        self.budgets.append(None if budget is None else (budget.left, budget.failover_left))
        if self.fail_before is not None:
            raise self.fail_before
        self.in_flight += 1
        try:
            yield self._events()
        finally:
            self.in_flight -= 1

    async def _events(self):
        yield TextDelta(f"from {self.kind}")
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_after_first is not None:
            raise self.fail_after_first
        yield Finished(finish_reason="stop")

    async def list_models(self):
        return [ModelInfo(name=m, context_length=4096, capabilities=["chat", "tools"]) for m in self.models]

    async def health(self):
        return True


def down(message: str = "runtime down") -> BackendError:
    return BackendError(message, code=ErrorCode.BACKEND_UNAVAILABLE, retryable=True)


def pool_of(*runtimes: Runtime, strategy="priority", weights=None, retries=2) -> BackendPool:
    members = [PoolMember(f"b{i}", r, f"model-{i}", weight=(weights or [1] * len(runtimes))[i], breaker=BREAKER)
               for i, r in enumerate(runtimes)]  # fmt: skip
    return BackendPool("m", members, strategy=strategy, retries=retries)


async def answer(pool: BackendPool) -> tuple[str, str]:
    """(the text, the member that served)."""
    served: list[PoolMember] = []
    async with pool.stream_chat(PARAMS, served) as events:
        texts = [e.text async for e in events if isinstance(e, TextDelta)]
    return "".join(texts), served[-1].name


# ---------------------------------------------------------------- strategies


async def test_priority_is_a_fallback_chain(autojump_clock):
    local, hosted = Runtime("ollama"), Runtime("openai", on_premise=False)
    pool = pool_of(local, hosted)
    assert [await answer(pool) for _ in range(3)] == [("from ollama", "b0")] * 3
    assert local.asked == ["model-0"] * 3  # each member is asked for its own name of the model
    local.fail_before = down()
    assert await answer(pool) == ("from openai", "b1")
    assert hosted.asked == ["model-1"]


async def test_round_robin_takes_turns(autojump_clock):
    pool = pool_of(Runtime("a"), Runtime("b"), Runtime("c"), strategy="round_robin")
    counts = Counter([(await answer(pool))[1] for _ in range(30)])
    assert counts == {"b0": 10, "b1": 10, "b2": 10}


async def test_weighted_follows_the_weights(autojump_clock):
    pool = pool_of(Runtime("a"), Runtime("b"), Runtime("c"), strategy="weighted", weights=[5, 3, 2])
    counts = Counter([(await answer(pool))[1] for _ in range(100)])
    for name, share in (("b0", 50), ("b1", 30), ("b2", 20)):
        assert abs(counts[name] - share) <= 2, counts  # smooth weighted round-robin: exact per 10


async def test_least_connections_under_concurrent_load(autojump_clock):
    runtimes = [Runtime("a"), Runtime("b"), Runtime("c")]
    release = trio.Event()
    for r in runtimes:
        r.hold = release
    pool = pool_of(*runtimes, strategy="least_connections")
    served: list[str] = []

    async def one() -> None:
        served.append((await answer(pool))[1])

    async with trio.open_nursery() as nursery:
        for _ in range(9):
            nursery.start_soon(one)
            await trio.sleep(0.01)  # each starts while the earlier ones hold their member
        assert [r.in_flight for r in runtimes] == [3, 3, 3]
        release.set()
    assert Counter(served) == {"b0": 3, "b1": 3, "b2": 3}
    # a member already busy is not chosen while another is idle
    runtimes[0].hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer, pool)
        await trio.sleep(0.01)
        assert (await answer(pool))[1] == "b1"
        runtimes[0].hold.set()


# ---------------------------------------------------------------- failover and retries


async def test_a_failure_before_the_first_event_moves_on_at_once(autojump_clock):
    first, second = Runtime("a"), Runtime("b")
    first.fail_before = down()
    pool = pool_of(first, second)
    began = trio.current_time()
    assert await answer(pool) == ("from b", "b1")
    assert trio.current_time() - began < 1.0  # no wait between members
    # the first member's adapter was told the next member is its retry; the last may retry
    assert first.budgets == [(2, True)] and second.budgets == [(1, False)]


async def test_a_failure_after_the_first_event_is_never_failed_over(autojump_clock):
    first, second = Runtime("a"), Runtime("b")
    first.fail_after_first = down("cut mid-stream")
    pool = pool_of(first, second)
    with pytest.raises(BackendError, match="cut mid-stream"):
        await answer(pool)
    assert second.asked == []
    assert pool.members[0].failed == 1 and pool.members[0].last_error == "BACKEND_UNAVAILABLE"


async def test_a_request_the_runtime_refuses_is_not_failed_over(autojump_clock):
    first, second = Runtime("a"), Runtime("b")
    first.fail_before = BackendError("bad prompt", code=ErrorCode.BAD_REQUEST, retryable=False)
    pool = pool_of(first, second)
    with pytest.raises(BackendError, match="bad prompt"):
        await answer(pool)
    assert second.asked == [] and pool.members[0].breaker.state == "closed"  # not the runtime's fault


async def test_the_retry_budget_bounds_failovers(autojump_clock):
    runtimes = [Runtime(k) for k in "abcd"]
    for r in runtimes[:3]:
        r.fail_before = down()
    pool = pool_of(*runtimes, retries=1)
    with pytest.raises(BackendError):
        await answer(pool)
    assert [len(r.asked) for r in runtimes] == [1, 1, 0, 0]  # one retry in all: two members asked


# ---------------------------------------------------------------- breakers


async def test_a_failing_member_is_benched_and_readmitted_after_it_recovers(autojump_clock):
    first, second = Runtime("a"), Runtime("b")
    pool = pool_of(first, second)
    first.fail_before = down()
    for _ in range(2):
        assert (await answer(pool))[1] == "b1"
    member = pool.members[0]
    assert member.breaker.state == "open" and not member.available
    first.fail_before = None  # it recovered, but is benched until the cool-down ends
    assert (await answer(pool))[1] == "b1" and len(first.asked) == 2
    await trio.sleep(5.0)
    assert member.breaker.state == "half_open"
    assert (await answer(pool))[1] == "b0"  # the probe succeeds: closed again
    assert member.breaker.state == "closed"


async def test_one_failure_can_open_a_breaker(autojump_clock):
    breaker = CircuitBreaker(BreakerSettings(failures=1, window=1.0, cooldown=2.0))
    breaker.failure()
    assert breaker.state == "open" and not breaker.allows()


async def test_breaker_transitions(autojump_clock):
    changes = []
    breaker = CircuitBreaker(BreakerSettings(failures=2, window=1.0, cooldown=2.0), on_change=changes.append)
    breaker.failure()
    await trio.sleep(1.5)
    breaker.failure()  # the first fell out of the window
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allows()
    await trio.sleep(2.0)
    assert breaker.allows()
    breaker.begin()
    assert not breaker.allows()  # one probe at a time
    breaker.failure()
    assert breaker.state == "open"
    await trio.sleep(2.0)
    breaker.begin()
    breaker.success()
    assert breaker.state == "closed" and changes == ["open", "half_open", "open", "half_open", "closed"]


# ---------------------------------------------------------------- the catalog's pools


async def test_the_catalog_pools_backends_as_configured(autojump_clock):
    local = Runtime("ollama", models=["llama3.1:8b", "qwen"])
    hosted = Runtime("openrouter", models=["meta/llama-3.1-8b"], on_premise=False)
    from loomnet.node.backends._config import BackendConfig

    config = ExecutorConfig(
        backends=[BackendConfig(provider="ollama", name="local"),
                  BackendConfig(provider="openrouter", name="hosted", api_key="k", models=["x"])],
        models=[ModelTerms(name="llama", price_out=1.0, backends=[
            PoolBackend(backend="local", model="llama3.1:8b"), PoolBackend(backend="hosted", model="meta/llama-3.1-8b")])],
    )  # fmt: skip
    local.label, hosted.label = "local", "hosted"
    catalog = await Catalog.build([local, hosted], config)
    entry = catalog.lookup("llama")
    assert [m.name for m in entry.pool.members] == ["local", "hosted"]
    assert [m.backend_model for m in entry.pool.members] == ["llama3.1:8b", "meta/llama-3.1-8b"]
    assert not entry.offer.on_premise and entry.offer.price_out == 1_000_000  # a hosted member: not on premise
    # the pool's members are offered under the pool's name only; the runtime's other models as before
    assert sorted(o.name for o in catalog.offers) == ["llama", "qwen"]
    local.fail_before = down()
    assert await answer(entry.pool) == ("from openrouter", "hosted")
    assert hosted.asked == ["meta/llama-3.1-8b"]


async def test_two_backends_listing_a_model_make_one_chain_in_config_order(autojump_clock):
    a, b = Runtime("ollama"), Runtime("ollama")
    catalog = await Catalog.build([a, b], ExecutorConfig())
    (entry,) = catalog.entries
    assert catalog.names == ["ollama", "ollama-2"] and [m.name for m in entry.pool.members] == catalog.names
    a.fail_before = down()
    assert await answer(entry.pool) == ("from ollama", "ollama-2")


async def test_a_model_with_no_available_member_leaves_the_offers(autojump_clock):
    a = Runtime("ollama")
    catalog = await Catalog.build([a], ExecutorConfig(breaker_failures=1, breaker_cooldown=5.0))
    changes = []
    catalog.on_change = lambda: changes.append(1)
    a.fail_before = down()
    with pytest.raises(BackendError):
        await answer(catalog.entries[0].pool)
    assert catalog.offers == [] and changes  # withdrawn, and the advert is told
    await trio.sleep(5.0)
    assert [o.name for o in catalog.offers] == ["m"]  # half-open: offered again for a probe


async def test_an_on_premise_only_executor_never_chains_a_hosted_backend(autojump_clock):
    local, hosted = Runtime("ollama"), Runtime("openai", on_premise=False)
    catalog = await Catalog.build([local, hosted], ExecutorConfig(on_premise_only=True))
    (entry,) = catalog.entries
    assert [m.backend for m in entry.pool.members] == [local] and entry.offer.on_premise


async def test_a_busy_backend_spills_over_to_the_next_of_its_chain(autojump_clock):
    local, hosted = Runtime("ollama"), Runtime("openai", on_premise=False)
    release = trio.Event()
    local.hold = hosted.hold = release
    pool = pool_of(local, hosted)
    pool.members[0].load.capacity = 1  # the local runtime answers one request at a time
    served: list[str] = []

    async def one() -> None:
        served.append((await answer(pool))[1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        await trio.sleep(0.01)
        nursery.start_soon(one)  # local is busy: this one goes to the hosted backend
        await trio.sleep(0.01)
        assert (local.in_flight, hosted.in_flight) == (1, 1)
        release.set()
    assert sorted(served) == ["b0", "b1"]
    assert [m.name for m in pool.candidates()] == ["b0", "b1"]  # free again: local first


async def test_the_advertised_capacity_is_what_the_available_backends_can_run(autojump_clock):
    from loomnet.node.backends._config import BackendConfig

    a, b = Runtime("ollama"), Runtime("vllm")
    a.config = BackendConfig(provider="ollama", capacity=2)
    b.config = BackendConfig(provider="vllm", capacity=3)
    catalog = await Catalog.build([a, b], ExecutorConfig(capacity=8, breaker_failures=1))
    assert catalog.capacity(8) == 5  # 2 + 3, under the executor's 8
    assert catalog.capacity(4) == 4  # never over the executor's own
    catalog.entries[0].pool.members[0].breaker.failure()  # a benched: only b's 3 count
    assert catalog.capacity(8) == 3
    b.config = BackendConfig(provider="vllm")  # a backend without a capacity: the executor's
    catalog = await Catalog.build([a, b], ExecutorConfig(capacity=8))
    assert catalog.capacity(8) == 8


async def test_successes_between_failures_do_not_keep_a_failing_backend_in(autojump_clock):
    """3 failures within the window open the breaker, whatever succeeded between them."""
    breaker = CircuitBreaker(BreakerSettings(failures=3, window=30.0, cooldown=5.0))
    for _ in range(3):
        breaker.success()
        breaker.failure()
        breaker.success()
        await trio.sleep(1.0)
    assert breaker.state == "open"


async def test_a_half_open_probe_is_not_retried_by_its_adapter(autojump_clock):
    first, second = Runtime("a"), Runtime("b")
    pool = pool_of(first, second)
    for _ in range(2):
        pool.members[0].breaker.failure()
    assert pool.members[0].breaker.state == "open"
    await trio.sleep(5.0)  # half-open: the next request probes it
    second.fail_before = down()
    first.fail_before = down()
    with pytest.raises(BackendError):
        await answer(pool)
    assert first.budgets[-1][1] is True  # the probe's adapter was told not to retry


async def test_an_unknown_context_length_does_not_hide_the_known_ones(autojump_clock):
    class NoWindow(Runtime):
        async def list_models(self):
            return [ModelInfo(name=m, context_length=0, capabilities=["chat"]) for m in self.models]

    catalog = await Catalog.build([Runtime("ollama"), NoWindow("vllm")], ExecutorConfig())
    assert catalog.entries[0].offer.context_length == 4096


async def test_a_model_name_with_control_characters_is_never_offered(autojump_clock):
    catalog = await Catalog.build([Runtime("ollama", models=["good", "evil\x1b]0;owned\x07", "two\nlines"])],
                                  ExecutorConfig())  # fmt: skip
    assert [o.name for o in catalog.offers] == ["good"]
