"""``kill -9`` of an executor in the middle of many streamed answers, then a restart on the
same data folder, identity and address: no receipt is lost and neither ledger is corrupt.

A real ``loomnet executor`` process (``executor_process``) serves the faithful fake vLLM
over loopback HTTP; a real client in the test process keeps six streamed requests going
at once. Once the client has accepted ``ACCEPTED_BEFORE_KILL`` receipts, every second new
answer is held mid-stream by the fake (its first piece of text sent, the rest never), and
once two answers are held and the client has text of at least two unfinished answers,
the executor gets SIGKILL: answers are cut mid-stream for sure, and others are being
finished, booked and sent around the kill as the scheduling falls. No timing is assumed.

What must hold (the executor writes a receipt to its ledger, ``synchronous=FULL``,
*before* it sends it; the client books a receipt, with its counter-signature, before it
sends the ack and before the caller gets the answer):

* both SQLite files pass ``PRAGMA integrity_check`` after the restart;
* every answer the application got is in the client's ledger, accepted;
* every receipt in the client's ledger is in the executor's, byte for byte ("write
  before send": the executor's ledger holds every receipt that was sent);
* every receipt the executor holds as acknowledged is in the client's, accepted;
* the receipts the executor holds and the client does not are the ones it booked but
  could not deliver before it died: each unacknowledged, each for this client, and no
  more of them than requests the client saw fail;
* every request that failed, failed with a typed ``LoomError``;
* the restarted executor serves the same client again, which redials it promptly.
"""

from __future__ import annotations

import msgspec
import pytest
import trio
from loomnet.client import ClientConfig, Ledger, LoomClient
from loomnet.protocol import ChatMessage, LoomError, Receipt

from .executor_process import ExecutorProcess, free_port, integrity, serve_paced

pytestmark = pytest.mark.integration

HI = [ChatMessage("user", "Count to eight.")]
PIECES = ["one ", "two ", "three ", "four ", "five ", "six ", "seven ", "eight"]
USAGE = {"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19}
WORKERS = 6
ACCEPTED_BEFORE_KILL = 30
#: seconds a restarted executor's first request may take, dial included: the bench the
#: failures at the kill earned (5 s) and a dial, with room for 2 loaded cores; a client
#: that waited for the next advert (60 s here) would take far longer
REDIAL_WITHIN = 20.0


async def test_kill_9_mid_stream_loses_no_receipt_and_corrupts_no_ledger(
    nursery, tmp_path
):
    paced, url = await serve_paced(nursery, pieces=PIECES, usage=USAGE)
    # adverts a minute apart: the client must come back to the restarted executor by
    # itself, not because a fresh advert happened to arrive
    executor = ExecutorProcess(
        tmp_path / "executor",
        url,
        port=free_port(),
        settings="advert-interval = 60.0\nadvert-ttl = 120.0\n",
    )
    try:
        addr = await executor.start()
        client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[addr], discover_local=False,
                                         offer_timeout=20.0, first_byte_timeout=20.0))  # fmt: skip
        await nursery.start(client.run)
        results: list = []
        failures: list[BaseException] = []
        unfinished_with_text: set[int] = set()
        killed = trio.Event()

        async def worker(index: int) -> None:
            while not killed.is_set():
                try:
                    async with client.stream_chat(HI, model="m1") as stream:
                        async for _ in stream:
                            unfinished_with_text.add(index)
                    results.append(stream.result)
                except Exception as exc:  # noqa: BLE001 - every one is checked to be typed below
                    failures.append(exc)
                finally:
                    unfinished_with_text.discard(index)

        with trio.fail_after(180):
            async with trio.open_nursery() as workers:
                for index in range(WORKERS):
                    workers.start_soon(worker, index)
                while len(results) < ACCEPTED_BEFORE_KILL:
                    await trio.sleep(0.01)
                paced.holding = True
                while paced.held < 2 or len(unfinished_with_text) < 2:
                    await trio.sleep(0.01)
                assert failures == [], failures  # nothing failed before the kill
                assert await executor.kill() == -9
                killed.set()
                paced.holding = (
                    False  # the restarted executor's answers go through whole
                )
        assert len(results) >= ACCEPTED_BEFORE_KILL and len(failures) >= 2
        assert all(isinstance(f, LoomError) for f in failures), [
            repr(f) for f in failures
        ]

        # the same identity, folder and address; the client comes back to it by itself
        assert await executor.start() == addr
        asked = trio.current_time()
        with trio.fail_after(REDIAL_WITHIN):
            again = await client.chat(HI, model="m1")
        assert (
            again.text == "".join(PIECES)
            and trio.current_time() - asked < REDIAL_WITHIN
        )
        assert await executor.terminate() == 0, executor.output.decode()[-3000:]
    finally:
        await executor.ensure_stopped()

    assert integrity(executor.ledger_path) == "ok"
    assert integrity(client.ledger.path) == "ok"
    theirs = {e.receipt_digest: e for e in await _all_entries(executor.ledger_path)}
    ours = {e.receipt_digest: e for e in await client.ledger.entries(limit=100_000)}

    answered = {r.receipt_envelope.payload for r in [*results, again]}
    assert len(answered) == len(results) + 1
    assert answered <= {
        e.receipt_payload for e in ours.values() if e.status == "accepted"
    }
    for receipt_digest, ours_entry in ours.items():  # write before send
        assert receipt_digest in theirs, (
            "a receipt the client holds is missing from the executor's ledger"
        )
        assert theirs[receipt_digest].receipt_payload == ours_entry.receipt_payload
        assert theirs[receipt_digest].receipt_sig == ours_entry.receipt_sig
    for receipt_digest, entry in theirs.items():
        if entry.status == "acknowledged":
            assert ours[receipt_digest].status == "accepted"
    undelivered = [theirs[d] for d in theirs.keys() - ours.keys()]
    assert all(
        e.status == "unacknowledged" and e.client == client.peer_id for e in undelivered
    )
    assert len(undelivered) <= len(failures)
    receipts = [
        msgspec.msgpack.decode(e.receipt_payload, type=Receipt) for e in theirs.values()
    ]
    assert all(r.output_tokens > 0 for r in receipts)


async def _all_entries(path) -> list:
    ledger = await Ledger.open(path)
    try:
        return await ledger.entries(limit=100_000)
    finally:
        await ledger.aclose()
