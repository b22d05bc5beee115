"""One routing decision, indexed router against the old scan, measured in the same run.

Builds an offer table of N executors × 20 models (N = 100, 1 000, 10 000 by default)
from signed adverts, as gossip would fill it, then times routing decisions of several
kinds with ``OfferRouter.rank`` (the indexes) and, for model routes, with the old scan
(``rank_offers(table.offers(now))``, what the client did before issue 8). Prints one
row per size and route kind: p50 and p99 of one decision, the old scan's p50 and the
ratio, and memory: the table with its indexes (tracemalloc, after the adds and with
every index sorted) and the most one decision allocated at once. Times are this
process's CPU time (``time.process_time``), so that other load on a shared machine
does not inflate them; ``--wall`` times with the wall clock instead.

The network it builds: 100 model names with Zipf popularity (each executor serves 20
distinct ones, so the most popular model is on most executors: the hard case, many
offers of one model); prices per model times an executor's tier (80 %) or a random
factor (20 %, so many distinct price pairs); advertised tokens/s 10–300, or 0 for
30 % of offers; contexts 4k–128k; capabilities, categories, on-premise and retention
mixed. The health table holds records for 100 pairs, as if this client had used them.

Exit status: 1 when the largest size misses the goal: p50 ≤ 1 ms for every route
kind and the table ≤ 200 MB (``--goal-ms``, ``--goal-mb``); 0 otherwise.

Part of the suite: ``--json PATH`` merges the figures (per size: the worst p50 and p99
over the route kinds, the model route against the old scan, the table's memory, with
the goal judged at the largest size) into the suite's JSON, and prints them in the
suite's table after its own; ``--quick`` is ``--sizes 100,1000 --decisions 100``.

Run: ``make bench-route`` or ``.venv/bin/python bench/route_bench.py [--sizes 100,1000]``.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from collections import Counter

from pathlib import Path

import msgspec

from loomnet.client._health import ExecutorHealth
from loomnet.client._offers import OfferTable
from loomnet.client._route import RequestShape, Route
from loomnet.client._router import OfferRouter, rank_offers
from loomnet.protocol import Advert, ModelOffer, SignedKind, SigningKey, seal

NOW = 1_000_000.0
POOL = 100
CAPABILITIES = ["tools", "json", "vision"]


def model_pool(rng: random.Random) -> list[tuple[str, str, int, int]]:
    """(name, alias, base price_in, base price_out) per model, micro-credits per million."""
    out = []
    for k in range(POOL):
        base = rng.choice([50_000, 150_000, 500_000, 1_000_000, 3_000_000])
        out.append((f"vendor-model-{k}-instruct", f"m{k}", base, base * rng.choice([2, 3, 4])))
    return out


def adverts(n: int, models_per: int, rng: random.Random) -> list[bytes]:
    """``n`` signed adverts as gossip carries them."""
    pool = model_pool(rng)
    weights = [1.0 / (k + 1) for k in range(POOL)]
    out = []
    for i in range(n):
        key = SigningKey((i + 1).to_bytes(32, "big"))
        chosen: set[int] = set()
        while len(chosen) < models_per:
            chosen.add(rng.choices(range(POOL), weights)[0])
        tier = rng.choice([0.8, 0.9, 1.0, 1.1, 1.25, 1.5]) if rng.random() < 0.8 else rng.uniform(0.5, 2.0)
        on_premise = rng.random() < 0.6
        models = []
        for k in sorted(chosen):
            name, alias, price_in, price_out = pool[k]
            models.append(
                ModelOffer(
                    name=name,
                    aliases=[alias],
                    categories=[rng.choice(["fast", "balanced", "quality"])] + (["coding"] if rng.random() < 0.1 else []),
                    context_length=rng.choice([4096, 8192, 32768, 131072]),
                    price_in=round(price_in * tier),
                    price_out=round(price_out * tier),
                    on_premise=on_premise,
                    capabilities=[c for c in CAPABILITIES if rng.random() < (0.2 if c == "vision" else 0.6)],
                    tokens_per_second=0.0 if rng.random() < 0.3 else round(rng.uniform(10, 300), 1),
                )
            )
        advert = Advert(
            seq=1, issued_at=NOW, ttl=600.0, models=models, capacity=rng.choice([1, 2, 4, 8]),
            load=rng.choice([0, 0, 1]), on_premise=on_premise,
            prompt_retention="none" if rng.random() < 0.9 else "logs",
        )  # fmt: skip
        out.append(msgspec.msgpack.encode(seal(SignedKind.ADVERT, advert, key)))
    return out


def build(n: int, models_per: int, seed: int) -> tuple[OfferTable, float]:
    """The filled table and its memory in MB (tracemalloc: everything the adds allocated)."""
    wire = adverts(n, models_per, random.Random(seed))
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    table = OfferTable()  # the default bounds must hold the whole network
    for data in wire:
        assert table.add(data, now=NOW)
    assert len(table) == n, "the table's default bounds dropped adverts"
    table.prepare()  # file every advert and sort every index, as queries would
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return table, held / 1e6


def health_for(table: OfferTable, rng: random.Random, pairs: int = 100) -> ExecutorHealth:
    health = ExecutorHealth(on_success=table.mark_used)
    offers = table.offers(now=NOW)
    for offer in rng.sample(offers, min(pairs, len(offers))):
        e, m = offer.executor, offer.model.name
        health.started(e, m, now=0.0)
        health.first_token(e, m, ttft=rng.uniform(0.1, 3.0), now=1.0)
        health.finished(e, m, output_tokens=200, seconds=rng.uniform(0.5, 10.0), now=2.0)
    return health


def routes(table: OfferTable) -> dict[str, Route]:
    ranked = [name for name, _ in Counter(o.model.name for o in table.offers(now=NOW)).most_common()]
    popular, second = ranked[0], ranked[min(1, len(ranked) - 1)]
    alias = "M" + second.split("-")[2]  # vendor-model-<k>-instruct is aliased m<k>
    return {
        "model": Route.parse(popular),
        "alias+cap": Route.parse(alias, max_price_in=4_000_000),
        "category": Route.parse("fast"),
        "cheapest": Route.parse("cheapest"),
        "fastest": Route.parse("fastest"),
        "model+filters": Route.parse(popular, capabilities=["tools"], min_context=16_000, on_premise_only=True),
        "fastest model": Route.parse(popular, strategy="fastest"),
    }


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_new(router, route, health, shapes, decisions, clock) -> tuple[float, float, float]:
    """p50 and p99 ms of ``decisions`` decisions, and the peak KB one allocated."""
    rng = random.Random(1)
    samples = []
    for i in range(decisions):
        shape = shapes[i % len(shapes)]
        t0 = clock()
        ranked = router.rank(route, shape, health, now=3.0, rng=rng, wall=NOW)
        samples.append(clock() - t0)
        assert ranked, route  # every route kind has candidates at every size
    tracemalloc.start()
    router.rank(route, shapes[0], health, now=3.0, rng=rng, wall=NOW)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return percentile(samples, 0.5) * 1e3, percentile(samples, 0.99) * 1e3, peak / 1e3


def time_old(table, route, decisions, clock) -> tuple[float, float]:
    """The old scan's p50 ms, and the peak KB one decision allocated."""
    samples = []
    for _ in range(decisions):
        t0 = clock()
        rank_offers(table.offers(now=NOW), model=route.model, max_price_in=route.max_price_in)
        samples.append(clock() - t0)
    tracemalloc.start()
    rank_offers(table.offers(now=NOW), model=route.model, max_price_in=route.max_price_in)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return percentile(samples, 0.5) * 1e3, peak / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="executor counts, comma-separated")
    parser.add_argument("--models", type=int, default=20, help="models per executor")
    parser.add_argument("--decisions", type=int, default=400, help="timed decisions per route kind")
    parser.add_argument("--old-budget", type=float, default=3.0, help="seconds of old-scan timing per row at most")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--goal-ms", type=float, default=1.0)
    parser.add_argument("--goal-mb", type=float, default=200.0)
    parser.add_argument(
        "--wall", action="store_true",
        help="time with the wall clock (default: this process's CPU time, which other load on the machine does not inflate)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="merge the figures into this suite JSON file")
    parser.add_argument("--quick", action="store_true", help="--sizes 100,1000 --decisions 100 --old-budget 0.5")
    args = parser.parse_args(argv)
    if args.quick:  # an option given explicitly wins
        harness().apply_quick(args, parser, sizes="100,1000", decisions=100, old_budget=0.5)
    clock = time.perf_counter if args.wall else time.process_time
    started = time.time()
    sizes = [int(s) for s in args.sizes.split(",")]
    shapes_rng = random.Random(args.seed)
    shapes = [
        RequestShape(prompt_tokens=shapes_rng.randint(10, 4000), max_tokens=shapes_rng.choice([16, 256, 1024, 2048]))
        for _ in range(64)
    ]
    print(f"{'executors':>9} {'route':14} {'p50 ms':>8} {'p99 ms':>8} {'old p50':>9} {'ratio':>7} "
          f"{'table MB':>9} {'peak KB':>8} {'old KB':>8}")  # fmt: skip
    missed = []
    figures: list[dict] = []
    for n in sizes:
        t0 = time.perf_counter()
        table, mb = build(n, args.models, args.seed)
        built = time.perf_counter() - t0
        router = OfferRouter(table)
        health = health_for(table, random.Random(args.seed))
        for kind, route in routes(table).items():
            p50, p99, peak = time_new(router, route, health, shapes, args.decisions, clock)
            old = ""
            old_kb = ""
            ratio = ""
            if route.model is not None and route.strategy == "best" and not route.capabilities:
                probe = time.perf_counter()
                rank_offers(table.offers(now=NOW), model=route.model)
                once = time.perf_counter() - probe
                old_p50, old_peak = time_old(table, route, max(1, min(50, int(args.old_budget / max(once, 1e-6)))), clock)
                old, old_kb, ratio = f"{old_p50:9.2f}", f"{old_peak:8.0f}", f"{old_p50 / p50:6.1f}×"
            print(f"{n:9d} {kind:14} {p50:8.3f} {p99:8.3f} {old:>9} {ratio:>7} {mb:9.1f} {peak:8.1f} {old_kb:>8}")
            figures.append({"executors": n, "route": kind, "p50_ms": p50, "p99_ms": p99, "peak_kb": peak, "table_mb": mb,
                            "old_p50_ms": float(old) if old else None})  # fmt: skip
            if n == max(sizes) and p50 > args.goal_ms:
                missed.append(f"{kind} p50 {p50:.3f} ms > {args.goal_ms} ms")
        if n == max(sizes) and mb > args.goal_mb:
            missed.append(f"table {mb:.0f} MB > {args.goal_mb} MB")
        print(f"{'':9} (built {n} executors × {args.models} models in {built:.1f} s, "
              f"{table.statistics().bytes / 1e6:.1f} MB of signed adverts)")  # fmt: skip
        del table, router, health
        gc.collect()
    if args.json or args.quick:
        suite_report(figures, args, max(sizes), started)
    if missed:
        print(f"goal missed at {max(sizes)} executors: " + "; ".join(missed))
        return 1
    print(f"goal met at {max(sizes)} executors: every route p50 ≤ {args.goal_ms} ms, table ≤ {args.goal_mb} MB")
    return 0


def harness():
    """``bench/_harness.py``, imported only when the suite's table or JSON is asked for
    (the test of this bench imports it by path, without ``bench/`` on ``sys.path``)."""
    folder = str(Path(__file__).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import _harness

    return _harness


def suite_report(figures: list[dict], args: argparse.Namespace, largest: int, started: float) -> None:
    """The suite's table and JSON (``bench/_harness.py``): per size, the worst route kind."""
    Report, Target = harness().Report, harness().Target
    report = Report("route", {k: v for k, v in vars(args).items() if k != "json"}, started=started)
    report.extra["figures"] = figures
    for n in sorted({f["executors"] for f in figures}):
        rows = [f for f in figures if f["executors"] == n]
        worst = max(rows, key=lambda f: f["p50_ms"])
        case = f"{n} executors x {args.models} models"
        at_goal = n == largest
        report.row(case, "decision p50, worst route kind", "ms", worst["p50_ms"],
                   target=Target("value", "<=", args.goal_ms) if at_goal else None, note=f"worst: {worst['route']}")  # fmt: skip
        report.row(case, "decision p99, worst route kind", "ms", max(f["p99_ms"] for f in rows))
        model = next(f for f in rows if f["route"] == "model")
        if model["old_p50_ms"] is not None:
            report.row(case, "model route p50 vs old scan", "ms", model["p50_ms"], baseline=model["old_p50_ms"], compare="ratio")
        report.row(case, "offer table memory", "MB", rows[0]["table_mb"],
                   target=Target("value", "<=", args.goal_mb) if at_goal else None)  # fmt: skip
    report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
