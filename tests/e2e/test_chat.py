"""An executor on the embedded model answers a signed, streamed request from a client."""

import pytest
import trio

from loomnet.client import ClientConfig, Done, LoomClient, TextDelta
from loomnet.protocol import ChatMessage, ErrorCode, NoOfferError, SignedKind, cost_of, credits_to_micro, digest, open_envelope

from .conftest import PRICE_IN, PRICE_OUT

pytestmark = [pytest.mark.integration, pytest.mark.model]

HELLO = [ChatMessage("user", "Name three colours.")]


async def test_streamed_chat_with_receipt_in_both_ledgers(executor, client):
    with trio.fail_after(60):
        offers = await client.wait_for_offers(model="smol", timeout=10)
        assert offers[0].executor == executor.peer_id
        pieces = []
        async with client.stream_chat(HELLO, model="smol", max_tokens=24) as stream:
            async for text in stream:
                pieces.append(text)
        result = stream.result
    text = "".join(pieces)
    assert text.strip() and result.text == text
    receipt = result.receipt
    assert receipt.client == client.peer_id and receipt.model == "smollm2-135m"
    assert receipt.count_source == "tokenizer"
    assert 0 < receipt.output_tokens <= 24 and receipt.input_tokens > 5
    # chunks counts every chunk frame, progress chunks (sent while the model is silent) too
    assert receipt.output_digest == digest(text.encode()) and receipt.chunks >= len(pieces)
    assert receipt.price_in == credits_to_micro(PRICE_IN) and receipt.price_out == credits_to_micro(PRICE_OUT)
    assert receipt.cost == cost_of(receipt.input_tokens, receipt.output_tokens, receipt.price_in, receipt.price_out) > 0

    receipt_digest = digest(result.receipt_envelope.payload)
    mine = await client.ledger.get(receipt_digest)
    with trio.fail_after(10):  # the executor books the counter-signature just after we send it
        while (theirs := await executor.server.ledger.get(receipt_digest)) is None or theirs.ack_payload is None:
            await trio.sleep(0.05)
    assert mine.role == "client" and theirs.role == "executor"
    assert (mine.status, theirs.status) == ("accepted", "acknowledged")
    assert mine.receipt_payload == theirs.receipt_payload == result.receipt_envelope.payload  # byte-identical
    assert mine.receipt_sig == theirs.receipt_sig
    assert mine.ack_payload == theirs.ack_payload
    ack, signer = open_envelope(SignedKind.RECEIPT_ACK, result_ack_envelope(theirs))
    assert signer == client.peer_id and ack.receipt_digest == receipt_digest
    assert (await client.ledger.totals()).cost == receipt.cost


def result_ack_envelope(entry):
    from loomnet.protocol import Envelope

    return Envelope(payload=entry.ack_payload, signer=entry.ack_signer, sig=entry.ack_sig)


async def test_events_yield_typed_deltas(executor, client):
    with trio.fail_after(60):
        async with client.stream_chat(HELLO, model="smol", max_tokens=8) as stream:
            *events, done = [event async for event in stream.events()]
    assert events and all(isinstance(e, TextDelta) for e in events)  # the embedded model does not reason aloud
    assert "".join(e.text for e in events) == stream.result.text
    assert isinstance(done, Done) and done.receipt == stream.result.receipt and done.executor == executor.info.peer_id
    assert stream.result.reasoning == ""


async def test_chat_collects_and_any_model_will_do(executor, client):
    with trio.fail_after(60):
        result = await client.chat(HELLO, max_tokens=8)
    assert result.text and result.receipt.output_tokens <= 8
    assert result.receipt.finish_reason in ("stop", "length")


async def test_price_cap_below_every_offer_finds_no_offer(executor, client):
    with trio.fail_after(30), pytest.raises(NoOfferError) as info:
        await client.chat(HELLO, model="smol", max_price_out=credits_to_micro(PRICE_OUT) - 1)
    assert info.value.code == ErrorCode.NO_OFFER


async def test_unknown_model_finds_no_offer(executor, client):
    with trio.fail_after(30), pytest.raises(NoOfferError) as info:
        await client.chat(HELLO, model="gpt-17", max_tokens=4)
    assert "smollm2-135m" in info.value.message


async def test_client_discovers_a_local_executor_without_flags(executor, tmp_path):
    config = ClientConfig(data_dir=str(tmp_path / "other-client"))  # no bootstrap: the state file leads there
    client = LoomClient(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        with trio.fail_after(30):
            offers = await client.wait_for_offers(model="smollm2-135m", timeout=10)
        assert offers[0].executor == executor.peer_id
        nursery.cancel_scope.cancel()
