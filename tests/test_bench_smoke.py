"""Every bench of ``bench/`` runs, at its tiniest, and writes the figures it promises.

Speed is never asserted here (that is what the benches print, against their targets);
only that each bench runs to the end in its own process, as ``make bench`` runs it, and
that its JSON holds the expected figures with sane values: finite, positive where a
time, a rate or a size is measured (CPU time may read 0 at the 10 ms tick of a tiny run).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

#: bench -> (script, tiny arguments, metrics every run must report)
CASES = {
    "crypto": ("crypto_bench.py", ["--repeats", "1", "--slice", "0.002", "--adverts", "10"],
               {"sign (seal)", "verify (open_envelope)", "encode frame", "decode frame", "offer-table add (gossip bytes)"}),
    "libp2p_floor": ("libp2p_floor.py", ["--samples", "4", "--frames", "50", "--frame-runs", "1"],
                     {"connect (dial + Noise + muxer)", "new stream + 64 B echo + close p50", "round trip on one stream p50"}),
    "seam": ("seam_bench.py", ["--requests", "3", "--rounds", "2", "--warmup", "1"],
             {"wall per request", "CPU per request (both sides)", "window updates per request"}),
    "ttft": ("ttft_bench.py", ["--samples", "3", "--embedded-samples", "1", "--warmup", "1", "--tokens", "4",
                               "--embedded-tokens", "2"],
             {"TTFT p50", "TTFT p99", "whole request p50", "CPU/req client", "CPU/req executor", "backend conns opened/req"}),
    # the paced fake is the same path with --token-interval: left out here, one executor fewer
    "stream": ("stream_bench.py", ["--tokens", "60", "--samples", "1", "--paced-interval", "0",
                                   "--embedded-tokens", "6", "--embedded-samples", "1", "--warmup", "1"],
               {"tokens/s", "time per token", "text pieces per answer", "CPU/token executor"}),
    "throughput": ("throughput_bench.py", ["--concurrency", "1,2", "--seconds", "0.3", "--rounds", "1", "--warmup", "0.1",
                                           "--tokens", "4"],
                   {"req/s loomnet->fake", "req/s loomnet->in-process", "CPU/req executor (in-process)"}),
    "gossip": ("gossip_bench.py", ["--sizes", "3", "--publishes", "2", "--joins", "1", "--settle", "0.5"],
               {"spread to all p50", "per-node arrival p50", "start to first offer p50", "import loomnet.client p50"}),
    "route": ("route_bench.py", ["--sizes", "12", "--models", "3", "--decisions", "5", "--old-budget", "0.01"],
              {"decision p50, worst route kind", "offer table memory"}),
}  # fmt: skip

#: metrics that may be 0 in a tiny run (10 ms CPU ticks; a connection pool that held;
#: yamux credit sent once 16 KiB is owed, trap Z)
MAY_BE_ZERO = ("CPU", "backend conns", "window updates")


@pytest.mark.integration
@pytest.mark.parametrize("name", list(CASES))
def test_each_bench_runs_and_writes_sane_figures(name, tmp_path):
    script, tiny, expected = CASES[name]
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *tiny, "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=BENCH.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"== {name} ==" in done.stdout  # the table was printed

    data = json.loads(out.read_text())
    assert data["schema"] == 1
    assert len(data["commit"]) == 40 and data["machine"]["cpus"] >= 1 and "libp2p" in data["machine"]["versions"]
    bench = data["benches"][name]
    rows = bench["rows"]
    seen = {row["metric"] for row in rows}
    missing = {m for m in expected if not any(s.startswith(m) for s in seen)}
    assert not missing, f"{name} did not report {missing}; it reported {sorted(seen)}"
    for row in rows:
        where = f"{name}: {row['case']} / {row['metric']}"
        assert row["value"] is not None and math.isfinite(row["value"]), where
        if row["metric"].startswith(MAY_BE_ZERO):
            assert row["value"] >= 0, where
        else:
            assert row["value"] > 0, where
        if row["baseline"] is not None:
            assert math.isfinite(row["baseline"]) and row["baseline"] >= 0, where
        for key in ("ratio", "added"):
            if row[key] is not None:
                assert math.isfinite(row[key]), where
        if row["target"] is not None:
            assert row["passed"] in (True, False), where  # judged, whichever way
        if row["metric"].startswith("window updates"):  # trap Z, against py-libp2p's rule in the same run
            assert row["baseline"] > row["value"], where
        # a bench whose requests failed would still print figures from what was left
        assert "failed samples dropped" not in row["note"] and " failed" not in row["note"], (where, row["note"])


def test_the_suite_runner_knows_every_bench():
    sys.path.insert(0, str(BENCH))
    try:
        import run_all
    finally:
        sys.path.remove(str(BENCH))
    assert {name for name, _ in run_all.BENCHES} == set(CASES)
    assert all((BENCH / script).exists() for _, script in run_all.BENCHES)


def test_show_renders_a_suite_file_and_compares_two(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import _harness
        import show
    finally:
        sys.path.remove(str(BENCH))
    runs = []
    for k, added in enumerate((16.5, 1.5)):
        report = _harness.Report("ttft", {"samples": 3})
        report.row("fake", "TTFT p50", "ms", 3.0 + added, baseline=3.0, compare="added", added=added,
                   target=_harness.Target("added", "<=", 2.0))  # fmt: skip
        report.row("fake", "tokens/s", "tok/s", 900.0, baseline=1000.0, compare="ratio")
        path = tmp_path / f"run{k}.json"
        _harness.write_json(str(path), report)
        runs.append(str(path))
    data = json.loads(Path(runs[1]).read_text())
    assert data["benches"]["ttft"]["rows"][0]["passed"] is True
    assert data["benches"]["ttft"]["commit"] == data["commit"]

    assert show.main(["--markdown", runs[0]]) == 0
    out = capsys.readouterr().out
    assert "| fake | TTFT p50 | 3 ms | 19.5 ms | +16.5 ms | added <= 2 | **MISS** |" in out
    assert "| fake | tokens/s | 1000 tok/s | 900 tok/s | 0.9x |" in out
    assert show.main(runs) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if "TTFT" in line]
    assert lines and lines[0][-1] == "PASS" and "+16.5" in lines[0] and "+1.5" in lines[0]
