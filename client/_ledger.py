"""The SQLite ledger both sides of a request keep: every signed receipt, as it travelled.

The executor books the receipt it signed, the client the receipt it accepted plus its
counter-signature (the ack). Both store the payload bytes exactly as sent, never
re-encoded, so the two ledgers hold byte-identical, independently verifiable evidence.

A receipt, once sent or accepted, must be on disk before the stream is closed: WAL mode
with ``synchronous=FULL`` means a write is on disk when its call returns (the commit
fsyncs the WAL), and writes are shielded so a shutdown cannot drop one. SQLite blocks,
so it never runs on the trio thread: one connection (``check_same_thread=False``) serves
worker threads one call at a time through a ``CapacityLimiter(1)``. sqlite3 and OS
errors become ``LedgerError`` here.

Writes are **group-committed** (``_ledger_writes``): writes made at the same time share
one transaction and one fsync, and each caller returns only once the transaction
holding its own write is committed, so the durability promise is the same as one
transaction per write. A write that carries several statements (the client's receipt
with its ack: ``record_receipt(..., ack=)``) is one transaction and one thread hop.
``synchronous=FULL`` stays: in WAL mode ``NORMAL`` skips the commit's fsync, so a power
cut could lose a receipt already sent, which is exactly what the ledger exists to
prevent; group commit recovers most of that fsync's cost under load instead.
:meth:`Ledger.statistics` counts writes, commits and batches.

Both ledgers hold the same set of receipts: every receipt the executor signed and sent
(its ``status`` is ``acknowledged`` once the client's counter-signature came back,
``unacknowledged`` otherwise), and on the client every such receipt it received, the
ones it accepted (``accepted``, with its ack) and the ones it did not (``disputed``,
with the reason, never acknowledged). Only a receipt whose signature does not verify
is booked nowhere: it cannot be the executor's.

A client row may name an **account** (``account``: who the request was made for, say a
gateway's user; NULL for the client's own requests): the receipt is the same, the
account only says whose spending it is, so ``totals(account=...)`` gives one account's
spending (its budget at start: ``LoomClient.account_budget``). An account name is 1 to
64 of ``A-Z a-z 0-9 . _ -`` (:func:`check_account`); executor rows never have one.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Self

import msgspec
import trio

from loomnet.protocol import Envelope, InvalidRequest, LedgerError, Receipt, ReceiptAck, digest

from ._ledger_writes import GroupCommit, LedgerStatistics

__all__ = ["ACCOUNT_MAX_CHARS", "GROUPINGS", "GroupTotals", "Grouping", "Ledger", "LedgerCursor", "LedgerEntry",
           "LedgerPage", "LedgerStatistics", "LedgerTotals", "Margin", "STATUSES", "check_account"]

#: ``PRAGMA user_version`` of the schema below; older files are migrated on open.
SCHEMA_VERSION = 5
#: Seconds SQLite waits for another process (say ``loomnet ledger`` reading) to let go.
_BUSY_TIMEOUT = 5.0
_ROLES = ("executor", "client")
#: The statuses a row may have, per role (see the module doc).
STATUSES: dict[str, tuple[str, ...]] = {
    "client": ("accepted", "disputed"),
    "executor": ("acknowledged", "unacknowledged"),
}
_ALL_STATUSES = tuple(s for statuses in STATUSES.values() for s in statuses)
#: the longest account name, in characters
ACCOUNT_MAX_CHARS = 64
_ACCOUNT = re.compile(rf"[A-Za-z0-9._-]{{1,{ACCOUNT_MAX_CHARS}}}")
# the same rule in SQL, so no other writer can store a name this code would refuse
_ACCOUNT_CHECK = (f"CHECK (account IS NULL OR (role = 'client' AND length(account) BETWEEN 1 AND {ACCOUNT_MAX_CHARS} "
                  "AND account NOT GLOB '*[^A-Za-z0-9._-]*'))")  # fmt: skip

_TABLE = """
CREATE TABLE {name} (
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
    dispute_reason TEXT CHECK ((status = 'disputed') = (dispute_reason IS NOT NULL)),
    account TEXT {account_check},
    {provider_columns}
);
"""
# Version 4: which of the executor's backends answered, and what its provider charged
# the operator for it (micro-credits; NULL: a client row, or a backend without a price)
_PROVIDER_COLUMNS = ("backend TEXT CHECK (backend IS NULL OR (role = 'executor' AND length(backend) <= 128))",
                     "provider_cost INTEGER CHECK (provider_cost IS NULL OR (role = 'executor' AND provider_cost >= 0))")
_PROVIDER = ",\n    ".join(_PROVIDER_COLUMNS)
_INDEXES = (
    "CREATE INDEX receipts_by_recorded_at ON receipts (recorded_at)",
    "CREATE INDEX receipts_by_status ON receipts (status)",
    "CREATE INDEX receipts_by_account ON receipts (account, recorded_at)",
)
_V1_COLUMNS = ("receipt_digest, receipt_payload, receipt_signer, receipt_sig, role, executor, client, model, "
               "input_tokens, output_tokens, cost, count_source, issued_at, recorded_at, ack_payload, ack_signer, "
               "ack_sig")  # fmt: skip

# Version 0 is a new, empty file. Version 1 had no status: its client rows were all
# accepted (a v1 client booked nothing else), its executor rows acknowledged when they
# carry an ack. SQLite cannot add a checked column to rows that exist, so the table is
# rebuilt. Version 2 had no account: every row was the client's own (NULL), which a
# plain added column gives. Each entry brings its version straight to SCHEMA_VERSION, in
# one transaction with the version bump: a crash leaves the file as it was.
_ADD_PROVIDER = [f"ALTER TABLE receipts ADD COLUMN {column}" for column in _PROVIDER_COLUMNS]
# Version 5: what a provider charged for work no receipt bills (a client that left
# before the first content: the provider read the prompt all the same)
_CHARGES = [
    """CREATE TABLE provider_charges (
        backend TEXT NOT NULL CHECK (length(backend) <= 128), model TEXT NOT NULL,
        input_tokens INTEGER NOT NULL CHECK (input_tokens >= 0),
        output_tokens INTEGER NOT NULL CHECK (output_tokens >= 0),
        cost INTEGER NOT NULL CHECK (cost >= 0), recorded_at REAL NOT NULL)""",
    "CREATE INDEX provider_charges_by_recorded_at ON provider_charges (recorded_at)",
]
_MIGRATIONS: dict[int, list[str]] = {
    0: [_TABLE.format(name="receipts", account_check=_ACCOUNT_CHECK, provider_columns=_PROVIDER), *_INDEXES,
        *_CHARGES],
    1: [
        _TABLE.format(name="receipts_v2", account_check=_ACCOUNT_CHECK, provider_columns=_PROVIDER),
        f"""INSERT INTO receipts_v2 ({_V1_COLUMNS}, status, dispute_reason)
            SELECT {_V1_COLUMNS}, CASE WHEN role = 'client' THEN 'accepted'
                                       WHEN ack_payload IS NULL THEN 'unacknowledged'
                                       ELSE 'acknowledged' END, NULL
            FROM receipts ORDER BY rowid""",
        "DROP TABLE receipts",
        "ALTER TABLE receipts_v2 RENAME TO receipts",
        *_INDEXES,
        *_CHARGES,
    ],
    2: [f"ALTER TABLE receipts ADD COLUMN account TEXT {_ACCOUNT_CHECK}", _INDEXES[-1], *_ADD_PROVIDER, *_CHARGES],
    3: [*_ADD_PROVIDER, *_CHARGES],
    4: _CHARGES,
}


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One row: a signed receipt (the exact bytes, their sha256, the executor's key and
    signature), what it says, which side wrote it (``role``), the client's ack once
    there is one, and the row's ``status`` (see :data:`STATUSES`) with, for a disputed
    receipt, why the client did not accept it. ``cost`` is in micro-credits, times in
    seconds since the epoch.
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
    status: str
    #: why the client disputes the receipt; None unless ``status`` is ``"disputed"``
    dispute_reason: str | None = None
    #: whose request it was (a client row only); None: the client's own
    account: str | None = None
    #: the executor's backend that answered (an executor row only; its operator-visible
    #: name, never an endpoint), and what its provider charged for it, micro-credits
    #: (None: a backend without a price)
    backend: str | None = None
    provider_cost: int | None = None


class LedgerTotals(msgspec.Struct, frozen=True):
    """Sums over the receipts in a ledger (or those of one status); ``cost`` in micro-credits."""

    receipts: int
    input_tokens: int
    output_tokens: int
    cost: int


class Margin(msgspec.Struct, frozen=True, kw_only=True):
    """An executor's receipts of one model answered by one backend: what clients were
    billed (``earned``) and what the provider charged (``paid``), micro-credits."""

    model: str
    #: None: receipts booked before the ledger knew backends, or by the embedded path
    backend: str | None
    receipts: int
    input_tokens: int
    output_tokens: int
    earned: int
    paid: int

    @property
    def margin(self) -> int:
        return self.earned - self.paid


_COLUMNS = LedgerEntry.__struct_fields__
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM receipts"
_PLACEHOLDERS = ", ".join("?" * len(_COLUMNS))
_INSERT = f"INSERT OR IGNORE INTO receipts ({', '.join(_COLUMNS)}) VALUES ({_PLACEHOLDERS})"
_ACK = ("UPDATE receipts SET ack_payload = ?, ack_signer = ?, ack_sig = ?, "
        "status = CASE role WHEN 'executor' THEN 'acknowledged' ELSE status END "
        "WHERE receipt_digest = ? AND status != 'disputed'")  # fmt: skip
_SUMS = "COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost), 0)"
_ack_decoder = msgspec.msgpack.Decoder(ReceiptAck)
_receipt_decoder = msgspec.msgpack.Decoder(Receipt)


def _decode(decoder: msgspec.msgpack.Decoder[Any], payload: bytes) -> Any:
    try:  # a caller passing an envelope of the wrong kind is misuse, not a ledger failure
        return decoder.decode(payload)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"the envelope does not carry what was expected: {exc}") from None


def check_account(account: str) -> str:
    """``account`` if it is a valid account name: 1 to :data:`ACCOUNT_MAX_CHARS` of
    ``A-Z a-z 0-9 . _ -``, so a valid one is safe to put in logs and error messages as
    it is.

    Raises:
        InvalidRequest: (a ``ValueError``, ``field="account"``) anything else; the
            message never repeats a bad name (it might be a key pasted by mistake).
    """
    if not isinstance(account, str):
        raise InvalidRequest(f"an account name is a string, not {type(account).__name__}", field="account")
    if _ACCOUNT.fullmatch(account) is None:
        raise InvalidRequest(
            f"an account name is 1 to {ACCOUNT_MAX_CHARS} of the characters A-Z a-z 0-9 . _ -; "
            f"this one has {len(account)} character(s)",
            field="account",
        )
    return account


def _filter(
    status: str | None, account: str | None = None, since: float | None = None
) -> tuple[str, tuple[object, ...]]:
    """The WHERE clause (with its leading space, or empty) and its parameters."""
    terms: list[str] = []
    params: list[object] = []
    if status is not None:
        if status not in _ALL_STATUSES:
            raise ValueError(f"status must be one of {_ALL_STATUSES}, not {status!r}")
        terms.append("status = ?")
        params.append(status)
    if account is not None:
        terms.append("account = ?")
        params.append(check_account(account))
    if since is not None:
        terms.append("recorded_at >= ?")
        params.append(since)
    return (" WHERE " + " AND ".join(terms) if terms else ""), tuple(params)


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
        if _schema_version(conn, path) < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")  # another process may be migrating: read again, locked
            try:
                version = _schema_version(conn, path)
                for statement in _MIGRATIONS.get(version, ()):  # nothing left if another process migrated
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    except BaseException:
        conn.close()
        raise
    return conn


def _schema_version(conn: sqlite3.Connection, path: Path) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise LedgerError(f"ledger {str(path)!r} has schema version {version}, newer "
                          f"than this loomnet's {SCHEMA_VERSION}")  # fmt: skip
    return version


class Ledger:
    """A node's ledger of signed receipts, in one SQLite file; see :meth:`open`.

    Resource handling: one SQLite connection, held until :meth:`aclose`.
    Error handling: SQLite and file system failures raise ``LedgerError``, chained to the
    original; misuse (bad ``role``, an envelope not matching its message) ``ValueError``.
    Cancellation: reads are cancellable; writes are shielded, so once called they finish
    (bounded by SQLite's 5 s busy timeout, for the commit in flight and then their own).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:  # use open()
        self._conn: sqlite3.Connection | None = conn
        self._limiter = trio.CapacityLimiter(1)
        self.path = path  #: where the database lives
        self._writes = GroupCommit(lambda: self._conn, self._limiter)

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

    async def _write(self, action: str, apply: Callable[[sqlite3.Connection], Any]) -> Any:
        """``apply(conn)`` group-committed (``_ledger_writes``); what it returned, once
        committed. Shielded.

        Raises:
            LedgerError: ``apply`` or the commit failed (the write is not on disk).
        """
        return await self._writes.write(action, apply)

    def statistics(self) -> LedgerStatistics:
        """Counts of writes, batches and commits since the ledger opened."""
        return self._writes.statistics()

    async def record_receipt(
        self,
        envelope: Envelope,
        receipt: Receipt,
        *,
        role: str,
        executor: str,
        now: float,
        dispute: str | None = None,
        ack: Envelope | None = None,
        account: str | None = None,
        backend: str | None = None,
        provider_cost: int | None = None,
    ) -> bytes:
        """Durably store a signed receipt; returns its digest (sha256 of the payload).

        Stores ``envelope.payload`` exactly as given (``receipt`` is that payload,
        decoded); recording it again keeps the first row. ``role`` is the writing side,
        ``"executor"`` or ``"client"``; ``now`` (seconds) is stored as ``recorded_at``.
        The row's status starts as ``unacknowledged`` on the executor (see
        :meth:`record_ack`) and ``accepted`` on the client, or ``disputed`` when the
        client gives ``dispute``, why it does not accept the receipt. A client that
        accepts gives its counter-signature as ``ack`` (a receipt ack for this receipt),
        booked with the receipt in the same transaction, as :meth:`record_ack` would
        book it after: one commit and one thread hop instead of two. Returns only once
        the commit is on disk. ``account`` (client rows only; see :func:`check_account`)
        books it as that account's spending; None: the client's own.

        Raises:
            LedgerError: the write failed (with ``ack``: neither is booked), or ``ack``
                was given for a receipt already booked as disputed.
            ValueError: a bad ``role``, a ``dispute`` from the executor or an empty one,
                ``receipt`` is not what ``envelope`` carries, or an ``ack`` with a
                dispute, from the executor, or for another receipt.
            InvalidRequest: (a ``ValueError``) a bad account name, or one from the executor.
        """
        if role not in _ROLES:
            raise ValueError(f"role must be one of {_ROLES}, not {role!r}")
        if account is not None:
            check_account(account)
            if role != "client":
                raise InvalidRequest("only the client books a receipt under an account", field="account")
        if (backend is not None or provider_cost is not None) and role != "executor":
            raise ValueError("only the executor books which backend answered and what it cost")
        if provider_cost is not None and provider_cost < 0:
            raise ValueError("a provider cost cannot be negative")
        if dispute is not None and (role != "client" or not dispute):
            raise ValueError("only the client disputes a receipt, and it must say why")
        if _decode(_receipt_decoder, envelope.payload) != receipt:
            raise ValueError("the receipt passed does not match the envelope's payload")
        key = digest(envelope.payload)
        if ack is not None:
            if role != "client" or dispute is not None:
                raise ValueError("only a client counter-signs, and never what it disputes")
            if _decode(_ack_decoder, ack.payload).receipt_digest != key:
                raise ValueError("the ack is for another receipt")
        status = "unacknowledged" if role == "executor" else "accepted" if dispute is None else "disputed"
        r = receipt
        signed = (None, None, None) if ack is None else (ack.payload, ack.signer, ack.sig)
        values = (key, envelope.payload, envelope.signer, envelope.sig, role, executor,
                  r.client, r.model, r.input_tokens, r.output_tokens, r.cost,
                  r.count_source, r.issued_at, now, *signed, status, dispute, account,
                  None if backend is None else backend[:128], provider_cost)  # fmt: skip

        def apply(conn: sqlite3.Connection) -> int:
            """1 when the row (with any ack) is booked; 0 for an ack the row refused."""
            if conn.execute(_INSERT, values).rowcount or ack is None:
                return 1
            return conn.execute(_ACK, (*signed, key)).rowcount  # booked before: attach the ack

        booked = await self._write("record a receipt", apply)
        if not booked:
            raise LedgerError(f"ledger: no undisputed receipt {key.hex()} to acknowledge")
        return key

    async def record_ack(self, receipt_digest: bytes, ack: Envelope) -> None:
        """Attach the client's counter-signature to a recorded receipt, durably; an
        executor's row becomes ``acknowledged``.

        Raises:
            LedgerError: there is no receipt with that digest, or only a disputed one
                (a client never counter-signs what it disputes), or the write failed.
            ValueError: ``ack`` does not carry a receipt ack for ``receipt_digest``.
        """
        if _decode(_ack_decoder, ack.payload).receipt_digest != receipt_digest:
            raise ValueError("the ack is for another receipt")
        params = (ack.payload, ack.signer, ack.sig, receipt_digest)
        updated = await self._write("record an ack", lambda conn: conn.execute(_ACK, params).rowcount)
        if updated == 0:
            raise LedgerError(f"ledger: no undisputed receipt {receipt_digest.hex()} to acknowledge")

    async def get(self, receipt_digest: bytes) -> LedgerEntry | None:
        """The entry for ``receipt_digest``, or None if there is none."""
        sql = f"{_SELECT} WHERE receipt_digest = ?"
        _, rows = await self._query("read a receipt", sql, (receipt_digest,))
        return LedgerEntry(**dict(zip(_COLUMNS, rows[0]))) if rows else None

    async def entries(
        self, *, limit: int = 100, status: str | None = None, account: str | None = None
    ) -> list[LedgerEntry]:
        """Up to ``limit`` entries, the most recently recorded first; only those with
        ``status`` when given (one of :data:`STATUSES`, else ``ValueError``), only those
        booked under ``account`` when given (None: every row, whoever's).

        Raises:
            ValueError: a negative limit, an unknown status; ``InvalidRequest`` (a
                ``ValueError``) for a bad account name.
        """
        if limit < 0:
            raise ValueError("limit cannot be negative")
        where, params = _filter(status, account)
        sql = f"{_SELECT}{where} ORDER BY recorded_at DESC, rowid DESC LIMIT ?"
        _, rows = await self._query("list receipts", sql, (*params, limit))
        return [LedgerEntry(**dict(zip(_COLUMNS, row))) for row in rows]

    async def totals(
        self, *, status: str | None = None, since: float | None = None, account: str | None = None
    ) -> LedgerTotals:
        """Counts and sums over every receipt in the ledger, or over those with
        ``status`` (say ``"accepted"``: what a client agreed to pay), with ``since``
        (seconds since the epoch) over those recorded at or after it (a client's
        spending this period: see ``_budget``), and with ``account`` over those booked
        under it (None: every row, the client's own and every account's).

        Raises:
            ValueError: an unknown status; ``InvalidRequest`` (a ``ValueError``) for a
                bad account name.
        """
        where, params = _filter(status, account, since)
        _, rows = await self._query("sum receipts", f"SELECT {_SUMS} FROM receipts{where}", params)
        return LedgerTotals(*rows[0])

    async def record_provider_charge(self, *, backend: str, model: str, input_tokens: int, output_tokens: int,
                                     cost: int, now: float) -> None:  # fmt: skip
        """Durably book what a backend's provider charged for work no receipt bills (a
        client that left before the first content). Counted in :meth:`margins` as paid.

        Raises:
            LedgerError: the write failed.
            ValueError: a negative count or cost.
        """
        if min(input_tokens, output_tokens, cost) < 0:
            raise ValueError("provider charges cannot be negative")
        values = (backend[:128], model, input_tokens, output_tokens, cost, now)
        sql = ("INSERT INTO provider_charges (backend, model, input_tokens, output_tokens, cost, recorded_at) "
               "VALUES (?, ?, ?, ?, ?, ?)")  # fmt: skip
        await self._write("record a provider charge", lambda conn: conn.execute(sql, values).rowcount)

    async def margins(self, *, since: float | None = None, until: float | None = None) -> list[Margin]:
        """The executor's side: per model and backend, what clients were billed and what
        the backends' providers charged (with their receipts, and for work no receipt
        bills: :meth:`record_provider_charge`), over what was recorded from ``since`` to
        ``until`` (seconds since the epoch; None: unbounded), the operator's margin."""
        terms, params = [], []
        if since is not None:
            terms.append("recorded_at >= ?")
            params.append(since)
        if until is not None:
            terms.append("recorded_at < ?")
            params.append(until)
        where = " AND ".join(["role = 'executor'", *terms])
        sql = (f"SELECT model, backend, {_SUMS}, COALESCE(SUM(provider_cost), 0) FROM receipts "
               f"WHERE {where} GROUP BY model, backend")  # fmt: skip
        _, rows = await self._query("sum margins", sql, tuple(params))
        found = {(r[0], r[1]): list(r[2:]) for r in rows}
        sql = (f"SELECT model, backend, COALESCE(SUM(cost), 0) FROM provider_charges "
               f"{'WHERE ' + ' AND '.join(terms) if terms else ''} GROUP BY model, backend")  # fmt: skip
        _, rows = await self._query("sum provider charges", sql, tuple(params))
        for model, backend, cost in rows:
            found.setdefault((model, backend), [0, 0, 0, 0, 0])[4] += cost
        return [Margin(model=model, backend=backend, receipts=r[0], input_tokens=r[1], output_tokens=r[2],
                       earned=r[3], paid=r[4])
                for (model, backend), r in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))]  # fmt: skip

    async def totals_by_status(self) -> dict[str, LedgerTotals]:
        """Counts and sums per status, for the statuses that have receipts."""
        sql = f"SELECT status, {_SUMS} FROM receipts GROUP BY status ORDER BY status"
        _, rows = await self._query("sum receipts", sql)
        return {row[0]: LedgerTotals(*row[1:]) for row in rows}

    async def aclose(self) -> None:
        """Close the database; idempotent. Waits for a call in flight, and for every
        write already queued, to finish."""

        def close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        with trio.CancelScope(shield=True), _map_sqlite_errors("close"):
            await self._writes.wait_idle()
            await trio.to_thread.run_sync(close, limiter=self._limiter)

    # ------------------------------------------------------------------------------------
    # Queries for ``loomnet ledger`` list, totals and export (node/_cli_ledger*.py; docs/ledger.md).
    # Add further read-only queries here; the structs they return follow the class.
    # Every window is over ``recorded_at`` (this side's clock, seconds since the epoch):
    # ``since`` inclusive, ``until`` exclusive, None unbounded. SQL is parameterised; the
    # only text put into a statement comes from the fixed ``_GROUPS`` table.
    # ------------------------------------------------------------------------------------

    async def totals_by(
        self,
        group: Grouping,
        *,
        since: float | None = None,
        until: float | None = None,
        status: str | None = None,
        account: str | None = None,
    ) -> list[GroupTotals]:
        """Counts and sums (tokens; ``cost`` in micro-credits) per ``group``, ordered by
        its key: ``"day"`` the UTC date a row was recorded (``YYYY-MM-DD``), ``"model"``,
        ``"peer"`` the other side's peer id (the client on an executor's row, the executor
        on a client's), ``"account"`` (None: the client's own requests; every executor row).
        Only rows in the window, with ``status`` and under ``account`` when given.

        Raises:
            ValueError: an unknown group or status, ``since`` after ``until``;
                ``InvalidRequest`` (a ``ValueError``) for a bad account name.
        """
        if group not in _GROUPS:
            raise ValueError(f"group must be one of {GROUPINGS}, not {group!r}")
        where, params = _window(status, account, since, until)
        sql = f"SELECT {_GROUPS[group]} AS key, {_SUMS} FROM receipts{where} GROUP BY key ORDER BY key"
        _, rows = await self._query("sum receipts", sql, params)
        return [GroupTotals(*row) for row in rows]

    async def page(
        self,
        *,
        after: LedgerCursor | None = None,
        limit: int = 500,
        newest_first: bool = False,
        since: float | None = None,
        until: float | None = None,
        status: str | None = None,
        account: str | None = None,
    ) -> LedgerPage:
        """Up to ``limit`` entries in the order they were recorded (``newest_first``: the
        reverse), starting after ``after`` (the previous page's ``next``; None: from the
        start), filtered as :meth:`totals_by`. Pages are keyed on (``recorded_at``,
        rowid), never on offsets, so each costs the same however deep it is, and rows
        booked meanwhile are neither skipped nor repeated (in recording order they come
        last). ``next`` is None when no row follows this page.

        Raises:
            ValueError: ``limit`` below 1, an unknown status, ``since`` after ``until``;
                ``InvalidRequest`` (a ``ValueError``) for a bad account name.
        """
        if limit < 1:
            raise ValueError("a page holds at least one entry")
        where, params = _window(status, account, since, until)
        order, beyond = ("DESC", "<") if newest_first else ("ASC", ">")
        if after is not None:
            cursor = f"(recorded_at {beyond} ? OR (recorded_at = ? AND rowid {beyond} ?))"
            where = f"{where} AND {cursor}" if where else f" WHERE {cursor}"
            params = (*params, after.recorded_at, after.recorded_at, after.rowid)
        sql = (f"SELECT rowid, {', '.join(_COLUMNS)} FROM receipts{where} "
               f"ORDER BY recorded_at {order}, rowid {order} LIMIT ?")  # fmt: skip
        _, rows = await self._query("list receipts", sql, (*params, limit + 1))
        entries = [LedgerEntry(**dict(zip(_COLUMNS, row[1:]))) for row in rows[:limit]]
        last = rows[limit - 1] if len(rows) > limit else None
        return LedgerPage(entries, None if last is None else LedgerCursor(entries[-1].recorded_at, last[0]))


