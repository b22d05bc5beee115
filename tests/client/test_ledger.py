"""The receipt ledger: exact bytes, idempotence, durability, and SQLite off the trio thread.

Every test uses a real SQLite file under ``tmp_path`` and real signed receipts.
"""

import sqlite3
import threading

import msgspec
import pytest
import trio

from loomnet.client import _ledger
from loomnet.client._ledger import Ledger, LedgerEntry, LedgerTotals
from loomnet.protocol import (
    Envelope,
    ErrorCode,
    LedgerError,
    Receipt,
    ReceiptAck,
    SignedKind,
    SigningKey,
    cost_of,
    digest,
    encode_payload,
    open_envelope,
    seal,
)

EXECUTOR = SigningKey(bytes(range(32)))
CLIENT = SigningKey(bytes(range(1, 33)))


def make_receipt(n: int = 0, **overrides) -> Receipt:
    fields = dict(
        request_digest=digest(b"request %d" % n),
        client=CLIENT.peer_id,
        model="smollm2-135m",
        input_tokens=10 + n,
        output_tokens=20 + n,
        count_source="backend",
        price_in=150_000,
        price_out=600_000,
        cost=cost_of(10 + n, 20 + n, 150_000, 600_000),
        output_digest=digest(b"streamed text %d" % n),
        chunks=3,
        finish_reason="stop",
        issued_at=1000.0 + n,
    )
    fields.update(overrides)
    return Receipt(**fields)


def signed_receipt(n: int = 0, **overrides) -> tuple[Envelope, Receipt]:
    receipt = make_receipt(n, **overrides)
    return seal(SignedKind.RECEIPT, receipt, EXECUTOR), receipt


def make_ack(receipt_digest: bytes) -> Envelope:
    ack = ReceiptAck(receipt_digest=receipt_digest, accepted_at=1001.0, client_output_tokens=21)
    return seal(SignedKind.RECEIPT_ACK, ack, CLIENT)


@pytest.fixture
async def ledger(tmp_path):
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        yield ledger


async def record(ledger: Ledger, n: int = 0, *, role: str = "client", now: float = 2000.0):
    envelope, receipt = signed_receipt(n)
    key = await ledger.record_receipt(
        envelope, receipt, role=role, executor=EXECUTOR.peer_id, now=now
    )
    return key, envelope, receipt


async def test_round_trip_keeps_the_signed_bytes_and_the_fields(ledger):
    key, envelope, receipt = await record(ledger, role="executor", now=2000.5)
    assert key == digest(envelope.payload)
    entry = await ledger.get(key)
    assert entry == LedgerEntry(
        receipt_digest=key,
        receipt_payload=envelope.payload,
        receipt_signer=EXECUTOR.public_key,
        receipt_sig=envelope.sig,
        role="executor",
        executor=EXECUTOR.peer_id,
        client=CLIENT.peer_id,
        model="smollm2-135m",
        input_tokens=10,
        output_tokens=20,
        cost=receipt.cost,
        count_source="backend",
        issued_at=1000.0,
        recorded_at=2000.5,
        status="unacknowledged",
    )
    # What the ledger holds still verifies, as evidence on its own.
    stored = Envelope(entry.receipt_payload, entry.receipt_signer, entry.receipt_sig)
    assert open_envelope(SignedKind.RECEIPT, stored) == (receipt, EXECUTOR.peer_id)
    assert await ledger.get(digest(b"no such receipt")) is None


async def test_payload_is_stored_as_received_never_reencoded(ledger):
    # A newer executor's receipt carries a field we do not know: re-encoding would drop
    # it and break the signature. The ledger must keep the bytes as they travelled.
    fields = msgspec.to_builtins(make_receipt(), builtin_types=(bytes,))
    fields["future_field"] = "from a newer release"
    payload = msgspec.msgpack.encode(fields)
    sig = EXECUTOR.sign(SignedKind.RECEIPT.prefix + payload)
    envelope = Envelope(payload, EXECUTOR.public_key, sig)
    receipt, _ = open_envelope(SignedKind.RECEIPT, envelope)
    assert encode_payload(receipt) != payload

    key = await ledger.record_receipt(
        envelope, receipt, role="client", executor=EXECUTOR.peer_id, now=1.0
    )
    entry = await ledger.get(key)
    assert entry.receipt_payload == payload
    assert key == digest(payload)


