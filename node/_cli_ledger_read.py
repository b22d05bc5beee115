"""``loomnet ledger list|totals|export``: the receipts in either side's ledger (docs/ledger.md).

``list`` prints the most recently recorded receipts; ``totals`` sums receipts, tokens
and cost per UTC day, model, peer or account; ``export --csv`` writes one row per
receipt (columns: ``_cli_ledger_kit.CSV_COLUMNS``), oldest first, page by page, so a
large ledger is streamed, never loaded whole. Each reads the file next to a running node
(SQLite's WAL lets both read) and writes nothing to it. Which file, and what dates mean:
``_cli_ledger_kit``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import click
import trio

from loomnet.client._ledger import GROUPINGS, STATUSES, Ledger

from ._cli_ledger_kit import (
    CSV_COLUMNS, SIDES, When, check_filters, credits, csv_row, iso_utc, json_row, ledger_errors, resolve, short_peer,
)  # fmt: skip

__all__ = ["export", "list_receipts", "totals"]

#: rows an export reads and writes at a time
_PAGE = 500
_ALL_STATUSES = tuple(s for statuses in STATUSES.values() for s in statuses)


def _reading(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every reading command takes: which ledger, and which of its rows."""
    options = [
        click.option("--side", type=click.Choice(SIDES),
                     help="Which ledger: the executor's or the client's [default: the executor's if there is one]."),
        click.option("--data-dir", type=click.Path(file_okay=False),
                     help="The data folder [default: $LOOMNET_DATA_DIR, else ~/.local/share/loomnet]."),
        click.option("--status", type=click.Choice(_ALL_STATUSES), help="Only receipts with this status."),
        click.option("--account", help="Only receipts booked under this account (a client's ledger)."),
        click.option("--since", type=When(), help="Recorded at or after this UTC date or ISO-8601 time."),
        click.option("--until", type=When(end_of_day=True),
                     help="Recorded before this ISO-8601 time, or by the end of this UTC date."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _open(
    data_dir: str | None, side: str | None, status: str | None, account: str | None, since: float | None,
    until: float | None,
) -> tuple[str, Path, dict[str, Any]]:
    """(side, ledger file, the ``Ledger`` query filters) for the options given.

    Raises:
        click.ClickException: no such ledger (exit 1).
        click.UsageError: filters this ledger cannot answer (exit 2).
    """
    side, path = resolve(data_dir, side)
    check_filters(side, status, account)
    if since is not None and until is not None and since > until:
        raise click.UsageError("--since is after --until")
    return side, path, {"status": status, "account": account, "since": since, "until": until}


@click.command("list")
@_reading
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per receipt (the export's columns).")
def list_receipts(side, data_dir, status, account, since, until, limit: int, as_json: bool) -> None:
    """The most recently recorded receipts first."""
    side, path, filters = _open(data_dir, side, status, account, since, until)

    async def read():
        async with await Ledger.open(path) as ledger:
            return await ledger.page(limit=limit, newest_first=True, **filters)

    with ledger_errors():
        page = trio.run(read)
    if as_json:
        for entry in page.entries:
            click.echo(json.dumps(json_row(entry)))
        return
    click.echo(f"{'recorded (UTC)':<19}  {'status':<14} {'model':<24} {'peer':<15}  {'account':<12} "
               f"{'in':>7} {'out':>7} {'credits':>14}  receipt")  # fmt: skip
    for e in page.entries:
        peer = e.client if e.role == "executor" else e.executor
        click.echo(f"{iso_utc(e.recorded_at)[:19].replace('T', ' '):<19}  {e.status:<14} {e.model[:24]:<24} "
                   f"{short_peer(peer):<15}  {(e.account or '-')[:12]:<12} {e.input_tokens:>7} {e.output_tokens:>7} "
                   f"{credits(e.cost):>14}  {e.receipt_digest.hex()[:16]}")  # fmt: skip
    more = "; more with a higher --limit" if page.next is not None else ""
    click.echo(f"{len(page.entries)} receipt(s), newest first{more}; the {side} ledger {path}")


@click.command()
@_reading
@click.option("--by", "group", type=click.Choice(GROUPINGS), default="day", show_default=True,
              help="Sum per UTC day (recorded), model, peer (the other side) or account.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object per group.")
def totals(side, data_dir, status, account, since, until, group: str, as_json: bool) -> None:
    """Receipts, tokens and cost (credits) per day, model, peer or account."""
    side, path, filters = _open(data_dir, side, status, account, since, until)

    async def read():
        async with await Ledger.open(path) as ledger:
            return await ledger.totals_by(group, **filters)  # type: ignore[arg-type]

    with ledger_errors():
        rows = trio.run(read)
    if as_json:
        for t in rows:
            click.echo(json.dumps({group: t.key, "receipts": t.receipts, "input_tokens": t.input_tokens,
                                   "output_tokens": t.output_tokens, "cost_micro": t.cost,
                                   "cost_credits": t.cost / 1_000_000}))  # fmt: skip
        return
    nobody = "(own)" if side == "client" else "-"  # an account group's NULL: the client's own requests
    keys = [nobody if t.key is None else t.key for t in rows]
    width = max([len(group), len("total"), *map(len, keys)])
    click.echo(f"{group:<{width}} {'receipts':>9} {'input':>12} {'output':>12} {'credits':>16}")
    for key, t in zip(keys, rows):
        click.echo(f"{key:<{width}} {t.receipts:>9} {t.input_tokens:>12} {t.output_tokens:>12} {credits(t.cost):>16}")
    click.echo(f"{'total':<{width}} {sum(t.receipts for t in rows):>9} {sum(t.input_tokens for t in rows):>12} "
               f"{sum(t.output_tokens for t in rows):>12} {credits(sum(t.cost for t in rows)):>16}")  # fmt: skip
    click.echo(f"{status or 'every status'}; the {side} ledger {path}")


@click.command()
@_reading
@click.option("--csv", "target", required=True, metavar="FILE|-", help="Write CSV to FILE, or to stdout with -.")
def export(side, data_dir, status, account, since, until, target: str) -> None:
    """Every receipt as one CSV row (columns: docs/ledger.md), oldest first.

    A FILE is written next to itself and renamed into place once complete, so it is
    never seen half-written.
    """
    side, path, filters = _open(data_dir, side, status, account, since, until)
    if target == "-":
        with ledger_errors():
            trio.run(_export, path, sys.stdout, filters)
        return
    final = Path(target).expanduser()
    partial = final.with_name(f".{final.name}.partial")
    try:
        with open(partial, "w", newline="", encoding="utf-8") as out, ledger_errors():
            count = trio.run(_export, path, out, filters)
        os.replace(partial, final)
    except OSError as exc:
        raise click.ClickException(f"could not write {final}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    click.echo(f"{count} receipt(s) from the {side} ledger {path} to {final}", err=True)


async def _export(path: Path, out: TextIO, filters: dict[str, Any]) -> int:
    """Write the header and every receipt ``filters`` select to ``out``, a page at a time
    (the writes in a worker thread); returns how many rows.

    Raises:
        LedgerError: the ledger could not be opened or read.
        OSError: ``out`` could not be written.
    """
    writer = csv.writer(out)  # the excel dialect: RFC 4180 quoting, CRLF line ends
    await trio.to_thread.run_sync(writer.writerow, CSV_COLUMNS)
    count, after = 0, None
    async with await Ledger.open(path) as ledger:
        while True:
            page = await ledger.page(after=after, limit=_PAGE, **filters)
            rows = [csv_row(entry) for entry in page.entries]
            await trio.to_thread.run_sync(writer.writerows, rows)
            count += len(rows)
            if page.next is None:
                break
            after = page.next
    await trio.to_thread.run_sync(out.flush)
    return count
