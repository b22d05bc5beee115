"""Show a suite JSON as tables, or compare two (e.g. before and after a change).

    .venv/bin/python bench/show.py bench/out/<commit>.json              # the tables again
    .venv/bin/python bench/show.py --markdown bench/out/<commit>.json   # for RESULTS.md
    .venv/bin/python bench/show.py OLD.json NEW.json                    # figure by figure

The comparison lines up rows by bench, case and metric, and shows each side's loomnet
figure and its ratio or added amount against the baseline of its own run (compare
those, not the raw values: the two runs had different machine load), and the verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Report, Row, _num, signed  # noqa: E402


def load(path: str) -> dict:
    return json.loads(Path(path).read_text())


#: the suite's order (run_all.BENCHES); others after, by name
ORDER = ["crypto", "libp2p_floor", "ttft", "stream", "throughput", "gossip", "route"]


def reports(data: dict) -> list[Report]:
    out = []
    benches = data.get("benches", {})
    for name in sorted(benches, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        bench = benches[name]
        columns = bench.get("columns", {})
        report = Report(name, bench.get("args", {}), value_label=columns.get("value", "loomnet"),
                        baseline_label=columns.get("baseline", "baseline"))  # fmt: skip
        report.rows = [Row(**{k: v for k, v in row.items() if k in Row.__dataclass_fields__}) for row in bench["rows"]]
        out.append(report)
    return out


def delta(row: Row) -> str:
    if row.ratio is not None:
        return f"{row.ratio:.4g}x"
    if row.added is not None:
        return signed(row.added, row.unit)
    return ""


def cell(x: float | None, unit: str) -> str:
    return "-" if x is None else f"{_num(x)} {unit}"


def markdown(data: dict) -> str:
    lines = [f"commit `{data.get('commit', '?')[:12]}`{' (dirty tree)' if data.get('dirty') else ''}, "
             f"{data['machine']['cpus']} CPUs ({data['machine']['cpu_model']}), load average at the end "
             f"{', '.join(f'{x:.2f}' for x in data['machine']['loadavg'])}"]  # fmt: skip
    for report in reports(data):
        lines += ["", f"#### {report.bench}", "",
                  f"| case | metric | {report.baseline_label} | {report.value_label} | ratio / added | target | |",
                  "| --- | --- | ---: | ---: | ---: | --- | --- |"]  # fmt: skip
        for r in report.rows:
            verdict = {True: "PASS", False: "**MISS**", None: ""}[r.passed]
            lines.append(f"| {r.case} | {r.metric} | {cell(r.baseline, r.unit)} | {cell(r.value, r.unit)} | "
                         f"{delta(r)} | {r.target or ''} | {verdict} |")  # fmt: skip
    return "\n".join(lines)


def compare(old: dict, new: dict) -> str:
    rows_old = {(b.bench, r.case, r.metric): r for b in reports(old) for r in b.rows}
    lines = [f"old {old.get('commit', '?')[:12]}  ->  new {new.get('commit', '?')[:12]}", ""]
    head = ("bench", "case", "metric", "old", "old vs base", "new", "new vs base", "target", "")
    table = [head]
    for b in reports(new):
        for r in b.rows:
            o = rows_old.get((b.bench, r.case, r.metric))
            verdict = {True: "PASS", False: "MISS", None: ""}[r.passed]
            table.append((b.bench, r.case, r.metric, cell(o.value, o.unit) if o else "", delta(o) if o else "",
                          cell(r.value, r.unit), delta(r), r.target or "", verdict))  # fmt: skip
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for k, line in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="JSON", help="one suite JSON, or two to compare")
    parser.add_argument("--markdown", action="store_true", help="markdown tables (one JSON)")
    args = parser.parse_args(argv)
    if len(args.paths) == 2:
        print(compare(load(args.paths[0]), load(args.paths[1])))
    elif args.markdown:
        print(markdown(load(args.paths[0])))
    else:
        for report in reports(load(args.paths[0])):
            print(report.table() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
