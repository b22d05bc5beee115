"""The executor's and a client's ``loomnet ledger export --csv`` reconcile (issue 12).

A real executor (its backend the OpenAI-compatible adapter over loopback HTTP to the
faithful fake runtime, behind a :class:`~.gateway_kit.Gate`) and a real client over
py-libp2p on 127.0.0.1 make seven requests: one the client leaves after the first piece
of text, five it accepts (two its own, three for accounts), and one whose receipt it
disputes (the runtime reports 10 000 output tokens for a four-piece answer). Then each
side's ledger is exported through the real CLI while both nodes still run, and the two
CSV files are held against each other as docs/ledger.md, "Reconciling", says to:

* every receipt in the client's export is in the executor's, under the same digest,
  with the same signed facts (model, tokens, cost, count source, finish reason, issue time);
* each accepted row is ``acknowledged`` on the executor, each disputed row
  ``unacknowledged`` there; the columns that legitimately differ are each side's own
  (role, status, recorded_at, dispute_reason on the client, account on the client,
  backend and provider cost on the executor);
* the executor's export holds exactly one row more: the receipt of the request the
  client left (``client_gone``, unacknowledged), which the client never received;
* the totals agree: the client's accepted = the executor's acknowledged, and everything
  the executor booked for this client = everything the client booked + that one row.
"""

from __future__ import annotations

import csv
import json

import pytest
import trio
from click.testing import CliRunner

from loomnet.node import ModelTerms
from loomnet.node.cli import main
from loomnet.protocol import ChatMessage, ErrorCode, ReceiptError

from ..limits import fail_after
from ..node.fake_openai import USAGE, FakeOpenAI
from .gateway_kit import FAKE_MODEL, Gate, start_client, start_fake_executor, wait_until

pytestmark = pytest.mark.integration

HELLO = [ChatMessage("user", "Say hello.")]
PIECES = ["Hel", "lo, ", "wor", "ld!"]
#: what the receipt itself says: both exports must agree on these, row for row
SIGNED = ("receipt_digest", "executor", "client", "model", "input_tokens", "output_tokens", "cost_micro",
          "cost_credits", "count_source", "finish_reason", "issued_at")  # fmt: skip


async def cli(*args: str):
    """``loomnet ledger ...`` through the real CLI, in a worker thread (it runs its own
    ``trio.run``); returns the result once it exited 0."""
    result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(main, ["ledger", *args]))
    assert result.exit_code == 0, result.output
    return result


