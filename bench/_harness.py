"""What every bench shares: percentiles, a table of figures against their baselines and
targets, the JSON record for comparing commits, CPU time per process, and starting the
fake backend and an executor as processes of their own.

A figure is loomnet's value beside a baseline measured in the same run (interleaved
with it where that makes sense), so a noisy shared machine moves both and the ratio or
the added time stays stable. ``Report.row`` records one; ``Report.finish`` prints the
table and, with ``--json PATH``, merges the bench's figures into ``PATH`` under the
bench's name, with the git commit and the machine's facts (several benches of one suite
run share one file).

Nothing here imports loomnet, so a bench that only needs the harness (``crypto``,
``libp2p_floor``) does not pay for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
SCHEMA = 1

__all__ = [
    "BENCH_DIR", "ROOT", "Child", "CpuMeter", "Report", "Row", "Target", "add_common_args", "apply_quick", "child_env",
    "cpu_seconds", "executor_toml", "git_facts", "loomnet_command", "machine_facts", "pct", "percentiles",
    "processes", "start_executor", "start_fake", "temp_dir", "write_json",
]  # fmt: skip


# ------------------------------------------------------------------------ statistics


def pct(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, linearly interpolated (NaN when empty)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99, mean, min, max and n of ``samples``."""
    n = len(samples)
    return {
        "p50": pct(samples, 0.50),
        "p95": pct(samples, 0.95),
        "p99": pct(samples, 0.99),
        "mean": sum(samples) / n if n else math.nan,
        "min": min(samples) if n else math.nan,
        "max": max(samples) if n else math.nan,
        "n": n,
    }


# ------------------------------------------------------------------------ figures


@dataclass(frozen=True)
class Target:
    """A goal on one column of a row: ``on`` is "value", "ratio" or "added"; ``op`` "<=" or ">="."""

    on: str
    op: str
    limit: float

    def judge(self, row: "Row") -> bool | None:
        got = {"value": row.value, "ratio": row.ratio, "added": row.added}[self.on]
        if got is None or not math.isfinite(got):
            return None
        return got <= self.limit if self.op == "<=" else got >= self.limit

    def __str__(self) -> str:
        what = {"value": "", "ratio": "ratio ", "added": "added "}[self.on]
        return f"{what}{self.op} {self.limit:g}"


@dataclass
class Row:
    """One figure: loomnet's ``value`` and the same run's ``baseline``, in ``unit``."""

    case: str
    metric: str
    unit: str
    value: float
    baseline: float | None = None
    #: value / baseline, when the comparison is a ratio (rates, costs)
    ratio: float | None = None
    #: value - baseline, when it is an added cost (latencies)
    added: float | None = None
    target: str | None = None
    passed: bool | None = None
    note: str = ""


@dataclass
class Report:
    """The figures of one bench run; ``finish`` prints them and writes the JSON."""

    bench: str
    args: dict
    rows: list[Row] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    #: column titles of the measured value and of the baseline
    value_label: str = "loomnet"
    baseline_label: str = "baseline"

    def row(
        self,
        case: str,
        metric: str,
        unit: str,
        value: float,
        *,
        baseline: float | None = None,
        compare: str | None = None,
        added: float | None = None,
        ratio: float | None = None,
        target: Target | None = None,
        note: str = "",
    ) -> Row:
        """Record a figure. ``compare``: "ratio" (value / baseline) or "added" (value -
        baseline), unless ``ratio``/``added`` is given (e.g. the median of paired ratios, a
        percentile of paired differences)."""
        if baseline is not None and compare == "ratio" and ratio is None:
            ratio = value / baseline if baseline else math.nan
        elif baseline is not None and compare == "added" and added is None:
            added = value - baseline
        row = Row(case, metric, unit, float(value), None if baseline is None else float(baseline), ratio, added,
                  None if target is None else str(target), note=note)  # fmt: skip
        if target is not None:
            row.passed = target.judge(row)
        self.rows.append(row)
        return row

    def table(self) -> str:
        head = ("case", "metric", self.baseline_label, self.value_label, "ratio/added", "target", "")
        lines = [head]
        for r in self.rows:
            delta = ""
            if r.ratio is not None:
                delta = f"{r.ratio:.4g}x"
            elif r.added is not None:
                delta = signed(r.added, r.unit)
            verdict = {True: "PASS", False: "MISS", None: ""}[r.passed]
            base = "-" if r.baseline is None else f"{_num(r.baseline)} {r.unit}"
            lines.append((r.case, r.metric, base, f"{_num(r.value)} {r.unit}", delta, r.target or "", verdict))
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        out = [f"== {self.bench} =="]
        for k, line in enumerate(lines):
            out.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
            if k == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)

    def finish(self, json_path: str | None) -> int:
        """Print the table; merge the figures into ``json_path``. Returns 0 (a MISS is a
        figure, not a failure: the bench ran)."""
        print(self.table(), flush=True)
        notes = [f"  [{r.case} / {r.metric}] {r.note}" for r in self.rows if r.note]
        if notes:
            print("notes:\n" + "\n".join(notes))
        if json_path:
            write_json(json_path, self)
            print(f"figures written to {json_path}")
        return 0

    def as_dict(self) -> dict:
        return {
            **git_facts(),  # each bench's own: a suite file may gather runs of several commits
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else [],  # at its end
            "args": self.args,
            "started": self.started,
            "seconds": round(time.time() - self.started, 2),
            "columns": {"value": self.value_label, "baseline": self.baseline_label},
            "rows": [asdict(r) for r in self.rows],
            "extra": self.extra,
        }


