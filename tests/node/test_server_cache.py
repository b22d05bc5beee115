"""The response cache inside the real ``InferenceServer`` (over in-memory streams, so
trio's autojump clock drives the TTL): a hit never reaches the backend nor takes a slot,
replays the answer as chunk frames, and its receipt says ``cached``, is priced per the
model's ``billing`` and passes the client's checks; misses, non-deterministic requests,
failed answers, the bounds and the client peer in the key."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from loomnet.client._receipts import receipt_problems
from loomnet.node._response_cache import CacheTerms
from loomnet.node.config import ModelTerms
from loomnet.protocol import (
    BackendError, ChatMessage, ErrorCode, SigningKey, ToolCall, ToolSpec, cost_of, digest, encode_payload,
)

from ..limits import fail_after
from .memory_stream import stream_pair
from .server_harness import (
    HELLO, ClientEnd, Finished, Harness, ReasoningDelta, ScriptedBackend, TextDelta, Usage, events, warm_tokens,
)

USAGE = Usage(input_tokens=11, output_tokens=4, source="backend")
PRICE_IN, PRICE_OUT = 1_500_000, 3_000_000  # micro-credits per million tokens
DETERMINISTIC = {"temperature": 0.0, "seed": 7}


@pytest.fixture
def autojump_clock():
    """Jumps only after 0.5 s of real idleness: the ledger and tiktoken work in worker
    threads, and a jump while one runs would fire every deadline meanwhile."""
    return trio.testing.MockClock(autojump_threshold=0.5)


def hello_backend() -> ScriptedBackend:
    return ScriptedBackend(events(TextDelta("Hello"), TextDelta(", world!"), Finished(finish_reason="stop", usage=USAGE)))


async def start(tmp_path, backend, *, ledger: str | None = ":memory:", **cache) -> Harness:
    warm_tokens()
    terms = ModelTerms(name="m1", price_in=1.5, price_out=3.0, cache=CacheTerms(**cache))
    return await Harness.start(tmp_path, [backend], ledger=ledger, models=[terms])


async def ask(harness: Harness, model: str = "m1", messages=HELLO, **fields):
    """``harness.ask``, also returning the signed request's payload (the bytes a receipt binds to)."""
    request = harness.request(model, messages, **fields)
    client_stream, executor_stream = stream_pair(harness.client_key.peer_id, harness.executor_key.peer_id)
    end = ClientEnd(client_stream, harness.client_key)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.server.handle, executor_stream)
        await end.send_request(request)
        answer = await end.read_answer()
    return answer, encode_payload(request)


def client_problems(harness: Harness, answer, request_payload: bytes) -> list:
    """What the client's own check (``receipt_problems``) finds in ``answer``'s receipt."""
    return receipt_problems(
        answer.receipt, client=harness.client_key.peer_id, request_payload=request_payload, text=answer.text,
        chunks=len(answer.chunks), reasoning=answer.reasoning, tool_calls=answer.tool_calls,
        price_in_limit=PRICE_IN, price_out_limit=PRICE_OUT,
    )  # fmt: skip


# ------------------------------------------------------------------ hits


@pytest.mark.parametrize(
    ("billing", "prices"),
    [
        ({}, (PRICE_IN, PRICE_OUT)),
        ({"billing": "discount", "discount": 0.25}, (1_125_000, 2_250_000)),
        ({"billing": "free"}, (0, 0)),
    ],
    ids=["normal", "discount", "free"],
)
@fail_after(30)
async def test_a_second_identical_deterministic_request_is_answered_from_the_cache(tmp_path, billing, prices):
    backend = hello_backend()
    harness = await start(tmp_path, backend, **billing)
    try:
        first, first_payload = await ask(harness, **DETERMINISTIC)
        second, payload = await ask(harness, **DETERMINISTIC)
    finally:
        await harness.aclose()
    assert backend.entered == 1  # the runtime was asked once
    assert first.text == second.text == "Hello, world!"
    assert not first.receipt.cached and (first.receipt.price_in, first.receipt.price_out) == (PRICE_IN, PRICE_OUT)
    receipt = second.receipt
    assert receipt.cached and (receipt.price_in, receipt.price_out) == prices
    assert (receipt.input_tokens, receipt.output_tokens, receipt.count_source) == (11, 4, "backend")
    assert receipt.cost == cost_of(11, 4, *prices) <= first.receipt.cost
    # the client's own check accepts it, bound to its own request (not the first one's)
    assert second.check(receipt) == [] and client_problems(harness, second, payload) == []
    assert client_problems(harness, first, first_payload) == []
    assert receipt.request_digest == digest(payload) != first.receipt.request_digest
    assert receipt.output_digest == first.receipt.output_digest
    stats = harness.server.caches.statistics()["m1"]
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert harness.server.statistics().served == 2


