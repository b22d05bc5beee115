"""An executor whose in-process backend floods: ``python bench/_firehose_executor.py
--config <toml>``. A chat whose last message is ``flood me`` streams 1 KiB text deltas
without end (only the executor's write deadline, or the client leaving, stops it);
any other chat is answered at once as ``bench/_instant_executor.py`` answers. It is the
real ``Executor`` otherwise, and prints what ``loomnet executor`` prints when ready.
Used by ``bench/slow_peers.py``: slow readers asking for an endless answer.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio.lowlevel
from _instant_executor import InstantBackend
from loomnet.node import Executor, load_config
from loomnet.node.backends._base import ChatParams, StreamEvent, TextDelta

FLOOD = "flood me"
DELTA = "lorem ipsum " * 85 + "dolor"  # 1 025 characters


class FirehoseBackend(InstantBackend):
    kind = "firehose"

    @asynccontextmanager
    async def stream_chat(self, params: ChatParams) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        if params.messages[-1].content != FLOOD:
            async with super().stream_chat(params) as events:
                yield events
            return

        async def events() -> AsyncIterator[StreamEvent]:
            while True:
                yield TextDelta(DELTA)
                await trio.lowlevel.checkpoint()

        yield events()


async def _memory_watch(path: str, every: float) -> None:
    """``LOOMNET_MEMWATCH=<file>``: every ``LOOMNET_MEMWATCH_EVERY`` seconds (default 5),
    append to ``<file>`` the RSS, the Python heap tracemalloc sees, the live objects by
    type that grew most, and the allocation sites that grew most since the first sample
    (to tell our objects from allocator growth)."""
    import collections
    import gc
    import os
    import tracemalloc

    def rss() -> float:
        for line in open(f"/proc/{os.getpid()}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def by_type() -> collections.Counter:
        return collections.Counter(type(o).__qualname__ for o in gc.get_objects())

    import ctypes
    import sys
    import threading

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def malloc() -> str:
        m = libc.mallinfo2()
        mib = 2**20
        return (f"malloc: arena={m.arena / mib:.1f} mmap={m.hblkhd / mib:.1f}({m.hblks}) used={m.uordblks / mib:.1f} "
                f"free={m.fordblks / mib:.1f} pyblocks={sys.getallocatedblocks()} threads={threading.active_count()}")

    def big_buffers() -> str:
        """Live str/bytes/bytearray of 16 KiB or more, found as referents of containers
        (they are not tracked by gc themselves), by the type of their holder; yamux state."""
        seen: set[int] = set()
        held: collections.Counter = collections.Counter()
        yamux = [0, 0, 0]  # connections, streams, buffered bytes
        sample: collections.Counter = collections.Counter()
        states: collections.Counter = collections.Counter()  # (closed, send_closed, recv_closed, reset, buffered, stamped, odd id)
        for holder in gc.get_objects():
            name = type(holder).__qualname__
            if name.endswith("Yamux") and hasattr(holder, "stream_buffers"):
                yamux[0] += 1
                yamux[1] += len(holder.streams)
                yamux[2] += sum(map(len, holder.stream_buffers.values()))
                for sid, st in holder.streams.items():
                    states[(st.closed, st.send_closed, st.recv_closed, getattr(st, "reset_received", None),
                            len(holder.stream_buffers.get(sid, b"")) > 0, getattr(st, "_closed_at", 0.0) > 0,
                            sid % 2)] += 1  # fmt: skip
                    if st.closed and holder.stream_buffers.get(sid):
                        sample[str(holder.peer_id)[-6:]] += 1
                        sample["bytes:" + bytes(holder.stream_buffers[sid][:24]).hex()] += 1
            for ref in gc.get_referents(holder):
                if isinstance(ref, (str, bytes, bytearray)) and id(ref) not in seen and sys.getsizeof(ref) >= 16384:
                    seen.add(id(ref))
                    held[name] += sys.getsizeof(ref)
        top = ", ".join(f"{k}:{v / 2**20:.1f}" for k, v in held.most_common(8))
        return f"yamux conns={yamux[0]} streams={yamux[1]} buffered={yamux[2] / 2**20:.1f}MiB; big buffers MiB by holder: {top}\n    stream states (closed, send_closed, recv_closed, reset_received, buffered, stamped, odd id): {dict(states.most_common(6))}\n    closed with unread bytes, by peer and first bytes: {dict(sample.most_common(10))}"

    frames = int(os.environ.get("LOOMNET_MEMWATCH_FRAMES", "12"))
    if frames:
        tracemalloc.start(frames)
    else:
        began = trio.current_time()
        with open(path, "a") as out:
            while True:
                await trio.sleep(every)
                out.write(f"t={trio.current_time() - began:.0f}s rss={rss():.1f}MiB {malloc()} "
                          f"objects={len(gc.get_objects())} tasks={trio.lowlevel.current_statistics().tasks_living}\n"
                          f"    {big_buffers()}\n")
                out.flush()
    first, types0, began = None, None, trio.current_time()
    with open(path, "a") as out:
        while True:
            await trio.sleep(every)
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            types = by_type()
            heap = sum(s.size for s in snap.statistics("filename")) / 2**20
            out.write(f"\n=== t={trio.current_time() - began:.0f}s rss={rss():.1f}MiB heap={heap:.1f}MiB "
                      f"objects={sum(types.values())} tasks={trio.lowlevel.current_statistics().tasks_living}\n")
            if first is None:
                first, types0 = snap, types
                out.flush()
                continue
            grown = sorted(((n - types0.get(k, 0), k, n) for k, n in types.items()), reverse=True)[:25]
            out.write("  types grown: " + ", ".join(f"{k}+{d}({n})" for d, k, n in grown if d > 0) + "\n")
            for stat in snap.compare_to(first, "traceback")[:12]:
                out.write(f"  {stat.size_diff / 1024:+.0f} KiB {stat.count_diff:+d} blocks (now {stat.size / 1024:.0f} KiB)\n")
                for line in stat.traceback.format()[-16:]:
                    out.write(f"      {line}\n")
            out.flush()


async def serve(config_path: str, model: str) -> None:
    import os

    node = Executor(load_config(config_path), backends=[FirehoseBackend(model)])
    async with trio.open_nursery() as nursery:
        if os.environ.get("LOOMNET_MEMWATCH"):
            every = float(os.environ.get("LOOMNET_MEMWATCH_EVERY", "5"))
            nursery.start_soon(_memory_watch, os.environ["LOOMNET_MEMWATCH"], every)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            info = await nursery.start(node.run)
            print(f"loomnet executor ready\n  peer id : {info.peer_id}", flush=True)
            for addr in info.addrs:
                print(f"  listen  : {addr}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.deadline = trio.current_time() + 5
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", default="bench-instant")
    args = parser.parse_args(argv)
    trio.run(serve, args.config, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
