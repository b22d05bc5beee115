"""The client's receipt check: it must catch every way a receipt can disagree with the stream."""

import pytest

from loomnet.client import check_receipt
from loomnet.protocol import Envelope, ErrorCode, Receipt, ReceiptError, SignedKind, SigningKey, cost_of, digest, seal

EXECUTOR = SigningKey(b"e" * 32)
CLIENT = SigningKey(b"c" * 32)
REQUEST = b"the signed request payload"
TEXT = "Red, green and blue."


def receipt(**overrides) -> Receipt:
    fields = dict(
        request_digest=digest(REQUEST),
        client=CLIENT.peer_id,
        model="smollm2-135m",
        input_tokens=30,
        output_tokens=6,
        count_source="tokenizer",
        price_in=1_500_000,
        price_out=3_000_000,
        cost=cost_of(30, 6, 1_500_000, 3_000_000),
        output_digest=digest(TEXT.encode()),
        chunks=2,
        finish_reason="stop",
        issued_at=1.0,
    )
    fields.update(overrides)
    return Receipt(**fields)


def check(envelope, **overrides):
    kwargs = dict(
        executor=EXECUTOR.peer_id,
        client=CLIENT.peer_id,
        request_payload=REQUEST,
        text=TEXT,
        chunks=2,
        own_output_tokens=6,
        price_in_limit=1_500_000,
        price_out_limit=3_000_000,
    )
    kwargs.update(overrides)
    return check_receipt(envelope, **kwargs)


def test_an_honest_receipt_passes():
    assert check(seal(SignedKind.RECEIPT, receipt(), EXECUTOR)) == receipt()


@pytest.mark.parametrize(
    "envelope, overrides",
    [
        (seal(SignedKind.RECEIPT, receipt(), CLIENT), {}),  # signed by someone else
        (seal(SignedKind.RECEIPT, receipt(), EXECUTOR), {"request_payload": b"another request"}),
        (seal(SignedKind.RECEIPT, receipt(client=EXECUTOR.peer_id), EXECUTOR), {}),
        (Envelope(payload=b"x", signer=EXECUTOR.public_key, sig=bytes(64)), {}),  # bad signature
    ],
)
def test_invalid_receipts(envelope, overrides):
    with pytest.raises(ReceiptError) as info:
        check(envelope, **overrides)
    assert info.value.code == ErrorCode.RECEIPT_INVALID


@pytest.mark.parametrize(
    "fields, overrides",
    [
        ({}, {"text": "Red, green and blue!"}),  # other text than streamed
        ({}, {"chunks": 3}),
        ({"price_out": 3_000_001, "cost": cost_of(30, 6, 1_500_000, 3_000_001)}, {}),  # above the offer
        ({"cost": cost_of(30, 6, 1_500_000, 3_000_000) + 1}, {}),  # cost does not follow
        ({"output_tokens": 100, "cost": cost_of(30, 100, 1_500_000, 3_000_000)}, {}),  # bills far more
    ],
)
def test_mismatched_receipts(fields, overrides):
    with pytest.raises(ReceiptError) as info:
        check(seal(SignedKind.RECEIPT, receipt(**fields), EXECUTOR), **overrides)
    assert info.value.code == ErrorCode.RECEIPT_MISMATCH


def test_tokenizer_differences_within_the_band_are_accepted():
    r = receipt(output_tokens=9, cost=cost_of(30, 9, 1_500_000, 3_000_000))
    assert check(seal(SignedKind.RECEIPT, r, EXECUTOR), own_output_tokens=6).output_tokens == 9
