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

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import msgspec
import trio

from loomnet.protocol import Envelope, InvalidRequest, LedgerError, Receipt, ReceiptAck, digest

from ._ledger_rows import (
    _GROUPS,
    GROUPINGS,
    GroupTotals,
    Grouping,
    LedgerCursor,
    LedgerEntry,
    LedgerPage,
    LedgerTotals,
    Margin,
    _filter,
    _window,
    check_account,
)
from ._ledger_schema import (  # noqa: F401 - the schema's names, read by the tests through this module
    _ADD_PROVIDER,
    _MIGRATIONS,
    _ROLES,
    ACCOUNT_MAX_CHARS,
    SCHEMA_VERSION,
    STATUSES,
    _connect,
    _map_sqlite_errors,
)
from ._ledger_writes import GroupCommit, LedgerStatistics

__all__ = ["ACCOUNT_MAX_CHARS", "GROUPINGS", "GroupTotals", "Grouping", "Ledger", "LedgerCursor", "LedgerEntry",
           "LedgerPage", "LedgerStatistics", "LedgerTotals", "Margin", "STATUSES", "check_account"]

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
