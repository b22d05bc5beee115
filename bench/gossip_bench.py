"""Gossip spread and joining: how fast a new advert reaches every node, and how fast a
fresh client process can route.

**Spread.** N loomnet ``Member``s (5, 10, 20: real py-libp2p hosts with gossipsub and
the advert validator) run on loopback in this one process. Each node after the first
joins through up to ``--links`` (3) random earlier nodes, as bootstrap addresses, so the
mesh is a random connected graph, not a star. Once every node has gossip peers and the
mesh has had two heartbeats to settle, nodes in turn publish a new signed advert
(``seq`` one higher each time); the time from ``publish_advert`` to the advert being in
every other node's offer table is one sample (p50/p95 over ``--publishes``), and the
time to each node one per-node sample. One process means each hop's validation and
relay run one after another on one core: a worst case for N nodes on N machines; the
CPU per node per advert (this process's CPU over the publishes / publishes / N, less the
same with nothing published for as long: heartbeats) says how much of the spread is that.

**Joining.** A fresh ``python bench/_join_probe.py`` process (``import loomnet.client``,
``open_client`` with the executor's address as bootstrap, ``wait_for_offers``) against
``loomnet executor`` in front of the instant fake: from the spawn to the line that
says the executor's model is routable, p50 over ``--joins``; also the import, the
start of the client, and the time to leave. The baseline is a bare ``python -c pass``
spawned in the same run.

Targets (issue 9): spread <= 50 ms p50 at 20 nodes; first routable offer <= 1 s from
the process start.

Run: ``make bench-gossip`` or ``.venv/bin/python bench/gossip_bench.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    BENCH_DIR, Report, Target, add_common_args, apply_quick, child_env, executor_toml, pct, processes,
    start_executor, start_fake, temp_dir,
)  # fmt: skip

from loomnet.client import Member, P2PConfig  # noqa: E402
from loomnet.protocol import ADVERT_TOPIC, Advert, ModelOffer, SignedKind, SigningKey, seal  # noqa: E402


async def wait_for_seq(member: Member, signer: str, seq: int) -> float:
    """perf_counter time at which ``member``'s table holds ``signer``'s advert ``seq``."""
    while True:
        changed = member.table_changed
        held = member.table.advert_of(signer, now=time.time())
        if held is not None and held.seq >= seq:
            return time.perf_counter()
        await changed.wait()


async def spread(n: int, args: argparse.Namespace, rng: random.Random) -> tuple[list[float], list[float], int, float, float]:
    """(spread-to-all ms per publish, arrival ms per node and publish, misses, and CPU µs
    per node per advert: this process's CPU over the publishes, which every node's
    receive, validate and relay share, divided by publishes × nodes; then the same for
    as long a time right after, with nothing published: heartbeats, keepalives)."""
    async with trio.open_nursery() as nursery:
        members: list[Member] = []
        addrs: list[str] = []
        for _ in range(n):
            links = rng.sample(addrs, min(len(addrs), args.links))
            member = Member(SigningKey(os.urandom(32)), P2PConfig(bootstrap=links))
            info = await nursery.start(member.run)
            members.append(member)
            addrs.append(info.addrs[0])
        for member in members:
            await member.node.wait_for_topic_peers(ADVERT_TOPIC, 1, timeout=30)
        await trio.sleep(args.settle)
        seqs = [0] * n
        to_all, per_node, misses = [], [], 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for k in range(args.publishes):
            i = k % n
            publisher = members[i]
            seqs[i] += 1
            advert = Advert(seq=seqs[i], issued_at=time.time(), ttl=600.0, models=[ModelOffer(name=f"model-{i}")])
            envelope = seal(SignedKind.ADVERT, advert, publisher.key)
            arrived: list[float] = []

            async def watch(member: Member) -> None:
                arrived.append(await wait_for_seq(member, publisher.peer_id, seqs[i]))

            t0 = time.perf_counter()
            with trio.move_on_after(args.timeout) as scope:
                async with trio.open_nursery() as watchers:
                    for j, member in enumerate(members):
                        if j != i:
                            watchers.start_soon(watch, member)
                    await publisher.publish_advert(envelope)
            if scope.cancelled_caught:
                misses += 1
                continue
            to_all.append(1e3 * (max(arrived) - t0))
            per_node += [1e3 * (t - t0) for t in arrived]
            await trio.sleep(args.gap)
        cpu = (time.process_time() - cpu0) / (args.publishes * n) * 1e6
        cpu0 = time.process_time()
        await trio.sleep(time.perf_counter() - wall0)
        idle = (time.process_time() - cpu0) / (args.publishes * n) * 1e6
        for member in members:
            member.stop()
        nursery.cancel_scope.cancel()
    return to_all, per_node, misses, cpu, idle


def spawn_and_time(argv: list[str], env: dict, timeout: float = 60.0) -> dict[str, float]:
    """Spawn ``argv``; the spawn-relative time of each ``EVENT seconds`` line it prints
    (key ``spawn:EVENT``), its own reported time (``EVENT``), and ``exit``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out: dict[str, float] = {}
    try:
        for line in iter(proc.stdout.readline, b""):
            now = time.perf_counter() - t0
            parts = line.decode().split()
            if len(parts) == 2:
                out[f"spawn:{parts[0]}"] = now
                out[parts[0]] = float(parts[1])
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out["exit"] = time.perf_counter() - t0
    out["rc"] = proc.returncode
    return out