async def test_executor_and_client_ledgers_hold_identical_bytes(tmp_path):
    envelope, receipt = signed_receipt()
    rows = []
    for role in ("executor", "client"):
        async with await Ledger.open(tmp_path / role / "ledger.sqlite") as ledger:
            key = await ledger.record_receipt(
                envelope, receipt, role=role, executor=EXECUTOR.peer_id, now=5.0
            )
            rows.append(await ledger.get(key))
    executor_row, client_row = rows
    assert executor_row.receipt_payload == client_row.receipt_payload == envelope.payload
    assert executor_row.receipt_sig == client_row.receipt_sig
    assert (executor_row.role, client_row.role) == ("executor", "client")


async def test_recording_the_same_receipt_twice_keeps_one_row(ledger):
    first, _, _ = await record(ledger, now=10.0)
    second, _, _ = await record(ledger, now=20.0)
    assert first == second
    assert (await ledger.totals()).receipts == 1
    entry = await ledger.get(first)
    assert entry.recorded_at == 10.0  # the first booking stands


async def test_ack_is_recorded_and_read_back(ledger):
    key, _, _ = await record(ledger)
    ack = make_ack(key)
    await ledger.record_ack(key, ack)
    entry = await ledger.get(key)
    assert (entry.ack_payload, entry.ack_signer, entry.ack_sig) == (ack.payload, ack.signer, ack.sig)
    assert entry.status == "accepted"
    stored = Envelope(entry.ack_payload, entry.ack_signer, entry.ack_sig)
    opened, signer = open_envelope(SignedKind.RECEIPT_ACK, stored)
    assert opened.receipt_digest == key and signer == CLIENT.peer_id


async def test_ack_for_an_unknown_receipt_is_a_ledger_error(ledger):
    missing = digest(b"never recorded")
    with pytest.raises(LedgerError) as info:
        await ledger.record_ack(missing, make_ack(missing))
    assert info.value.code is ErrorCode.LEDGER_FAILED


async def test_misuse_is_a_value_error(ledger):
    envelope, receipt = signed_receipt()
    with pytest.raises(ValueError, match="role"):
        await ledger.record_receipt(envelope, receipt, role="auditor", executor="x", now=0.0)
    with pytest.raises(ValueError, match="does not match"):
        await ledger.record_receipt(
            envelope, make_receipt(1), role="client", executor="x", now=0.0
        )
    ack_envelope = make_ack(digest(envelope.payload))
    with pytest.raises(ValueError, match="does not carry"):
        await ledger.record_receipt(ack_envelope, receipt, role="client", executor="x", now=0.0)
    key, _, _ = await record(ledger)
    with pytest.raises(ValueError, match="another receipt"):
        await ledger.record_ack(key, make_ack(digest(b"other")))
    assert (await ledger.totals()).receipts == 1


async def test_totals_sum_every_receipt(ledger):
    assert await ledger.totals() == LedgerTotals(0, 0, 0, 0)
    for n in range(3):
        await record(ledger, n)
    costs = sum(make_receipt(n).cost for n in range(3))
    assert await ledger.totals() == LedgerTotals(3, 10 + 11 + 12, 20 + 21 + 22, costs)


async def test_entries_are_newest_first_and_limited(ledger):
    keys = [(await record(ledger, n, now=100.0 + n))[0] for n in range(5)]
    entries = await ledger.entries()
    assert [e.receipt_digest for e in entries] == keys[::-1]
    assert [e.receipt_digest for e in await ledger.entries(limit=2)] == keys[::-1][:2]
    assert await ledger.entries(limit=0) == []
    with pytest.raises(ValueError):
        await ledger.entries(limit=-1)


async def test_data_survives_close_and_reopen(tmp_path):
    path = tmp_path / "deep" / "dir" / "ledger.sqlite"  # parents are created
    ledger = await Ledger.open(path)
    key, envelope, _ = await record(ledger)
    await ledger.record_ack(key, make_ack(key))
    await ledger.aclose()
    await ledger.aclose()  # idempotent

    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("PRAGMA user_version").fetchone() == (_ledger.SCHEMA_VERSION,)
    finally:
        raw.close()

    async with await Ledger.open(path) as reopened:
        entry = await reopened.get(key)
        assert entry.receipt_payload == envelope.payload
        assert entry.ack_payload is not None
        assert (await reopened.totals()).receipts == 1