#: How :meth:`Ledger.totals_by` groups; each maps to a fixed SQL expression, never to input.
Grouping = Literal["day", "model", "peer", "account"]
_GROUPS: dict[str, str] = {
    "day": "strftime('%Y-%m-%d', recorded_at, 'unixepoch')",
    "model": "model",
    "peer": "CASE role WHEN 'executor' THEN client ELSE executor END",
    "account": "account",
}
GROUPINGS: tuple[str, ...] = tuple(_GROUPS)


class GroupTotals(msgspec.Struct, frozen=True):
    """Sums over the receipts of one group (:meth:`Ledger.totals_by`); ``cost`` in micro-credits."""

    #: the day, model, peer id or account; None: no account (the client's own, or an executor row)
    key: str | None
    receipts: int
    input_tokens: int
    output_tokens: int
    cost: int


class LedgerCursor(msgspec.Struct, frozen=True):
    """Where a :class:`LedgerPage` ended: its last row's ``recorded_at`` and SQLite rowid."""

    recorded_at: float
    rowid: int


class LedgerPage(msgspec.Struct, frozen=True):
    """One page of :meth:`Ledger.page`; pass ``next`` as ``after`` for the following one."""

    entries: list[LedgerEntry]
    #: None: this was the last page
    next: LedgerCursor | None


def _window(
    status: str | None, account: str | None, since: float | None, until: float | None
) -> tuple[str, tuple[object, ...]]:
    """:func:`_filter`'s WHERE clause and parameters, with ``recorded_at < until`` added."""
    if since is not None and until is not None and since > until:
        raise ValueError(f"the window starts ({since}) after it ends ({until})")
    where, params = _filter(status, account, since)
    if until is None:
        return where, params
    return (f"{where} AND recorded_at < ?" if where else " WHERE recorded_at < ?"), (*params, until)


# ---------------------------------------------------- end of the queries for ``loomnet ledger``
