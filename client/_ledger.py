"""The SQLite ledger both sides of a request keep: every signed receipt, as it travelled.

The executor books the receipt it signed, the client the receipt it accepted plus its
counter-signature (the ack). Both store the payload bytes exactly as sent, never
re-encoded, so the two ledgers hold byte-identical, independently verifiable evidence.

A receipt, once sent or accepted, must be on disk before the stream is closed: WAL mode
with ``synchronous=FULL`` means a write is on disk when its call returns, and writes are
shielded so a shutdown cannot drop one. SQLite blocks, so it never runs on the trio
thread: one connection (``check_same_thread=False``) serves worker threads one call at a
time through a ``CapacityLimiter(1)``. sqlite3 and OS errors become ``LedgerError`` here.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import msgspec
import trio

from loomnet.protocol import Envelope, LedgerError, Receipt, ReceiptAck, digest

__all__ = ["Ledger", "LedgerEntry", "LedgerTotals"]

#: ``PRAGMA user_version`` of the schema below; a later version migrates from it.
SCHEMA_VERSION = 1
#: Seconds SQLite waits for another process (say ``loomnet ledger`` reading) to let go.
_BUSY_TIMEOUT = 5.0
_ROLES = ("executor", "client")

# Version 0 is a new, empty file; a later version adds its migration next to this.
_SCHEMA = f"""
BEGIN IMMEDIATE;
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
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One row: a signed receipt (the exact bytes, their sha256, the executor's key and
    signature), what it says, which side wrote it (``role``), and the client's ack once
    there is one. ``cost`` is in micro-credits, times in seconds since the epoch.
    """

    receipt_digest: bytes
    receipt_payload: bytes
    receipt_signer: bytes
    receipt_sig: bytes
    role: str
    executor: str
    client: str
    model: str
    input_tokens: int
    output_tokens: int
    cost: int
    count_source: str
    issued_at: float
    recorded_at: float
    ack_payload: bytes | None = None
    ack_signer: bytes | None = None
    ack_sig: bytes | None = None


class LedgerTotals(msgspec.Struct, frozen=True):
    """Sums over every receipt in a ledger; ``cost`` in micro-credits."""

    receipts: int
    input_tokens: int
    output_tokens: int
    cost: int


_COLUMNS = LedgerEntry.__struct_fields__
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM receipts"
_PLACEHOLDERS = ", ".join("?" * len(_COLUMNS))
_INSERT = f"INSERT OR IGNORE INTO receipts ({', '.join(_COLUMNS)}) VALUES ({_PLACEHOLDERS})"
_ACK = "UPDATE receipts SET ack_payload = ?, ack_signer = ?, ack_sig = ? WHERE receipt_digest = ?"
_TOTALS = ("SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
           "COALESCE(SUM(cost), 0) FROM receipts")  # fmt: skip
_ack_decoder = msgspec.msgpack.Decoder(ReceiptAck)
_receipt_decoder = msgspec.msgpack.Decoder(Receipt)


def _decode(decoder: msgspec.msgpack.Decoder[Any], payload: bytes) -> Any:
    try:  # a caller passing an envelope of the wrong kind is misuse, not a ledger failure
        return decoder.decode(payload)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"the envelope does not carry what was expected: {exc}") from None


@contextlib.contextmanager
def _map_sqlite_errors(action: str) -> Iterator[None]:
    """Turn SQLite and file system failures into ``LedgerError`` (LEDGER_FAILED)."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise LedgerError(f"ledger: could not {action}: {exc}") from exc


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database and bring its schema to SCHEMA_VERSION."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, _BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise LedgerError(f"ledger {str(path)!r} has schema version {version}, newer "
                              f"than this loomnet's {SCHEMA_VERSION}")  # fmt: skip
        if version < SCHEMA_VERSION:
            conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


