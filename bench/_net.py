"""The two paths the network benches compare, timed the same way.

* **direct**: the request straight to the backend over HTTP (httpx, one pooled
  ``AsyncClient``, the SSE parsed with ``json.loads`` per event as the OpenAI SDK does),
  read to the end of the body so the connection is reused.
* **loomnet**: the same request through ``LoomClient.stream_chat`` (route, sign, libp2p
  stream, executor, backend, chunk frames, receipt checked, booked and counter-signed).

Each returns a :class:`Timing`: when the first text arrived, when the last did, when the
request was over, and how the text came (pieces, characters), all in ``perf_counter``
seconds from the call.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loomnet.client import ClientConfig, LoomClient, open_client
from loomnet.protocol import ChatMessage

from _harness import CpuMeter

PROMPT = "Say hello."

# py-libp2p logs an ERROR (with a multi-line dump) for every stream it fails to open; the
# benches count failures themselves (as ``loomnet`` does for operators, see node/cli.py)
logging.getLogger("libp2p").setLevel(logging.CRITICAL)


@dataclass
class Timing:
    ttft: float = float("nan")  #: first non-empty text
    last: float = float("nan")  #: last text
    total: float = float("nan")  #: the whole request, receipt or end of body included
    pieces: list[tuple[float, int]] = field(default_factory=list)  #: (time, characters) per text piece
    tokens: int = 0  #: the answer's tokens (backend usage or receipt)

    @property
    def chars(self) -> int:
        return sum(n for _, n in self.pieces)

    def rate(self) -> float:
        """Tokens per second after the first piece: the first piece's share of the tokens
        (by characters) is left out, and so is the time to it. An answer that came in one
        piece has no such window: its rate is its tokens over the time to that piece."""
        if not self.pieces or not self.tokens:
            return float("nan")
        if len(self.pieces) < 2:
            return self.tokens / self.last if self.last > 0 else float("nan")
        first_chars = self.pieces[0][1]
        after = self.tokens * (self.chars - first_chars) / self.chars
        window = self.last - self.ttft
        return after / window if window > 0 else float("nan")


def messages(prompt: str = PROMPT) -> list[ChatMessage]:
    return [ChatMessage("user", prompt)]


async def direct(http: httpx.AsyncClient, url: str, model: str, max_tokens: int, prompt: str = PROMPT, **extra) -> Timing:
    """One streamed chat straight to the backend at ``url`` (``.../v1``)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        **extra,
    }
    t = Timing()
    t0 = time.perf_counter()
    async with http.stream("POST", f"{url}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter() - t0
                    if not t.pieces:
                        t.ttft = now
                    t.pieces.append((now, len(text)))
                    t.last = now
            if event.get("usage"):
                t.tokens = event["usage"].get("completion_tokens") or 0
    t.total = time.perf_counter() - t0
    return t


async def through(client: LoomClient, model: str, max_tokens: int, prompt: str = PROMPT, **extra) -> Timing:
    """The same chat through loomnet."""
    t = Timing()
    t0 = time.perf_counter()
    async with client.stream_chat(messages(prompt), model=model, max_tokens=max_tokens, **extra) as stream:
        async for text in stream:
            if text:
                now = time.perf_counter() - t0
                if not t.pieces:
                    t.ttft = now
                t.pieces.append((now, len(text)))
                t.last = now
    t.total = time.perf_counter() - t0
    t.tokens = stream.result.receipt.output_tokens if stream.result is not None else 0
    return t


@asynccontextmanager
async def bench_client(home: Path, *addrs: str, models: tuple[str, ...] = ()) -> AsyncIterator[LoomClient]:
    """A client joined to the executors at ``addrs``, with an offer for each of ``models``.

    It keeps up to 64 idle session streams per executor (``max-idle-sessions``; 8 by
    default), as the direct path's httpx pool keeps a connection per task: with more
    tasks than idle sessions, a request finding none opens a stream of its own."""
    config = ClientConfig(
        data_dir=str(home / "client"), bootstrap=list(addrs), discover_local=False,
        first_byte_timeout=60.0, connect_timeout=20.0, max_idle_sessions=64,
    )  # fmt: skip
    async with open_client(config) as client:
        for model in models:
            await client.wait_for_offers(model=model, timeout=30)
        yield client


def http_client(connections: int = 100) -> httpx.AsyncClient:
    """The direct path's client: one pool, keep-alive, no timeout surprises."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0))


async def paired(
    n: int, warmup: int, direct_fn, loom_fn, meters: tuple[CpuMeter, CpuMeter]
) -> tuple[list[Timing], list[Timing], int]:
    """``n`` pairs of ``direct_fn()`` and ``loom_fn()`` after ``warmup`` unmeasured ones,
    in ABBA order (direct first in even pairs, loomnet first in odd ones), each call
    metered by its path's :class:`CpuMeter`. A failed call is printed and counted and
    its pair dropped. Returns (direct timings, loomnet timings, failures)."""
    for _ in range(warmup):
        await direct_fn()
        await loom_fn()
    ds, ls = [], []
    failures = 0
    for i in range(n):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        got: dict[int, Timing] = {}
        for which in order:
            fn, meter = (direct_fn, meters[0]) if which == 0 else (loom_fn, meters[1])
            meter.start()
            try:
                got[which] = await fn()
            except Exception as exc:  # noqa: BLE001 - a failure is counted, and the pair dropped
                failures += 1
                print(f"  sample {i} ({'direct' if which == 0 else 'loomnet'}) failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr)  # fmt: skip
            finally:
                meter.stop()
        if len(got) == 2:
            ds.append(got[0])
            ls.append(got[1])
    return ds, ls, failures
