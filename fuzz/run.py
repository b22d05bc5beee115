"""Long-run fuzzing: every target in ``fuzz/targets.py`` with a large example budget.

    .venv/bin/python fuzz/run.py --examples 1000000              # every target
    .venv/bin/python fuzz/run.py --examples 50000 --target stream
    .venv/bin/python fuzz/run.py --list

Per target it prints the inputs tried, the time taken and the findings. A finding (an
exception other than the decoder's typed errors, a broken property, or an input that
runs past ``--hang-seconds``) is shrunk by hypothesis to a minimal input, which is
written to ``fuzz/findings/<target>-<time>.txt`` (its ``repr`` and the traceback) and
replayed first on the next run (hypothesis's example database in
``fuzz/findings/.hypothesis``). The exit status is 1 when any target had a finding.

Hypothesis draws inputs by its own search (a budget of ``--examples`` valid examples
per target), not uniformly at random; ``--seed`` makes a run repeatable.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `fuzz` as a package, run from anywhere

from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

from fuzz.targets import TARGETS, Target  # noqa: E402

FINDINGS = HERE / "findings"


class Hang(Exception):
    """An input ran past ``--hang-seconds``."""


def _alarm(signum: int, frame: Any) -> None:
    raise Hang("the input ran past its time limit (a hang?)")


def run_target(target: Target, examples: int, *, hang_seconds: float, seed: int | None) -> dict[str, Any]:
    """Fuzz one target; returns ``{"name", "tried", "seconds", "finding"}``."""
    tried = 0
    last: list[Any] = [None]

    def check(case: Any) -> None:
        nonlocal tried
        tried += 1
        last[0] = case
        signal.setitimer(signal.ITIMER_REAL, hang_seconds)
        try:
            target.check(case)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    test = settings(
        max_examples=examples,
        deadline=None,
        database=DirectoryBasedExampleDatabase(str(FINDINGS / ".hypothesis")),
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        print_blob=True,
    )(given(target.strategy)(check))
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    started = time.monotonic()
    finding = None
    try:
        test()
    except BaseException as exc:  # the finding: whatever escaped, after shrinking
        if isinstance(exc, KeyboardInterrupt):
            raise
        FINDINGS.mkdir(exist_ok=True)
        path = FINDINGS / f"{target.name}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        shown = repr(last[0])
        if len(shown) > 4000:  # the whole input goes beside it
            path.with_suffix(".input").write_text(shown)
            shown = f"{shown[:4000]} ... ({len(shown)} characters; all of it in {path.with_suffix('.input').name})"
        path.write_text(f"target: {target.name}\nminimal input (repr):\n{shown}\n\n"
                        + "".join(traceback.format_exception(exc)))
        finding = str(path)
    return {"name": target.name, "tried": tried, "seconds": time.monotonic() - started, "finding": finding}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000, help="examples per target (default 10000)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="only this target (repeatable)")
    parser.add_argument("--hang-seconds", type=float, default=20.0, help="one input's time limit (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="a fixed seed, for a repeatable run")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for target in TARGETS.values():
            print(f"{target.name:16} {target.doc}")
        return 0
    signal.signal(signal.SIGALRM, _alarm)
    results = []
    for name in args.target or list(TARGETS):
        print(f"fuzzing {name} ({args.examples} examples) ...", flush=True)
        result = run_target(TARGETS[name], args.examples, hang_seconds=args.hang_seconds, seed=args.seed)
        results.append(result)
        status = f"FINDING -> {result['finding']}" if result["finding"] else "no findings"
        print(f"  {name}: {result['tried']} inputs tried in {result['seconds']:.1f} s; {status}", flush=True)
    print("\nsummary")
    for r in results:
        print(f"  {r['name']:16} {r['tried']:>9} inputs {r['seconds']:>8.1f} s  "
              f"{'FINDING ' + r['finding'] if r['finding'] else 'ok'}")
    return 1 if any(r["finding"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
