"""An executor serving an in-process backend that answers at once (the throughput
bench's "in-process instant backend" row): ``python bench/_instant_executor.py --config
<toml>``. It is the real ``Executor`` (libp2p, intake, queue, metering, ledger,
receipts) with ``backends=[InstantBackend]`` instead of the configured ones, so what is
measured is loomnet alone, no HTTP. It prints what ``loomnet executor`` prints when
ready (the ``listen :`` lines), and stops on SIGINT/SIGTERM.

The backend follows the interface of ``loomnet.node.backends._base.Backend`` (as
``tests/node/server_harness.py``'s ``ScriptedBackend`` does): ``max_tokens`` tokens of
" hi" (default 16), then ``Finished`` with the usage the runtime would report.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from loomnet.node import Executor, load_config
from loomnet.node.backends._base import Backend, ChatParams, Finished, ModelInfo, StreamEvent, TextDelta, Usage

TOKEN = " hi"


class InstantBackend(Backend):
    """Answers every chat at once: no I/O, no sleeps."""

    kind = "instant"

    def __init__(self, model: str, default_tokens: int = 16) -> None:
        self.model = model
        self.default_tokens = default_tokens

    @asynccontextmanager
    async def stream_chat(self, params: ChatParams) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        tokens = params.max_tokens or self.default_tokens
        prompt = sum(len(m.content.split()) + 4 for m in params.messages)

        async def events() -> AsyncIterator[StreamEvent]:
            for _ in range(tokens):
                yield TextDelta(TOKEN)
            usage = Usage(input_tokens=prompt, output_tokens=tokens, source="backend")
            yield Finished(finish_reason="length" if params.max_tokens else "stop", usage=usage)

        yield events()

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(name=self.model, context_length=32768, capabilities=["chat"])]

    async def health(self) -> bool:
        return True


async def serve(config_path: str, model: str) -> None:
    config = load_config(config_path)
    node = Executor(config, backends=[InstantBackend(model)])
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
