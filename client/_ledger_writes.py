"""Group commit for the ledger: writes made at the same time share one transaction.

Theory of operation
-------------------
A write is a function ``apply(conn)`` that runs inside a transaction in a worker thread.
It joins a queue; the first writer to find no batch in flight *leads*: in one
worker-thread call (through the ledger's ``CapacityLimiter(1)``, so reads never overlap
it) it opens one transaction, runs every write queued so far, each inside its own
savepoint when there are several (so one failing write is rolled back alone), and
commits them with one fsync. Then it wakes each of their callers and hands the lead to
the first write that queued meanwhile, whose caller runs the next batch; with none
queued the committer goes idle.

So each caller returns only once the transaction holding *its* write is committed (the
same promise as one transaction per write), a caller waits for at most the batch in
flight plus its own, and under concurrency the fsyncs are shared: N bookings at once
cost 2 commits (the first alone, then the N - 1 that queued while it ran), not N.
Every write is shielded from cancellation: once asked for, it finishes.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from loomnet.protocol import LedgerError

__all__ = ["GroupCommit", "LedgerStatistics"]


class LedgerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a ledger's writes since it opened (trio's ``statistics()`` convention).

    ``commits`` below ``writes`` is group commit at work: ``writes - commits`` fsyncs saved.
    """

    #: writes asked for (a receipt, an ack, or a receipt with its ack), failed ones included
    writes: int
    #: worker-thread calls that ran writes: one transaction each
    batches: int
    #: transactions committed (a batch whose commit failed is not one)
    commits: int
    #: the most writes one transaction held
    largest_batch: int
    #: writes that raised (``LedgerError``)
    failed: int
    #: writes waiting for their commit right now
    pending: int


class _Write:
    """One queued write: ``apply(conn)`` runs inside the batch's transaction, in a worker
    thread; its return value (or its error) goes back to the caller."""

    __slots__ = ("apply", "done", "result", "error", "finished")

    def __init__(self, apply: Callable[[sqlite3.Connection], Any]) -> None:
        self.apply = apply
        #: set when the write is committed or failed, or when its caller must lead the next batch
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False


class GroupCommit:
    """The write side of one SQLite connection (see the module doc).

    Args:
        connection: returns the connection, or None once it is closed (read in the
            worker thread, so a close that ran meanwhile is seen).
        limiter: the connection's ``CapacityLimiter(1)``, shared with its reads.
    """

    def __init__(self, connection: Callable[[], sqlite3.Connection | None], limiter: trio.CapacityLimiter) -> None:
        self._connection = connection
        self._limiter = limiter
        self._queue: list[_Write] = []  # writes waiting for the next batch
        self._committing = False  # a batch is in flight, or its successor's leader is waking
        self._idle = trio.Event()  # set whenever no batch is in flight
        self._idle.set()
        self._writes = self._batches = self._commits = self._largest = self._failed = 0

    async def write(self, action: str, apply: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``apply(conn)`` in a transaction, group-committed; returns what it returned
        once that transaction is committed.

        Raises:
            LedgerError: ``apply`` or the commit failed with an SQLite or OS error (the
                write is not on disk), or the connection is closed; other errors of
                ``apply`` (a bug) as they are.

        Cancellation: shielded; once called, the write finishes (bounded by SQLite's
        busy timeout, for the batch in flight and then its own).
        """
        write = _Write(apply)
        self._queue.append(write)
        self._writes += 1
        with trio.CancelScope(shield=True):
            if self._committing:
                await write.done.wait()  # committed by another's batch, or our turn to lead
            if not write.finished:
                await self._lead()
        error = write.error
        if error is None:
            return write.result
        self._failed += 1
        if isinstance(error, (sqlite3.Error, OSError)):  # a fresh error per caller: a batch's may be shared
            raise LedgerError(f"ledger: could not {action}: {error}") from error
        raise error

    async def wait_idle(self) -> None:
        """Return once no batch is in flight and none is queued (before a close)."""
        while self._committing:
            await self._idle.wait()

    def statistics(self) -> LedgerStatistics:
        """Counts of writes, batches and commits so far."""
        return LedgerStatistics(
            writes=self._writes, batches=self._batches, commits=self._commits, largest_batch=self._largest,
            failed=self._failed, pending=len(self._queue),
        )  # fmt: skip

    async def _lead(self) -> None:
        """Commit every queued write in one worker-thread call, wake their callers, and
        hand the lead to the first write queued meanwhile (or go idle)."""
        self._committing = True
        if self._idle.is_set():  # kept across hand-overs: wait_idle may be waiting on it
            self._idle = trio.Event()
        batch, self._queue = self._queue, []
        committed = False
        try:
            committed = await trio.to_thread.run_sync(self._commit, batch, limiter=self._limiter)
        except BaseException as exc:  # pragma: no cover - _commit catches what SQLite raises
            for write in batch:
                write.error = write.error or exc
            raise
        finally:
            self._batches += 1
            if committed:
                self._commits += 1
                self._largest = max(self._largest, len(batch))
            for write in batch:
                write.finished = True
                write.done.set()
            if self._queue:
                self._queue[0].done.set()  # unfinished: it leads the next batch
            else:
                self._committing = False
                self._idle.set()

    def _commit(self, batch: list[_Write]) -> bool:
        """In a worker thread: ``batch`` in one transaction, each write in a savepoint when
        there are several. Sets each write's result or error; True if it committed."""
        conn = self._connection()
        try:
            if conn is None:
                raise sqlite3.ProgrammingError("the ledger is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                savepoints = len(batch) > 1
                for write in batch:
                    if not savepoints:
                        write.result = write.apply(conn)
                        continue
                    conn.execute("SAVEPOINT loomnet_write")
                    try:
                        write.result = write.apply(conn)
                    except Exception as exc:  # noqa: BLE001 - this write fails alone
                        conn.execute("ROLLBACK TO loomnet_write")
                        write.error = exc
                    conn.execute("RELEASE loomnet_write")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        except Exception as exc:  # noqa: BLE001 - every write of the batch failed with it
            for write in batch:
                write.result = None
                write.error = write.error or exc
            return False
        return True
