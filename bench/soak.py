"""Long life: one executor serves ``--requests`` streamed requests over one lifetime, and
its resident memory (RSS) and open file descriptors stay flat.

An executor process (``loomnet executor``, its backend the instant OpenAI-compatible
fake in a process of its own, over the real HTTP adapter; ``--instant``: the executor
with an in-process backend, no HTTP) is asked by one client in this process, with
``--concurrency`` requests in flight at all times. Every ``--every`` seconds, and at
the end, the executor's RSS (``/proc/<pid>/status`` ``VmRSS``) and open descriptors
(``/proc/<pid>/fd``) are sampled and printed with the requests done so far.

Flat is judged against the sample taken once the first ``--warmup`` requests are done
(allocators, caches, pools and the ledger's page cache settle first, and the replay
guard fills up: it keeps each request's nonce for ``max-request-age``, 60 s, so its
size levels off after a minute of traffic; measured here, RSS rose ~1.7 KiB a request
for the first ~2 000 requests, then stayed within 0.2 MiB): the run **fails**
(exit 1) when any later sample's RSS is more than ``--max-rss-growth`` MiB above it, or
its descriptors more than ``--max-fd-growth`` above it, or when a request failed.
Otherwise it exits 0. ``--json PATH`` writes every sample.

Run: ``.venv/bin/python bench/soak.py --requests 100000`` (about an hour here at
~30 requests a second on 2 shared cores); ``tests/e2e/test_soak.py`` runs it small in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import executor_toml, processes, start_executor, start_fake, temp_dir
from _net import bench_client, through

MODEL = "bench-fake"
INSTANT = "bench-instant"


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid``, MiB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """Open file descriptors of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    """The run's state: requests done and failed, and the samples taken."""

    def __init__(self, pid: int, requests: int) -> None:
        self.pid = pid
        self.requests = requests
        self.started = 0
        self.done = 0
        self.failed: list[str] = []
        self.began = time.monotonic()
        #: (seconds since start, requests done, RSS MiB, open fds)
        self.samples: list[tuple[float, int, float, int]] = []

    def sample(self) -> tuple[float, int, float, int]:
        row = (round(time.monotonic() - self.began, 1), self.done, round(rss_mib(self.pid), 1), open_fds(self.pid))
        self.samples.append(row)
        print(f"{row[0]:>9.1f} s {row[1]:>9d} requests  RSS {row[2]:>8.1f} MiB  fds {row[3]:>5d}", flush=True)
        return row


async def soak(args: argparse.Namespace) -> int:
    with temp_dir("loomnet-soak-") as home, processes() as children:
        if args.instant:
            model = INSTANT
            toml = executor_toml(home, "executor", backend=None, models=[model])
        else:
            model = MODEL
            fake = start_fake(home, "--tokens", str(args.tokens))
            children.append(fake)
            toml = executor_toml(home, "executor", backend=fake.ready["url"], models=[model])
        executor = start_executor(home, toml, instant=args.instant)
        children.append(executor)
        state = Soak(executor.pid, args.requests)
        print(f"soak: {args.requests} requests, {args.concurrency} at a time, executor pid {executor.pid}", flush=True)
        async with bench_client(home, executor.ready["addr"], models=(model,)) as client:
            state.sample()

            async def worker() -> None:
                while state.started < state.requests:
                    state.started += 1
                    try:
                        await through(client, model, args.tokens)
                    except Exception as exc:  # noqa: BLE001 - counted and reported; the run fails
                        state.failed.append(repr(exc)[:200])
                    state.done += 1

            async def sampler() -> None:
                while True:
                    await trio.sleep(args.every)
                    state.sample()

            baseline: tuple[float, int, float, int] | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler)
                async with trio.open_nursery() as workers:
                    for _ in range(args.concurrency):
                        workers.start_soon(worker)
                    while state.done < min(args.warmup, args.requests):
                        await trio.sleep(0.05)
                    baseline = state.sample()
                nursery.cancel_scope.cancel()
            await trio.sleep(1.0)  # let the last acks and stream closes land
            state.sample()
    return judge(state, baseline, args)


def judge(state: Soak, baseline: tuple[float, int, float, int] | None, args: argparse.Namespace) -> int:
    """Print the verdict; returns the exit code (0: flat and no failures)."""
    assert baseline is not None
    after = [s for s in state.samples if s[1] >= baseline[1]]
    rss_growth = max(s[2] for s in after) - baseline[2]
    fd_growth = max(s[3] for s in after) - baseline[3]
    seconds = state.samples[-1][0]
    print(f"\nsoak: {state.done} requests in {seconds:.0f} s ({state.done / max(seconds, 1e-9):.1f}/s), "
          f"{len(state.failed)} failed")  # fmt: skip
    print(f"executor after {baseline[1]} warm-up requests: RSS {baseline[2]:.1f} MiB, {baseline[3]} fds; "
          f"most above that later: RSS +{rss_growth:.1f} MiB (bound {args.max_rss_growth:g}), "
          f"fds +{fd_growth} (bound {args.max_fd_growth})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({
            "requests": state.done, "failed": state.failed[:20], "seconds": seconds, "baseline": baseline,
            "rss_growth_mib": rss_growth, "fd_growth": fd_growth, "samples": state.samples,
            "concurrency": args.concurrency, "instant": args.instant,
        }, indent=1))  # fmt: skip
    problems = []
    if state.failed:
        problems.append(f"{len(state.failed)} request(s) failed, the first: {state.failed[0]}")
    if rss_growth > args.max_rss_growth:
        problems.append(f"RSS grew {rss_growth:.1f} MiB past the warm-up (bound {args.max_rss_growth:g})")
    if fd_growth > args.max_fd_growth:
        problems.append(f"open fds grew by {fd_growth} past the warm-up (bound {args.max_fd_growth})")
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print("PASS: flat")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests over the executor's life")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--tokens", type=int, default=16, help="output tokens per answer")
    parser.add_argument("--warmup", type=int, default=2000, help="requests before the baseline sample")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--max-rss-growth", type=float, default=40.0, help="MiB above the baseline allowed")
    parser.add_argument("--max-fd-growth", type=int, default=8, help="descriptors above the baseline allowed")
    parser.add_argument("--instant", action="store_true", help="the executor's in-process backend (no HTTP)")
    parser.add_argument("--json", metavar="PATH", help="write every sample here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0 or args.every <= 0:
        parser.error("--requests and --concurrency must be at least 1, --warmup >= 0, --every > 0")
    return trio.run(soak, args)


if __name__ == "__main__":
    sys.exit(main())
