"""Accounts in the ledger (since schema version 3): a client row may name whose request it was.

Old files (versions 1 and 2, written as those versions wrote them) are migrated on open
with every row kept as it was and no account; rows can then be booked under accounts,
and ``totals``/``entries`` filter by one. Account names are checked in code and in SQL.
A real SQLite file under ``tmp_path`` and real signed receipts throughout.
"""

import sqlite3

import pytest

from loomnet.client import _ledger, check_account
from loomnet.client._ledger import Ledger, LedgerTotals
from loomnet.protocol import ErrorCode, InvalidRequest, digest

from .test_ledger import EXECUTOR, make_ack, signed_receipt, write_v1_ledger

# The schema loomnet wrote as version 2 (issue 8), verbatim, and its insert.
_V2_SCHEMA = """
CREATE TABLE receipts (
    receipt_digest BLOB PRIMARY KEY, receipt_payload BLOB NOT NULL,
    receipt_signer BLOB NOT NULL, receipt_sig BLOB NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('executor', 'client')),
    executor TEXT NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cost INTEGER NOT NULL,
    count_source TEXT NOT NULL, issued_at REAL NOT NULL, recorded_at REAL NOT NULL,
    ack_payload BLOB, ack_signer BLOB, ack_sig BLOB,
    status TEXT NOT NULL CHECK (
        (role = 'client' AND status IN ('accepted', 'disputed'))
        OR (role = 'executor' AND status IN ('acknowledged', 'unacknowledged'))),
    dispute_reason TEXT CHECK ((status = 'disputed') = (dispute_reason IS NOT NULL))
);
CREATE INDEX receipts_by_recorded_at ON receipts (recorded_at);
CREATE INDEX receipts_by_status ON receipts (status);
PRAGMA user_version = 2;
"""
_V2_COLUMNS = ("receipt_digest", "receipt_payload", "receipt_signer", "receipt_sig", "role", "executor", "client",
               "model", "input_tokens", "output_tokens", "cost", "count_source", "issued_at", "recorded_at",
               "ack_payload", "ack_signer", "ack_sig", "status", "dispute_reason")  # fmt: skip
_V2_INSERT = f"INSERT OR IGNORE INTO receipts ({', '.join(_V2_COLUMNS)}) VALUES ({', '.join('?' * len(_V2_COLUMNS))})"

#: (role, n, status): one row of every status a version 2 ledger held
V2_ROWS = [("executor", 0, "acknowledged"), ("executor", 1, "unacknowledged"), ("client", 2, "accepted"),
           ("client", 3, "disputed")]  # fmt: skip


def write_v2_ledger(path, rows) -> None:
    """A version 2 ledger file, as loomnet wrote it: its schema, its insert, its acks."""
    raw = sqlite3.connect(path)
    try:
        raw.execute("PRAGMA journal_mode=WAL")
        raw.executescript(_V2_SCHEMA)
        for role, n, status in rows:
            envelope, r = signed_receipt(n)
            key = digest(envelope.payload)
            acked = status in ("acknowledged", "accepted")
            ack = make_ack(key) if acked else None
            signed = (None, None, None) if ack is None else (ack.payload, ack.signer, ack.sig)
            reason = "its cost is above the request's max_cost" if status == "disputed" else None
            raw.execute(
                _V2_INSERT,
                (key, envelope.payload, envelope.signer, envelope.sig, role, EXECUTOR.peer_id, r.client, r.model,
                 r.input_tokens, r.output_tokens, r.cost, r.count_source, r.issued_at, 100.0 + n, *signed, status,
                 reason),
            )  # fmt: skip
        raw.commit()
    finally:
        raw.close()


def raw_rows(path, columns) -> list[tuple]:
    raw = sqlite3.connect(path)
    try:
        return raw.execute(f"SELECT {', '.join(columns)} FROM receipts ORDER BY receipt_digest").fetchall()
    finally:
        raw.close()