def signed(x: float, unit: str) -> str:
    """``+1.5 ms``, ``-12 us``: an added amount with its sign."""
    if not math.isfinite(x):
        return f"{x} {unit}"
    return f"{'-' if x < 0 else '+'}{_num(abs(x))} {unit}"


def _num(x: float) -> str:
    if x is None or not math.isfinite(x):
        return str(x)
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}" if abs(x) < 1e7 else f"{x:.3g}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}".rstrip("0").rstrip(".")


def _clean(value):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: str, report: Report) -> None:
    """Merge ``report`` into the suite file at ``path`` (created if missing)."""
    target = Path(path)
    data: dict = {}
    if target.exists():
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(target.read_text())
    if data.get("schema") != SCHEMA:
        data = {"schema": SCHEMA}
    data.update(git_facts())
    data["machine"] = machine_facts()
    data.setdefault("benches", {})[report.bench] = report.as_dict()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=1, sort_keys=True) + "\n")
    tmp.replace(target)


def git_facts() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def machine_facts() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    versions = {}
    for name in ("libp2p", "trio", "msgspec", "httpx", "cryptography", "llama_cpp_python"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu,
        "memory_bytes": mem,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else [],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def apply_quick(args: argparse.Namespace, parser: argparse.ArgumentParser, **small: object) -> None:
    """With ``--quick``, set each of ``small`` that the command line left at its default
    (an option given explicitly wins, so a test can make a quick run even smaller)."""
    if not args.quick:
        return
    for name, value in small.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small run (seconds): sizes and repetitions cut down")
    parser.add_argument("--json", metavar="PATH", help="merge the figures into this JSON file (commit, machine, rows)")


# ------------------------------------------------------------------------ CPU time


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, every thread, the ended ones too
    (``/proc/<pid>/stat``; 1/CLK_TCK = 10 ms resolution, so meter blocks, not requests)."""
    if pid == os.getpid():
        return time.process_time()
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: fields 14 and 15


class CpuMeter:
    """CPU seconds spent by named processes between ``start`` and ``stop``, summed over
    any number of start/stop spans (interleaved samples each meter their own spans)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.total = dict.fromkeys(pids, 0.0)
        self._at: dict[str, float] | None = None
        self.spans = 0

    def _read(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            try:
                out[name] = cpu_seconds(pid)
            except OSError:
                out[name] = math.nan
        return out

    def start(self) -> None:
        self._at = self._read()

    def stop(self) -> None:
        assert self._at is not None, "stop() without start()"
        now = self._read()
        for name in self.pids:
            self.total[name] += now[name] - self._at[name]
        self._at = None
        self.spans += 1

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop()

    def per(self, count: int) -> dict[str, float]:
        """Milliseconds of CPU per ``count`` (requests), per process."""
        return {name: 1e3 * spent / count if count else math.nan for name, spent in self.total.items()}


# ------------------------------------------------------------------------ processes


@dataclass
class Child:
    """A process a bench started: its pid, what it printed when ready, its log file."""

    proc: subprocess.Popen
    ready: dict
    log: Path
    argv: list[str] = field(default_factory=list)
    _is_ready: Callable[[list[str]], dict | None] | None = None
    _deadline: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self) -> None:
        """SIGTERM to this pid only (nothing if it has exited)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; only this pid."""
        self.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self) -> "Child":
        """Read its stdout until it says it is up (``ready`` then holds what it said); the
        rest of its stdout goes to its log.

        Raises:
            RuntimeError: it exited or was not ready by its deadline; the message holds
                the end of its log. The process is stopped.
        """
        if self._is_ready is None:
            return self
        proc, lines, buf = self.proc, [], b""
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            while True:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self.argv[1:3]} not ready in time:\n{self.log_tail()}")
                if not sel.select(left):
                    continue
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    proc.wait(5)
                    raise RuntimeError(f"{self.argv[1:3]} exited ({proc.returncode}) before ready:\n"
                                       + "\n".join(lines) + "\n" + self.log_tail())  # fmt: skip
                buf += data
                *complete, buf = buf.split(b"\n")
                lines += [line.decode(errors="replace") for line in complete]
                if (info := self._is_ready(lines)) is not None:
                    break
        except BaseException:
            self.stop(1)
            raise
        finally:
            sel.close()
        self.ready, self._is_ready = info, None
        _drain_to(proc.stdout, self.log)  # so the child never blocks on a full pipe
        return self


