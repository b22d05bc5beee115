"""The client's own queue to an executor: at most ``max-streams-per-executor`` requests
open to it at once; the rest wait, in order, and give up with ``ExecutorBusy`` (which
fails over and is never charged to the executor). Real client, real server, memory
streams, trio's clock."""

from __future__ import annotations

import pytest
import trio

from loomnet.client._attempt import blames_executor, fails_over
from loomnet.client._session_pool import ExecutorBusy
from loomnet.protocol import INFER_SESSION_PROTOCOL, ErrorCode

from loomnet.client import Ledger

from ..node.server_harness import ScriptedBackend, warm_tokens
from .test_sessions import answer_of, run_client


@pytest.fixture(autouse=True)
def _tokens():
    warm_tokens()


@pytest.fixture
def autojump_clock():
    """Jumps after 0.5 s of real quiet (ledger writes run in worker threads)."""
    return trio.testing.MockClock(autojump_threshold=0.5)


@pytest.fixture
async def book():
    ledger = await Ledger.open(":memory:")
    yield ledger
    await ledger.aclose()


class Counting(ScriptedBackend):
    """Counts generations running at once, and the most there ever were."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.running = self.most = 0

    def stream_chat(self, params):
        outer = super().stream_chat(params)
        backend = self

        class Counted:
            async def __aenter__(self):
                backend.running += 1
                backend.most = max(backend.most, backend.running)
                return await outer.__aenter__()

            async def __aexit__(self, *exc):
                backend.running -= 1
                return await outer.__aexit__(*exc)

        return Counted()


async def test_a_burst_past_the_bound_waits_its_turn_instead_of_being_refused(tmp_path, book, autojump_clock):
    backend = Counting(answer_of("a", "b", pause=1.0))
    answers: list[str] = []

    async def body(client):
        async def one():
            answers.append(await client.chat())

        async with trio.open_nursery() as nursery:
            for _ in range(7):
                nursery.start_soon(one)
            await trio.sleep(0.5)
            stats = client.pool.statistics()
            assert (stats.active, stats.waiting) == (2, 5)
        stats = client.pool.statistics()
        assert (stats.active, stats.waiting, stats.waited, stats.busy) == (0, 0, 5, 0)
        assert client.opener.opened == {INFER_SESSION_PROTOCOL: 2}  # the waiters reused the two sessions
        assert client.pool._slots == {}  # nothing kept for an executor with no request open

    # the executor would refuse a third stream of this peer (max-streams-per-peer 2)
    await run_client(tmp_path, book, body, backend=backend, capacity=8, max_streams_per_peer=2,
                     pool={"max_active_per_peer": 2})  # fmt: skip
    assert answers == ["ab"] * 7 and backend.most == 2


async def test_a_request_that_waits_too_long_is_executor_busy_which_fails_over_without_blame(
    tmp_path, book, autojump_clock
):
    backend = Counting(answer_of("a", pause=100.0))

    async def body(client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.chat)
            await trio.sleep(1)
            with pytest.raises(ExecutorBusy) as info:
                await client.chat()  # its first-byte deadline (60 s) passes while it waits
            nursery.cancel_scope.cancel()
        assert client.pool.statistics().busy == 1
        error = info.value
        assert error.code == ErrorCode.PEER_LIMIT and error.retryable
        assert fails_over(error) and not blames_executor(error)
        assert "max-streams-per-executor" in error.message

    await run_client(tmp_path, book, body, backend=backend, capacity=8, pool={"max_active_per_peer": 1})
