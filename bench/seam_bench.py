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
  ``/loomnet/infer/2`` and ``/1`` with the same ``InferenceServer.handle``.

Both sides run in this process, so CPU per request is the two sides together
(``time.process_time``); wall per request is one request's whole exchange, receipt and
ack included. The added amount is what py-libp2p costs per request on top of loomnet.
No target: the issue asks that the bench separate the two, which this does.

Run: ``make bench-seam`` or ``.venv/bin/python bench/seam_bench.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Report, add_common_args, apply_quick, temp_dir  # noqa: E402
from _instant_executor import InstantBackend  # noqa: E402

from loomnet.client import Ledger, P2PConfig, TokenCounter  # noqa: E402
from loomnet.client._chat_stream import ChatStream, RequestOptions, StreamKit  # noqa: E402
from loomnet.client._memory_stream import MemoryStreamOpener  # noqa: E402
from loomnet.client._offers import Offer  # noqa: E402
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
                for name, opener, addrs in (("memory", memory, []), ("libp2p", client_node, list(info.addrs))):
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

                wall: dict[str, list[float]] = {"memory": [], "libp2p": []}
                cpu: dict[str, list[float]] = {"memory": [], "libp2p": []}
                for name in paths:  # warm: sessions opened, connections made, caches filled
                    for _ in range(args.warmup):
                        await ask(name)
                for r in range(args.rounds):
                    order = ("memory", "libp2p") if r % 2 == 0 else ("libp2p", "memory")
                    for name in order:
                        c0, t0 = time.process_time(), time.perf_counter()
                        for _ in range(args.requests):
                            await ask(name)
                        cpu[name].append((time.process_time() - c0) / args.requests * 1000)
                        wall[name].append((time.perf_counter() - t0) / args.requests * 1000)
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
    report.extra = {"wall_ms": wall, "cpu_ms": cpu, "server": {"served": stats.served, "sessions": stats.sessions}}


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
