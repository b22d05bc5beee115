"""Failover with several real executors on loopback (libp2p hosts, the real server, in-process
scripted backends): a killed executor and one that accepts a stream and then says nothing
are both passed over before the first chunk; a failure after the first chunk is not; an
explicit model never falls back to another model.

The client uses its default router and health table, which rank these executors by the
request's expected cost: each test makes the executors it wants tried first the cheapest.
"""

from __future__ import annotations

import pytest
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.node import Executor, ExecutorConfig, ModelTerms
from loomnet.protocol import BackendError, ChatMessage, ErrorCode, NetworkError, RemoteError

from ..limits import fail_after
from ..node.server_harness import Finished, ScriptedBackend, TextDelta, Usage, events

pytestmark = pytest.mark.integration

HELLO = [ChatMessage("user", "Say hello.")]


class Running:
    """An executor running in its own cancel scope, so a test can kill it."""

    def __init__(self, executor: Executor, backend: ScriptedBackend) -> None:
        self.executor = executor
        self.backend = backend
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    @property
    def peer_id(self) -> str:
        return self.executor.peer_id

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                await self.executor.run(task_status=task_status)
        finally:
            self.stopped.set()

    async def kill(self) -> None:
        """Stop it: its host closes, so a dial is refused (its advert lives on elsewhere)."""
        self.scope.cancel()
        await self.stopped.wait()


def answer(text: str, output_tokens: int):
    """A backend script: ``text`` at once, then finish with the runtime's own counts."""
    return events(TextDelta(text), Finished(finish_reason="stop", usage=Usage(input_tokens=5, output_tokens=output_tokens, source="backend")))


async def silent_script(params):
    await trio.sleep_forever()
    yield  # pragma: no cover - an async generator that never yields


async def start_executor(
    nursery, tmp_path, name: str, script, *, model: str = "m1", price_in: float = 0.0, price_out: float = 1.0, **settings
) -> Running:
    """One executor serving ``model`` through a scripted backend, on 127.0.0.1."""
    backend = ScriptedBackend(script, model=model)
    config = ExecutorConfig(
        data_dir=str(tmp_path / name), listen=["/ip4/127.0.0.1/tcp/0"], announce_local=False,
        request_read_timeout=10.0, ack_timeout=10.0,
        models=[ModelTerms(name=model, price_in=price_in, price_out=price_out)], **settings,
    )  # fmt: skip
    running = Running(Executor(config, backends=[backend]), backend)
    await nursery.start(running.run)
    return running


async def start_client(
    nursery, tmp_path, executors: list[Running], *, offers: int | None = None, on_budget_warning=None, **config
) -> LoomClient:
    """A client joined through every executor, once it holds ``offers`` live offers
    (default: one per executor)."""
    settings = dict(offer_timeout=10.0, first_byte_timeout=5.0, idle_timeout=30.0) | config
    client = LoomClient(ClientConfig(
        data_dir=str(tmp_path / "client"), discover_local=False,
        bootstrap=[r.executor.info.addrs[0] for r in executors], **settings,
    ), on_budget_warning=on_budget_warning)  # fmt: skip
    await nursery.start(client.run)
    wanted = len(executors) if offers is None else offers
    with trio.fail_after(20):
        while len(client.offers()) < wanted:
            await client.member.table_changed.wait()
    return client


@fail_after(120)
async def test_a_killed_and_a_silent_executor_are_passed_over_before_the_first_chunk(nursery, tmp_path):
    # cheapest first: the one to be killed, then the silent one, then the one that answers
    killed = await start_executor(nursery, tmp_path, "killed", answer("never", 1), price_out=1.0)
    silent = await start_executor(nursery, tmp_path, "silent", silent_script, price_out=2.0, progress_interval=3600.0)
    good = await start_executor(nursery, tmp_path, "good", answer("Hello from the good one.", 6), price_out=3.0)
    client = await start_client(nursery, tmp_path, [killed, silent, good])
    await killed.kill()

    result = await client.chat(HELLO, model="m1", max_tokens=16)

    assert result.executor == good.peer_id and result.text == "Hello from the good one."
    assert [(a.executor, a.outcome) for a in result.attempts] == [
        (killed.peer_id, "CONNECT_FAILED"), (silent.peer_id, "NETWORK_TIMEOUT"),
    ]  # fmt: skip
    assert "first-byte deadline (5 s)" in result.attempts[1].detail
    assert (silent.backend.entered, good.backend.entered) == (1, 1)  # the silent one really had the request
    [entry] = await client.ledger.entries()
    assert entry.executor == good.peer_id and entry.status == "accepted"


