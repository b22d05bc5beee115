"""The bad-input suite: every hostile input a peer can send an executor, refused with
its own stable code and no effect (issue 13, "The bad-input suite").

One real executor over real py-libp2p on 127.0.0.1, serving an instant in-process
backend that counts its calls (``bad_input_kit.Instant``); a hostile peer, a bare
libp2p host with its own identity, writes raw bytes and frames on a real stream, on
both inference protocols (``/loomnet/infer/1``, one request a stream, and the session
protocol ``/loomnet/infer/2``). Every test asserts the exact code the peer receives (or,
for framing attacks, that the stream ends within a bound), that nothing was booked or
generated, that no stream, session, slot or buffered byte is left held, and that an
honest client is served afterwards (``assert_no_effect``, ``honest_is_served``).

Item → test (``tests/e2e/`` unless a path says otherwise):

======================================  ==============================================
item                                    test
======================================  ==============================================
oversized frame                         test_bad_input_framing.py::test_an_oversized_frame_is_refused_unread
truncated frame                         test_bad_input_framing.py::test_a_truncated_frame_ends_the_stream
huge length announced, then a stall     test_bad_input_framing.py::test_a_frame_announcing_a_huge_length_then_stalling_is_cut_off
                                        (a drip, byte by byte: test_peer_limits.py::test_a_request_dripped_byte_by_byte_meets_one_deadline)
unknown fields                          test_bad_input_framing.py::test_an_unknown_frame_type_is_refused;
                                        ::test_unknown_fields_in_a_request_are_skipped (schema evolution)
                                        (a known frame out of place: ::test_an_ack_before_any_request_is_refused)
wrong types                             test_bad_input_framing.py::test_wrong_types_are_refused (frame and signed payload)
bad signature                           test_refused_request[bad-signature]
signer ≠ remote peer                    test_refused_request[signer-mismatch]
replayed nonce                          test_a_replayed_request_runs_once
expired / future-dated request          test_refused_request[expired], [future]
wrong audience                          test_refused_request[wrong-audience]
price cap below the price               test_refused_request[price-cap-in], [price-cap-out], [max-cost]
unknown model                           test_refused_request[unknown-model]
max tokens above the model's context    test_refused_request[max-tokens-over-context]
over the client's rate limits           test_a_request_flood_from_one_peer_is_rate_limited_and_others_are_served
                                        (requests per minute), test_over_the_token_rate_is_refused (tokens per minute)
over the client's own budget            test_budget.py::test_warnings_at_75_and_90_percent_and_the_refusal_at_100
                                        (BUDGET_EXCEEDED, refused in the client before any traffic)
a request flood from one peer           test_a_request_flood_from_one_peer_is_rate_limited_and_others_are_served
advert flood on gossip                  test_bad_input_gossip.py::test_an_advert_flood_is_dropped_and_not_relayed
                                        (the adverts stream: tests/client/test_member.py, 600-advert flood)
forged adverts on gossip                tests/client/test_member_gossip.py::test_forged_adverts_are_dropped_and_not_relayed
                                        (bad signature, signer ≠ source, stale, expired, future, oversized, malformed;
                                        three real nodes, not relayed to the third)
======================================  ==============================================

Bounds: the executor reads a whole request frame within ``request-read-timeout``
(``READ_TIMEOUT`` = 2 s here, ``node/_intake.py``); the tests allow several times that.
"""

from __future__ import annotations

import os
import time

import msgspec
import pytest
import trio
from loomnet.protocol import (
    INFER_PROTOCOL,
    INFER_SESSION_PROTOCOL,
    ErrorCode,
    ReceiptFrame,
    SigningKey,
    credits_to_micro,
)

from ..limits import fail_after
from .bad_input_kit import (
    CONTEXT,
    HI,
    MODEL,
    PRICE_IN,
    PRICE_OUT,
    Hostile,
    Instant,
    Reply,
    assert_no_effect,
    framed,
    honest_is_served,
    start_executor,
    start_honest,
)

pytestmark = pytest.mark.integration

PROTOCOLS = pytest.mark.parametrize("protocol", [INFER_PROTOCOL, INFER_SESSION_PROTOCOL], ids=["infer-1", "session"])


@pytest.fixture
def backend() -> Instant:
    return Instant()


@pytest.fixture
async def executor(nursery, tmp_path, backend):
    return await start_executor(nursery, tmp_path, backend)


@pytest.fixture
async def hostile(nursery, executor) -> Hostile:
    return await Hostile.start(nursery, executor)

#: case -> (the request's fields changed, the code the executor answers with)
REFUSALS: dict[str, tuple[dict[str, object], ErrorCode]] = {
    "wrong-audience": ({"audience": SigningKey(b"\x01" * 32).peer_id}, ErrorCode.WRONG_AUDIENCE),
    "expired": ({"created_at": -3600.0}, ErrorCode.REQUEST_EXPIRED),  # seconds from now
    "future": ({"created_at": 3600.0}, ErrorCode.REQUEST_FROM_FUTURE),
    "unknown-model": ({"model": "gpt-17"}, ErrorCode.UNKNOWN_MODEL),
    "price-cap-in": ({"max_price_in": credits_to_micro(PRICE_IN) - 1}, ErrorCode.PRICE_CAP_EXCEEDED),
    "price-cap-out": ({"max_price_out": credits_to_micro(PRICE_OUT) - 1}, ErrorCode.PRICE_CAP_EXCEEDED),
    "max-cost": ({"max_cost": 1, "max_tokens": 500}, ErrorCode.PRICE_CAP_EXCEEDED),
    "max-tokens-over-context": ({"max_tokens": CONTEXT + 1}, ErrorCode.MAX_TOKENS_OVER_CONTEXT),
}