def schema_of(path) -> tuple[int, set[str], list[str]]:
    """(user_version, index names, column names) of the file."""
    raw = sqlite3.connect(path)
    try:
        version = raw.execute("PRAGMA user_version").fetchone()[0]
        indexes = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
        columns = [r[1] for r in raw.execute("PRAGMA table_info(receipts)")]
        return version, indexes, columns
    finally:
        raw.close()


async def book(ledger: Ledger, n: int, *, account=None, dispute=None, now: float = 2000.0) -> bytes:
    envelope, receipt = signed_receipt(n)
    ack = None if dispute else make_ack(digest(envelope.payload))
    return await ledger.record_receipt(envelope, receipt, role="client", executor=EXECUTOR.peer_id, now=now,
                                       dispute=dispute, ack=ack, account=account)  # fmt: skip


# ------------------------------------------------------------------ migrations


async def test_a_version_2_ledger_is_migrated_keeping_every_row_with_no_account(tmp_path):
    path = tmp_path / "v2.sqlite"
    write_v2_ledger(path, V2_ROWS)
    before = raw_rows(path, _V2_COLUMNS)
    assert len(before) == 4
    async with await Ledger.open(path) as ledger:
        entries = await ledger.entries()
        assert [e.status for e in entries] == ["disputed", "accepted", "unacknowledged", "acknowledged"]
        assert [e.account for e in entries] == [None] * 4
        # the migrated table takes rows under accounts
        await book(ledger, 9, account="alice")
        assert await ledger.totals(account="alice") == LedgerTotals(1, 19, 29, signed_receipt(9)[1].cost)
    # every old row is byte for byte what it was, and has no account
    after = [row for row in raw_rows(path, (*_V2_COLUMNS, "account")) if row[0] != digest(signed_receipt(9)[0].payload)]
    assert after == [(*row, None) for row in before]
    version, indexes, columns = schema_of(path)
    assert version == _ledger.SCHEMA_VERSION == 5 and columns[-3:] == ["account", "backend", "provider_cost"]
    assert indexes == {"receipts_by_recorded_at", "receipts_by_status", "receipts_by_account",
                       "provider_charges_by_recorded_at"}
    async with await Ledger.open(path) as reopened:  # opening again migrates nothing twice
        assert (await reopened.totals()).receipts == 5


async def test_a_version_1_ledger_is_migrated_straight_to_the_current_version(tmp_path):
    path = tmp_path / "v1.sqlite"
    write_v1_ledger(path, [("executor", 0, True), ("executor", 1, False), ("client", 2, True), ("client", 3, False)])
    v1_columns = _V2_COLUMNS[:-2]
    before = raw_rows(path, v1_columns)
    async with await Ledger.open(path) as ledger:
        entries = await ledger.entries()
        assert len(entries) == 4 and all(e.account is None for e in entries)
        await book(ledger, 9, account="bob")
        assert [e.receipt_digest for e in await ledger.entries(account="bob")] == [digest(signed_receipt(9)[0].payload)]
    kept = {row[0]: row for row in raw_rows(path, (*v1_columns, "account"))}
    assert [kept[row[0]] for row in before] == [(*row, None) for row in before]
    version, indexes, _ = schema_of(path)
    assert version == _ledger.SCHEMA_VERSION and "receipts_by_account" in indexes


async def test_migrated_and_new_files_check_account_names_in_sql_too(tmp_path):
    write_v2_ledger(tmp_path / "v2.sqlite", V2_ROWS)
    await (await Ledger.open(tmp_path / "v2.sqlite")).aclose()
    async with await Ledger.open(tmp_path / "new.sqlite") as new:
        await book(new, 0, account="alice")
        envelope, receipt = signed_receipt(1)
        await new.record_receipt(envelope, receipt, role="executor", executor=EXECUTOR.peer_id, now=1.0)
    for name in ("v2.sqlite", "new.sqlite"):
        raw = sqlite3.connect(tmp_path / name)
        try:
            for bad in ("", "a b", "x" * 65, "é"):
                with pytest.raises(sqlite3.IntegrityError):
                    raw.execute("UPDATE receipts SET account = ? WHERE role = 'client'", (bad,))
            with pytest.raises(sqlite3.IntegrityError):  # executor rows never have an account
                raw.execute("UPDATE receipts SET account = 'alice' WHERE role = 'executor'")
        finally:
            raw.close()