@fail_after(30)
async def test_reasoning_and_tool_calls_replay_and_bill_as_the_original(tmp_path):
    call = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')
    usage = Usage(input_tokens=40, output_tokens=30, source="backend", reasoning_tokens=12)
    backend = ScriptedBackend(events(
        ReasoningDelta("The user wants "), ReasoningDelta("the weather."), TextDelta("Let me look."),
        Finished(finish_reason="tool_calls", usage=usage, tool_calls=[call]),
    ))  # fmt: skip
    harness = await start(tmp_path, backend)
    tools = [ToolSpec(name="get_weather", parameters='{"type":"object"}')]
    try:
        first = await harness.ask("m1", tools=tools, **DETERMINISTIC)
        second = await harness.ask("m1", tools=tools, **DETERMINISTIC)
    finally:
        await harness.aclose()
    assert backend.entered == 1 and second.receipt.cached
    assert (second.text, second.reasoning, second.tool_calls) == (first.text, first.reasoning, first.tool_calls)
    assert second.receipt.finish_reason == "tool_calls"
    for part in ("output_tokens", "reasoning_tokens", "hidden_reasoning_tokens", "tool_call_tokens",
                 "reasoning_digest", "tool_calls_digest", "output_digest"):  # fmt: skip
        assert getattr(second.receipt, part) == getattr(first.receipt, part), part
    assert second.check(second.receipt) == []


@fail_after(30)
async def test_a_hit_takes_no_slot_while_the_backend_is_busy(tmp_path):
    """capacity = 1 and max-queue = 0: a new generation is refused while one runs, a hit is not."""
    release = trio.Event()

    async def script(params):
        if params.messages[0].content == "Busy.":
            await release.wait()
        yield TextDelta("Hello")
        yield Finished(finish_reason="stop", usage=USAGE)

    backend = ScriptedBackend(script)
    warm_tokens()
    terms = ModelTerms(name="m1", price_out=3.0, cache=CacheTerms())
    harness = await Harness.start(tmp_path, [backend], ledger=":memory:", models=[terms], capacity=1, max_queue=0)
    try:
        await harness.ask("m1", **DETERMINISTIC)
        async with trio.open_nursery() as nursery:
            busy = await harness.open(nursery, "m1", [ChatMessage("user", "Busy.")])
            await trio.testing.wait_all_tasks_blocked()
            refused = await harness.ask("m1", temperature=0.5)
            hit = await harness.ask("m1", **DETERMINISTIC)
            release.set()
            await busy.read_answer()
    finally:
        await harness.aclose()
    assert refused.error is not None and refused.error.code == ErrorCode.OVER_CAPACITY
    assert hit.error is None and hit.receipt.cached and hit.text == "Hello"


# ------------------------------------------------------------------ misses


@pytest.mark.parametrize("changed", [{"max_tokens": 50}, {"seed": 8}, {"top_p": 0.5}, {"stop": ["!"]}])
@fail_after(30)
async def test_a_changed_parameter_is_a_miss(tmp_path, changed):
    backend = hello_backend()
    harness = await start(tmp_path, backend)
    try:
        await harness.ask("m1", **DETERMINISTIC)
        other = await harness.ask("m1", **{**DETERMINISTIC, **changed})
        again = await harness.ask("m1", **{**DETERMINISTIC, **changed})
    finally:
        await harness.aclose()
    assert backend.entered == 2 and not other.receipt.cached and again.receipt.cached


@fail_after(30)
async def test_changed_messages_are_a_miss(tmp_path):
    backend = hello_backend()
    harness = await start(tmp_path, backend)
    try:
        await harness.ask("m1", **DETERMINISTIC)
        other = await harness.ask("m1", [ChatMessage("user", "Say hello!")], **DETERMINISTIC)
    finally:
        await harness.aclose()
    assert backend.entered == 2 and not other.receipt.cached


