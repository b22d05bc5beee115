"""The ledger's SQLite file: its schema, the migrations from every older version,
and opening it (``Ledger.open`` in ``_ledger``; the rows are described there).

``PRAGMA user_version`` holds :data:`SCHEMA_VERSION`; an older file is migrated on
open, in one transaction with the version bump, so a crash leaves it as it was; a newer
one is refused (``LedgerError``) rather than misread.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from loomnet.protocol import LedgerError

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
