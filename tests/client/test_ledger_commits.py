"""Group commit in the ledger: concurrent bookings share one transaction, each caller
returns only once its own write is committed, a receipt and its ack are one write.

Real SQLite files under ``tmp_path``; transactions are counted on the connection itself
(every ``COMMIT`` the ledger sends), not inferred from timings.
"""

from __future__ import annotations

import sqlite3

import pytest
import trio

from loomnet.client import _ledger
from loomnet.client._ledger import Ledger, LedgerStatistics
from loomnet.protocol import LedgerError, digest

from .test_ledger import EXECUTOR, make_ack, signed_receipt


class CountingConnection:
    """A real connection that counts the transactions committed through it."""

    def __init__(self, conn: sqlite3.Connection, counts: dict[str, int]) -> None:
        self._conn = conn
        self._counts = counts

    def execute(self, sql: str, *args):
        word = sql.split(None, 1)[0].upper()
        if word in ("COMMIT", "BEGIN"):
            self._counts[word] = self._counts.get(word, 0) + 1
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


@pytest.fixture
async def counted(tmp_path, monkeypatch):
    counts: dict[str, int] = {}
    real_connect = sqlite3.connect
    monkeypatch.setattr(_ledger.sqlite3, "connect", lambda *a, **k: CountingConnection(real_connect(*a, **k), counts))
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        counts.clear()  # the schema's own transaction is not a booking
        yield ledger, counts, tmp_path / "ledger.sqlite"


def committed_rows(path) -> int:
    """Rows another connection sees: only what was committed."""
    raw = sqlite3.connect(path)
    try:
        return raw.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
    finally:
        raw.close()


async def test_concurrent_bookings_share_one_commit(counted):
    ledger, counts, path = counted
    n = 50
    seen_after_return: list[int] = []

    async def book(i: int) -> None:
        envelope, receipt = signed_receipt(i)
        await ledger.record_receipt(envelope, receipt, role="executor", executor=EXECUTOR.peer_id, now=1.0)
        # on disk before the call returns: another connection already sees this row
        seen_after_return.append(await trio.to_thread.run_sync(committed_rows, path))

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(book, i)
    stats = ledger.statistics()
    assert stats.writes == n and stats.failed == 0 and stats.pending == 0
    # the first booking commits alone; the 49 that queued meanwhile share the next commit
    assert counts["COMMIT"] == stats.commits == stats.batches <= 3
    assert stats.largest_batch >= n - 2
    assert (await ledger.totals()).receipts == n
    assert min(seen_after_return) >= 1 and len(seen_after_return) == n


async def test_sequential_bookings_commit_each_before_returning(counted):
    ledger, counts, path = counted
    for i in range(3):
        envelope, receipt = signed_receipt(i)
        await ledger.record_receipt(envelope, receipt, role="client", executor=EXECUTOR.peer_id, now=1.0)
        assert await trio.to_thread.run_sync(committed_rows, path) == i + 1
    assert counts["COMMIT"] == 3
    assert ledger.statistics() == LedgerStatistics(writes=3, batches=3, commits=3, largest_batch=1, failed=0, pending=0)


async def test_a_receipt_and_its_ack_are_one_transaction(counted):
    ledger, counts, _ = counted
    envelope, receipt = signed_receipt()
    key = digest(envelope.payload)
    ack = make_ack(key)
    assert await ledger.record_receipt(envelope, receipt, role="client", executor=EXECUTOR.peer_id, now=1.0, ack=ack) == key
    assert counts == {"BEGIN": 1, "COMMIT": 1}
    assert (ledger.statistics().writes, ledger.statistics().batches) == (1, 1)  # one thread hop
    entry = await ledger.get(key)
    assert entry is not None and entry.status == "accepted"
    assert (entry.ack_payload, entry.ack_signer, entry.ack_sig) == (ack.payload, ack.signer, ack.sig)


async def test_an_ack_with_a_receipt_booked_before_is_attached(ledger):
    envelope, receipt = signed_receipt()
    key = await ledger.record_receipt(envelope, receipt, role="client", executor=EXECUTOR.peer_id, now=1.0)
    await ledger.record_receipt(envelope, receipt, role="client", executor=EXECUTOR.peer_id, now=2.0, ack=make_ack(key))
    entry = await ledger.get(key)
    assert entry.ack_payload == make_ack(key).payload and entry.recorded_at == 1.0  # the first row stands

    other_envelope, other = signed_receipt(1)
    other_key = await ledger.record_receipt(
        other_envelope, other, role="client", executor=EXECUTOR.peer_id, now=1.0, dispute="bills too much"
    )
    with pytest.raises(LedgerError, match="undisputed"):
        await ledger.record_receipt(
            other_envelope, other, role="client", executor=EXECUTOR.peer_id, now=2.0, ack=make_ack(other_key)
        )
    assert (await ledger.get(other_key)).ack_payload is None


async def test_an_ack_given_with_a_receipt_is_checked(ledger):
    envelope, receipt = signed_receipt()
    key = digest(envelope.payload)
    with pytest.raises(ValueError, match="another receipt"):
        await ledger.record_receipt(envelope, receipt, role="client", executor="x", now=0.0, ack=make_ack(b"x" * 32))
    with pytest.raises(ValueError, match="counter-signs"):
        await ledger.record_receipt(envelope, receipt, role="executor", executor="x", now=0.0, ack=make_ack(key))
    with pytest.raises(ValueError, match="counter-signs"):
        await ledger.record_receipt(
            envelope, receipt, role="client", executor="x", now=0.0, dispute="no", ack=make_ack(key)
        )
    assert (await ledger.totals()).receipts == 0 and ledger.statistics().writes == 0


async def test_a_failing_write_fails_alone_in_its_batch(counted):
    ledger, counts, _ = counted
    results: dict[int, object] = {}

    async def book(i: int) -> None:
        envelope, receipt = signed_receipt(i)
        results[i] = await ledger.record_receipt(envelope, receipt, role="executor", executor="x", now=1.0)

    async def broken() -> None:
        try:
            await ledger._write("do something broken", lambda conn: conn.execute("INSERT INTO nowhere VALUES (1)"))
        except LedgerError as exc:
            results[-1] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(book, 0)  # leads the first batch
        await trio.sleep(0)
        for i in range(1, 6):
            nursery.start_soon(book, i)
        nursery.start_soon(broken)
        for i in range(6, 10):
            nursery.start_soon(book, i)
    error = results.pop(-1)
    assert isinstance(error, LedgerError) and isinstance(error.__cause__, sqlite3.OperationalError)
    assert sorted(results) == list(range(10)) and (await ledger.totals()).receipts == 10
    stats = ledger.statistics()
    assert (stats.writes, stats.failed) == (11, 1) and stats.largest_batch >= 2 and counts["COMMIT"] == stats.commits


async def test_close_waits_for_the_writes_already_queued(tmp_path):
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    booked: list[bytes] = []

    async def book(i: int) -> None:
        envelope, receipt = signed_receipt(i)
        booked.append(await ledger.record_receipt(envelope, receipt, role="client", executor="x", now=1.0))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(book, i)
        await trio.sleep(0)  # every booking has queued
        nursery.start_soon(ledger.aclose)
    assert len(booked) == 10
    assert committed_rows(tmp_path / "ledger.sqlite") == 10
    with pytest.raises(LedgerError, match="closed"):
        await ledger.record_ack(booked[0], make_ack(booked[0]))


@pytest.fixture
async def ledger(tmp_path):
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        yield ledger
