"""The attempt loop against scripted executors over memory streams: what fails over before
the first content, what never does, and what the caller learns. Deadlines run on trio's
autojump clock; tests that settle a receipt (the ledger works in threads) use the real
clock, with executors that answer at once.
"""

import pytest
import trio

from loomnet.client import Attempt, Done, TextDelta
from loomnet.client._attempt import fails_over, open_first
from loomnet.client._chat_stream import RequestOptions
from loomnet.client._route import RequestShape, Route
from loomnet.protocol import (
    ErrorCode,
    LoomError,
    NetworkError,
    NetworkTimeout,
    RemoteError,
    SigningKey,
    StreamTruncated,
)

from ..limits import fail_after
from .fake_executor import HELLO, UNREACHABLE, FakeNetwork, ListRouter, RecordingHealth, make_client

A, B, C, D = (SigningKey(bytes([n]) * 32) for n in (1, 2, 3, 4))
SHAPE = RequestShape(prompt_tokens=20, max_tokens=100)


@pytest.fixture
async def client(tmp_path):
    client = await make_client(tmp_path)
    try:
        yield client
    finally:
        await client.ledger.aclose()


def answers(text: str, *, finish: bool = False):
    """A behaviour: read the request, send ``text``; then finish, or wait to be reset."""

    async def behaviour(ex):
        await ex.read_request()
        await ex.chunk(text=text)
        if finish:
            await ex.finish()
            await ex.read_rest()
        else:
            await trio.sleep_forever()

    return behaviour


async def silent(ex):
    """Accept the stream, read the request, then say nothing at all."""
    await ex.read_request()
    await trio.sleep_forever()


def refuses(code: ErrorCode, *, retryable: bool, progress: int = 0):
    async def behaviour(ex):
        await ex.read_request()
        for _ in range(progress):
            await ex.chunk()  # alive, thinking: no content yet
        await ex.fail(code, f"refused: {code.name}", retryable=retryable)
        await trio.sleep_forever()

    return behaviour


async def first(client, net, offers, health, *, max_attempts: int = 3, **options):
    """``open_first`` over ``offers`` ranked as listed; returns the stream (caller closes)."""
    candidates = ListRouter(offers).rank(Route(), SHAPE, health, now=trio.current_time(), rng=None)
    return await open_first(
        client.stream_kit(opener=net), candidates, list(HELLO), RequestOptions(**options),
        shape=SHAPE, health=health, max_attempts=max_attempts,
    )  # fmt: skip


async def first_delta(stream):
    events = stream.events()
    try:
        return await events.__anext__()
    finally:
        await events.aclose()


# ------------------------------------------------------------ what fails over


@fail_after(100_000)
async def test_a_killed_and_a_silent_executor_are_both_passed_over_before_the_first_chunk(client, autojump_clock):
    health = RecordingHealth()
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(A, UNREACHABLE), net.add(B, silent), net.add(C, answers("Hello from C."))]
        began = trio.current_time()
        stream = await first(client, net, offers, health)
        try:
            waited = trio.current_time() - began
            assert stream.executor == C.peer_id
            assert await first_delta(stream) == TextDelta("Hello from C.")
        finally:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert 60 <= waited < 61  # the silent one had exactly its first-byte deadline
    assert [(a.executor, a.outcome) for a in stream.attempts] == [
        (A.peer_id, "CONNECT_FAILED"), (B.peer_id, "NETWORK_TIMEOUT"),
    ]  # fmt: skip
    assert "first-byte deadline (60 s)" in stream.attempts[1].detail
    [silent_session] = net.sessions[B.peer_id]
    assert silent_session.client_end.reset_called  # told to stop
    assert health.verbs(A.peer_id) == ["started", "failed"]
    assert health.verbs(B.peer_id) == ["started", "failed"]
    assert health.verbs(C.peer_id) == ["started", "first_token", "cancelled"]  # the caller left: nobody's fault
    assert health.in_flight == {A.peer_id: 0, B.peer_id: 0, C.peer_id: 0}
    assert [r.audience for r in net.requests(C.peer_id)] == [C.peer_id]  # signed for C, not replayed from B


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (ErrorCode.OVER_CAPACITY, True),
        (ErrorCode.BACKEND_UNAVAILABLE, True),
        (ErrorCode.PEER_LIMIT, True),
        (ErrorCode.BACKEND_TIMEOUT, True),
        # not flagged retryable, but about that executor: a stale advert, its clock
        (ErrorCode.UNKNOWN_MODEL, False),
        (ErrorCode.REQUEST_EXPIRED, False),
        (ErrorCode.INTERNAL, True),
    ],
)
@fail_after(100_000)
async def test_a_refusal_about_the_executor_fails_over(client, autojump_clock, code, retryable):
    health = RecordingHealth()
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(A, refuses(code, retryable=retryable)), net.add(B, answers("Hi."))]
        stream = await first(client, net, offers, health)
        try:
            assert stream.executor == B.peer_id and await first_delta(stream) == TextDelta("Hi.")
        finally:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert stream.attempts == [Attempt(executor=A.peer_id, model="tiny", outcome=code.name,
                                       detail=stream.attempts[0].detail)]  # fmt: skip
    assert health.verbs(A.peer_id) == ["started", "first_token", "failed"]


