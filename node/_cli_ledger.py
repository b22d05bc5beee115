"""``loomnet ledger``: what the ledger says, without a running node.

``list``, ``totals`` and ``export`` read either side's ledger (``_cli_ledger_read``;
docs/ledger.md). ``margins`` (the executor's side): per model and per backend, over
the current UTC day, week or month (or everything), what clients were billed and what the
backends' providers charged: the operator's margin (``Ledger.margins``; docs/backends.md,
"Provider spend"). It opens ``<data-dir>/executor/ledger.sqlite`` (``--data-dir``, else
``$LOOMNET_DATA_DIR``, else ``~/.local/share/loomnet``) alongside a running executor
(SQLite's WAL lets both read); a data directory without a ledger is an error that says
where it looked.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import trio

from loomnet.client import Ledger, default_data_dir
from loomnet.client._budget import period_bounds

from ._cli_ledger_read import export, list_receipts, totals

__all__ = ["ledger"]

_MICRO = 1_000_000


@click.group()
def ledger() -> None:
    """Read a ledger: receipts, totals, a CSV export; the executor's margins."""


ledger.add_command(list_receipts)
ledger.add_command(totals)
ledger.add_command(export)


@ledger.command()
@click.option("--data-dir", type=click.Path(file_okay=False), help="The executor's data folder.")
@click.option("--period", type=click.Choice(["day", "week", "month", "all"]), default="month", show_default=True,
              help="The current UTC calendar period, or every receipt.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model and backend.")
def margins(data_dir: str | None, period: str, as_json: bool) -> None:
    """Per model and backend: receipts, what clients were billed, what providers charged, the margin."""
    home = Path(data_dir).expanduser() if data_dir else default_data_dir()
    path = home / "executor" / "ledger.sqlite"
    if not path.is_file():
        click.echo(f"no executor ledger at {path} (give --data-dir, or set LOOMNET_DATA_DIR)", err=True)
        sys.exit(1)
    since = None if period == "all" else period_bounds(period, time.time())[0]  # type: ignore[arg-type]

    async def read():
        async with await Ledger.open(path) as opened:
            return await opened.margins(since=since)

    rows = trio.run(read)
    if as_json:
        for m in rows:
            click.echo(json.dumps({"model": m.model, "backend": m.backend, "receipts": m.receipts,
                                   "input_tokens": m.input_tokens, "output_tokens": m.output_tokens,
                                   "earned": m.earned / _MICRO, "paid": m.paid / _MICRO, "margin": m.margin / _MICRO}))  # fmt: skip
        return
    click.echo(f"{'model':<28} {'backend':<16} {'receipts':>8} {'earned':>14} {'paid':>14} {'margin':>14}")
    for m in rows:
        click.echo(f"{m.model[:28]:<28} {(m.backend or '-')[:16]:<16} {m.receipts:>8} {m.earned / _MICRO:>14.6f} "
                   f"{m.paid / _MICRO:>14.6f} {m.margin / _MICRO:>14.6f}")  # fmt: skip
    earned, paid = sum(m.earned for m in rows), sum(m.paid for m in rows)
    click.echo(f"{'total':<28} {'':<16} {sum(m.receipts for m in rows):>8} {earned / _MICRO:>14.6f} "
               f"{paid / _MICRO:>14.6f} {(earned - paid) / _MICRO:>14.6f}")  # fmt: skip
    click.echo(f"credits; {'every receipt' if since is None else 'this ' + period + ' (UTC)'}; {path}")
