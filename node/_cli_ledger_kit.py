"""What ``loomnet ledger list|totals|export`` share: which ledger file, dates, and a
receipt as one row of stable columns (docs/ledger.md).

**Which ledger.** ``--side executor`` reads ``<data-dir>/executor/ledger.sqlite`` (what
the executor signed), ``--side client`` ``<data-dir>/client/ledger.sqlite`` (what this
machine's client received). Without ``--side``: the executor's when it exists, else the
client's. A machine that runs an executor is its operator's, whose ledger is the
executor's even if they once ran ``loomnet chat`` there; a machine that only runs
clients has no executor ledger. Every command's text output names the file it read.

**Dates.** ``--since`` and ``--until`` take a UTC date (``2024-05-01``) or an ISO-8601
time (``2024-05-01T12:00:00Z``; one without a zone is UTC) and bound ``recorded_at``:
``--since`` inclusive, ``--until`` exclusive, except that a bare date given to
``--until`` means the end of that day, so ``--since 2024-05-01 --until 2024-05-01`` is
that whole day.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import msgspec

from loomnet.client import check_account, default_data_dir
from loomnet.client._ledger import STATUSES, LedgerEntry
from loomnet.protocol import LedgerError, Receipt

__all__ = ["CSV_COLUMNS", "SIDES", "When", "check_filters", "credits", "csv_row", "iso_utc", "json_row",
           "ledger_errors", "resolve", "short_peer"]  # fmt: skip

SIDES = ("executor", "client")
_MICRO = 1_000_000
_receipt_decoder = msgspec.msgpack.Decoder(Receipt)

#: The export's columns, in order; a stable interface (docs/ledger.md): columns are only
#: ever appended, never renamed, removed or reordered.
CSV_COLUMNS = (
    "receipt_digest",  # hex sha256 of the signed receipt payload: the key both ledgers share
    "role",  # which side wrote the row: executor or client
    "executor",  # the executor's peer id
    "client",  # the client's peer id
    "model",
    "input_tokens",
    "output_tokens",
    "cost_micro",  # what the receipt bills, integer micro-credits
    "cost_credits",  # the same, in credits, exact (6 decimals)
    "count_source",  # who counted the tokens: backend, tokenizer, tiktoken, estimate, ...
    "finish_reason",  # stop, length, error, client_gone, ...
    "issued_at",  # when the executor signed it (its clock), ISO-8601 UTC
    "recorded_at",  # when this side booked it (its clock), ISO-8601 UTC
    "status",  # acknowledged | unacknowledged (executor), accepted | disputed (client)
    "dispute_reason",  # why the client disputes it; empty otherwise
    "account",  # a client row's account; empty: the client's own, and every executor row
    "backend",  # an executor row's backend that answered; empty otherwise
    "provider_cost_micro",  # what that backend's provider charged, micro-credits; empty: unpriced
)


def resolve(data_dir: str | None, side: str | None) -> tuple[str, Path]:
    """The side and the ledger file the options name (module doc).

    Raises:
        click.ClickException: (exit 1) no such ledger; the message names where it looked.
    """
    home = Path(data_dir).expanduser() if data_dir else default_data_dir()
    paths = {s: home / s / "ledger.sqlite" for s in SIDES}
    hint = "give --data-dir, or set LOOMNET_DATA_DIR"
    if side is None:
        side = next((s for s in SIDES if paths[s].is_file()), None)
        if side is None:
            raise click.ClickException(f"no ledger at {paths['executor']} or {paths['client']} ({hint})")
    if not paths[side].is_file():
        raise click.ClickException(f"no {side} ledger at {paths[side]} ({hint}, or --side)")
    return side, paths[side]


def check_filters(side: str, status: str | None, account: str | None) -> None:
    """Refuse a ``--status`` or ``--account`` the side's ledger cannot hold.

    Raises:
        click.BadParameter: (exit 2) a status of the other side, an account on the
            executor's side, a bad account name (never repeated: it may be a pasted key).
    """
    if status is not None and status not in STATUSES[side]:
        raise click.BadParameter(f"{status!r} is not a {side}'s status ({', '.join(STATUSES[side])})",
                                 param_hint="--status")  # fmt: skip
    if account is not None:
        if side != "client":
            raise click.BadParameter("accounts are a client's: the executor's ledger has none", param_hint="--account")
        try:
            check_account(account)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--account") from None


@contextlib.contextmanager
def ledger_errors() -> Iterator[None]:
    """Turn a ``LedgerError`` (not a ledger, a newer schema, a failed read) into a one-line
    ``click.ClickException`` (exit 1)."""
    try:
        yield
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from None


class When(click.ParamType):
    """A UTC date or ISO-8601 time, as seconds since the epoch (module doc)."""

    name = "DATE"

    def __init__(self, *, end_of_day: bool = False) -> None:
        self.end_of_day = end_of_day  #: a bare date means the next midnight (for --until)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            if len(text) == 10:  # YYYY-MM-DD
                day = dt.date.fromisoformat(text) + dt.timedelta(days=1 if self.end_of_day else 0)
                return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{text!r} is not a date (YYYY-MM-DD) or an ISO-8601 time", param, ctx)
        return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def credits(micro: int) -> str:
    """Micro-credits as an exact decimal number of credits (``1500`` -> ``0.001500``)."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), _MICRO)
    return f"{sign}{whole}.{fraction:06d}"


def iso_utc(seconds: float) -> str:
    """Seconds since the epoch as ISO-8601 UTC, to the microsecond (``...T12:00:00.000000Z``)."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def short_peer(peer_id: str) -> str:
    """A peer id shortened for a table (``12D3KooW…x7Yq``); exports keep it whole."""
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


def json_row(entry: LedgerEntry) -> dict[str, Any]:
    """One receipt under :data:`CSV_COLUMNS`, typed: counts and micro-credits as integers,
    ``cost_credits`` a number, a missing value None."""
    receipt = _receipt_decoder.decode(entry.receipt_payload)
    return {
        "receipt_digest": entry.receipt_digest.hex(), "role": entry.role, "executor": entry.executor,
        "client": entry.client, "model": entry.model, "input_tokens": entry.input_tokens,
        "output_tokens": entry.output_tokens, "cost_micro": entry.cost, "cost_credits": entry.cost / _MICRO,
        "count_source": entry.count_source, "finish_reason": receipt.finish_reason,
        "issued_at": iso_utc(entry.issued_at), "recorded_at": iso_utc(entry.recorded_at), "status": entry.status,
        "dispute_reason": entry.dispute_reason, "account": entry.account, "backend": entry.backend,
        "provider_cost_micro": entry.provider_cost,
    }  # fmt: skip


def csv_row(entry: LedgerEntry) -> list[str]:
    """One receipt as the export's cells, in :data:`CSV_COLUMNS` order: credits exact, a
    missing value empty."""
    row = json_row(entry)
    row["cost_credits"] = credits(entry.cost)
    return ["" if row[c] is None else str(row[c]) for c in CSV_COLUMNS]
