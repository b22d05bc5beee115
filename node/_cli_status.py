"""``loomnet status``: what an executor on this machine is doing, from its operator
endpoint's ``/status`` (``node/_operator``).

It finds the endpoint the way ``loomnet chat`` finds a local executor: the state file
each running executor writes (``LOOMNET_STATE_DIR``, else ``~/.local/state/loomnet``),
which holds the endpoint's URL; ``--url`` names one instead (another machine's, through
a tunnel). With several executors on the machine, each is shown. ``--json`` prints the
``/status`` objects as they came.
"""

from __future__ import annotations

import datetime as dt
import json
import sys

import click
import httpx
import msgspec

from loomnet.client import local_executors

from ._status import ExecutorStatus

__all__ = ["status"]


@click.command()
@click.option("--url", help="The operator endpoint (default: every executor announced on this machine).")
@click.option("--json", "as_json", is_flag=True, help="The /status JSON, one object per line.")
def status(url: str | None, as_json: bool) -> None:
    """Show the status of the executors on this machine: models, backends, load, earnings."""
    urls = [url] if url else [e.operator for e in local_executors() if e.operator]
    if not urls:
        click.echo("no executor with an operator endpoint is running on this machine "
                   "(start one with `loomnet executor`, or give --url)", err=True)  # fmt: skip
        sys.exit(1)
    failed = False
    for where in urls:
        try:
            answer = httpx.get(where.rstrip("/") + "/status", timeout=10)
            answer.raise_for_status()
            body = msgspec.json.decode(answer.content, type=ExecutorStatus)
        except httpx.HTTPStatusError as exc:  # its text sends the operator to a web page: the status says it all
            click.echo(f"{where}: no status (HTTP {exc.response.status_code}: not a loomnet operator endpoint?)", err=True)
            failed = True
            continue
        except (httpx.HTTPError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            click.echo(f"{where}: no status ({type(exc).__name__}: {str(exc)[:200]})", err=True)
            failed = True
            continue
        if as_json:
            click.echo(json.dumps(json.loads(answer.content)))
        else:
            click.echo(render(body, where))
    sys.exit(1 if failed else 0)


def render(s: ExecutorStatus, url: str) -> str:
    """The status as a few lines of text."""
    uptime = str(dt.timedelta(seconds=int(s.uptime)))
    lines = [
        f"executor {s.peer_id}  ({s.state}, up {uptime}, {s.peers_connected} peer(s) connected)",
        f"  endpoint : {url}",
        f"  load     : {s.slots.running} running / capacity {s.slots.capacity}, {s.slots.queued} queued; "
        f"{s.served} served, {s.refused} refused",
    ]
    lines += [f"  WARNING  : {w.message}" + (f" (backend {w.backend})" if w.backend else "") for w in s.warnings]
    for e in s.earnings:
        lines.append(f"  {e.period:<9}: {e.receipts} receipt(s), earned {e.earned:.6f}, paid providers "
                     f"{e.paid:.6f}, margin {e.margin:.6f} credits")  # fmt: skip
        for line in e.lines:
            lines.append(f"      {line.model} via {line.backend or '-'}: {line.receipts} receipt(s), earned "
                         f"{line.earned:.6f}, paid {line.paid:.6f}, margin {line.margin:.6f}")  # fmt: skip
    lines.append("  models:")
    for m in s.models:
        ttft = f"{m.ttft * 1000:.0f} ms" if m.ttft is not None else "-"
        lines.append(f"    {m.name:<24} {'offered' if m.offered else 'WITHDRAWN':<9} {m.price_in:g}/{m.price_out:g} "
                     f"per M  {m.running} running {m.queued} queued  {m.served} served  {m.tokens_per_second:g} tok/s  "
                     f"TTFT {ttft}  ({m.strategy})")  # fmt: skip
        if m.cache is not None:
            c = m.cache
            lines.append(f"      cache: {c.hits} hit(s), {c.misses} miss(es), {c.entries} answer(s) held "
                         f"({c.bytes} bytes), {c.evictions} evicted, {c.expired} expired")  # fmt: skip
        for b in m.backends:
            lines.append(f"      - {b.name:<16} breaker {b.breaker:<9} {b.in_flight} in flight, {b.served} served, "
                         f"{b.failed} failed{f', last {b.last_error}' if b.last_error else ''}")  # fmt: skip
    lines.append("  backends:")
    for b in s.backends:
        spend = ""
        if b.spend is not None:
            budget = f" of {b.spend.amount}" if b.spend.amount is not None else ""
            spend = f", spent {b.spend.spent}{budget} micro-credits this {b.spend.period or 'run'}"
            if b.spend.exhausted:
                spend += " (BUDGET SPENT: out of rotation)"
            elif b.spend.warned:
                spend += f" (past {round(max(b.spend.warned) * 100)}%)"
        lines.append(f"    {b.name:<16} {b.kind:<12} {'healthy' if b.healthy else 'DOWN':<8} {b.in_flight} in flight"
                     f"{spend}")  # fmt: skip
    return "\n".join(lines)
