"""The routing benchmark runs (a tiny size; the numbers themselves belong to bench/)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "route_bench.py"


def test_the_route_bench_runs_and_judges_its_goal(capsys):
    spec = importlib.util.spec_from_file_location("route_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--sizes", "12", "--models", "3", "--decisions", "5", "--old-budget", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "goal met at 12 executors" in out
    for kind in ("model", "alias+cap", "category", "cheapest", "fastest", "model+filters", "fastest model"):
        assert f"       12 {kind} " in out
    assert bench.main(["--sizes", "12", "--models", "3", "--decisions", "5", "--goal-mb", "0.001"]) == 1
    assert "goal missed at 12 executors: table" in capsys.readouterr().out
