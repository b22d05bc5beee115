"""An executor process stopped by the operator with answers in flight that will not end
by themselves: SIGTERM with the default ``drain-timeout`` (5 s).

The fake runtime holds three answers mid-stream (a piece of text sent, the rest never),
so nothing finishes within the drain: the executor stops taking requests at once, ends
each answer at a frame boundary with ``SHUTTING_DOWN`` and a receipt for the text the
client got (never a bare truncation), and the process exits 0 within the drain's bound.
Then it restarts on the same address and identity and the same client's next request
is answered (the redial after a ``kill -9`` is in ``test_kill9.py``).
"""

from __future__ import annotations

import pytest
import trio
from loomnet.client import ClientConfig, Ledger, LoomClient
from loomnet.protocol import ChatMessage, ErrorCode, RemoteError, digest

from .executor_process import ExecutorProcess, free_port, serve_paced

pytestmark = pytest.mark.integration

HI = [ChatMessage("user", "Count to eight.")]
PIECES = ["one ", "two ", "three ", "four ", "five ", "six ", "seven ", "eight"]
IN_FLIGHT = 3
#: the default drain (5 s), the cut answers' receipts (2 s), closing (3 s), and room
#: for a loaded 2-core machine: the process must be gone well before a stuck one would be
EXIT_WITHIN = 20.0


async def test_sigterm_cuts_what_the_drain_cannot_finish_with_receipts_and_exits_0(
    nursery, tmp_path
):
    paced, url = await serve_paced(nursery, pieces=PIECES, usage=None)
    paced.hold_every = 1
    executor = ExecutorProcess(
        tmp_path / "executor", url, port=free_port()
    )  # drain-timeout: the default
    try:
        addr = await executor.start()
        client = LoomClient(
            ClientConfig(
                data_dir=str(tmp_path / "client"),
                bootstrap=[addr],
                discover_local=False,
                offer_timeout=20.0,
            )
        )
        await nursery.start(client.run)
        errors: list[BaseException] = []
        with_text: set[int] = set()

        async def ask(index: int) -> None:
            try:
                async with client.stream_chat(HI, model="m1") as stream:
                    async for _ in stream:
                        with_text.add(index)
            except Exception as exc:  # noqa: BLE001 - checked below
                errors.append(exc)

        paced.holding = True
        async with trio.open_nursery() as asking:
            for index in range(IN_FLIGHT):
                asking.start_soon(ask, index)
            with trio.fail_after(60):
                while paced.held < IN_FLIGHT or len(with_text) < IN_FLIGHT:
                    await trio.sleep(0.01)
            signalled = trio.current_time()
            code = await executor.terminate(timeout=EXIT_WITHIN)
            took = trio.current_time() - signalled
        assert code == 0, executor.output.decode()[-3000:]
        assert 4.0 < took < EXIT_WITHIN, (
            took
        )  # it waited for the drain (5 s), then stopped
        assert b"SIGTERM: shutting down; requests in flight get 5 s" in executor.output
        assert len(errors) == IN_FLIGHT
        for error in errors:
            assert (
                isinstance(error, RemoteError) and error.code == ErrorCode.SHUTTING_DOWN
            ), repr(error)
            assert (
                not error.retryable
            )  # text was sent: the answer cannot go on elsewhere
            assert error.result is not None and error.result.receipt.output_tokens > 0
        ours = await client.ledger.entries(status="accepted")
        assert len(ours) == IN_FLIGHT

        paced.holding = False
        assert await executor.start() == addr
        with trio.fail_after(30):
            again = await client.chat(HI, model="m1")
        assert again.text == "".join(PIECES)
        assert await executor.terminate() == 0
    finally:
        await executor.ensure_stopped()
    ledger = await Ledger.open(executor.ledger_path)
    try:
        theirs = {e.receipt_digest for e in await ledger.entries(limit=1000)}
    finally:
        await ledger.aclose()
    assert {e.receipt_digest for e in ours} | {
        digest(again.receipt_envelope.payload)
    } <= theirs
