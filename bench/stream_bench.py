"""Streaming rate: tokens/s delivered to the client through loomnet vs. the backend's
own rate read directly, and the time loomnet adds per token.

Three backends, each read both ways in paired samples (ABBA order):

* the instant fake emitting ``--tokens`` (2000) tokens as fast as it can, one SSE event
  per token and per write (direct: httpx from this process);
* the same fake paced at ``--paced-interval`` (1 ms) per token: a fast real runtime,
  which loomnet should keep up with exactly;
* the embedded model (``--embedded-tokens``, 128, greedy; direct: llama-cpp-python in
  this process, the same GGUF and threads).

The rate of one answer is the tokens after the first text piece over the time from the
first piece to the last (time to first token is ``ttft_bench``'s): a piece's share of
the tokens is its share of the characters. The ratio is the median of the per-pair
ratios; "per token" is 1/rate, and its added µs the median of the per-pair differences.
Pieces per answer: SSE content events direct, chunk frames through loomnet. CPU per
token is metered per process over each path's samples.

Targets (issue 9): >= 0.98 of the backend's rate; <= 50 µs added per token.

Run: ``make bench-stream`` or ``.venv/bin/python bench/stream_bench.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    CpuMeter, Report, Target, add_common_args, apply_quick, executor_toml, processes, start_executor, start_fake, temp_dir,
)  # fmt: skip
from _llama_direct import EMBEDDED_MODEL, THREADS, embedded_toml_extra, llama_direct, load_llama, smollm_path  # noqa: E402
from _net import Timing, bench_client, direct, http_client, paired, through  # noqa: E402


def median(xs: list[float]) -> float:
    """The median of the numbers in ``xs`` that are not NaN (NaN if none)."""
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def rate_rows(report: Report, case: str, ds: list[Timing], ls: list[Timing], failures: int,
              meters: tuple[CpuMeter, CpuMeter], tokens: int) -> None:  # fmt: skip
    d_rate, l_rate = [d.rate() for d in ds], [l.rate() for l in ls]
    ratios = [l / d for d, l in zip(d_rate, l_rate)]
    per_token = [1e6 / l - 1e6 / d for d, l in zip(d_rate, l_rate)]
    note = f"{len(ds)} pairs" + (f", {failures} failed samples dropped" if failures else "")
    report.row(case, "tokens/s", "tok/s", median(l_rate), baseline=median(d_rate), compare="ratio",
               ratio=median(ratios), target=Target("ratio", ">=", 0.98), note=note)  # fmt: skip
    report.row(case, "time per token", "us", median([1e6 / x for x in l_rate]), baseline=median([1e6 / x for x in d_rate]),
               compare="added", added=median(per_token), target=Target("added", "<=", 50.0))  # fmt: skip
    report.row(case, "text pieces per answer", "pieces", median([len(l.pieces) for l in ls]),
               baseline=median([len(d.pieces) for d in ds]), compare="ratio",
               note="direct: SSE content events; loomnet: chunk frames with text")  # fmt: skip
    n = (len(ds) + failures // 2) * tokens
    d, l = meters[0].per(n), meters[1].per(n)
    for key in meters[0].pids:
        if key == "executor":
            report.row(case, "CPU/token executor", "us", 1e3 * l[key])
        else:
            report.row(case, f"CPU/token {key}", "us", 1e3 * l[key], baseline=1e3 * d[key], compare="ratio")
    report.extra.setdefault("samples", {})[case] = {
        "direct_tok_s": [round(x, 1) for x in d_rate],
        "loomnet_tok_s": [round(x, 1) for x in l_rate],
    }


async def run(args: argparse.Namespace, home: Path, fakes: dict, executors: dict, report: Report) -> None:
    addrs = [ex.ready["addr"] for ex in executors.values()]
    async with bench_client(home, *addrs, models=tuple(executors)) as client, http_client() as http:
        for model, tokens, samples in (("bench-fake", args.tokens, args.samples),
                                       ("bench-paced", args.paced_tokens, args.paced_samples)):  # fmt: skip
            if model not in executors:
                continue
            fake, ex = fakes[model], executors[model]
            pids = {"client": os.getpid(), "executor": ex.pid, "fake": fake.pid}
            meters = (CpuMeter(pids), CpuMeter(pids))
            url = fake.ready["url"]
            ds, ls, failures = await paired(
                samples, args.warmup,
                lambda url=url, model=model, tokens=tokens: direct(http, url, model, tokens),
                lambda model=model, tokens=tokens: through(client, model, tokens),
                meters,
            )  # fmt: skip
            label = "as fast as it can" if model == "bench-fake" else f"paced {1e3 * args.paced_interval:g} ms/token"
            rate_rows(report, f"fake, {tokens} tokens, {label}", ds, ls, failures, meters, tokens)
        if EMBEDDED_MODEL not in executors:
            return
        ex = executors[EMBEDDED_MODEL]
        llm = await trio.to_thread.run_sync(load_llama, args.model_path, args.embedded_threads)
        pids = {"client": os.getpid(), "executor": ex.pid}
        meters = (CpuMeter(pids), CpuMeter(pids))
        ds, ls, failures = await paired(
            args.embedded_samples, 1,
            lambda: trio.to_thread.run_sync(llama_direct, llm, args.embedded_tokens, args.prompt),
            lambda: through(client, EMBEDDED_MODEL, args.embedded_tokens, args.prompt),
            meters,
        )  # fmt: skip
        got = [l.tokens for l in ls]
        rate_rows(report, f"embedded SmolLM2, {args.embedded_tokens} tokens", ds, ls, failures, meters,
                  int(median(got)) if got else args.embedded_tokens)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per answer from the unpaced fake")
    parser.add_argument("--samples", type=int, default=10, help="pairs against the unpaced fake")
    parser.add_argument("--paced-tokens", type=int, default=500)
    parser.add_argument("--paced-samples", type=int, default=4)
    parser.add_argument("--paced-interval", type=float, default=0.001, help="seconds per token of the paced fake (0: no paced rows)")
    parser.add_argument("--embedded-tokens", type=int, default=128)
    parser.add_argument("--embedded-samples", type=int, default=4)
    parser.add_argument("--no-embedded", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompt", default="Write a long story about a lighthouse keeper and the sea.")
    parser.add_argument("--embedded-threads", type=int, default=THREADS, help="llama.cpp threads, both paths")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_quick(args, parser, tokens=300, samples=2, paced_tokens=40, paced_samples=1, embedded_tokens=16,
                embedded_samples=1, warmup=1)
    args.model_path = None if args.no_embedded else smollm_path()
    report = Report("stream", {k: v for k, v in vars(args).items() if k != "json"})
    with temp_dir() as home, processes() as children:
        fakes, executors = {}, {}
        specs = [("bench-fake", [])]
        if args.paced_interval > 0:
            specs.append(("bench-paced", ["--token-interval", str(args.paced_interval)]))
        for model, extra in specs:
            fake = fakes[model] = start_fake(home, "--model", model, *extra, name=f"fake-{model}")
            children.append(fake)
            toml = executor_toml(home, f"ex-{model}", backend=fake.ready["url"], models=[model])
            children.append(ex := start_executor(home, toml, name=f"ex-{model}", wait=False))
            executors[model] = ex
        if args.model_path is not None:
            toml = executor_toml(home, "ex-embedded", backend=None, models=[EMBEDDED_MODEL],
                                 extra=embedded_toml_extra(args.embedded_tokens, args.embedded_threads))  # fmt: skip
            children.append(ex := start_executor(home, toml, name="ex-embedded", wait=False))
            executors[EMBEDDED_MODEL] = ex
        for child in children:
            child.wait_ready()
        report.extra["executor_settings"] = "defaults for streaming (chunk-interval 0.05 s); capacity 256"
        trio.run(run, args, home, fakes, executors, report)
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