@fail_after(100_000)
async def test_progress_chunks_then_a_refusal_still_fail_over_and_no_text_is_mixed(client, autojump_clock):
    health = RecordingHealth()
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [
            net.add(A, refuses(ErrorCode.BACKEND_UNAVAILABLE, retryable=True, progress=3)),
            net.add(B, answers("Only B speaks.")),
        ]
        stream = await first(client, net, offers, health)
        try:
            assert stream.executor == B.peer_id
            assert await first_delta(stream) == TextDelta("Only B speaks.")
        finally:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert [a.outcome for a in stream.attempts] == ["BACKEND_UNAVAILABLE"]


# ------------------------------------------------------------ what never does


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (ErrorCode.BAD_REQUEST, False),
        (ErrorCode.CONTENT_FILTERED, False),
        (ErrorCode.PRICE_CAP_EXCEEDED, False),
        # about the request, whatever the flag says
        (ErrorCode.CONTENT_FILTERED, True),
    ],
)
@fail_after(100_000)
async def test_a_refusal_about_the_request_is_not_failed_over(client, autojump_clock, code, retryable):
    health = RecordingHealth()
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(A, refuses(code, retryable=retryable)), net.add(B, answers("never"))]
        with pytest.raises(RemoteError) as info:
            await first(client, net, offers, health)
        nursery.cancel_scope.cancel()
    assert info.value.code == code
    assert [a.outcome for a in info.value.attempts] == [code.name]
    assert net.dials[B.peer_id] == 0
    assert health.verbs(A.peer_id) == ["started", "first_token", "cancelled"]  # not the executor's fault, nor a success


@fail_after(30)
async def test_a_failure_after_the_first_chunk_ends_the_stream_with_the_partial_receipt(client):
    health = RecordingHealth()

    async def breaks_midway(ex):
        await ex.read_request()
        await ex.chunk(text="one ")
        await ex.chunk(text="two ")
        await ex.fail(ErrorCode.BACKEND_ERROR, "the model's runtime failed", with_receipt=True)
        await ex.read_rest()

    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(A, breaks_midway), net.add(B, answers("never"))]
        stream = await first(client, net, offers, health)
        seen = []
        try:
            with pytest.raises(RemoteError) as info:
                async for text in stream:
                    seen.append(text)
        finally:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert seen == ["one ", "two "] and net.dials[B.peer_id] == 0
    error = info.value
    assert error.code == ErrorCode.BACKEND_ERROR
    assert error.result.text == "one two " and error.result.executor == A.peer_id
    [entry] = await client.ledger.entries()
    assert entry.status == "accepted" and entry.executor == A.peer_id
    assert health.verbs(A.peer_id) == ["started", "first_token", "failed"]


@fail_after(30)
async def test_a_stream_that_breaks_after_the_first_chunk_is_not_failed_over(client):
    health = RecordingHealth()

    async def dies_midway(ex):
        await ex.read_request()
        await ex.chunk(text="Half an ")
        await ex._server_end.aclose()  # noqa: SLF001 - the stream ends with no terminal frame

    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(A, dies_midway), net.add(B, answers("never"))]
        stream = await first(client, net, offers, health)
        seen = []
        try:
            with pytest.raises(StreamTruncated):
                async for text in stream:
                    seen.append(text)
        finally:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert seen == ["Half an "] and net.dials[B.peer_id] == 0
    assert health.verbs(A.peer_id)[-1] == "failed"


@fail_after(30)
async def test_an_empty_answer_is_served_not_retried(client):
    health = RecordingHealth()

    async def says_nothing_but_a_receipt(ex):
        await ex.read_request()
        await ex.finish(output_tokens=0)
        await ex.read_rest()

    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(C, UNREACHABLE), net.add(A, says_nothing_but_a_receipt), net.add(B, answers("never"))]
        stream = await first(client, net, offers, health)
        try:
            events = [e async for e in stream.events()]
        finally:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert [type(e) for e in events] == [Done] and stream.result.text == ""
    assert [a.outcome for a in stream.result.attempts] == ["CONNECT_FAILED"]  # settled in start(), still told
    assert net.dials[B.peer_id] == 0
    assert health.verbs(A.peer_id) == ["started", "first_token", "finished"]


# ------------------------------------------------------------ limits and the final error


