"""Both ledgers always hold the same receipts: accepted, disputed and partial alike.

A real executor serves the embedded model three ways (honest; reporting 10 000 output
tokens for a short answer; dying after two text deltas) and a real client asks each
over libp2p on loopback. After every answer the two ledgers hold the same set of
receipt digests, with each side's status.
"""

import pytest
import trio

from loomnet.node import Executor
from loomnet.node.backends._base import Finished, TextDelta, Usage
from loomnet.node.backends.embedded import EmbeddedBackend, EmbeddedConfig
from loomnet.node.config import ExecutorConfig, ModelTerms
from loomnet.protocol import BackendError, ChatMessage, ErrorCode, ReceiptError, RemoteError, digest

from ..limits import fail_after

pytestmark = [pytest.mark.integration, pytest.mark.model]

HELLO = [ChatMessage("user", "Name three colours.")]


class InflatedUsage(EmbeddedBackend):
    """The embedded model, but its usage claims 10 000 output tokens."""

    def stream_chat(self, params):
        self._check_model(params.model)
        return self._inflated(params)

    @trio.as_safe_channel
    async def _inflated(self, params):
        async with EmbeddedBackend.stream_chat(self, params) as events:
            async for event in events:
                if isinstance(event, Finished):
                    usage = Usage(input_tokens=event.usage.input_tokens, output_tokens=10_000, source="backend")
                    event = Finished(finish_reason=event.finish_reason, usage=usage)
                yield event


class DiesAfterTwoDeltas(EmbeddedBackend):
    """The embedded model, but the runtime fails after its second piece of text."""

    def stream_chat(self, params):
        self._check_model(params.model)
        return self._dying(params)

    @trio.as_safe_channel
    async def _dying(self, params):
        async with EmbeddedBackend.stream_chat(self, params) as events:
            sent = 0
            async for event in events:
                yield event
                sent += isinstance(event, TextDelta)
                if sent == 2:
                    raise BackendError("the runtime died", code=ErrorCode.BACKEND_ERROR, retryable=True)


@pytest.fixture
async def executor(nursery, tmp_path):
    def model(cls, name):
        return cls(EmbeddedConfig(model_name=name, max_tokens=24, temperature=0.0, seed=7))

    backends = [model(EmbeddedBackend, "honest"), model(InflatedUsage, "inflated"), model(DiesAfterTwoDeltas, "dying")]
    config = ExecutorConfig(
        data_dir=str(tmp_path / "executor-home"),
        listen=["/ip4/127.0.0.1/tcp/0"],
        models=[ModelTerms(name=n, price_in=1.5, price_out=3.0) for n in ("honest", "inflated", "dying")],
        announce_local=False,
        request_read_timeout=5.0,
        ack_timeout=5.0,
    )
    node = Executor(config, backends=backends)
    await nursery.start(node.run)
    return node


async def digests(ledger) -> dict[bytes, str]:
    return {e.receipt_digest: e.status for e in await ledger.entries(limit=1000)}


async def settled(executor, client, key: bytes, status: str) -> tuple[dict, dict]:
    """Both ledgers, once the executor's row for ``key`` has ``status`` (its ack lands
    just after the client sends it)."""
    with trio.fail_after(10):
        while (entry := await executor.server.ledger.get(key)) is None or entry.status != status:
            await trio.sleep(0.02)
    return await digests(client.ledger), await digests(executor.server.ledger)


@fail_after(120)
async def test_both_ledgers_hold_the_same_receipts_accepted_disputed_and_partial(executor, client):
    await client.wait_for_offers(model="dying", timeout=20)

    # accepted: booked and counter-signed on both sides
    result = await client.chat(HELLO, model="honest")
    accepted = digest(result.receipt_envelope.payload)
    mine, theirs = await settled(executor, client, accepted, "acknowledged")
    assert mine == {accepted: "accepted"} and theirs.keys() == mine.keys()

    # disputed: the client does not accept 10 000 tokens for a short answer, yet books it
    with pytest.raises(ReceiptError) as info:
        await client.chat(HELLO, model="inflated")
    assert info.value.code == ErrorCode.RECEIPT_MISMATCH and "10000" in info.value.message
    [disputed] = set(await digests(client.ledger)) - {accepted}
    mine, theirs = await settled(executor, client, disputed, "unacknowledged")
    assert mine == {accepted: "accepted", disputed: "disputed"}
    assert theirs == {accepted: "acknowledged", disputed: "unacknowledged"}
    entry = await client.ledger.get(disputed)
    assert "visible text" in entry.dispute_reason and entry.ack_payload is None
    assert entry.receipt_payload == (await executor.server.ledger.get(disputed)).receipt_payload

    # partial: the executor's error reaches the caller, with the receipt for what streamed
    received = []
    with pytest.raises(RemoteError) as info:
        async with client.stream_chat(HELLO, model="dying") as stream:
            async for text in stream:
                received.append(text)
    error = info.value
    assert error.code == ErrorCode.BACKEND_ERROR and len(received) >= 1
    assert error.result.text == "".join(received) and error.result.receipt.finish_reason == "error"
    partial = digest(error.result.receipt_envelope.payload)
    mine, theirs = await settled(executor, client, partial, "unacknowledged")
    assert mine == {accepted: "accepted", disputed: "disputed", partial: "accepted"}
    assert theirs == {accepted: "acknowledged", disputed: "unacknowledged", partial: "unacknowledged"}

    # what each side would bill agrees where both agree
    assert (await client.ledger.totals(status="accepted")).receipts == 2
    assert (await client.ledger.totals()).cost == (await executor.server.ledger.totals()).cost
