"""``loomnet admin``: the operator endpoint's admin routes from the shell (``_admin``,
``_operator``).

It finds the endpoint as ``loomnet status`` does (the executors announced on this
machine; ``--url`` names one) and sends the admin token from ``$LOOMNET_ADMIN_TOKEN``
(never a command-line argument: those show in ``ps``). Every change is applied at once,
persisted and audit-logged by the executor.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
import urllib.parse
from typing import Any

import click
import httpx

from loomnet.client import local_executors
from loomnet.protocol import ErrorCode

__all__ = ["admin"]


def _endpoint(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    found = [e.operator for e in local_executors() if e.operator]
    if len(found) != 1:
        click.echo("give --url: " + ("no executor with an operator endpoint runs on this machine" if not found
                                     else f"{len(found)} executors run here ({', '.join(found)})"), err=True)  # fmt: skip
        sys.exit(2)
    return found[0].rstrip("/")


def _call(url: str | None, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    token = os.environ.get("LOOMNET_ADMIN_TOKEN")
    if not token:
        click.echo("set LOOMNET_ADMIN_TOKEN to the executor's [operator] admin-token", err=True)
        sys.exit(2)
    where = _endpoint(url)
    try:
        answer = httpx.request(method, where + path, json=body, timeout=60,
                               headers={"authorization": f"Bearer {token}"})  # fmt: skip
    except httpx.HTTPError as exc:
        click.echo(f"{where}: {type(exc).__name__}: {str(exc)[:200]}", err=True)
        sys.exit(1)
    try:
        data = answer.json()
    except ValueError:
        data = {"error": answer.text[:300]}
    if answer.status_code >= 400:
        code = data.get("code") if isinstance(data, dict) else None
        named = f" [{code} {ErrorCode(code).name}]" if code in ErrorCode._value2member_map_ else ""
        wait = f" (retry after {answer.headers['retry-after']} s)" if "retry-after" in answer.headers else ""
        click.echo(f"error {answer.status_code}{named}: {data.get('error', data)}{wait}", err=True)
        sys.exit(1)
    return data


def _q(name: str) -> str:
    """``name`` as one path segment (a ``/`` or ``%`` in it stays part of the name)."""
    return urllib.parse.quote(name, safe="")


_url = click.option("--url", help="The operator endpoint (default: the executor on this machine).")


@click.group()
def admin() -> None:
    """Change a running executor: backends, model terms, drain (needs $LOOMNET_ADMIN_TOKEN)."""


@admin.group()
def backends() -> None:
    """List, add, enable, disable or remove backends."""


@backends.command("list")
@_url
@click.option("--json", "as_json", is_flag=True)
def backends_list(url: str | None, as_json: bool) -> None:
    """The executor's backends: enabled, healthy, the models they serve."""
    listed = _call(url, "GET", "/admin/backends")["backends"]
    for b in listed:
        if as_json:
            click.echo(json.dumps(b))
        else:
            state = ("enabled" if b["enabled"] else "DISABLED") + (", healthy" if b["healthy"] else ", DOWN")
            click.echo(f"{b['name']:<16} {b['kind']:<12} {state:<18} {', '.join(b['models']) or '-'}")


@backends.command("add")
@_url
@click.argument("table_file", type=click.File("rb"))
def backends_add(url: str | None, table_file) -> None:
    """Add (or replace) a backend from a TOML file holding one [[backends]] table's keys
    (secrets as "${VAR}", set in the executor's environment)."""
    try:
        table = tomllib.loads(table_file.read().decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        click.echo(f"{table_file.name}: not TOML: {exc}", err=True)
        sys.exit(2)
    table = table.get("backends", [table])[0] if isinstance(table.get("backends"), list) else table
    added = _call(url, "POST", "/admin/backends", table)
    down = f" (down: {added['down']})" if added.get("down") else ""
    click.echo(f"added {added['name']}: {', '.join(added['models']) or 'no model yet'}{down}")


@backends.command("disable")
@_url
@click.argument("name")
def backends_disable(url: str | None, name: str) -> None:
    """Take a backend out of every chain (its models leave the advert if it was their only one)."""
    _call(url, "POST", f"/admin/backends/{_q(name)}/disable")
    click.echo(f"disabled {name}")


@backends.command("enable")
@_url
@click.argument("name")
def backends_enable(url: str | None, name: str) -> None:
    """Put a disabled backend back."""
    _call(url, "POST", f"/admin/backends/{_q(name)}/enable")
    click.echo(f"enabled {name}")


@backends.command("remove")
@_url
@click.argument("name")
def backends_remove(url: str | None, name: str) -> None:
    """Remove a backend (requests under way on it finish)."""
    _call(url, "DELETE", f"/admin/backends/{_q(name)}")
    click.echo(f"removed {name}")


@admin.command("model")
@_url
@click.argument("name")
@click.option("--price-in", type=click.FloatRange(0), help="Credits per million input tokens.")
@click.option("--price-out", type=click.FloatRange(0), help="Credits per million output tokens.")
@click.option("--alias", "aliases", multiple=True, help="An alias (repeat; replaces the aliases).")
@click.option("--category", "categories", multiple=True, help="A category (repeat; replaces them).")
@click.option("--backend", "pool", multiple=True,
              help="A backend serving it, in order: NAME or NAME=MODEL (repeat; replaces its chain).")  # fmt: skip
def model(url: str | None, name: str, price_in, price_out, aliases, categories, pool) -> None:
    """Set a model's price, aliases, categories or backends; the next advert shows it."""
    change: dict[str, Any] = {}
    if price_in is not None:
        change["price-in"] = price_in
    if price_out is not None:
        change["price-out"] = price_out
    if aliases:
        change["aliases"] = list(aliases)
    if categories:
        change["categories"] = list(categories)
    if pool:
        change["backends"] = [{"backend": b.partition("=")[0], **({"model": b.partition("=")[2]} if "=" in b else {})}
                              for b in pool]  # fmt: skip
    if not change:
        click.echo("nothing to set: give --price-in, --price-out, --alias, --category or --backend", err=True)
        sys.exit(2)
    _call(url, "PATCH", f"/admin/models/{_q(name)}", change)
    click.echo(f"set {name}: {json.dumps(change)}")


@admin.command("spend-budget")
@_url
@click.argument("name")
@click.argument("amount", type=click.IntRange(0))
def spend_budget(url: str | None, name: str, amount: int) -> None:
    """Set a backend's spend budget (micro-credits per period) until the next restart."""
    stats = _call(url, "POST", f"/admin/backends/{_q(name)}/spend-budget", {"amount": amount})
    click.echo(f"{name}: budget {stats['amount']}, spent {stats['spent']}"
               f"{' (spent: out of rotation)' if stats['exhausted'] else ''}")  # fmt: skip


@admin.command("drain")
@_url
def drain(url: str | None) -> None:
    """Stop taking requests; those in flight finish (then stop the process)."""
    _call(url, "POST", "/admin/drain")
    click.echo("draining: new requests are refused; stop the executor once its answers are done")
