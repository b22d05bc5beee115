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
  frame handed to the stream, for a backend that yields a delta every millisecond;
* with ``--embedded N``: time to first token of the embedded model (SmolLM2, in
  process, 32 tokens an answer), straight from ``stream_chat`` and through the relay,
  ``N`` requests each, interleaved.

``--ledger`` measures the ledger writes after an answer instead, on a real SQLite file
(fsync'd: ``synchronous=FULL``) in ``--dir``: the client's settle (its receipt and its
ack) and ``--concurrency`` executors' receipts booked at once, as wall ms per booking
and commits per booking. With ``--compare REV`` the same with ``client/_ledger.py`` as it
was at ``REV`` (two writes per settle, one commit per write).

``--meter`` measures ``Meter.book`` instead (count, sign, book a receipt; the ledger a
no-op): CPU µs per receipt for an answer of ``--chars`` characters whose usage the
runtime reported, the commonest receipt; with ``--compare REV``, ``node/_metering.py``
as it was at ``REV`` too.

``--compare REV`` also loads ``node/_relay.py`` as it was at git revision ``REV`` and
measures it in the same run, interleaved, so the two columns share the machine's load.
Medians of ``--reps`` runs.

Run: ``.venv/bin/python bench/relay_bench.py [--tokens 2000] [--reps 15] [--compare 255f953]``
and ``.venv/bin/python bench/relay_bench.py --ledger [--concurrency 1,8,64] [--compare 255f953]``
and ``.venv/bin/python bench/relay_bench.py --meter [--chars 600,8000] [--compare 255f953]``
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import statistics
import subprocess
import sys
import tempfile
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


def load_at(rev: str, path: str, package: str) -> types.ModuleType:
    """The module at ``path`` as of git revision ``rev``, as a module of ``package``."""
    root = Path(loomnet.node.__file__).parent.parent
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    name = f"{package}._{Path(path).stem.strip('_')}_at_{rev}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    sys.modules[name] = module
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


# ---------------------------------------------------------------------- the ledger


def receipts(n: int, salt: int) -> list[tuple[object, object, object]]:
    """``n`` signed receipts with their acks: (envelope, receipt, ack)."""
    from loomnet.protocol import Receipt, ReceiptAck, digest

    out = []
    for i in range(n):
        receipt = Receipt(
            request_digest=digest(b"%d %d" % (salt, i)), client=KEY.peer_id, model="m", input_tokens=10,
            output_tokens=20, count_source="backend", price_in=0, price_out=0, cost=0,
            output_digest=digest(b"text"), chunks=2, finish_reason="stop", issued_at=1.0,
        )  # fmt: skip
        envelope = seal(SignedKind.RECEIPT, receipt, KEY)
        ack = seal(SignedKind.RECEIPT_ACK, ReceiptAck(receipt_digest=digest(envelope.payload), accepted_at=2.0,
                                                      client_output_tokens=20), KEY)  # fmt: skip
        out.append((envelope, receipt, ack))
    return out


async def settle_once(module: types.ModuleType, ledger, item, combined: bool) -> None:
    envelope, receipt, ack = item
    if combined:
        await ledger.record_receipt(envelope, receipt, role="client", executor="x", now=1.0, ack=ack)
    else:
        key = await ledger.record_receipt(envelope, receipt, role="client", executor="x", now=1.0)
        await ledger.record_ack(key, ack)


async def ledger_case(module: types.ModuleType, path: Path, case: str, n: int, salt: int) -> tuple[float, int]:
    """Wall seconds per booking, and commits (COMMIT statements) for all ``n``."""
    ledger = await module.Ledger.open(path)
    commits = 0
    conn = ledger._conn

    class Counting:
        """Counts transactions: each COMMIT, and each write made outside a transaction
        (autocommit: SQLite commits it on its own)."""

        def execute(self, sql, *args):
            nonlocal commits
            word = sql.split(None, 1)[0].upper()
            commits += word == "COMMIT" or (word in ("INSERT", "UPDATE") and not conn.in_transaction)
            return conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(conn, name)

    ledger._conn = Counting()
    items = receipts(n, salt)
    combined = hasattr(module, "LedgerStatistics")
    start = time.perf_counter()
    if case == "settle":
        for item in items:
            await settle_once(module, ledger, item, combined)
    else:
        async with trio.open_nursery() as nursery:
            for envelope, receipt, _ in items:
                nursery.start_soon(
                    functools.partial(ledger.record_receipt, envelope, receipt, role="executor", executor="x", now=1.0)
                )
    seconds = (time.perf_counter() - start) / n
    ledger._conn = conn
    await ledger.aclose()
    return seconds, commits


def ledger_bench(args: argparse.Namespace) -> int:
    """The ``--ledger`` table (module doc)."""
    from loomnet.client import _ledger

    modules = {"now": _ledger}
    if args.compare:
        modules[args.compare] = load_at(args.compare, "client/_ledger.py", "loomnet.client")
    cases = [("settle", 20)] + [(f"x{c}", c) for c in args.concurrency]
    samples: dict[tuple[str, str], list[float]] = {(m, c): [] for m in modules for c, _ in cases}
    commits: dict[tuple[str, str], float] = {}
    base = Path(tempfile.mkdtemp(prefix="relay-bench-", dir=args.dir))
    salt = 0
    for _ in range(args.reps):
        for case, n in cases:
            for name, module in modules.items():
                salt += 1
                seconds, done = trio.run(ledger_case, module, base / f"{salt}.sqlite", case, n, salt)
                samples[name, case].append(seconds)
                commits[name, case] = done / n
    print(f"ledger writes on {base} (wall ms per booking, median of {args.reps} runs; fsync'd)")
    print(f"{'ledger':>10} {'case':>10} {'ms/booking':>11} {'commits/booking':>16}")
    for case, n in cases:
        label = "client settle (receipt+ack)" if case == "settle" else f"{n} executor receipts at once"
        print(f"-- {label}")
        for name in modules:
            ms = statistics.median(samples[name, case]) * 1e3
            print(f"{name:>10} {case:>10} {ms:11.3f} {commits[name, case]:16.2f}")
    return 0


async def embedded_ttft(modules: dict[str, types.ModuleType], n: int) -> dict[str, list[float]]:
    """TTFT (wall s) of the embedded model straight and through each relay (module doc)."""
    from loomnet.node.backends._base import ChatParams
    from loomnet.node.backends.embedded import EmbeddedBackend, EmbeddedConfig

    params = ChatParams(model="smollm2-135m", messages=[ChatMessage("user", "Say hello.")], max_tokens=32)
    out: dict[str, list[float]] = {"direct": [], **{name: [] for name in modules}}
    async with EmbeddedBackend(EmbeddedConfig(seed=1)) as model:
        for _ in range(n):
            start, first = time.perf_counter(), math.nan
            async with model.stream_chat(params) as events:
                async for event in events:
                    if math.isnan(first) and isinstance(event, TextDelta):
                        first = time.perf_counter() - start
            out["direct"].append(first)
            for name, module in modules.items():
                marks: list[float] = []
                stream = NullStream(on_first_write=lambda: marks.append(time.perf_counter()))
                start = time.perf_counter()
                await relay_once(module, functools.partial(model.stream_chat, params), stream)
                out[name].append(marks[0] - start)
    return out


class Row(msgspec.Struct):
    relay: str
    kind: str
    us_per_token: float
    us_per_token_over_floor: float
    frames: int


# ---------------------------------------------------------------------- the meter


class _NullLedger:
    async def record_receipt(self, envelope, receipt, **booking) -> bytes:
        from loomnet.protocol import digest

        return digest(envelope.payload)


class _SilentBackend:
    """A runtime with no tokenizer: counts fall to tiktoken, as for most HTTP backends."""

    kind = "bench"

    async def count_tokens(self, model: str, text: str) -> None:
        return None

    async def count_prompt_tokens(self, params: object) -> None:
        return None


async def meter_once(module: types.ModuleType, meter, entry, params, output, usage, n: int) -> None:
    for _ in range(n):
        await meter.book(request_payload=b"r" * 300, client="c", entry=entry, params=params, output=output,
                         finish_reason="stop", usage=usage)  # fmt: skip


def meter_bench(args: argparse.Namespace) -> int:
    """The ``--meter`` table (module doc)."""
    from loomnet.client import TokenCounter
    from loomnet.node import _metering
    from loomnet.node._catalog import CatalogEntry
    from loomnet.node.backends._base import ChatParams, Usage
    from loomnet.protocol import ChunkFrame, ModelOffer

    modules = {"now": _metering}
    if args.compare:
        modules[args.compare] = load_at(args.compare, "node/_metering.py", "loomnet.node")
    tokens = TokenCounter()
    tokens.load("cl100k_base")
    entry = CatalogEntry(ModelOffer(name="m", price_in=150_000, price_out=600_000), _SilentBackend(), "m")
    params = ChatParams(model="m", messages=[ChatMessage("user", "Say hello, please.")])
    n = 200
    print(f"Meter.book, usage reported by the runtime (CPU µs per receipt, median of {args.reps} runs of {n})")
    for chars in args.chars:
        output = _metering.Output()
        words = ("Hello there, this is a sentence. " * (chars // 33 + 1))[:chars]
        for i in range(0, chars, 128):
            output.record(ChunkFrame(seq=len(output.chunks), text=words[i:i + 128]))
        usage = Usage(input_tokens=12, output_tokens=chars // 4, source="backend")
        samples: dict[str, list[float]] = {name: [] for name in modules}
        for _ in range(args.reps):
            for name, module in modules.items():
                meter = module.Meter(KEY, _NullLedger(), tokens)
                samples[name].append(cpu(lambda: trio.run(meter_once, module, meter, entry, params, output, usage, n)))
        for name in modules:
            print(f"{name:>10} {chars:7d} chars {statistics.median(samples[name]) / n * 1e6:9.1f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--compare", metavar="REV", help="also measure node/_relay.py at this git revision")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    parser.add_argument("--ledger", action="store_true", help="measure the ledger writes instead")
    parser.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8, 64])
    parser.add_argument("--dir", help="where the --ledger files go (default: the system's temp dir)")
    parser.add_argument("--meter", action="store_true", help="measure Meter.book instead")
    parser.add_argument("--embedded", type=int, default=0, metavar="N", help="also time the embedded model's TTFT")
    parser.add_argument("--chars", type=lambda v: [int(x) for x in v.split(",")], default=[600, 8000])
    args = parser.parse_args()
    if args.ledger:
        return ledger_bench(args)
    if args.meter:
        return meter_bench(args)
    relays = {"now": _relay}
    if args.compare:
        relays[args.compare] = load_at(args.compare, "node/_relay.py", "loomnet.node")
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
    if args.embedded:
        ttft = trio.run(embedded_ttft, relays, args.embedded)
        print(f"embedded model, time to first token (wall ms, p50 / p95 of {args.embedded}):")
        for name, values in ttft.items():
            values.sort()
            p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
            print(f"{name:>10} {statistics.median(values) * 1e3:9.1f} / {p95 * 1e3:.1f}")
    if args.json:
        out = {"tokens": n, "reps": args.reps, "rows": rows,
               "first_frame_ms": {k: statistics.median(v) * 1e3 for k, v in firsts.items()}}  # fmt: skip
        Path(args.json).write_bytes(msgspec.json.encode(out))
    return 0 if math.isfinite(rows[0].us_per_token) else 1


if __name__ == "__main__":
    sys.exit(main())