def forged_bytes(hostile: Hostile, case: str) -> bytes:
    if case == "bad-signature":
        envelope = hostile.sealed()
        return framed(msgspec.structs.replace(envelope, sig=bytes(64)))
    if case == "signer-mismatch":  # a request honestly signed by someone else, sent by the hostile peer
        return framed(hostile.sealed(key=SigningKey(os.urandom(32))))
    fields, _ = REFUSALS[case]
    if "created_at" in fields:  # seconds from now
        fields = {**fields, "created_at": time.time() + fields["created_at"]}  # type: ignore[operator]
    return framed(hostile.sealed(hostile.request(**fields)))


CODES = {"bad-signature": ErrorCode.BAD_SIGNATURE, "signer-mismatch": ErrorCode.SIGNER_MISMATCH}
CODES.update({case: code for case, (_, code) in REFUSALS.items()})


@fail_after(90)
@PROTOCOLS
@pytest.mark.parametrize("case", list(CODES))
async def test_refused_request(nursery, tmp_path, executor, backend, hostile, case, protocol):
    reply = await hostile.exchange(forged_bytes(hostile, case), protocol)
    assert reply.code == CODES[case], reply.error
    assert not reply.error.retryable or CODES[case] == ErrorCode.MAX_TOKENS_OVER_CONTEXT
    await assert_no_effect(executor, backend)
    assert executor.server.refused == 1
    await honest_is_served(nursery, tmp_path, executor, backend)


@fail_after(90)
@PROTOCOLS
async def test_a_replayed_request_runs_once(nursery, tmp_path, executor, backend, hostile, protocol):
    data = framed(hostile.sealed())
    first = await hostile.exchange(data, protocol)
    assert isinstance(first.frames[-1], ReceiptFrame)
    for other in (INFER_PROTOCOL, INFER_SESSION_PROTOCOL):  # the same bytes, again, on either protocol
        again = await hostile.exchange(data, other)
        assert again.code == ErrorCode.REPLAYED_NONCE
    await assert_no_effect(executor, backend, entries=1, calls=1)  # the first, only
    await honest_is_served(nursery, tmp_path, executor, backend)


@fail_after(120)
async def test_a_request_flood_from_one_peer_is_rate_limited_and_others_are_served(nursery, tmp_path):
    backend = Instant()
    executor = await start_executor(nursery, tmp_path, backend, peer_requests_per_minute=3)  # one per 20 s after 3
    hostile = await Hostile.start(nursery, executor)
    honest = await start_honest(nursery, tmp_path, executor)
    replies: list[Reply] = []

    async def one(protocol: str) -> None:
        replies.append(await hostile.exchange(framed(hostile.sealed()), protocol))

    flood = 24
    async with trio.open_nursery() as both:
        for i in range(flood):  # at once, on both protocols
            both.start_soon(one, (INFER_PROTOCOL, INFER_SESSION_PROTOCOL)[i % 2])
        with trio.fail_after(30):
            result = await honest.chat(HI, model=MODEL, max_tokens=4)  # served during the flood
    assert result.text == "Hello."

    served = [r for r in replies if isinstance(r.frames[-1], ReceiptFrame)]
    refused = [r.error for r in replies if r not in served]
    assert len(served) == 3  # the peer's minute's worth, not one more
    assert len(refused) == flood - 3
    # over its rate; or, at once, over its open streams (max-streams-per-peer 8): both retryable
    assert {e.code for e in refused} <= {ErrorCode.RATE_LIMITED, ErrorCode.PEER_LIMIT}
    assert any(e.code == ErrorCode.RATE_LIMITED for e in refused)
    for error in refused:
        assert error.retryable
        if error.code == ErrorCode.RATE_LIMITED:
            assert 0 < error.retry_after <= 20.0
    assert executor.server.rate.statistics().refused_requests == sum(e.code == ErrorCode.RATE_LIMITED for e in refused)
    # the three, and the honest one (whose session stream stays open for its next request)
    await assert_no_effect(executor, backend, entries=3 + 1, calls=3 + 1, sessions=1)

    again = await hostile.exchange(framed(hostile.sealed()), INFER_PROTOCOL)  # still limited afterwards
    assert again.code == ErrorCode.RATE_LIMITED
    await honest_is_served(nursery, tmp_path, executor, backend, name="honest-after")


@fail_after(90)
@PROTOCOLS
async def test_over_the_token_rate_is_refused(nursery, tmp_path, protocol):
    backend = Instant()  # each answer bills 5 + 2 tokens
    executor = await start_executor(nursery, tmp_path, backend, peer_tokens_per_minute=6)
    hostile = await Hostile.start(nursery, executor)
    first = await hostile.exchange(framed(hostile.sealed()), protocol)
    assert isinstance(first.frames[-1], ReceiptFrame)  # admitted with allowance left; overdraws it
    second = await hostile.exchange(framed(hostile.sealed()), protocol)
    assert second.code == ErrorCode.RATE_LIMITED and second.error.retryable
    assert 0 < second.error.retry_after <= 60.0
    assert executor.server.rate.statistics().refused_tokens == 1
    await assert_no_effect(executor, backend, entries=1, calls=1)
    await honest_is_served(nursery, tmp_path, executor, backend)
