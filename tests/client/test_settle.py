"""Settling a receipt on the client (``client/_settle.py``): an accepted receipt and its
counter-signature are one ledger write (one transaction, one thread hop), on disk before
the ack is sent; a disputed one is booked alone and never counter-signed.

A real ledger file and real signed receipts; the "stream" notes what is written to it.
"""

from __future__ import annotations

import sqlite3

import pytest
import trio

from loomnet.client import Ledger, TokenCounter
from loomnet.client._offers import Offer
from loomnet.client._settle import settle_receipt
from loomnet.client._stream_kit import RequestOptions, StreamKit
from loomnet.protocol import (
    AckFrame,
    Advert,
    ChatMessage,
    ChunkFrame,
    InferenceConnection,
    InferenceRequest,
    ModelOffer,
    Receipt,
    ReceiptError,
    ReceiptFrame,
    RequestFrame,
    Role,
    SignedKind,
    SigningKey,
    cost_of,
    decode_frame,
    digest,
    encode_payload,
    open_envelope,
    seal,
)

EXECUTOR, CLIENT = SigningKey(b"e" * 32), SigningKey(b"c" * 32)
TEXT = "Red, green and blue."
TOKENS = TokenCounter()


class Written:
    """A stream that notes what the client writes, and whether the ledger held the
    receipt at that moment."""

    def __init__(self, path) -> None:
        self.path = path
        self.data = b""
        self.rows_when_written: list[int] = []

    async def send_all(self, data: bytes, *, timeout: float) -> None:
        raw = sqlite3.connect(self.path)
        try:
            self.rows_when_written.append(raw.execute("SELECT COUNT(*) FROM receipts WHERE ack_payload IS NOT NULL").fetchone()[0])
        finally:
            raw.close()
        self.data += data
        await trio.lowlevel.checkpoint()


async def settle(tmp_path, *, output_tokens: int = 6):
    """One answer settled: (the result or the error, the ledger's statistics, the stream,
    the ledger row, what ``booked`` was told)."""
    model = ModelOffer(name="m1", price_in=1_500_000, price_out=3_000_000)
    advert = Advert(seq=1, issued_at=1.0, ttl=60.0, models=[model])
    offer = Offer(executor=EXECUTOR.peer_id, model=model, advert=advert, expires_at=1e12)
    request = InferenceRequest(audience=EXECUTOR.peer_id, nonce=b"n" * 16, created_at=1.0, model="m1",
                               messages=[ChatMessage("user", "Colours?")])  # fmt: skip
    request_payload = encode_payload(request)
    receipt = Receipt(
        request_digest=digest(request_payload), client=CLIENT.peer_id, model="m1", input_tokens=30,
        output_tokens=output_tokens, count_source="tokenizer", price_in=model.price_in, price_out=model.price_out,
        cost=cost_of(30, output_tokens, model.price_in, model.price_out), output_digest=digest(TEXT.encode()),
        chunks=1, finish_reason="stop", issued_at=1.0,
    )  # fmt: skip
    envelope = seal(SignedKind.RECEIPT, receipt, EXECUTOR)
    # the client's state machine after one chunk and the receipt: it may send the ack
    conn, executor_side = InferenceConnection(Role.CLIENT), InferenceConnection(Role.EXECUTOR)
    executor_side.receive_data(conn.send(RequestFrame(seal(SignedKind.REQUEST, request, CLIENT))))
    executor_side.next_event()
    conn.receive_data(executor_side.send(ChunkFrame(seq=0, text=TEXT)) + executor_side.send(ReceiptFrame(envelope)))
    conn.next_event(), conn.next_event()
    path = tmp_path / "ledger.sqlite"
    stream = Written(path)
    booked: list[tuple[Receipt, bool]] = []
    async with await Ledger.open(path) as ledger:
        kit = StreamKit(opener=None, key=CLIENT, ledger=ledger, tokens=TOKENS)  # type: ignore[arg-type]
        try:
            outcome: object = await settle_receipt(
                kit, envelope, offer=offer, options=RequestOptions(), request_payload=request_payload, text=TEXT,
                reasoning="", tool_calls=[], chunks=1, booked=lambda r, ok: booked.append((r, ok)),
                ack_to=(stream, conn),
            )  # fmt: skip
        except ReceiptError as exc:
            outcome = exc
        stats = ledger.statistics()
        entry = await ledger.get(digest(envelope.payload))
    return outcome, stats, stream, entry, booked


async def test_an_accepted_receipt_and_its_ack_are_one_ledger_write_before_the_ack_is_sent(tmp_path):
    result, stats, stream, entry, booked = await settle(tmp_path)
    assert result.receipt.output_tokens == 6 and booked == [(result.receipt, True)]
    assert (stats.writes, stats.batches, stats.commits) == (1, 1, 1)  # one transaction, one thread hop
    assert entry.status == "accepted" and entry.ack_payload is not None
    assert stream.rows_when_written == [1]  # the ack went out once receipt and ack were on disk
    # the bytes sent are one ack frame carrying the ack the ledger holds
    body_len = int.from_bytes(stream.data[:4], "big")
    frame = decode_frame(stream.data[4:4 + body_len])
    assert isinstance(frame, AckFrame) and len(stream.data) == 4 + body_len
    sent = frame.envelope
    ack, signer = open_envelope(SignedKind.RECEIPT_ACK, sent)
    assert signer == CLIENT.peer_id and ack.receipt_digest == entry.receipt_digest
    assert entry.ack_payload == sent.payload


async def test_a_disputed_receipt_is_one_write_and_never_acknowledged(tmp_path):
    error, stats, stream, entry, booked = await settle(tmp_path, output_tokens=10_000)  # far over the text's bytes
    assert isinstance(error, ReceiptError)
    assert (stats.writes, stats.commits) == (1, 1) and stream.data == b""
    assert entry.status == "disputed" and entry.ack_payload is None and booked[0][1] is False


@pytest.fixture(autouse=True, scope="module")
def _warm():
    TOKENS.load("cl100k_base")

