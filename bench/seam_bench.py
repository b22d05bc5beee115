"""loomnet's own cost apart from py-libp2p's: the same requests over the in-memory stream
pair and over real libp2p streams, in one process.

The real client (``ChatStream`` with its ``SessionPool``) asks the real executor
(``InferenceServer``: intake, replay guard, limits, queue, relay, metering, the SQLite
ledger, receipts and acks) to answer from an in-process backend that answers at once
(``_instant_executor.InstantBackend``), ``--requests`` sequential requests per block,
blocks alternating between two transports, ``--rounds`` rounds:

* **memory** (the baseline): ``MemoryStreamOpener``, the transport seam's in-memory
  side (``client/_memory_stream.py``): no libp2p, no sockets; what is measured is
  loomnet alone;
* **libp2p**: two ``P2PNode``s on loopback (Noise, yamux), the executor's node serving
  ``/loomnet/infer/2`` and ``/1`` with the same ``InferenceServer.handle``;
* **libp2p, py-libp2p's credit rule**: the same two nodes with yamux's flow-control
  credit sent by py-libp2p's own rule (a ``WINDOW_UPDATE`` after almost every read)
  instead of trap Z's (``client/_p2p_yamux.py``; credit once 16 KiB is owed), swapped in
  for that path's blocks only: trap Z's effect measured in the same run. The window
  updates each path writes per request are counted at the muxers.

Both sides run in this process, so CPU per request is the two sides together
(``time.process_time``); wall per request is one request's whole exchange, receipt and
ack included. The added amount is what py-libp2p costs per request on top of loomnet.
No target: the issue asks that the bench separate the two, which this does.

Run: ``make bench-seam`` or ``.venv/bin/python bench/seam_bench.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Report, add_common_args, apply_quick, temp_dir  # noqa: E402
from _instant_executor import InstantBackend  # noqa: E402

from loomnet.client import Ledger, P2PConfig, TokenCounter  # noqa: E402
from loomnet.client._chat_stream import ChatStream, RequestOptions, StreamKit  # noqa: E402
from loomnet.client._memory_stream import MemoryStreamOpener  # noqa: E402
from loomnet.client._offers import Offer  # noqa: E402
from loomnet.client import _p2p  # noqa: E402
from loomnet.client._p2p import P2PNode  # noqa: E402
from loomnet.client._session_pool import SessionPool  # noqa: E402
from loomnet.node._catalog import Catalog  # noqa: E402
from loomnet.node._server import InferenceServer  # noqa: E402
from loomnet.node.config import ExecutorConfig  # noqa: E402
from loomnet.protocol import (  # noqa: E402
    INFER_PROTOCOL, INFER_SESSION_PROTOCOL, Advert, ChatMessage, ModelOffer, SigningKey,
)  # fmt: skip

MODEL = "bench-instant"
HELLO = [ChatMessage("user", "Say hi.")]


async def run(args: argparse.Namespace, report: Report) -> None:
    tokens = TokenCounter()
    tokens.count("warm")  # a client loads its encoding at start (open_client)
    executor_key, client_key = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    with temp_dir() as home:
        config = ExecutorConfig(
            data_dir=str(home), capacity=64, peer_requests_per_minute=0, max_streams_per_peer=1024,
        )  # fmt: skip
        catalog = await Catalog.build([InstantBackend(MODEL, default_tokens=args.tokens)], config)
        server_ledger = await Ledger.open(home / "executor.sqlite")
        client_ledger = await Ledger.open(home / "client.sqlite")
        server = InferenceServer(executor_key, config, catalog, server_ledger, tokens=tokens)
        model = ModelOffer(name=MODEL)
        try:
            async with trio.open_nursery() as nursery:
                memory = MemoryStreamOpener(nursery, client_key.peer_id)
                executor_node = P2PNode(executor_key.seed, P2PConfig(max_streams_per_connection=1024))
                client_node = P2PNode(client_key.seed, P2PConfig())
                for protocol in (INFER_SESSION_PROTOCOL, INFER_PROTOCOL):
                    memory.serve(executor_key.peer_id, protocol, server.handle)
                    executor_node.set_stream_handler(protocol, server.handle, max_streams_per_peer=1024)
                info = await nursery.start(executor_node.run)
                await nursery.start(client_node.run)
                paths = {}
                for name, opener, addrs in (("memory", memory, []), ("libp2p", client_node, list(info.addrs)),
                                            (OLD_CREDIT, client_node, list(info.addrs))):  # fmt: skip
                    kit = StreamKit(opener=opener, key=client_key, ledger=client_ledger, tokens=tokens,
                                    sessions=SessionPool(opener))  # fmt: skip
                    offer = Offer(executor=executor_key.peer_id, model=model, expires_at=float("inf"),
                                  advert=Advert(seq=1, issued_at=0.0, ttl=60.0, models=[model], addrs=addrs))  # fmt: skip
                    paths[name] = (kit, offer)

                async def ask(name: str) -> None:
                    kit, offer = paths[name]
                    stream = ChatStream(kit, offer, HELLO, RequestOptions(max_tokens=args.tokens))
                    try:
                        await stream.open()
                        await stream.start()
                        async for _ in stream:
                            pass
                    finally:
                        await stream.aclose()

                wall: dict[str, list[float]] = {name: [] for name in paths}
                cpu: dict[str, list[float]] = {name: [] for name in paths}
                updates: dict[str, list[float]] = {name: [] for name in paths}
                for name in paths:  # warm: sessions opened, connections made, caches filled
                    with credit_rule(name):
                        for _ in range(args.warmup):
                            await ask(name)
                counted = count_window_updates(client_node, executor_node)
                for r in range(args.rounds):
                    order = list(paths) if r % 2 == 0 else list(reversed(paths))
                    for name in order:
                        with credit_rule(name):
                            before = counted[0]
                            c0, t0 = time.process_time(), time.perf_counter()
                            for _ in range(args.requests):
                                await ask(name)
                            cpu[name].append((time.process_time() - c0) / args.requests * 1000)
                            wall[name].append((time.perf_counter() - t0) / args.requests * 1000)
                            updates[name].append((counted[0] - before) / args.requests)
                stats = server.statistics()
                nursery.cancel_scope.cancel()
        finally:
            await client_ledger.aclose()
            await server_ledger.aclose()
    case = f"{args.tokens} tokens, 1 client task, sessions"
    note = f"{args.rounds} blocks of {args.requests} requests per path; medians of the blocks"
    for metric, samples in (("wall per request", wall), ("CPU per request (both sides)", cpu)):
        mem, p2p = statistics.median(samples["memory"]), statistics.median(samples["libp2p"])
        report.row(case, metric, "ms", p2p, baseline=mem, compare="added", note=note)
        report.row(case, metric + ", libp2p / memory", "x", p2p / mem if mem else float("nan"))
        old = statistics.median(samples[OLD_CREDIT])
        report.row(case, metric + ", py-libp2p's credit rule -> trap Z", "ms", p2p, baseline=old, compare="ratio",
                   note="baseline: the libp2p path with py-libp2p's own yamux credit rule")  # fmt: skip
    report.row(case, "window updates per request, py-libp2p's credit rule -> trap Z", "frames",
               statistics.median(updates["libp2p"]), baseline=statistics.median(updates[OLD_CREDIT]))  # fmt: skip
    report.extra = {"wall_ms": wall, "cpu_ms": cpu, "window_updates": updates,
                    "server": {"served": stats.served, "sessions": stats.sessions}}  # fmt: skip


OLD_CREDIT = "libp2p, py-libp2p's credit rule"


@contextlib.contextmanager
def credit_rule(path: str) -> Iterator[None]:
    """py-libp2p's own yamux credit rule while ``path`` is ``OLD_CREDIT``'s blocks run."""
    stream_class = _p2p.YamuxStream
    ours = stream_class._auto_tune_and_send_window_update
    if path == OLD_CREDIT:
        stream_class._auto_tune_and_send_window_update = _p2p.LIBP2P_CREDIT_RULE
    try:
        yield
    finally:
        stream_class._auto_tune_and_send_window_update = ours


def count_window_updates(*nodes: P2PNode) -> list[int]:
    """Count, from now on, the plain WINDOW_UPDATE frames (credit: no SYN/ACK/FIN/RST
    flags) the open connections of ``nodes`` write; ``[count]``, updated in place."""
    counted = [0]
    for node in nodes:
        for muxer in node._guard.open_muxers():
            write = muxer._write_frame

            async def counting(data: bytes, write=write) -> None:  # noqa: ANN001
                if data[1] == 1 and data[2:4] == b"\0\0":  # type WINDOW_UPDATE, no flags
                    counted[0] += 1
                await write(data)

            muxer._write_frame = counting
    return counted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50, help="sequential requests per block")
    parser.add_argument("--rounds", type=int, default=8, help="blocks per path, alternating")
    parser.add_argument("--warmup", type=int, default=5, help="requests per path before timing")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_quick(args, parser, requests=10, rounds=2, warmup=2)
    logging.getLogger("loomnet").setLevel(logging.WARNING)
    report = Report("seam", {k: v for k, v in vars(args).items() if k != "json"},
                    baseline_label="memory", value_label="libp2p")  # fmt: skip
    trio.run(run, args, report)
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
