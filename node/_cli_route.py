"""``loomnet route``: how the router would serve a request, without sending it.

Joins the network as ``loomnet offers`` does, waits (``--wait``) until the route has a
candidate or the time is up, ranks the live offers with the client's router and prints
the candidates, best first, each with the line that says why it is where it is; with
``--explain``, also every offer of the route it left out and the reason. This process
has measured nothing, so speeds are the advertised ones (the router's priors).

Exit status: 0 when some offer qualifies; 1 (``error [400 NO_OFFER]: ...``) when none
does, after printing what was left out; 2 for a usage error.
"""

from __future__ import annotations

import random
import sys
import time

import click
import msgspec
import trio

from loomnet.client import ClientConfig, open_client
from loomnet.client._health import ExecutorHealth
from loomnet.client._route import RequestShape, Route
from loomnet.client._router import OfferRouter, RouteExplanation
from loomnet.protocol import ErrorCode, LoomError, NoOfferError, credits_to_micro

__all__ = ["route"]


def _check_bootstrap(ctx, param, values):
    from .cli import _check_bootstrap as check  # the CLI's own rule (imported late: cli imports us)

    return check(ctx, param, values)


@click.command()
@click.argument("route_text", metavar="[ROUTE]", required=False)
@click.option("--explain", is_flag=True, help="Also list every offer of the route left out, and why.")
@click.option("--strategy", type=click.Choice(["best", "cheapest", "fastest"]), help="How to order a model or category.")
@click.option("--prompt", default="", help="The prompt, to count its tokens (for cost and context).")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 20), default=256, show_default=True)
@click.option("--max-price-in", type=click.FloatRange(0), help="Cap, credits per million input tokens.")
@click.option("--max-price-out", type=click.FloatRange(0), help="Cap, credits per million output tokens.")
@click.option("--min-context", type=click.IntRange(0), help="Smallest context, tokens (default: prompt + max tokens).")
@click.option("--capability", "capabilities", multiple=True, help="Needed capability: tools, vision, json (repeatable).")
@click.option("--on-premise", is_flag=True, help="Only executors whose models all run on premise.")
@click.option("--no-retention", is_flag=True, help="Only executors that keep no prompts.")
@click.option("--pin", multiple=True, help="Only this executor peer id (repeatable).")
@click.option("--exclude", multiple=True, help="Never this executor peer id (repeatable).")
@click.option("--limit", type=click.IntRange(1), default=8, show_default=True, help="Most candidates shown.")
@click.option("--bootstrap", multiple=True, callback=_check_bootstrap, help="Peer multiaddr with /p2p/<id> to join through (repeatable).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Client identity and ledger folder.")
@click.option("--wait", type=float, default=5.0, show_default=True, help="Seconds to wait for a matching offer.")
def route(route_text, explain, strategy, prompt, max_tokens, max_price_in, max_price_out, min_context,
          capabilities, on_premise, no_retention, pin, exclude, limit, bootstrap, data_dir, wait):  # fmt: skip
    """Rank the live offers for ROUTE (a model or alias, provider:model, a category,
    category:<name>, cheapest or fastest; any model when omitted) and say why."""
    from .cli import _client_config, _fail, _run

    filters: dict[str, object] = dict(
        max_price_in=None if max_price_in is None else credits_to_micro(max_price_in),
        max_price_out=None if max_price_out is None else credits_to_micro(max_price_out),
        capabilities=capabilities, on_premise_only=on_premise, no_retention_only=no_retention,
        pinned=pin, excluded=exclude,
    )  # fmt: skip
    if strategy is not None:
        filters["strategy"] = strategy
    try:
        parsed = Route.parse(route_text, **filters)
    except LoomError as exc:
        _fail(exc)
    _run(_route_main, _client_config(bootstrap, data_dir, wait), parsed, prompt, max_tokens, min_context, explain, limit)


async def _route_main(config: ClientConfig, parsed: Route, prompt: str, max_tokens: int, min_context, explain, limit):
    async with open_client(config) as client:
        prompt_tokens, _ = await trio.to_thread.run_sync(client.tokens.count, prompt)
        needed = prompt_tokens + max_tokens
        parsed = msgspec.structs.replace(parsed, min_context=max(needed, min_context or 0))
        shape = RequestShape(prompt_tokens=prompt_tokens, max_tokens=max_tokens)
        router, health = OfferRouter(client.member.table, limit=limit), ExecutorHealth()
        with trio.move_on_after(config.offer_timeout):
            while True:
                changed = client.member.table_changed
                if router.rank(parsed, shape, health, now=trio.current_time(), rng=random.Random(), wall=time.time()):
                    break
                await changed.wait()
        result = router.explain(parsed, shape, health, now=trio.current_time(), rng=random.Random(), wall=time.time())
        live = sorted({o.model.name for o in client.member.table.offers(now=time.time())})
    _print(parsed, shape, result, explain=explain, limit=limit)
    if not result.candidates:
        what = result.note or "no live offer qualifies for this route"
        raise NoOfferError(f"{what}; live models: {', '.join(live) or 'none'}", code=ErrorCode.NO_OFFER, live_models=tuple(live))


def _describe(route: Route) -> str:
    what = (
        f"model {route.model!r}" if route.model is not None
        else f"category {route.category!r}" if route.category is not None
        else "any model"
    )  # fmt: skip
    return f"{what}, {route.strategy}"


def _print(route: Route, shape: RequestShape, result: RouteExplanation, *, explain: bool, limit: int) -> None:
    shown = result.candidates[:limit]
    click.echo(
        f"route: {_describe(route)}; {shape.prompt_tokens} prompt + {shape.max_tokens} max tokens; "
        f"{len(result.candidates)} candidate(s), {len(result.rejected)} left out"
    )
    for i, c in enumerate(shown, 1):
        click.echo(f"{i:3}. {c.offer.model.name} on {c.offer.executor}")
        click.echo(f"     {c.why}")
    if len(result.candidates) > len(shown):
        click.echo(f"     ... and {len(result.candidates) - len(shown)} more (--limit)")
    if explain:
        click.echo(f"left out ({len(result.rejected)}):" if result.rejected else "left out: none")
        for r in result.rejected:
            click.echo(f"   - {r.offer.model.name} on {r.offer.executor}: {r.detail}")
        if result.note:
            click.echo(f"   {result.note}")
    sys.stdout.flush()