@fail_after(100_000)
async def test_when_every_candidate_fails_the_error_names_each_attempt(client, autojump_clock):
    health = RecordingHealth()
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(A, UNREACHABLE), net.add(B, refuses(ErrorCode.OVER_CAPACITY, retryable=True))]
        with pytest.raises(RemoteError) as info:
            await first(client, net, offers, health)
        nursery.cancel_scope.cancel()
    error = info.value
    assert error.code == ErrorCode.OVER_CAPACITY and error.retryable  # the last attempt's class and code
    assert "2 executor(s) tried, none answered" in error.message
    assert f"{A.peer_id[-8:]}: CONNECT_FAILED (open /loomnet/infer/1 to" in error.message
    assert f"{B.peer_id[-8:]}: OVER_CAPACITY (executor {B.peer_id[-8:]} failed: refused: OVER_CAPACITY)" in error.message
    assert [a.outcome for a in error.attempts] == ["CONNECT_FAILED", "OVER_CAPACITY"]
    assert isinstance(error.__cause__, RemoteError)


@pytest.fixture
async def short_total(tmp_path):
    """A client whose total deadline is 100 s. (Its ledger opens and closes here, outside
    the test's clock limit: an autojump clock reads a worker thread as everyone asleep.)"""
    client = await make_client(tmp_path, total_timeout=100.0)
    try:
        yield client
    finally:
        await client.ledger.aclose()


@fail_after(100_000)
async def test_one_total_deadline_spans_every_attempt(short_total, autojump_clock):
    health = RecordingHealth()
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(A, silent), net.add(B, silent), net.add(C, answers("too late"))]
        began = trio.current_time()
        with pytest.raises(NetworkTimeout) as info:
            await first(short_total, net, offers, health)
        elapsed = trio.current_time() - began
        nursery.cancel_scope.cancel()
    assert 100 <= elapsed < 101  # B got the 40 s that were left, not its own 60
    assert [a.outcome for a in info.value.attempts] == ["NETWORK_TIMEOUT", "NETWORK_TIMEOUT"]
    assert "total deadline (100 s)" in info.value.attempts[1].detail
    assert net.dials[C.peer_id] == 0  # no time left for it


@fail_after(100_000)
async def test_at_most_max_attempts_executors_are_asked(client, autojump_clock):
    health = RecordingHealth()
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(k, UNREACHABLE) for k in (A, B, C, D)]
        with pytest.raises(NetworkError) as info:
            await first(client, net, offers, health, max_attempts=2)
        nursery.cancel_scope.cancel()
    assert info.value.code == ErrorCode.CONNECT_FAILED
    assert [net.dials[k.peer_id] for k in (A, B, C, D)] == [1, 1, 0, 0]


@fail_after(100_000)
async def test_the_circuit_breaker_keeps_a_failing_executor_out_of_later_requests(client, autojump_clock):
    health = RecordingHealth(failures_to_bench=2, bench_seconds=30.0)
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(A, UNREACHABLE), net.add(B, answers("B."))]
        for _ in range(3):  # A fails twice, then is benched: the third request goes straight to B
            stream = await first(client, net, offers, health)
            await stream.aclose()
        assert net.dials[A.peer_id] == 2 and net.dials[B.peer_id] == 3
        await trio.sleep(31)  # the bench is over: A is probed again
        stream = await first(client, net, offers, health)
        await stream.aclose()
        assert net.dials[A.peer_id] == 3
        nursery.cancel_scope.cancel()


@fail_after(100_000)
async def test_a_benched_executor_is_skipped_even_when_ranked(client, autojump_clock):
    health = RecordingHealth(benched={A.peer_id})
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(A, answers("A.")), net.add(B, answers("B."))]
        candidates = ListRouter(offers).rank(Route(), SHAPE, RecordingHealth(), now=0.0, rng=None)  # A first
        stream = await open_first(
            client.stream_kit(opener=net), candidates, list(HELLO), RequestOptions(), shape=SHAPE, health=health
        )
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert stream.executor == B.peer_id and net.dials[A.peer_id] == 0


def test_the_failover_policy_in_one_table():
    def remote(code, retryable):
        return RemoteError("x", code=code, retryable=retryable)

    assert fails_over(NetworkError("dial", code=ErrorCode.CONNECT_FAILED))
    assert fails_over(NetworkTimeout("slow"))
    assert fails_over(StreamTruncated("gone"))
    assert fails_over(remote(ErrorCode.OVER_CAPACITY, True))
    assert fails_over(remote(ErrorCode.UNSUPPORTED_FEATURE, False))
    assert not fails_over(remote(ErrorCode.BAD_REQUEST, True))
    assert not fails_over(remote(ErrorCode.BACKEND_ERROR, False))  # the executor says: do not retry
    assert not fails_over(LoomError("a bug here", code=ErrorCode.INTERNAL))