@pytest.mark.parametrize(
    "fields",
    [{"seed": 7}, {"temperature": 0.7, "seed": 7}, {"temperature": 0.0}, {}],
    ids=["temperature-unset", "temperature-0.7", "no-seed", "neither"],
)
@fail_after(30)
async def test_a_non_deterministic_request_is_never_cached(tmp_path, fields):
    backend = hello_backend()
    harness = await start(tmp_path, backend)
    try:
        answers = [await harness.ask("m1", **fields) for _ in range(3)]
    finally:
        await harness.aclose()
    assert backend.entered == 3 and not any(a.receipt.cached for a in answers)
    assert harness.server.caches.statistics() == {}  # not even looked up


@fail_after(30)
async def test_a_model_without_a_cache_table_is_never_cached(tmp_path):
    backend = hello_backend()
    warm_tokens()
    harness = await Harness.start(tmp_path, [backend], ledger=":memory:", models=[ModelTerms(name="m1", price_out=3.0)])
    try:
        answers = [await harness.ask("m1", **DETERMINISTIC) for _ in range(2)]
    finally:
        await harness.aclose()
    assert backend.entered == 2 and not any(a.receipt.cached for a in answers)


@fail_after(30)
async def test_a_failed_answer_is_never_stored(tmp_path):
    runs = 0

    async def script(params):
        nonlocal runs
        runs += 1
        yield TextDelta("Hello")
        if runs == 1:
            raise BackendError("the runtime died", code=ErrorCode.BACKEND_UNAVAILABLE, retryable=True)
        yield TextDelta(", world!")
        yield Finished(finish_reason="stop", usage=USAGE)

    harness = await start(tmp_path, ScriptedBackend(script))
    try:
        failed = await harness.ask("m1", **DETERMINISTIC)
        whole = await harness.ask("m1", **DETERMINISTIC)
        hit = await harness.ask("m1", **DETERMINISTIC)
    finally:
        await harness.aclose()
    assert failed.error is not None and failed.error_receipt is not None and not failed.error_receipt.cached
    assert runs == 2 and not whole.receipt.cached and whole.text == "Hello, world!"
    assert hit.receipt.cached and hit.text == "Hello, world!"


@fail_after(120)
async def test_an_answer_is_served_from_the_cache_only_within_its_ttl(tmp_path, autojump_clock):
    backend = hello_backend()
    harness = await start(tmp_path, backend, ttl=30.0)
    try:
        await harness.ask("m1", **DETERMINISTIC)
        await trio.sleep(29)
        within = await harness.ask("m1", **DETERMINISTIC)
        await trio.sleep(2)  # past the first answer's 30 s
        after = await harness.ask("m1", **DETERMINISTIC)
    finally:
        await harness.aclose()
    assert within.receipt.cached and not after.receipt.cached and backend.entered == 2
    assert harness.server.caches.statistics()["m1"].expired == 1


@fail_after(30)
async def test_the_entry_bound_evicts_the_least_recently_used_answer(tmp_path):
    backend = hello_backend()
    harness = await start(tmp_path, backend, max_entries=1)
    try:
        await harness.ask("m1", **DETERMINISTIC)
        await harness.ask("m1", temperature=0.0, seed=8)  # pushes the first out
        first_again = await harness.ask("m1", **DETERMINISTIC)
    finally:
        await harness.aclose()
    assert backend.entered == 3 and not first_again.receipt.cached
    assert harness.server.caches.statistics()["m1"].evictions == 2


@fail_after(30)
async def test_an_answer_over_max_bytes_is_never_stored(tmp_path):
    backend = hello_backend()
    harness = await start(tmp_path, backend, max_bytes=64)  # the answer and its key take more
    try:
        answers = [await harness.ask("m1", **DETERMINISTIC) for _ in range(2)]
    finally:
        await harness.aclose()
    assert backend.entered == 2 and not any(a.receipt.cached for a in answers)
    assert harness.server.caches.statistics()["m1"].entries == 0


# ------------------------------------------------------------------ whose answer


@pytest.mark.parametrize("shared", [False, True])
@fail_after(30)
async def test_an_answer_goes_to_another_client_only_when_the_cache_is_shared(tmp_path, shared):
    backend = hello_backend()
    harness = await start(tmp_path, backend, shared=shared)
    try:
        await harness.ask("m1", **DETERMINISTIC)
        harness.client_key = SigningKey(os.urandom(32))  # another client peer
        other = await harness.ask("m1", **DETERMINISTIC)
    finally:
        await harness.aclose()
    assert other.receipt.client == harness.client_key.peer_id
    assert other.receipt.cached is shared and backend.entered == (1 if shared else 2)
