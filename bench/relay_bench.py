"""The executor's relay of one answer (``node/_relay.py``): per-token cost and first-frame delay.

``relay_answer`` runs between an in-process backend and a null stream (writes are
counted and dropped, reads wait forever, as a client that sends nothing before its
receipt), so what is measured is loomnet's own relay, not libp2p or HTTP. Two numbers:

* **per token**: CPU µs (``time.process_time``) to relay ``--tokens`` deltas from a
  backend that yields them as fast as it can, minus the same backend iterated bare (the
  floor, in the same run), divided by the tokens. Three backends: ``plain`` (an async
  generator that checkpoints once per delta, as one reading a socket would), ``burst``
  (no checkpoint between deltas: many SSE events in one read) and ``safe-channel`` (the
  ``plain`` generator behind ``trio.as_safe_channel``, as the real adapters are);
* **first frame**: wall ms from the backend yielding its first delta to the first chunk
  frame handed to the stream, for a backend that yields a delta every millisecond.

``--compare REV`` also loads ``node/_relay.py`` as it was at git revision ``REV`` and
measures it in the same run, interleaved, so the two columns share the machine's load.
Medians of ``--reps`` runs.

Run: ``.venv/bin/python bench/relay_bench.py [--tokens 2000] [--reps 15] [--compare 255f953]``
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import trio

import loomnet.node
from loomnet.node import _relay
from loomnet.node._metering import Output
from loomnet.node.backends._base import Finished, TextDelta
from loomnet.protocol import (
    ChatMessage,
    InferenceConnection,
    InferenceRequest,
    RequestFrame,
    Role,
    SignedKind,
    SigningKey,
    seal,
)

KEY = SigningKey(bytes(range(32)))


class NullStream:
    """A client that reads everything at once and sends nothing: writes are counted."""

    remote_peer = "bench"

    def __init__(self, on_first_write: Callable[[], None] = lambda: None) -> None:
        self.frames = 0
        self.bytes = 0
        self._on_first_write = on_first_write

    async def send_all(self, data: bytes, *, timeout: float) -> None:
        if not self.frames:
            self._on_first_write()
        self.frames += 1
        self.bytes += len(data)
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int = 65536, *, timeout: float) -> bytes:
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover


def open_conn() -> InferenceConnection:
    """An executor-side state machine that has read a request (state OPEN)."""
    request = InferenceRequest(
        audience=KEY.peer_id, nonce=b"\0" * 16, created_at=1.0, model="m", messages=[ChatMessage("user", "hi")]
    )
    client, executor = InferenceConnection(Role.CLIENT), InferenceConnection(Role.EXECUTOR)
    executor.receive_data(client.send(RequestFrame(seal(SignedKind.REQUEST, request, KEY))))
    executor.next_event()
    return executor


def backend(kind: str, n: int, *, gap: float = 0.0, on_first: Callable[[], None] = lambda: None):
    """``open_events`` for ``relay_answer``: ``n`` one-word deltas, then Finished."""

    async def generate() -> AsyncIterator[object]:
        for i in range(n):
            if gap:
                await trio.sleep(gap)
            elif kind != "burst":
                await trio.lowlevel.checkpoint()
            if i == 0:
                on_first()
            yield TextDelta(" word")
        yield Finished(finish_reason="stop")

    if kind == "safe-channel":
        return trio.as_safe_channel(generate)

    @asynccontextmanager
    async def open_events() -> AsyncIterator[AsyncIterator[object]]:
        yield generate()

    return open_events


async def relay_once(module: types.ModuleType, open_events, stream: NullStream) -> None:
    await module.relay_answer(
        stream, open_conn(), open_events, Output(), chunk_interval=0.05, progress_interval=3.0, send_timeout=10
    )


async def floor_once(open_events) -> None:
    async with open_events() as events:
        async for _ in events:
            pass


def cpu(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def per_token(module: types.ModuleType, kind: str, n: int) -> tuple[float, int]:
    stream = NullStream()
    seconds = cpu(lambda: trio.run(relay_once, module, backend(kind, n), stream))
    return seconds, stream.frames


def first_frame(module: types.ModuleType, n: int = 200) -> float:
    marks: dict[str, float] = {}
    stream = NullStream(on_first_write=lambda: marks.setdefault("sent", time.perf_counter()))
    events = backend("plain", n, gap=0.001, on_first=lambda: marks.setdefault("first", time.perf_counter()))
    trio.run(relay_once, module, events, stream)
    return marks["sent"] - marks["first"]


def load_relay_at(rev: str) -> types.ModuleType:
    """``node/_relay.py`` as of git revision ``rev``, as a module of ``loomnet.node``."""
    root = Path(loomnet.node.__file__).parent.parent
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{rev}:node/_relay.py"], check=True, capture_output=True, text=True
    ).stdout
    name = f"loomnet.node._relay_at_{rev}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "loomnet.node"
    sys.modules[name] = module
    exec(compile(source, f"{rev}:node/_relay.py", "exec"), module.__dict__)
    return module


class Row(msgspec.Struct):
    relay: str
    kind: str
    us_per_token: float
    us_per_token_over_floor: float
    frames: int


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--compare", metavar="REV", help="also measure node/_relay.py at this git revision")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = parser.parse_args()
    relays = {"now": _relay}
    if args.compare:
        relays[args.compare] = load_relay_at(args.compare)
    n, kinds = args.tokens, ("plain", "burst", "safe-channel")
    samples: dict[tuple[str, str], list[float]] = {(r, k): [] for r in [*relays, "floor"] for k in kinds}
    frames: dict[tuple[str, str], int] = {}
    firsts: dict[str, list[float]] = {r: [] for r in relays}
    for _ in range(args.reps):  # interleaved: every relay sees the same load
        for kind in kinds:
            samples["floor", kind].append(cpu(lambda: trio.run(floor_once, backend(kind, n))))
            for name, module in relays.items():
                seconds, frames[name, kind] = per_token(module, kind, n)
                samples[name, kind].append(seconds)
        for name, module in relays.items():
            firsts[name].append(first_frame(module))
    rows = []
    print(f"relay_answer, {n} tokens per answer, median of {args.reps} runs (CPU time)")
    print(f"{'relay':>10} {'backend':>13} {'µs/token':>9} {'over floor':>11} {'frames':>7}")
    for kind in kinds:
        floor = statistics.median(samples["floor", kind]) / n * 1e6
        print(f"{'floor':>10} {kind:>13} {floor:9.1f} {'':>11} {'':>7}")
        for name in relays:
            total = statistics.median(samples[name, kind]) / n * 1e6
            rows.append(Row(name, kind, total, total - floor, frames[name, kind]))
            print(f"{name:>10} {kind:>13} {total:9.1f} {total - floor:11.1f} {frames[name, kind]:7d}")
    print("first frame after the backend's first delta (wall ms, p50 / max):")
    for name, values in firsts.items():
        print(f"{name:>10} {statistics.median(values) * 1e3:9.3f} / {max(values) * 1e3:.3f}")
    if args.json:
        out = {"tokens": n, "reps": args.reps, "rows": rows,
               "first_frame_ms": {k: statistics.median(v) * 1e3 for k, v in firsts.items()}}  # fmt: skip
        Path(args.json).write_bytes(msgspec.json.encode(out))
    return 0 if math.isfinite(rows[0].us_per_token) else 1


if __name__ == "__main__":
    sys.exit(main())
