"""The ``loomnet`` command: ``executor`` serves, ``chat`` and ``offers`` ask, ``gateway``
serves the OpenAI and Anthropic HTTP APIs on the network.

The client commands are thin over :mod:`loomnet.client`. Every failure prints one
line, ``error [CODE NAME]: message``, and exits non-zero (1 for loomnet errors, 2 for
usage errors, 130 on Ctrl-C); a traceback is a bug.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import NoReturn

import click
import trio

from loomnet.client import BudgetConfig, ClientConfig, ReasoningDelta, TextDelta, default_data_dir, open_client
from loomnet.protocol import ChatMessage, ConfigError, ErrorCode, LoomError, credits_to_micro

# Importing loomnet makes ~55,000 objects the cyclic GC tracks, nearly all alive until
# the process ends; the interpreter's last collection walked them all once more at
# exit (0.1-0.2 s after the last line was printed). Frozen at exit, they are skipped.
atexit.register(gc.freeze)

__all__ = ["main"]

_SHUTDOWN_GRACE = 5.0


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        # py-libp2p logs ERROR lines for every peer that leaves abruptly (about a dozen
        # per `loomnet chat`): noise to an operator. loomnet's own loomnet.p2p logger
        # reports what matters (refused, flooded, dead connections); -vv shows libp2p's.
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def _fail(exc: BaseException) -> NoReturn:
    if isinstance(exc, LoomError):
        click.echo(f"error [{int(exc.code)} {exc.code.name}]: {exc.message}", err=True)
        if exc.code is ErrorCode.RECEIPT_MISMATCH:
            click.echo("the receipt is booked as disputed in your ledger, with this reason", err=True)
        elif exc.code is ErrorCode.NO_OFFER and not getattr(exc, "live_models", ()):
            click.echo(
                "no executor answered: start one (`loomnet executor`) on this machine, "
                "or pass --bootstrap /ip4/<host>/tcp/<port>/p2p/<peer id> of one elsewhere",
                err=True,
            )
    else:
        click.echo(f"error [503 INTERNAL]: {type(exc).__name__}: {exc}", err=True)
    sys.exit(1)


def _run(async_fn, *args) -> None:
    try:
        trio.run(async_fn, *args)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseExceptionGroup as group:  # a nursery wraps what a task raised
        if group.subgroup(KeyboardInterrupt) is not None:
            sys.exit(130)
        leaf = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        _fail(leaf)
    except Exception as exc:
        _fail(exc)


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="loomnet")
def main(verbose: int) -> None:
    """loomnet: a peer-to-peer network for LLM inference."""
    _setup_logging(verbose)


# ---------------------------------------------------------------------- executor


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
def executor(config_path: str | None) -> None:
    """Run an executor (the embedded SmolLM2 model unless configured otherwise)."""
    _run(_executor_main, config_path)


async def _executor_main(config_path: str | None) -> None:
    from ._executor import Executor  # here: the client commands never need it
    from .config import load_config

    from ._admin import load_overlay, overlay_path_for

    probe = load_config(config_path)  # where the data folder is, for the overlay without a TOML
    home = (Path(probe.data_dir).expanduser() if probe.data_dir else default_data_dir()) / "executor"
    overlay_path = overlay_path_for(config_path, home)
    try:
        config = load_config(config_path, overlay=load_overlay(overlay_path))  # the admin's changes win
    except ConfigError as exc:
        if not overlay_path.exists():
            raise
        raise ConfigError(f"{exc.message} (with the admin's runtime changes in {overlay_path}: fix or remove "
                          "that file)") from None  # fmt: skip
    node = Executor(config, overlay_path=overlay_path)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            info = await nursery.start(node.run)
            _print_ready(info)
            async for signum in signals:
                click.echo(f"\n{signal.Signals(signum).name}: shutting down; requests in flight get "
                           f"{config.drain_timeout:g} s to finish (again to stop at once)", err=True)  # fmt: skip
                with trio.move_on_after(config.drain_timeout + 3):  # the drain, and its cut answers' receipts
                    async with trio.open_nursery() as draining:
                        draining.start_soon(_cancel_on_signal, signals, draining.cancel_scope)
                        await node.drain()
                        draining.cancel_scope.cancel()
                nursery.cancel_scope.deadline = trio.current_time() + _SHUTDOWN_GRACE
                nursery.cancel_scope.cancel()
                break


async def _cancel_on_signal(signals, scope: trio.CancelScope) -> None:
    """A second Ctrl-C or SIGTERM during the drain stops at once."""
    async for _ in signals:
        scope.cancel()
        return


def _print_ready(info) -> None:
    local = [a for a in info.addrs if "/127.0.0.1/" in a] or info.addrs
    exe = Path(sys.argv[0])
    loomnet = shlex.quote(str(exe if exe.name == "loomnet" else "loomnet"))
    models = ", ".join(
        m.name + (f" (aliases: {', '.join(m.aliases)})" if m.aliases else "") for m in info.models
    )
    click.echo(f"loomnet executor ready\n  peer id : {info.peer_id}")
    for addr in info.addrs:
        click.echo(f"  listen  : {addr}")
    click.echo(f"  models  : {models}")
    if info.operator_url:
        click.echo(f"  status  : {info.operator_url}/status   metrics: {info.operator_url}/metrics   "
                   f"(or: {loomnet} status)")  # fmt: skip
    click.echo("\nChat with it from a second terminal (same machine, no flags needed):")
    click.echo(f"  {loomnet} chat \"Hello, who are you?\"")
    remote = [a for a in info.addrs if "/127.0.0.1/" not in a and "/::1/" not in a]
    if remote:
        click.echo("From another machine:")
        click.echo(f"  {loomnet} chat --bootstrap {remote[0]} \"Hello\"")
    else:
        click.echo("From another machine (listen on 0.0.0.0 or this machine's address first):")
        click.echo(f"  {loomnet} chat --bootstrap {local[0].replace('127.0.0.1', '<this machine>')} \"Hello\"")
    click.echo("Stop with Ctrl-C.", err=False)
    sys.stdout.flush()


# --------------------------------------------------------------------- client side

def _check_bootstrap(ctx, param, values):
    """A bootstrap address is a multiaddr ending in /p2p/<peer id>: say so at once, not
    after a failed dial and a NO_OFFER."""
    for value in values:
        if not value.startswith("/") or "/p2p/" not in value:
            raise click.BadParameter(f"{value!r} is not a multiaddr like /ip4/<host>/tcp/<port>/p2p/<peer id>")
    return values


_client_options = [
    click.option(
        "--bootstrap", multiple=True, callback=_check_bootstrap,
        help="Peer multiaddr with /p2p/<id> to join through (repeatable).",
    ),
    click.option("--data-dir", type=click.Path(file_okay=False), help="Client identity and ledger folder."),
    click.option("--wait", type=float, default=5.0, show_default=True, help="Seconds to wait for offers."),
]


def _with_client_options(fn):
    for option in reversed(_client_options):
        fn = option(fn)
    return fn


def _client_config(bootstrap, data_dir, wait, timeout: float = 900.0, budget: BudgetConfig | None = None) -> ClientConfig:
    return ClientConfig(
        data_dir=data_dir or os.environ.get("LOOMNET_DATA_DIR"),
        bootstrap=list(bootstrap),
        offer_timeout=wait,
        total_timeout=timeout,
        budget=budget,
    )


@main.command()
@click.argument("prompt", required=False)
@click.option(
    "--batch", "batch_path", metavar="FILE",
    help="Answer every line of a JSONL file instead of PROMPT ('-': stdin); one JSON answer per line "
    "to stdout, in input order (docs/client.md, \"loomnet chat --batch\").",
)  # fmt: skip
@click.option("--output", type=click.Path(dir_okay=False, writable=True), help="With --batch: write the answers here.")
@click.option(
    "--concurrency", type=click.IntRange(1, 1024), help="With --batch: requests in flight at once (default 4).",
)  # fmt: skip
@click.option("--model", help="Model name or alias (never served by another model); any live offer when omitted.")
@click.option(
    "--route",
    help='Where to send it: "cheapest", "fastest", "category:<name>" (fast, balanced, quality), or a model.',
)
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 20), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2))
@click.option("--seed", type=click.IntRange(0, (1 << 31) - 1))
@click.option("--max-price-in", type=click.FloatRange(0), help="Cap, credits per million input tokens.")
@click.option("--max-price-out", type=click.FloatRange(0), help="Cap, credits per million output tokens.")
@click.option("--on-premise-only", is_flag=True, help="Only executors whose models all run on premise.")
@click.option("--no-retention-only", is_flag=True, help="Only executors that keep no prompts.")
@click.option(
    "--budget", type=click.FloatRange(0),
    help="Credits this client may spend per --budget-period (its ledger says what is spent); "
    "a request whose worst case does not fit is refused before it is sent.",
)  # fmt: skip
@click.option("--budget-period", type=click.Choice(["day", "week", "month"]), default="month", show_default=True)
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=900.0, show_default=True,
    help="Seconds the whole answer may take (the first-byte and idle deadlines apply too).",
)
@_with_client_options
def chat(
    prompt, batch_path, output, concurrency, model, route, system, max_tokens, temperature, seed, max_price_in,
    max_price_out, on_premise_only, no_retention_only, budget, budget_period, bootstrap, data_dir, wait, timeout,
):  # fmt: skip
    """Send PROMPT to the network and stream the answer (reasoning, if the model shows
    any, goes dimmed to stderr; the answer to stdout). Executors that failed before the
    answer began are named on stderr. With --batch FILE, every line of FILE instead."""
    if (prompt is None) == (batch_path is None):
        raise click.UsageError("give a PROMPT or --batch FILE (one of them)")
    if batch_path is None and (output is not None or concurrency is not None):
        raise click.UsageError("--output and --concurrency go with --batch")
    limit = None if budget is None else BudgetConfig(amount=credits_to_micro(budget), period=budget_period)
    config = _client_config(bootstrap, data_dir, wait, timeout, limit)
    caps = dict(
        max_price_in=None if max_price_in is None else credits_to_micro(max_price_in),
        max_price_out=None if max_price_out is None else credits_to_micro(max_price_out),
    )
    if batch_path is not None:
        from ._cli_batch import LineDefaults, chat_batch

        defaults = LineDefaults(
            model=model, route=route, system=system, max_tokens=max_tokens, temperature=temperature, seed=seed,
            on_premise_only=on_premise_only, no_retention_only=no_retention_only, **caps,
        )  # fmt: skip
        chat_batch(config, batch_path, output, concurrency or 4, defaults)
        return
    messages = ([ChatMessage("system", system)] if system else []) + [ChatMessage("user", prompt)]
    options = dict(
        model=model,
        route=route,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        on_premise_only=on_premise_only,
        no_retention_only=no_retention_only,
        **caps,
    )
    _run(_chat_main, config, messages, options)


async def _chat_main(config: ClientConfig, messages, options) -> None:
    async with open_client(config) as client:
        async with client.stream_chat(messages, **options) as stream:
            for attempt in stream.attempts:
                click.echo(f"[passed over {attempt.brief()}]", err=True)
            async for event in stream.events():
                if isinstance(event, ReasoningDelta):
                    click.echo(click.style(event.text, dim=True), nl=False, err=True)
                elif isinstance(event, TextDelta):
                    click.echo(event.text, nl=False)
                    sys.stdout.flush()
        click.echo()
        r = stream.result.receipt
        spent = [f"{n} {what}" for n, what in ((r.reasoning_tokens, "reasoning"),
                 (r.hidden_reasoning_tokens, "hidden reasoning"), (r.tool_call_tokens, "tool calls")) if n]  # fmt: skip
        click.echo(
            f"[{r.model} on {stream.executor[:16]}…  in {r.input_tokens} + out {r.output_tokens} tokens "
            f"{'(' + ', '.join(spent) + ') ' if spent else ''}"
            f"({r.count_source})  cost {r.cost / 1e6:.6f} credits  finish {r.finish_reason}]",
            err=True,
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per offer.")
@_with_client_options
def offers(as_json, bootstrap, data_dir, wait):
    """Print the live offer table."""
    _run(_offers_main, _client_config(bootstrap, data_dir, wait), as_json)


async def _offers_main(config: ClientConfig, as_json: bool) -> None:
    import msgspec

    async with open_client(config) as client:
        with trio.move_on_after(config.offer_timeout):
            while not client.offers():
                await client.member.table_changed.wait()
        table = client.offers()
    if as_json:
        for o in table:
            click.echo(msgspec.json.encode({"executor": o.executor, **msgspec.to_builtins(o.model), "load": o.advert.load, "capacity": o.advert.capacity}))
        return
    if not table:
        click.echo("no live offers", err=True)
        sys.exit(1)
    click.echo(f"{'MODEL':24} {'ALIASES':20} {'IN/M':>10} {'OUT/M':>10} {'LOAD':>6} {'CTX':>6}  EXECUTOR")
    for o in table:
        m = o.model
        click.echo(
            f"{shown(m.name)[:24]:24} {shown(','.join(m.aliases))[:20]:20} {m.price_in / 1e6:10.4f} "
            f"{m.price_out / 1e6:10.4f} {o.advert.load}/{o.advert.capacity:<4} {m.context_length:6}  {o.executor}"
        )


def shown(text: str) -> str:
    """``text`` from the network as a terminal may print it: control characters (an
    escape sequence, a line break a peer slipped into a model's name) as ``\\xNN``."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
from ._cli_peers import peers as _peers  # noqa: E402  (registered here: it uses this module's helpers)
main.add_command(_peers)
from ._cli_route import route as _route  # noqa: E402  (after main: it borrows this module's helpers)
main.add_command(_route)
from ._cli_gateway import gateway as _gateway  # noqa: E402
main.add_command(_gateway)
from ._cli_status import status as _status  # noqa: E402
main.add_command(_status)
from ._cli_ledger import ledger as _ledger  # noqa: E402
main.add_command(_ledger)
from ._cli_admin import admin as _admin  # noqa: E402
main.add_command(_admin)