class Ledger:
    """A node's ledger of signed receipts, in one SQLite file; see :meth:`open`.

    Resource handling: one SQLite connection, held until :meth:`aclose`.
    Error handling: SQLite and file system failures raise ``LedgerError``, chained to the
    original; misuse (bad ``role``, an envelope not matching its message) ``ValueError``.
    Cancellation: reads are cancellable; writes are shielded, so once called they finish
    (bounded by SQLite's 5 s busy timeout).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:  # use open()
        self._conn: sqlite3.Connection | None = conn
        self._limiter = trio.CapacityLimiter(1)
        self.path = path  #: where the database lives

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Ledger:
        """Open the ledger at ``path``, creating parent directories and the schema; also
        usable as ``async with await Ledger.open(path) as ledger:``.

        Raises:
            LedgerError: the file cannot be opened or created, is not a ledger, or was
                written by a newer schema version.
        """
        where = Path(path)
        with _map_sqlite_errors(f"open {str(where)!r}"):
            return cls(await trio.to_thread.run_sync(_connect, where), where)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _query(self, action: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """Run one statement in a worker thread, one at a time; returns (rowcount, rows)."""

        def call() -> tuple[int, list[Any]]:
            if self._conn is None:  # checked in the thread: aclose may have run meanwhile
                raise sqlite3.ProgrammingError("the ledger is closed")
            cursor = self._conn.execute(sql, params)
            return cursor.rowcount, cursor.fetchall()

        with _map_sqlite_errors(action):
            return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def record_receipt(
        self, envelope: Envelope, receipt: Receipt, *, role: str, executor: str, now: float
    ) -> bytes:
        """Durably store a signed receipt; returns its digest (sha256 of the payload).

        Stores ``envelope.payload`` exactly as given (``receipt`` is that payload,
        decoded); recording it again keeps the first row. ``role`` is the writing side,
        ``"executor"`` or ``"client"``; ``now`` (seconds) is stored as ``recorded_at``.
        Returns only once the commit is on disk.

        Raises:
            LedgerError: the write failed.
            ValueError: a bad ``role``, or ``receipt`` is not what ``envelope`` carries.
        """
        if role not in _ROLES:
            raise ValueError(f"role must be one of {_ROLES}, not {role!r}")
        if _decode(_receipt_decoder, envelope.payload) != receipt:
            raise ValueError("the receipt passed does not match the envelope's payload")
        key = digest(envelope.payload)
        r = receipt
        values = (key, envelope.payload, envelope.signer, envelope.sig, role, executor,
                  r.client, r.model, r.input_tokens, r.output_tokens, r.cost,
                  r.count_source, r.issued_at, now, None, None, None)  # fmt: skip
        with trio.CancelScope(shield=True):
            await self._query("record a receipt", _INSERT, values)
        return key

    async def record_ack(self, receipt_digest: bytes, ack: Envelope) -> None:
        """Attach the client's counter-signature to a recorded receipt, durably.

        Raises:
            LedgerError: there is no receipt with that digest, or the write failed.
            ValueError: ``ack`` does not carry a receipt ack for ``receipt_digest``.
        """
        if _decode(_ack_decoder, ack.payload).receipt_digest != receipt_digest:
            raise ValueError("the ack is for another receipt")
        with trio.CancelScope(shield=True):
            params = (ack.payload, ack.signer, ack.sig, receipt_digest)
            updated, _ = await self._query("record an ack", _ACK, params)
        if updated == 0:
            raise LedgerError(f"ledger: no receipt {receipt_digest.hex()} to acknowledge")

    async def get(self, receipt_digest: bytes) -> LedgerEntry | None:
        """The entry for ``receipt_digest``, or None if there is none."""
        sql = f"{_SELECT} WHERE receipt_digest = ?"
        _, rows = await self._query("read a receipt", sql, (receipt_digest,))
        return LedgerEntry(**dict(zip(_COLUMNS, rows[0]))) if rows else None

    async def entries(self, *, limit: int = 100) -> list[LedgerEntry]:
        """Up to ``limit`` entries, the most recently recorded first."""
        if limit < 0:
            raise ValueError("limit cannot be negative")
        sql = f"{_SELECT} ORDER BY recorded_at DESC, rowid DESC LIMIT ?"
        _, rows = await self._query("list receipts", sql, (limit,))
        return [LedgerEntry(**dict(zip(_COLUMNS, row))) for row in rows]

    async def totals(self) -> LedgerTotals:
        """Counts and sums over every receipt in the ledger."""
        _, rows = await self._query("sum receipts", _TOTALS)
        return LedgerTotals(*rows[0])

    async def aclose(self) -> None:
        """Close the database; idempotent. Waits for a call in flight to finish."""

        def close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        with trio.CancelScope(shield=True), _map_sqlite_errors("close"):
            await trio.to_thread.run_sync(close, limiter=self._limiter)
