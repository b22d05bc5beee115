"""The whole bench suite, one bench after another (each in a process of its own), into
one JSON file, then one summary of every figure that has a target.

Run: ``make bench`` (full sizes, ~10 min on 2 cores), ``make bench-quick`` (tiny sizes,
~2 min), or ``.venv/bin/python bench/run_all.py [--quick] [--only ttft,stream] [--json PATH]``.
The JSON defaults to ``bench/out/<commit>[-quick].json`` (``bench/out/`` is not tracked).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import BENCH_DIR, git_facts  # noqa: E402

#: (name in the JSON, script), in the order they run: cheapest first
BENCHES = [
    ("crypto", "crypto_bench.py"),
    ("libp2p_floor", "libp2p_floor.py"),
    ("seam", "seam_bench.py"),
    ("ttft", "ttft_bench.py"),
    ("stream", "stream_bench.py"),
    ("throughput", "throughput_bench.py"),
    ("gossip", "gossip_bench.py"),
    ("route", "route_bench.py"),
]


def summary(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [f"== summary: commit {data.get('commit', '?')[:12]}{' (dirty)' if data.get('dirty') else ''} =="]
    for name, _ in BENCHES:
        bench = data.get("benches", {}).get(name)
        if bench is None:
            continue
        for row in bench["rows"]:
            if row["target"] is None:
                continue
            got = row["ratio"] if "ratio" in row["target"] else row["added"] if "added" in row["target"] else row["value"]
            verdict = {True: "PASS", False: "MISS", None: "n/a"}[row["passed"]]
            shown = "n/a" if got is None else f"{got:.4g}"
            lines.append(f"  {verdict:4}  {name:12} {row['case'][:34]:34} {row['metric'][:32]:32} {shown:>10}  target {row['target']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every bench in its quick mode")
    parser.add_argument("--only", help="comma-separated bench names: " + ", ".join(n for n, _ in BENCHES))
    parser.add_argument("--json", metavar="PATH", help="default: bench/out/<commit>[-quick].json")
    args = parser.parse_args(argv)
    chosen = [(n, s) for n, s in BENCHES if not args.only or n in args.only.split(",")]
    commit = (git_facts()["commit"] or "unknown")[:12]
    path = Path(args.json) if args.json else BENCH_DIR / "out" / f"{commit}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not args.only:
        path.unlink()  # a fresh suite; with --only, the other benches' figures stay
    failed = []
    for name, script in chosen:
        print(f"\n>>> {name}: {script}{' --quick' if args.quick else ''}", flush=True)
        t0, started = time.perf_counter(), time.time()
        rc = subprocess.run([sys.executable, str(BENCH_DIR / script), *(["--quick"] if args.quick else []),
                             "--json", str(path)]).returncode  # fmt: skip
        ran = path.exists() and json.loads(path.read_text()).get("benches", {}).get(name, {}).get("started", 0) >= started
        print(f"<<< {name}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        if not ran or rc not in (0, 1):  # route_bench exits 1 when its goal is missed: a figure, not a crash
            failed.append(name)
    print()
    if path.exists():
        print(summary(path))
        print(f"all figures: {path}")
    if failed:
        print(f"benches that did not run to the end: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