@fail_after(120)
async def test_a_failure_after_the_first_chunk_is_not_failed_over(nursery, tmp_path):
    async def breaks(params):
        yield TextDelta("Hello, ")
        raise BackendError("runtime crashed", code=ErrorCode.BACKEND_ERROR, retryable=True)

    first = await start_executor(nursery, tmp_path, "first", breaks, price_out=1.0)
    second = await start_executor(nursery, tmp_path, "second", answer("never", 1), price_out=2.0)
    client = await start_client(nursery, tmp_path, [first, second])

    seen = []
    with pytest.raises(RemoteError) as info:
        async with client.stream_chat(HELLO, model="m1", max_tokens=16) as stream:
            async for text in stream:
                seen.append(text)

    assert seen == ["Hello, "] and stream.executor == first.peer_id
    error = info.value
    assert error.code == ErrorCode.BACKEND_ERROR and error.retryable  # retryable, yet not retried: text went out
    assert error.result.text == "Hello, " and error.result.receipt.finish_reason == "error"
    assert second.backend.entered == 0
    [entry] = await client.ledger.entries()
    assert entry.executor == first.peer_id and entry.status == "accepted"


@fail_after(120)
async def test_an_explicit_model_never_falls_back_to_another_model(nursery, tmp_path):
    gone = await start_executor(nursery, tmp_path, "gone", answer("never", 1), model="wanted", price_out=1.0)
    other = await start_executor(nursery, tmp_path, "other", answer("Another model speaks.", 4), model="other", price_out=2.0)
    client = await start_client(nursery, tmp_path, [gone, other])
    await gone.kill()

    with pytest.raises(NetworkError) as info:
        await client.chat(HELLO, model="wanted", max_tokens=16)
    assert info.value.code == ErrorCode.CONNECT_FAILED
    assert [a.executor for a in info.value.attempts] == [gone.peer_id]
    assert other.backend.entered == 0

    # without an explicit model, any model will do: the same request fails over to it
    result = await client.chat(HELLO, max_tokens=16)
    assert result.executor == other.peer_id and result.model == "other"
    assert all(a.outcome == "CONNECT_FAILED" for a in result.attempts)  # unless already benched


@fail_after(90)
async def test_an_executor_sending_only_progress_chunks_is_failed_over_at_the_first_content_deadline(nursery, tmp_path):
    # Review of issue 8: progress chunks (sent while a backend is silent) kept the attempt
    # alive until the total deadline, so a cheap executor that never answered held every
    # request. They still keep a thinking model's stream alive, up to first-content-timeout.
    stalling = await start_executor(nursery, tmp_path, "stall", silent_script, price_out=1.0, progress_interval=0.5)
    good = await start_executor(nursery, tmp_path, "good", answer("from good", 2), price_out=2.0)
    client = await start_client(nursery, tmp_path, [stalling, good], first_byte_timeout=3.0,
                                first_content_timeout=4.0, total_timeout=60.0)  # fmt: skip
    with trio.fail_after(30):
        result = await client.chat(HELLO, model="m1", max_tokens=4)
    assert result.executor == good.peer_id and result.text == "from good"
    assert [(a.executor, a.outcome) for a in result.attempts][:1] == [(stalling.peer_id, "NETWORK_TIMEOUT")]
    assert "first-content deadline" in result.attempts[0].detail
