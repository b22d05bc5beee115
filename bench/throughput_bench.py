"""Throughput: completed signed requests per second one executor serves to one client
node with 1, 8, 32 and 64 concurrent tasks, against direct HTTP at the same concurrency,
and CPU per request on each side.

Three paths, each run for ``--seconds`` per block, blocks rotated round after round
(``--rounds``) so drift on a shared machine hits them alike:

* **direct**: httpx (one pool, as many connections as tasks) straight to the instant
  fake (``fake_backend.py``, its own process);
* **loomnet -> fake**: ``LoomClient.stream_chat`` to ``loomnet executor --config``
  (its own process, the ``vllm`` profile) in front of the same fake;
* **loomnet -> in-process**: the same executor code serving an in-process backend that
  answers at once (``_instant_executor.py``, its own process): loomnet alone, no HTTP.

Every request asks ``--tokens`` (16) tokens and is read to its end (loomnet: the receipt
verified, booked and counter-signed). The executors' limits are raised far above what
the bench sends (capacity 256, max-queue 4096, no per-peer request or token rate,
max-streams-per-peer and max-streams-per-connection 1024), so they are not what is measured. CPU: milliseconds per
completed request, per process (``/proc/<pid>/stat``, summed over the blocks).

Targets (issue 9): >= 0.8 of direct at 8 and 32 concurrent; >= 300 req/s against the
in-process backend (judged at 8, 32 and 64 concurrent).

Run: ``make bench-throughput`` or ``.venv/bin/python bench/throughput_bench.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    CpuMeter, Report, Target, add_common_args, apply_quick, executor_toml, processes, start_executor, start_fake, temp_dir,
)  # fmt: skip
from _net import bench_client, direct, http_client, through  # noqa: E402

PATHS = ("direct", "loomnet-fake", "loomnet-inproc")


class Tally:
    def __init__(self, pids: dict[str, int]) -> None:
        self.done = 0
        self.errors = 0
        self.seconds = 0.0
        self.cpu = CpuMeter(pids)
        self.error_kinds: dict[str, int] = defaultdict(int)


async def block(fn, concurrency: int, seconds: float, tally: Tally) -> None:
    """``concurrency`` tasks calling ``fn()`` back to back for ``seconds``; each finishes
    the request it is in. Counts completions and failures into ``tally``."""
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            try:
                await fn()
            except Exception as exc:  # noqa: BLE001 - counted, by kind
                tally.errors += 1
                tally.error_kinds[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
            else:
                tally.done += 1

    tally.cpu.start()
    t0 = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    finally:
        tally.seconds += time.perf_counter() - t0
        tally.cpu.stop()


async def run(args: argparse.Namespace, home: Path, fake, fake_ex, inproc_ex, report: Report) -> None:
    url = fake.ready["url"]
    async with bench_client(home, fake_ex.ready["addr"], inproc_ex.ready["addr"], models=("bench-fake", "bench-instant")) as client:
        async with http_client(max(args.concurrency)) as http:
            fns = {
                "direct": lambda: direct(http, url, "bench-fake", args.tokens),
                "loomnet-fake": lambda: through(client, "bench-fake", args.tokens),
                "loomnet-inproc": lambda: through(client, "bench-instant", args.tokens),
            }
            pids = {
                "direct": {"client": os.getpid(), "fake": fake.pid},
                "loomnet-fake": {"client": os.getpid(), "executor": fake_ex.pid, "fake": fake.pid},
                "loomnet-inproc": {"client": os.getpid(), "executor": inproc_ex.pid},
            }
            for path in PATHS:  # warm: connections, pools, tokenizer, the executors' first requests
                await block(fns[path], min(8, max(args.concurrency)), args.warmup, Tally(pids[path]))
            tallies = {(c, p): Tally(pids[p]) for c in args.concurrency for p in PATHS}
            for conc in args.concurrency:
                for r in range(args.rounds):
                    order = PATHS[r % 3:] + PATHS[: r % 3]
                    for path in order:
                        await block(fns[path], conc, args.seconds, tallies[conc, path])
                d, lf, li = (tallies[conc, p] for p in PATHS)
                print(f"  {conc:3d} concurrent: direct {d.done / d.seconds:7.1f} req/s, loomnet->fake "
                      f"{lf.done / lf.seconds:6.1f}, loomnet->in-process {li.done / li.seconds:6.1f}", file=sys.stderr)  # fmt: skip
    for conc in args.concurrency:
        d, lf, li = (tallies[conc, p] for p in PATHS)
        case = f"{conc} concurrent"
        rate = {p: t.done / t.seconds if t.seconds else float("nan") for p, t in zip(PATHS, (d, lf, li))}
        errors = ", ".join(f"{p}: {t.errors} failed" for p, t in zip(PATHS, (d, lf, li)) if t.errors)
        kinds = {p: dict(t.error_kinds) for p, t in zip(PATHS, (d, lf, li)) if t.errors}
        if kinds:
            report.extra.setdefault("errors", {})[case] = kinds
        ratio_target = Target("ratio", ">=", 0.8) if conc in (8, 32) else None
        report.row(case, "req/s loomnet->fake", "req/s", rate["loomnet-fake"], baseline=rate["direct"], compare="ratio",
                   target=ratio_target, note=errors)  # fmt: skip
        report.row(case, "req/s loomnet->in-process", "req/s", rate["loomnet-inproc"], baseline=rate["direct"],
                   compare="ratio", target=Target("value", ">=", 300.0) if conc >= 8 else None)  # fmt: skip
        dc, fc, ic = d.cpu.per(d.done), lf.cpu.per(lf.done), li.cpu.per(li.done)
        report.row(case, "CPU/req client (->fake)", "ms", fc["client"], baseline=dc["client"], compare="ratio")
        report.row(case, "CPU/req client (->in-process)", "ms", ic["client"], baseline=dc["client"], compare="ratio")
        report.row(case, "CPU/req executor (->fake)", "ms", fc["executor"])
        report.row(case, "CPU/req executor (in-process)", "ms", ic["executor"])
        report.row(case, "CPU/req backend (fake)", "ms", fc["fake"], baseline=dc["fake"], compare="ratio")
        report.extra.setdefault("requests", {})[case] = {p: t.done for p, t in zip(PATHS, (d, lf, li))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32,64", help="concurrent client tasks, comma-separated")
    parser.add_argument("--seconds", type=float, default=2.5, help="seconds per block")
    parser.add_argument("--rounds", type=int, default=2, help="blocks per path and concurrency")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per path first")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_quick(args, parser, concurrency="1,8", seconds=0.6, rounds=1, warmup=0.3)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    report = Report("throughput", {k: v for k, v in vars(args).items() if k != "json"})
    with temp_dir() as home, processes() as children:
        fake = start_fake(home)
        children.append(fake)
        children.append(fake_ex := start_executor(
            home, executor_toml(home, "ex-fake", backend=fake.ready["url"], models=["bench-fake"]), name="ex-fake", wait=False))
        children.append(inproc_ex := start_executor(
            home, executor_toml(home, "ex-instant", backend=None, models=["bench-instant"]), name="ex-instant",
            instant=True, wait=False))
        for child in children:
            child.wait_ready()
        report.extra["executor_settings"] = (
            "capacity 256, max-queue 4096, peer-requests-per-minute 0, peer-tokens-per-minute 0, "
            "max-streams-per-peer 1024, max-streams-per-connection 1024"
        )
        trio.run(run, args, home, fake, fake_ex, inproc_ex, report)
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
