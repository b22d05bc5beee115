"""The replay memory (``protocol/_replay.py``) is not a resource one peer can use up.

A reviewer's attack (issue 13): a nonce was stored before the rate limit was applied,
so every request refused for its rate (or its model, its price...) still held a slot of
the executor's shared nonce memory for ~65 s; one peer at a per-minute limit of 1
filled it and every other peer was then refused ``OVER_CAPACITY``. Now a nonce is
stored last, once every other check passed, and one peer holds at most its share.

A real executor over real py-libp2p on 127.0.0.1 (``bad_input_kit``), with its replay
memory scaled down (100 000 nonces in production) to show the mechanism in a few dozen
requests. Each test fails with the nonce stored at ``_admit`` again, or without the
per-peer share.
"""

from __future__ import annotations

import pytest
from loomnet.protocol import (
    INFER_PROTOCOL,
    INFER_SESSION_PROTOCOL,
    ErrorCode,
    ReceiptFrame,
    credits_to_micro,
)

from ..limits import fail_after
from .bad_input_kit import (
    CONTEXT,
    PRICE_IN,
    Hostile,
    Instant,
    framed,
    honest_is_served,
    start_executor,
)

pytestmark = [pytest.mark.integration]

PROTOCOLS = pytest.mark.parametrize("protocol", [INFER_PROTOCOL, INFER_SESSION_PROTOCOL], ids=["infer-1", "session"])


def outcome(reply) -> object:
    return "receipt" if isinstance(reply.frames[-1], ReceiptFrame) else reply.code


@fail_after(120)
@PROTOCOLS
async def test_refused_requests_hold_no_nonce(nursery, tmp_path, protocol):
    backend = Instant()
    executor = await start_executor(nursery, tmp_path, backend, peer_requests_per_minute=1)
    guard = executor.server.replay
    guard.capacity = guard.per_peer = 20  # scaled down: the flood below is twice the memory
    hostile = await Hostile.start(nursery, executor)
    first = hostile.sealed()
    assert outcome(await hostile.exchange(framed(first), protocol)) == "receipt"
    codes: dict[object, int] = {}
    for _ in range(40):  # over its rate: every one refused, none remembered
        code = outcome(await hostile.exchange(framed(hostile.sealed()), protocol))
        codes[code] = codes.get(code, 0) + 1
    assert codes == {ErrorCode.RATE_LIMITED: 40}
    # refused for anything else before the nonce is stored: nothing remembered either
    for request, code in [
        (hostile.request(model="nope"), ErrorCode.UNKNOWN_MODEL),
        (hostile.request(max_price_in=credits_to_micro(PRICE_IN) - 1), ErrorCode.PRICE_CAP_EXCEEDED),
        (hostile.request(max_tokens=CONTEXT + 1), ErrorCode.MAX_TOKENS_OVER_CONTEXT),
    ]:
        assert outcome(await hostile.exchange(framed(hostile.sealed(request)), protocol)) == code
    assert len(guard) == 1 and guard.held_by(hostile.key.peer_id) == 1
    # a replay is refused as one, whatever the peer's rate (the nonce is looked up first)
    assert outcome(await hostile.exchange(framed(first), protocol)) == ErrorCode.REPLAYED_NONCE
    assert backend.entered == 1
    await honest_is_served(nursery, tmp_path, executor, backend)


@fail_after(120)
async def test_one_peer_holds_at_most_its_share_of_the_nonce_memory(nursery, tmp_path):
    backend = Instant()
    executor = await start_executor(nursery, tmp_path, backend, peer_requests_per_minute=0)  # no rate limit
    guard = executor.server.replay
    guard.capacity, guard.per_peer = 12, 5
    hostile = await Hostile.start(nursery, executor)
    replies = [await hostile.exchange(framed(hostile.sealed()), INFER_PROTOCOL) for _ in range(8)]
    assert [outcome(r) for r in replies] == ["receipt"] * 5 + [ErrorCode.PEER_LIMIT] * 3
    for reply in replies[5:]:
        assert reply.error.retryable and 0 < reply.error.retry_after <= guard.max_age
    assert guard.held_by(hostile.key.peer_id) == 5 and len(guard) == 5
    # another peer is unaffected, and so is an honest client
    other = await Hostile.start(nursery, executor)
    assert outcome(await other.exchange(framed(other.sealed()), INFER_PROTOCOL)) == "receipt"
    await honest_is_served(nursery, tmp_path, executor, backend)
    assert len(guard) == 7 <= guard.capacity and backend.entered == 7
