"""The py-libp2p floor: what raw py-libp2p 0.8.1 costs on loopback, without loomnet, next
to plain trio TCP in the same process. Where loomnet's figures sit near these, libp2p
itself is the bottleneck (``reference/libp2p.md`` has the first measurements).

Two hosts (``new_host``, Noise, the default muxer, ``max_connections_per_peer=1`` against
the 250 ms dial floor, trap A) in this one process, an echo protocol, and:

* **new stream + echo**: ``new_stream`` (multistream-select included), 64 B written and
  read back, ``close``: what a request on a stream of its own pays before any work;
* **new stream**: ``new_stream`` then ``close``, nothing sent;
* **round trip**: 64 B echoed on one long-lived stream (what a session stream pays per
  request);
* **frames one way**: ``--frames`` writes of 100 B on a new stream, then a 2-byte answer
  once all arrived: frames per second.

Baseline: the same on plain trio TCP sockets (a new connection per "stream").
Each figure is the median (p50) of ``--samples`` samples, interleaved libp2p/TCP.

Run: ``make bench-libp2p`` or ``.venv/bin/python bench/libp2p_floor.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Report, add_common_args, apply_quick, pct  # noqa: E402

T_IMPORT = time.perf_counter()
from libp2p import new_host  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.custom_types import TProtocol  # noqa: E402
from libp2p.network.config import ConnectionConfig  # noqa: E402
from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: E402
from multiaddr import Multiaddr  # noqa: E402

IMPORT_S = time.perf_counter() - T_IMPORT
logging.getLogger("libp2p").setLevel(logging.CRITICAL)

ECHO = TProtocol("/bench/echo/1")
SINK = TProtocol("/bench/sink/1")
PING = b"x" * 64


async def read_exactly(read, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = await read(n - len(buf))
        if not data:
            raise EOFError("stream ended early")
        buf += data
    return buf


# ----------------------------------------------------------------- libp2p


async def echo_handler(stream) -> None:
    try:
        while True:
            data = await stream.read(65536)
            if not data:
                break
            await stream.write(data)
    except Exception:  # noqa: BLE001 - a reset ends the echo (trap B: never let it escape)
        pass
    finally:
        try:
            await stream.close()
        except Exception:  # noqa: BLE001
            pass


async def sink_handler(stream) -> None:
    """Reads an 8-byte total, then that many bytes, then answers ``ok``."""
    try:
        buf = b""
        while len(buf) < 8 or len(buf) < 8 + int.from_bytes(buf[:8], "big"):
            data = await stream.read(65536)
            if not data:
                return
            buf += data
        await stream.write(b"ok")
    except Exception:  # noqa: BLE001
        pass
    finally:
        try:
            await stream.close()
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------- plain TCP


async def tcp_echo(stream: trio.SocketStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def tcp_sink(stream: trio.SocketStream) -> None:
    try:
        buf = b""
        while len(buf) < 8 or len(buf) < 8 + int.from_bytes(buf[:8], "big"):
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        await stream.send_all(b"ok")
    except trio.BrokenResourceError:
        pass


async def run(args: argparse.Namespace, report: Report) -> None:
    config = ConnectionConfig(max_connections_per_peer=1)
    server = new_host(key_pair=create_new_key_pair(os.urandom(32)), connection_config=config)
    client = new_host(key_pair=create_new_key_pair(os.urandom(32)), connection_config=config)
    server.set_stream_handler(ECHO, echo_handler)
    server.set_stream_handler(SINK, sink_handler)
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with server.run(listen_addrs=listen), client.run(listen_addrs=listen), trio.open_nursery() as nursery:
        echo_l = (await nursery.start(trio.serve_tcp, tcp_echo, 0))[0]
        sink_l = (await nursery.start(trio.serve_tcp, tcp_sink, 0))[0]
        echo_port, sink_port = echo_l.socket.getsockname()[1], sink_l.socket.getsockname()[1]
        addr = next(a for a in server.get_addrs() if "/127.0.0.1/" in str(a))
        info = info_from_p2p_addr(Multiaddr(f"{addr}/p2p/{server.get_id()}") if "/p2p/" not in str(addr) else addr)
        t0 = time.perf_counter()
        await client.connect(info)
        connect_ms = 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        tcp = await trio.open_tcp_stream("127.0.0.1", echo_port)
        tcp_connect_ms = 1e3 * (time.perf_counter() - t0)
        await tcp.aclose()
        peer = server.get_id()

        async def p2p_open_echo() -> float:
            t = time.perf_counter()
            s = await client.new_stream(peer, [ECHO])
            await s.write(PING)
            await read_exactly(s.read, len(PING))
            await s.close()
            return time.perf_counter() - t

        async def p2p_open() -> float:
            t = time.perf_counter()
            s = await client.new_stream(peer, [ECHO])
            await s.close()
            return time.perf_counter() - t

        async def tcp_open_echo() -> float:
            t = time.perf_counter()
            s = await trio.open_tcp_stream("127.0.0.1", echo_port)
            await s.send_all(PING)
            await read_exactly(s.receive_some, len(PING))
            await s.aclose()
            return time.perf_counter() - t

        muxer = ""
        for _ in range(5):  # warm
            await p2p_open_echo()
            await tcp_open_echo()
        opens, opens_tcp, bare = [], [], []
        for i in range(args.samples):
            pair = (p2p_open_echo, tcp_open_echo) if i % 2 == 0 else (tcp_open_echo, p2p_open_echo)
            for fn in pair:
                (opens if fn is p2p_open_echo else opens_tcp).append(1e3 * await fn())
            bare.append(1e3 * await p2p_open())
        await trio.sleep(0.2)  # let the closed streams' last frames go

        s = await client.new_stream(peer, [ECHO])
        muxer = type(s.muxed_conn).__name__
        t = await trio.open_tcp_stream("127.0.0.1", echo_port)
        rtt, rtt_tcp = [], []
        for _ in range(20):
            await s.write(PING)
            await read_exactly(s.read, 64)
            await t.send_all(PING)
            await read_exactly(t.receive_some, 64)
        for _ in range(args.samples):
            a = time.perf_counter()
            await s.write(PING)
            await read_exactly(s.read, 64)
            b = time.perf_counter()
            await t.send_all(PING)
            await read_exactly(t.receive_some, 64)
            c = time.perf_counter()
            rtt.append(1e3 * (b - a))
            rtt_tcp.append(1e3 * (c - b))
        await s.close()
        await t.aclose()

        frame = b"f" * 100
        rates, rates_tcp = [], []
        for _ in range(args.frame_runs):
            a = time.perf_counter()
            total = (len(frame) * args.frames).to_bytes(8, "big")
            s = await client.new_stream(peer, [SINK])
            await s.write(total)
            for _ in range(args.frames):
                await s.write(frame)
            await read_exactly(s.read, 2)  # the sink answers once everything arrived
            await s.close()
            b = time.perf_counter()
            t = await trio.open_tcp_stream("127.0.0.1", sink_port)
            await t.send_all(total)
            for _ in range(args.frames):
                await t.send_all(frame)
            await read_exactly(t.receive_some, 2)
            await t.aclose()
            c = time.perf_counter()
            rates.append(args.frames / (b - a))
            rates_tcp.append(args.frames / (c - b))
        nursery.cancel_scope.cancel()
        await client.close()
        await server.close()

    case = f"py-libp2p ({muxer}, Noise)"
    report.row(case, "connect (dial + Noise + muxer)", "ms", connect_ms, baseline=tcp_connect_ms, compare="ratio")
    report.row(case, "new stream + 64 B echo + close p50", "ms", pct(opens, 0.5), baseline=pct(opens_tcp, 0.5),
               compare="ratio", note="baseline: a new TCP connection each time")  # fmt: skip
    report.row(case, "new stream + 64 B echo + close p95", "ms", pct(opens, 0.95), baseline=pct(opens_tcp, 0.95), compare="ratio")
    report.row(case, "new stream + close p50", "ms", pct(bare, 0.5))
    report.row(case, "round trip on one stream p50", "ms", pct(rtt, 0.5), baseline=pct(rtt_tcp, 0.5), compare="ratio")
    report.row(case, "round trip on one stream p95", "ms", pct(rtt, 0.95), baseline=pct(rtt_tcp, 0.95), compare="ratio")
    report.row(case, f"{args.frames} x 100 B frames one way", "frames/s", pct(rates, 0.5), baseline=pct(rates_tcp, 0.5),
               compare="ratio", note=f"median of {args.frame_runs} runs")  # fmt: skip
    report.row(case, "import libp2p (this process)", "s", IMPORT_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--frame-runs", type=int, default=3)
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_quick(args, parser, samples=20, frames=500, frame_runs=1)
    report = Report("libp2p_floor", {k: v for k, v in vars(args).items() if k != "json"},
                    value_label="py-libp2p", baseline_label="trio TCP")
    trio.run(run, args, report)
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
