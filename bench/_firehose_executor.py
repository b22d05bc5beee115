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


async def serve(config_path: str, model: str) -> None:
    node = Executor(load_config(config_path), backends=[FirehoseBackend(model)])
    async with trio.open_nursery() as nursery:
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