async def export(data_dir, side: str, target) -> dict[str, dict[str, str]]:
    """``loomnet ledger export --csv`` of one side's ledger, read back: rows by digest."""
    await cli("export", "--data-dir", str(data_dir), "--side", side, "--csv", str(target))
    with open(target, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {row["receipt_digest"]: row for row in rows}


async def totals(data_dir, side: str, *options: str) -> list[dict]:
    result = await cli("totals", "--data-dir", str(data_dir), "--side", side, "--json", *options)
    return [json.loads(line) for line in result.stdout.splitlines()]


def summed(rows) -> tuple[int, int, int, int]:
    rows = list(rows)
    return (len(rows), sum(int(r["input_tokens"]) for r in rows), sum(int(r["output_tokens"]) for r in rows),
            sum(int(r["cost_micro"]) for r in rows))  # fmt: skip


@fail_after(120)
async def test_the_executors_and_a_clients_exports_reconcile(nursery, tmp_path):
    fake = FakeOpenAI(pieces=list(PIECES))
    gate = Gate(fake, piece=PIECES[0])
    executor = await start_fake_executor(
        nursery, tmp_path, gate, models=[ModelTerms(name=f"openai:{FAKE_MODEL}", price_in=1.5, price_out=3.0)]
    )
    client = await start_client(nursery, tmp_path, executor)
    await client.wait_for_offers(model=FAKE_MODEL, timeout=20)
    executor_ledger = executor.server.ledger

    # the client leaves after the first piece: the executor bills what it sent, on its side only
    async with client.stream_chat(HELLO, model=FAKE_MODEL) as stream:
        async for text in stream:
            assert text == "Hel"
            break
    await wait_until(lambda: gate.hung_up == 1)
    await wait_until(lambda: executor_ledger.entries())
    gate.release.set()

    # accepted: the client's own requests and three for accounts
    accounts = [None, None, "alice", "alice", "bob"]
    for account in accounts:
        result = await client.chat(HELLO, model=FAKE_MODEL, account=account)
        assert result.text == "".join(PIECES)
    # disputed: 10 000 output tokens for four pieces of text; the client books it all the same
    fake.usage = {**USAGE, "completion_tokens": 10_000, "total_tokens": 10_011}
    with pytest.raises(ReceiptError) as info:
        await client.chat(HELLO, model=FAKE_MODEL, account="alice")
    assert info.value.code == ErrorCode.RECEIPT_MISMATCH
    fake.usage = dict(USAGE)
    # the executor books each ack just after the client sends it
    await wait_until(lambda: _count(executor_ledger, "acknowledged", 5))

    # the exports, read while both nodes run
    theirs = await export(tmp_path / "fake-executor", "executor", tmp_path / "executor.csv")
    mine = await export(tmp_path / "client", "client", tmp_path / "client.csv")
    assert len(theirs) == 7 and len(mine) == 6

    # every receipt the client booked is the executor's, with the same signed facts
    assert mine.keys() <= theirs.keys()
    for key, row in mine.items():
        assert {c: row[c] for c in SIGNED} == {c: theirs[key][c] for c in SIGNED}
        assert (row["role"], theirs[key]["role"]) == ("client", "executor")
        assert row["backend"] == row["provider_cost_micro"] == theirs[key]["account"] == ""
        assert theirs[key]["backend"] != ""  # the executor knows which backend answered
    accepted = {k for k, r in mine.items() if r["status"] == "accepted"}
    disputed = {k for k, r in mine.items() if r["status"] == "disputed"}
    assert len(accepted) == 5 and len(disputed) == 1
    assert {theirs[k]["status"] for k in accepted} == {"acknowledged"}
    assert {theirs[k]["status"] for k in disputed} == {"unacknowledged"}
    [key] = disputed
    assert "10000" in mine[key]["dispute_reason"] and mine[key]["account"] == "alice"
    assert theirs[key]["output_tokens"] == "10000" and theirs[key]["dispute_reason"] == ""
    assert sorted(mine[k]["account"] for k in accepted) == sorted(a or "" for a in accounts)

    # what only the executor holds: the receipt of the request the client left
    [gone] = theirs.keys() - mine.keys()
    assert theirs[gone]["finish_reason"] == "client_gone" and theirs[gone]["status"] == "unacknowledged"
    assert int(theirs[gone]["output_tokens"]) >= 1 and theirs[gone]["client"] == client.peer_id

    # the totals agree, in the exports and as `loomnet ledger totals` prints them
    assert summed(mine[k] for k in accepted) == summed(r for r in theirs.values() if r["status"] == "acknowledged")
    assert summed(theirs.values()) == tuple(a + b for a, b in zip(summed(mine.values()), summed([theirs[gone]])))
    paid = await totals(tmp_path / "client", "client", "--by", "peer", "--status", "accepted")
    billed = await totals(tmp_path / "fake-executor", "executor", "--by", "peer", "--status", "acknowledged")
    assert [{**t, "peer": None} for t in paid] == [{**t, "peer": None} for t in billed]
    assert [t["peer"] for t in paid] == [executor.peer_id] and [t["peer"] for t in billed] == [client.peer_id]
    by_account = await totals(tmp_path / "client", "client", "--by", "account", "--status", "accepted")
    assert [(t["account"], t["receipts"]) for t in by_account] == [(None, 2), ("alice", 2), ("bob", 1)]
    assert sum(t["cost_micro"] for t in by_account) == paid[0]["cost_micro"] > 0


async def _count(ledger, status: str, n: int) -> bool:
    return (await ledger.totals(status=status)).receipts == n