def join_rows(report: Report, args: argparse.Namespace, home: Path) -> None:
    with processes() as children:
        children.append(fake := start_fake(home))
        children.append(ex := start_executor(home, executor_toml(home, "ex", backend=fake.ready["url"], models=["bench-fake"])))
        env = child_env(home)
        bare, joins = [], []
        for k in range(args.joins):
            bare.append(spawn_and_time([sys.executable, "-c", "pass"], env)["exit"])
            probe = [sys.executable, str(BENCH_DIR / "_join_probe.py"), "--bootstrap", ex.ready["addr"],
                     "--model", "bench-fake", "--data-dir", str(home / f"join-{k}")]  # fmt: skip
            got = spawn_and_time(probe, env)
            if "spawn:OFFER" not in got:
                print(f"  join {k}: no offer (rc {got['rc']})", file=sys.stderr)
                continue
            joins.append(got)
    case = "fresh client process"
    if not joins:
        report.row(case, "start to first offer p50", "s", float("nan"), target=Target("value", "<=", 1.0), note="no probe got an offer")
        return
    col = lambda key: [j[key] for j in joins]  # noqa: E731
    first_offer = col("spawn:OFFER")
    report.row(case, "start to first offer p50", "s", pct(first_offer, 0.5), baseline=pct(bare, 0.5), compare="added",
               target=Target("value", "<=", 1.0), note=f"{len(joins)} of {args.joins} probes; baseline: python -c pass")  # fmt: skip
    report.row(case, "start to first offer max", "s", max(first_offer))
    report.row(case, "import loomnet.client p50", "s", pct([j["IMPORTED"] for j in joins], 0.5),
               note="from the probe's first statement")  # fmt: skip
    report.row(case, "open_client started p50", "s", pct([j["STARTED"] - j["IMPORTED"] for j in joins], 0.5),
               note="joined: dial, adverts exchanged")  # fmt: skip
    report.row(case, "started to offer p50", "s", pct([j["OFFER"] - j["STARTED"] for j in joins], 0.5))
    report.row(case, "leaving (offer to exit) p50", "s", pct([j["exit"] - j["spawn:OFFER"] for j in joins], 0.5))
    report.extra["joins"] = joins


async def spread_all(args: argparse.Namespace, report: Report) -> None:
    rng = random.Random(args.seed)
    for n in args.sizes:
        to_all, per_node, misses, cpu, idle = await spread(n, args, rng)
        case = f"{n} nodes"
        note = f"{len(to_all)} publishes" + (f", {misses} not everywhere within {args.timeout} s" if misses else "")
        report.row(case, "spread to all p50", "ms", pct(to_all, 0.5),
                   target=Target("value", "<=", 50.0) if n == 20 else None, note=note)  # fmt: skip
        report.row(case, "spread to all p95", "ms", pct(to_all, 0.95))
        report.row(case, "per-node arrival p50", "ms", pct(per_node, 0.5))
        report.row(case, "CPU per node per advert", "us", cpu, baseline=idle, compare="added",
                   note="all nodes share this process; baseline: as long with nothing published")  # fmt: skip
        print(f"  {n} nodes: spread p50 {pct(to_all, 0.5):.1f} ms", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5,10,20", help="node counts, comma-separated")
    parser.add_argument("--links", type=int, default=3, help="bootstrap links of each new node to earlier ones")
    parser.add_argument("--publishes", type=int, default=30, help="adverts published per size")
    parser.add_argument("--settle", type=float, default=2.5, help="seconds for the mesh to settle before publishing")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between publishes")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds an advert may take to reach everyone")
    parser.add_argument("--joins", type=int, default=5, help="fresh client processes")
    parser.add_argument("--seed", type=int, default=9)
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_quick(args, parser, sizes="5", publishes=6, joins=2, settle=1.5)
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    report = Report("gossip", {k: v for k, v in vars(args).items() if k != "json"})
    trio.run(spread_all, args, report)
    with temp_dir() as home:
        join_rows(report, args, home)
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