async def test_a_closed_ledger_raises_ledger_error(tmp_path):
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    await ledger.aclose()
    with pytest.raises(LedgerError, match="closed"):
        await ledger.totals()
    with pytest.raises(LedgerError):
        await record(ledger)


async def test_unopenable_paths_are_ledger_errors(tmp_path):
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(LedgerError) as info:
        await Ledger.open(tmp_path / "a-directory")
    assert info.value.code is ErrorCode.LEDGER_FAILED
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert "a-directory" in str(info.value)

    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(LedgerError) as info:
        await Ledger.open(tmp_path / "a-file" / "ledger.sqlite")
    assert isinstance(info.value.__cause__, OSError)

    (tmp_path / "garbage.sqlite").write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(LedgerError):
        await Ledger.open(tmp_path / "garbage.sqlite")


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {_ledger.SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(LedgerError, match="newer"):
        await Ledger.open(path)


class RecordingConnection:
    """Wraps a real connection and notes the thread of every call made on it."""

    def __init__(self, conn: sqlite3.Connection, threads: list[int]) -> None:
        self._conn = conn
        self._threads = threads

    def __getattr__(self, name):
        attr = getattr(self._conn, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._threads.append(threading.get_ident())
            return attr(*args, **kwargs)

        return call


async def test_sqlite_never_runs_on_the_trio_thread(tmp_path, monkeypatch):
    threads: list[int] = []
    real_connect = sqlite3.connect

    def connect(*args, **kwargs):
        threads.append(threading.get_ident())
        return RecordingConnection(real_connect(*args, **kwargs), threads)

    monkeypatch.setattr(_ledger.sqlite3, "connect", connect)
    trio_thread = threading.get_ident()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(60):
        ledger = await Ledger.open(tmp_path / "ledger.sqlite")
        async with ledger, trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            for n in range(200):
                await record(ledger, n)
            first = digest(signed_receipt(0)[0].payload)
            await ledger.record_ack(first, make_ack(first))
            assert (await ledger.totals()).receipts == 200
            await ledger.entries()
            nursery.cancel_scope.cancel()

    assert len(threads) >= 205  # connect, pragmas, schema, 200 inserts, ack, reads, close
    assert trio_thread not in threads
    assert ticks >= 200  # the loop kept running while the writes were in flight


async def test_a_receipt_write_finishes_even_when_cancelled(ledger):
    envelope, receipt = signed_receipt()
    with trio.CancelScope() as scope:
        scope.cancel()
        key = await ledger.record_receipt(
            envelope, receipt, role="executor", executor=EXECUTOR.peer_id, now=1.0
        )
    assert key == digest(envelope.payload)
    assert await ledger.get(key) is not None


# ------------------------------------------------------------ statuses (schema 2)


async def test_rows_start_with_their_sides_status(ledger):
    executor_key, _, _ = await record(ledger, 0, role="executor")
    client_key, _, _ = await record(ledger, 1, role="client")
    assert (await ledger.get(executor_key)).status == "unacknowledged"
    assert (await ledger.get(client_key)).status == "accepted"
    assert (await ledger.get(client_key)).dispute_reason is None


async def test_an_ack_makes_the_executors_row_acknowledged(ledger):
    key, _, _ = await record(ledger, role="executor")
    await ledger.record_ack(key, make_ack(key))
    assert (await ledger.get(key)).status == "acknowledged"


async def test_a_disputed_receipt_is_booked_with_its_reason_and_never_acknowledged(ledger):
    envelope, receipt = signed_receipt()
    key = await ledger.record_receipt(
        envelope, receipt, role="client", executor=EXECUTOR.peer_id, now=1.0, dispute="it bills too much"
    )
    entry = await ledger.get(key)
    assert (entry.status, entry.dispute_reason) == ("disputed", "it bills too much")
    assert entry.receipt_payload == envelope.payload
    with pytest.raises(LedgerError, match="undisputed"):
        await ledger.record_ack(key, make_ack(key))
    assert (await ledger.get(key)).ack_payload is None


@pytest.mark.parametrize(("role", "dispute"), [("executor", "no"), ("client", "")])
async def test_only_a_client_disputes_and_always_says_why(ledger, role, dispute):
    envelope, receipt = signed_receipt()
    with pytest.raises(ValueError, match="say why"):
        await ledger.record_receipt(envelope, receipt, role=role, executor="x", now=0.0, dispute=dispute)
    assert (await ledger.totals()).receipts == 0


async def test_totals_and_entries_by_status(ledger):
    accepted = [(await record(ledger, n, now=10.0 + n))[0] for n in range(2)]
    envelope, receipt = signed_receipt(5)
    disputed = await ledger.record_receipt(
        envelope, receipt, role="client", executor=EXECUTOR.peer_id, now=20.0, dispute="bad"
    )
    assert [e.receipt_digest for e in await ledger.entries(status="accepted")] == accepted[::-1]
    assert [e.receipt_digest for e in await ledger.entries(status="disputed")] == [disputed]
    assert await ledger.entries(status="acknowledged") == []
    both = sum(make_receipt(n).cost for n in range(2))
    assert await ledger.totals(status="accepted") == LedgerTotals(2, 21, 41, both)
    assert await ledger.totals(status="disputed") == LedgerTotals(1, 15, 25, receipt.cost)
    assert (await ledger.totals()).receipts == 3
    assert await ledger.totals_by_status() == {
        "accepted": LedgerTotals(2, 21, 41, both),
        "disputed": LedgerTotals(1, 15, 25, receipt.cost),
    }
    with pytest.raises(ValueError, match="status"):
        await ledger.totals(status="paid")
    with pytest.raises(ValueError, match="status"):
        await ledger.entries(status="paid")


# The schema loomnet 0.1 wrote (version 1), verbatim.
_V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    receipt_digest BLOB PRIMARY KEY, receipt_payload BLOB NOT NULL,
    receipt_signer BLOB NOT NULL, receipt_sig BLOB NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('executor', 'client')),
    executor TEXT NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cost INTEGER NOT NULL,
    count_source TEXT NOT NULL, issued_at REAL NOT NULL, recorded_at REAL NOT NULL,
    ack_payload BLOB, ack_signer BLOB, ack_sig BLOB
);
CREATE INDEX IF NOT EXISTS receipts_by_recorded_at ON receipts (recorded_at);
PRAGMA user_version = 1;
"""


def write_v1_ledger(path, rows) -> None:
    raw = sqlite3.connect(path)
    try:
        raw.executescript(_V1_SCHEMA)
        for role, n, acked in rows:
            envelope, r = signed_receipt(n)
            key = digest(envelope.payload)
            ack = make_ack(key) if acked else Envelope(None, None, None)
            raw.execute(
                "INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, envelope.payload, envelope.signer, envelope.sig, role, EXECUTOR.peer_id, r.client, r.model,
                 r.input_tokens, r.output_tokens, r.cost, r.count_source, r.issued_at, 100.0 + n,
                 ack.payload, ack.signer, ack.sig),
            )  # fmt: skip
        raw.commit()
    finally:
        raw.close()


async def test_a_version_1_ledger_is_migrated_with_every_row_and_its_status(tmp_path):
    path = tmp_path / "v1.sqlite"
    write_v1_ledger(path, [("executor", 0, True), ("executor", 1, False), ("client", 2, True), ("client", 3, False)])
    async with await Ledger.open(path) as ledger:
        entries = await ledger.entries()
        assert [e.receipt_digest for e in entries] == [digest(signed_receipt(n)[0].payload) for n in (3, 2, 1, 0)]
        assert [e.status for e in entries] == ["accepted", "accepted", "unacknowledged", "acknowledged"]
        assert all(e.dispute_reason is None for e in entries)
        old = entries[-1]
        assert old.receipt_payload == signed_receipt(0)[0].payload
        assert old.ack_payload == make_ack(old.receipt_digest).payload
        # The migrated table takes new rows of every kind, and acks still update status.
        await ledger.record_ack(entries[2].receipt_digest, make_ack(entries[2].receipt_digest))
        assert (await ledger.get(entries[2].receipt_digest)).status == "acknowledged"
        envelope, receipt = signed_receipt(9)
        await ledger.record_receipt(envelope, receipt, role="client", executor="x", now=1.0, dispute="why")
        assert (await ledger.totals_by_status())["disputed"].receipts == 1
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone() == (_ledger.SCHEMA_VERSION,)
        with pytest.raises(sqlite3.IntegrityError):  # the status check holds on the migrated table
            raw.execute("UPDATE receipts SET status = 'accepted' WHERE role = 'executor'")
    finally:
        raw.close()
    async with await Ledger.open(path) as reopened:  # opening again migrates nothing twice
        assert (await reopened.totals()).receipts == 5
