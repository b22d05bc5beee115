"""Slow readers and a request flood against one executor process: its resident memory
(RSS) stays flat, and an honest client keeps being served throughout.

The executor (``bench/_firehose_executor.py``: the real executor, its backend in
process, an endless answer for ``flood me``, ``ack-timeout`` 3 s, the default per-peer
request rate) is attacked for ``--seconds`` over loopback by:

- ``--slow-peers`` peers, each holding ``--streams`` streams at all times: each sends a
  valid signed request for an endless answer and then never reads it (half the
  streams) or reads it one byte a second (the other half); when the executor cuts the
  stream (its write deadline) the peer opens the next;
- ``--flood-peers`` peers sending valid requests as fast as they can on
  ``--flood-streams`` streams each, half reading the answer, half resetting the stream
  at once (the per-peer rate limit refuses most of them: ``RATE_LIMITED``);
- and one honest client (a real ``LoomClient``) asking a short chat every 0.2 s.

The executor's RSS is sampled every ``--every`` seconds. The first third of the run
is the warm-up; the run **fails** (exit 1) when a later sample's RSS is more than
``--max-rss-growth`` MiB above the sample ending the warm-up, when an honest request
failed or a third of the run passed without one served, or when the executor died.
``--json PATH`` writes the samples and counts.

Run: ``.venv/bin/python bench/slow_peers.py --seconds 60``; ``tests/e2e/test_slow_peers.py``
runs it for 15 s in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import BENCH_DIR, _spawn, child_env, executor_toml, processes, temp_dir
from _net import bench_client
from loomnet.client import P2PConfig, P2PNode
from loomnet.protocol import (
    INFER_PROTOCOL,
    ChatMessage,
    InferenceRequest,
    LoomError,
    RequestFrame,
    SignedKind,
    SigningKey,
    encode_frame,
    encode_frame_body,
    seal,
)
from soak import rss_mib

MODEL = "bench-instant"
FLOOD = [ChatMessage("user", "flood me")]
HI = [ChatMessage("user", "Say hi.")]
ACK_TIMEOUT = 3.0
_LISTEN = re.compile(r"^\s*listen\s*:\s*(\S+)")


class Attacker:
    """A bare libp2p host with its own key, writing signed requests on raw streams."""

    def __init__(self, executor: str, addr: str) -> None:
        seed = os.urandom(32)
        self.node = P2PNode(seed, P2PConfig())
        self.key = SigningKey(seed)
        self.executor, self.addr = executor, addr

    def request(self, messages: list[ChatMessage], max_tokens: int) -> bytes:
        request = InferenceRequest(audience=self.executor, nonce=os.urandom(16), created_at=time.time(), model=MODEL,
                                   messages=messages, max_tokens=max_tokens)  # fmt: skip
        return encode_frame(encode_frame_body(RequestFrame(seal(SignedKind.REQUEST, request, self.key))))


class Run:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.began = time.monotonic()
        self.samples: list[tuple[float, float]] = []  # (seconds since start, RSS MiB)
        self.honest_ok: list[float] = []  # seconds since start of each success
        self.honest_failed: list[str] = []
        self.slow_streams = self.flood_requests = self.refused = 0

    def now(self) -> float:
        return time.monotonic() - self.began

    def sample(self) -> None:
        self.samples.append((round(self.now(), 1), round(rss_mib(self.pid), 1)))


async def slow_stream(attacker: Attacker, run: Run, *, trickle: bool) -> None:
    """One stream at a time, forever: ask for an endless answer, then never read it (or
    read it a byte a second) until the executor cuts it."""
    while True:
        stream = None
        try:
            stream = await attacker.node.open_stream(attacker.executor, INFER_PROTOCOL, addrs=[attacker.addr],
                                                     timeout=10)  # fmt: skip
            await stream.send_all(attacker.request(FLOOD, 64), timeout=10)
            run.slow_streams += 1
            if trickle:
                while await stream.receive_some(1, timeout=30):
                    await trio.sleep(1.0)
            else:
                await trio.sleep(4 * ACK_TIMEOUT)  # the executor cut it long before
        except LoomError:
            await trio.sleep(0.2)
        finally:
            if stream is not None:
                await stream.reset()


async def flood_stream(attacker: Attacker, run: Run, *, read: bool) -> None:
    while True:
        stream = None
        try:
            stream = await attacker.node.open_stream(attacker.executor, INFER_PROTOCOL, addrs=[attacker.addr],
                                                     timeout=10)  # fmt: skip
            await stream.send_all(attacker.request(HI, 4), timeout=10)
            run.flood_requests += 1
            if read:
                reply = b""
                while data := await stream.receive_some(timeout=10):
                    reply += data
                if b"RATE" in reply or len(reply) < 200:
                    run.refused += 1
        except LoomError:
            await trio.sleep(0.05)
        finally:
            if stream is not None:
                await stream.reset()


async def honest(client, run: Run) -> None:
    while True:
        try:
            with trio.fail_after(30):
                result = await client.chat(HI, model=MODEL, max_tokens=4)
            assert result.text
            run.honest_ok.append(run.now())
        except Exception as exc:  # noqa: BLE001 - counted; the run fails
            run.honest_failed.append(f"{run.now():.1f} s: {exc!r}"[:200])
        await trio.sleep(0.2)


def start_firehose(home: Path, toml: str):
    config = home / "executor.toml"
    config.write_text(toml)

    def ready(lines: list[str]) -> dict | None:
        addrs = [m.group(1) for line in lines if (m := _LISTEN.match(line))]
        if not any("executor ready" in line for line in lines) or not addrs:
            return None
        addr = next((a for a in addrs if "/127.0.0.1/" in a), addrs[0])
        return {"addr": addr, "peer_id": addr.rsplit("/p2p/", 1)[1]}

    argv = [sys.executable, str(BENCH_DIR / "_firehose_executor.py"), "--config", str(config), "--model", MODEL]
    return _spawn(argv, home / "executor.log", ready, 90.0, env=child_env(home))


async def attack(args: argparse.Namespace) -> int:
    with temp_dir("loomnet-slow-peers-") as home, processes() as children:
        toml = executor_toml(home, "executor", backend=None, models=[MODEL])
        toml = toml.replace("ack-timeout = 30.0", f"ack-timeout = {ACK_TIMEOUT}")
        toml = toml.replace("peer-requests-per-minute = 0", "peer-requests-per-minute = 600")  # the default
        toml = toml.replace("capacity = 256", "capacity = 32")
        executor = start_firehose(home, toml)
        children.append(executor)
        addr, peer = executor.ready["addr"], executor.ready["peer_id"]
        run = Run(executor.pid)
        print(f"slow peers: {args.seconds:g} s, executor pid {executor.pid}", flush=True)
        async with bench_client(home, addr, models=(MODEL,)) as client, trio.open_nursery() as nursery:
            run.sample()
            nursery.start_soon(honest, client, run)
            for i in range(args.slow_peers + args.flood_peers):
                attacker = Attacker(peer, addr)
                await nursery.start(attacker.node.run)
                if i < args.slow_peers:
                    for j in range(args.streams):
                        nursery.start_soon(lambda a=attacker, t=j % 2 == 1: slow_stream(a, run, trickle=t))
                else:
                    for j in range(args.flood_streams):
                        nursery.start_soon(lambda a=attacker, r=j % 2 == 0: flood_stream(a, run, read=r))
            while run.now() < args.seconds:
                await trio.sleep(args.every)
                run.sample()
                if executor.proc.poll() is not None:
                    break
            nursery.cancel_scope.cancel()
        alive = executor.proc.poll() is None
        return judge(run, args, alive)


def judge(run: Run, args: argparse.Namespace, alive: bool) -> int:
    third = args.seconds / 3
    warm = [s for s in run.samples if s[0] <= third]
    baseline = warm[-1][1]
    later = [s[1] for s in run.samples if s[0] > third] or [baseline]
    growth = max(later) - baseline
    served_each_third = [any(k * third <= t < (k + 1) * third + 1 for t in run.honest_ok) for k in range(3)]
    print(f"\nslow peers: {run.slow_streams} slow streams, {run.flood_requests} flooded requests "
          f"({run.refused} refused or cut), honest: {len(run.honest_ok)} served, {len(run.honest_failed)} failed")
    print(f"executor RSS after the warm-up {baseline:.1f} MiB, most above that later +{growth:.1f} MiB "
          f"(bound {args.max_rss_growth:g}); first {run.samples[0][1]:.1f} MiB, last {run.samples[-1][1]:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "seconds": args.seconds, "samples": run.samples, "rss_growth_mib": growth, "baseline_mib": baseline,
            "honest_served": len(run.honest_ok), "honest_failed": run.honest_failed[:20],
            "served_each_third": served_each_third, "slow_streams": run.slow_streams,
            "flood_requests": run.flood_requests, "alive": alive,
        }, indent=1))  # fmt: skip
    problems = []
    if not alive:
        problems.append("the executor died")
    if growth > args.max_rss_growth:
        problems.append(f"RSS grew {growth:.1f} MiB after the warm-up")
    if run.honest_failed:
        problems.append(f"{len(run.honest_failed)} honest requests failed: {run.honest_failed[:3]}")
    if not all(served_each_third):
        problems.append(f"the honest client went unserved for a third of the run: {served_each_third}")
    print("FAIL: " + "; ".join(problems) if problems else "PASS: flat, honest client served throughout", flush=True)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--slow-peers", type=int, default=4)
    parser.add_argument("--streams", type=int, default=6, help="streams each slow peer holds")
    parser.add_argument("--flood-peers", type=int, default=2)
    parser.add_argument("--flood-streams", type=int, default=8, help="streams each flood peer keeps busy")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--max-rss-growth", type=float, default=40.0, help="MiB")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    return trio.run(attack, args)


if __name__ == "__main__":
    sys.exit(main())