# ------------------------------------------------------------------ filters


@pytest.fixture
async def ledger(tmp_path):
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        yield ledger


async def test_totals_and_entries_filter_by_account(ledger):
    own = await book(ledger, 0, now=1000.0)
    alice = [await book(ledger, 1, account="alice", now=1000.0), await book(ledger, 2, account="alice", now=3000.0)]
    disputed = await book(ledger, 3, account="alice", dispute="too dear", now=3000.0)
    bob = await book(ledger, 4, account="bob", now=3000.0)
    cost = {n: signed_receipt(n)[1].cost for n in range(5)}

    assert (await ledger.totals()).receipts == 5  # None: every row, whoever's
    assert [e.receipt_digest for e in await ledger.entries()] == [bob, disputed, alice[1], alice[0], own]
    assert [e.receipt_digest for e in await ledger.entries(account="alice")] == [disputed, alice[1], alice[0]]
    assert [e.receipt_digest for e in await ledger.entries(account="alice", status="accepted", limit=1)] == [alice[1]]
    assert [e.account for e in await ledger.entries(account="bob")] == ["bob"]
    assert await ledger.entries(account="carol") == []

    assert (await ledger.totals(account="alice")).cost == cost[1] + cost[2] + cost[3]
    assert (await ledger.totals(account="alice", status="accepted")).cost == cost[1] + cost[2]
    assert (await ledger.totals(account="alice", status="accepted", since=2000.0)).cost == cost[2]
    assert (await ledger.totals(status="accepted", since=2000.0)).cost == cost[2] + cost[4]
    assert await ledger.totals(account="carol") == LedgerTotals(0, 0, 0, 0)
    assert (await ledger.get(own)).account is None and (await ledger.get(bob)).account == "bob"


@pytest.mark.parametrize("bad", ["", "x" * 65, "a b", "alice\n", "é", "a/b", "a;DROP", None, 7])
async def test_a_bad_account_name_is_refused_with_a_typed_error(ledger, bad):
    if bad is None:  # None is "the client's own" everywhere but check_account itself
        with pytest.raises(InvalidRequest):
            check_account(bad)
        return
    with pytest.raises(InvalidRequest) as info:
        await book(ledger, 0, account=bad)
    error = info.value
    assert error.code is ErrorCode.BAD_REQUEST and error.field == "account" and isinstance(error, ValueError)
    assert "1 to 64 of the characters A-Z a-z 0-9 . _ -" in error.message or "a string, not int" in error.message
    with pytest.raises(InvalidRequest):
        await ledger.totals(account=bad)
    with pytest.raises(InvalidRequest):
        await ledger.entries(account=bad)
    assert (await ledger.totals()).receipts == 0  # nothing was booked


async def test_names_at_the_bounds_are_accepted_and_executor_rows_take_none(ledger):
    longest = "A-z.0_" + "9" * 58
    assert len(longest) == 64 and check_account(longest) == longest
    await book(ledger, 0, account=longest)
    await book(ledger, 1, account="a")
    assert (await ledger.totals(account=longest)).receipts == 1
    envelope, receipt = signed_receipt(2)
    with pytest.raises(InvalidRequest, match="only the client"):
        await ledger.record_receipt(envelope, receipt, role="executor", executor=EXECUTOR.peer_id, now=1.0,
                                    account="alice")  # fmt: skip
    assert (await ledger.totals()).receipts == 2


async def test_a_bad_name_is_never_repeated_in_the_error(ledger):
    # a key pasted where its name belongs must not end up in a log or a response
    secret = "sk-" + "Q" * 40 + "/"
    with pytest.raises(InvalidRequest) as info:
        await ledger.totals(account=secret)
    assert "Q" * 10 not in str(info.value) and "44 character(s)" in info.value.message
