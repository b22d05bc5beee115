"""A client that vanishes mid-stream (its whole node gone: the libp2p host stops, the
connection closes under the stream) stops the embedded model's generation promptly,
not at ``max_tokens``, and the executor books a ``client_gone`` receipt for exactly what
it sent, never more than llama generated.

The real executor serves the embedded SmolLM2 over real py-libp2p on 127.0.0.1; the
answer may run to 400 tokens (~3 s of generation here), and the client leaves after its
first piece of text. (Closing the stream, the client staying up, is in
``test_network.py``; a client leaving during a backend's silence in ``test_long_silence.py``.)
"""

from __future__ import annotations

import msgspec
import pytest
import trio
from loomnet.client import ClientConfig, LoomClient
from loomnet.protocol import ChatMessage, Receipt

pytestmark = [pytest.mark.integration, pytest.mark.model]

LONG = [
    ChatMessage("user", "Write a long story about a lighthouse keeper and her cat.")
]
MAX_TOKENS = 400
#: tokens llama may produce after the client is gone: those in the batch being sent, and
#: a few while the reset travels (~120 tokens/s here: 50 ms of chunking is ~6)
AFTER_GONE = 48


async def test_a_client_that_vanishes_mid_stream_stops_the_embedded_model(
    nursery, tmp_path, executor
):
    (backend,) = executor.catalog.backends
    before = backend.statistics().tokens_generated
    config = ClientConfig(data_dir=str(tmp_path / "gone"), bootstrap=[executor.info.addrs[0]], discover_local=False,
                          first_byte_timeout=30.0)  # fmt: skip
    client = LoomClient(config)
    got = []
    with trio.fail_after(60):
        async with trio.open_nursery() as life:
            await life.start(client.run)
            await client.wait_for_offers(timeout=20)
            async with client.stream_chat(
                LONG, model="smol", max_tokens=MAX_TOKENS, temperature=0.0
            ) as stream:
                async for text in stream:
                    got.append(text)
                    if "".join(got).strip():
                        break
                # the node goes while the stream is open: host, connections and all
                life.cancel_scope.cancel()
    assert got
    with trio.fail_after(20):
        while executor.server.load or backend.statistics().busy:
            await trio.sleep(0.02)
        while not (entries := await executor.server.ledger.entries()):
            await trio.sleep(0.02)
    generated = backend.statistics().tokens_generated - before
    await trio.sleep(1.0)
    assert backend.statistics().tokens_generated - before == generated, (
        "llama went on after the client was gone"
    )
    (entry,) = entries
    receipt = msgspec.msgpack.decode(entry.receipt_payload, type=Receipt)
    assert receipt.finish_reason == "client_gone" and entry.status == "unacknowledged"
    assert receipt.client == client.peer_id and receipt.chunks >= 1
    assert 1 <= receipt.output_tokens <= generated, (receipt.output_tokens, generated)
    assert generated <= receipt.output_tokens + AFTER_GONE < MAX_TOKENS, (
        receipt.output_tokens,
        generated,
    )