@contextlib.contextmanager
def processes() -> Iterator[list[Child]]:
    """A list to put started children in; on the way out each gets SIGTERM (all at once,
    so their shutdowns overlap), then each is waited for, and killed if it lingers."""
    children: list[Child] = []
    try:
        yield children
    finally:
        for child in children:
            child.terminate()
        for child in reversed(children):
            child.stop()


@contextlib.contextmanager
def temp_dir(prefix: str = "loomnet-bench-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _spawn(argv: list[str], log: Path, ready: Callable[[list[str]], dict | None], timeout: float,
           env: dict | None = None, wait: bool = True) -> Child:  # fmt: skip
    """Start ``argv`` (stderr to ``log``); with ``wait``, return once it is ready
    (:meth:`Child.wait_ready`), else at once: start several, then wait for each, and
    their start-ups overlap."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT, start_new_session=True)
    child = Child(proc, {}, log, argv, ready, time.monotonic() + timeout)
    return child.wait_ready() if wait else child


def _drain_to(pipe, log: Path) -> None:
    import threading

    def pump() -> None:
        with open(log, "ab") as out:
            for chunk in iter(lambda: pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(65536), b""):
                out.write(chunk)

    threading.Thread(target=pump, daemon=True).start()


def child_env(home: Path) -> dict:
    env = dict(os.environ)
    env["LOOMNET_STATE_DIR"] = str(home / "state")  # never announce into the user's own state dir
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_fake(home: Path, *args: str, name: str = "fake", timeout: float = 30.0) -> Child:
    """The instant OpenAI-compatible fake (``bench/fake_backend.py``) in its own process;
    ``child.ready["url"]`` is its base URL (``/v1`` included)."""

    def ready(lines: list[str]) -> dict | None:
        for line in lines:
            if line.startswith("READY "):
                return {"url": line.split()[1]}
        return None

    argv = [sys.executable, str(BENCH_DIR / "fake_backend.py"), "--port", "0", *args]
    return _spawn(argv, home / f"{name}.log", ready, timeout, env=child_env(home))


def loomnet_command() -> list[str]:
    """The ``loomnet`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("loomnet")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from loomnet.node.cli import main; sys.exit(main())"]


_LISTEN = re.compile(r"^\s*listen\s*:\s*(\S+)")


def start_executor(home: Path, toml: str, *, name: str = "executor", instant: bool = False,
                   timeout: float = 90.0, wait: bool = True) -> Child:  # fmt: skip
    """An executor in its own process, configured by ``toml``: ``loomnet executor --config``
    (or, with ``instant``, ``bench/_instant_executor.py``: the same executor serving an
    in-process backend that answers at once). ``child.ready``: ``addr`` (loopback
    multiaddr with ``/p2p/``) and ``peer_id``, once ready (``wait=False``: call
    ``child.wait_ready()``; start several first, so their start-ups overlap)."""
    config = home / f"{name}.toml"
    config.write_text(toml)

    def ready(lines: list[str]) -> dict | None:
        if not any("executor ready" in line for line in lines):
            return None
        addrs = [m.group(1) for line in lines if (m := _LISTEN.match(line))]
        if not addrs:
            return None
        addr = next((a for a in addrs if "/127.0.0.1/" in a), addrs[0])
        return {"addr": addr, "peer_id": addr.rsplit("/p2p/", 1)[1]}

    if instant:
        argv = [sys.executable, str(BENCH_DIR / "_instant_executor.py"), "--config", str(config)]
    else:
        argv = [*loomnet_command(), "executor", "--config", str(config)]
    return _spawn(argv, home / f"{name}.log", ready, timeout, env=child_env(home), wait=wait)


def executor_toml(home: Path, name: str, *, backend: str | None, models: Sequence[str], extra: str = "") -> str:
    """An executor config for benches: loopback, no local announcement, and limits raised
    far above what a bench sends (capacity, queue, per-peer rate and streams), so they
    are not what is measured. ``backend``: the fake's base URL, or None for the
    embedded model (or the instant executor's own backend)."""
    lines = [
        f'data-dir = "{home / name}"',
        'listen = ["/ip4/127.0.0.1/tcp/0"]',
        "announce-local = false",
        "capacity = 256",
        "max-queue = 4096",
        "peer-requests-per-minute = 0",
        "peer-tokens-per-minute = 0",
        "max-streams-per-peer = 1024",
        "max-streams-per-connection = 1024",
        "health-interval = 60.0",
        "request-read-timeout = 30.0",
        "ack-timeout = 30.0",
        extra,
    ]
    if backend is not None:
        lines += ["", "[[backends]]", 'provider = "vllm"', f'endpoint = "{backend}"',
                  f"models = {json.dumps(list(models))}", "timeout = 30.0"]  # fmt: skip
    for model in models:
        lines += ["", "[[models]]", f'name = "{model}"']
    return "\n".join(lines) + "\n"
