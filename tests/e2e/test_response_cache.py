"""The response cache end to end (issue 11): a real executor whose backend is the
OpenAI-compatible adapter talking to the faithful fake runtime over loopback HTTP, and
real clients, each with its own identity, over libp2p on 127.0.0.1.

Identical deterministic requests reach the runtime once; the receipt of the cached
answer says so, is priced per the model's ``billing``, and the client verifies and
accepts it (both ledgers hold it). A changed parameter and a non-deterministic request
reach the runtime; another client gets its own answer unless the cache is shared.
"""

from __future__ import annotations

import pytest
import trio

from loomnet.node import ModelTerms
from loomnet.node._response_cache import CacheTerms
from loomnet.protocol import ChatMessage, cost_of, digest

from ..limits import fail_after
from ..node.fake_openai import FakeOpenAI
from .gateway_kit import FAKE_MODEL, start_client, start_fake_executor

pytestmark = pytest.mark.integration

HELLO = [ChatMessage("user", "Say hello.")]
DETERMINISTIC = {"temperature": 0.0, "seed": 42}
CHAT = "/v1/chat/completions"
#: micro-credits per million tokens: the offer's prices (1 and 2 credits)
PRICE_IN, PRICE_OUT = 1_000_000, 2_000_000


async def start(nursery, tmp_path, fake, cache: CacheTerms):
    terms = ModelTerms(name=f"openai:{FAKE_MODEL}", price_in=1.0, price_out=2.0, cache=cache)
    return await start_fake_executor(nursery, tmp_path, fake, models=[terms])


async def joined(nursery, tmp_path, executor, name: str):
    client = await start_client(nursery, tmp_path, executor, name=name)
    await client.wait_for_offers(timeout=20)
    return client


async def booked_on_both_sides(executor, client, result) -> None:
    """The receipt is accepted in the client's ledger and acknowledged in the executor's."""
    key = digest(result.receipt_envelope.payload)
    mine = await client.ledger.get(key)
    assert mine is not None and mine.status == "accepted", mine
    with trio.fail_after(10):
        while (theirs := await executor.server.ledger.get(key)) is None or theirs.status != "acknowledged":
            await trio.sleep(0.02)
    assert theirs.receipt_payload == mine.receipt_payload


@fail_after(90)
async def test_identical_deterministic_requests_reach_the_runtime_once_and_the_cached_receipt_is_accepted(
    nursery, tmp_path
):
    fake = FakeOpenAI()
    executor = await start(nursery, tmp_path, fake, CacheTerms(ttl=600, billing="discount", discount=0.5))
    client = await joined(nursery, tmp_path, executor, "client")

    first = await client.chat(HELLO, model=FAKE_MODEL, **DETERMINISTIC)
    second = await client.chat(HELLO, model=FAKE_MODEL, **DETERMINISTIC)
    assert fake.count(CHAT) == 1
    assert first.text == second.text == fake.text
    assert not first.receipt.cached and (first.receipt.price_in, first.receipt.price_out) == (PRICE_IN, PRICE_OUT)
    cached = second.receipt
    assert cached.cached and (cached.price_in, cached.price_out) == (PRICE_IN // 2, PRICE_OUT // 2)
    assert (cached.input_tokens, cached.output_tokens) == (first.receipt.input_tokens, first.receipt.output_tokens)
    assert cached.cost == cost_of(cached.input_tokens, cached.output_tokens, PRICE_IN // 2, PRICE_OUT // 2)
    assert cached.cost < first.receipt.cost
    await booked_on_both_sides(executor, client, first)
    await booked_on_both_sides(executor, client, second)

    # a changed parameter is another request: the runtime is asked, and that answer is kept too
    longer = await client.chat(HELLO, model=FAKE_MODEL, max_tokens=64, **DETERMINISTIC)
    other_seed = await client.chat(HELLO, model=FAKE_MODEL, temperature=0.0, seed=43)
    assert fake.count(CHAT) == 3 and not longer.receipt.cached and not other_seed.receipt.cached
    sent = [r.body for r in fake.requests if r.path == CHAT]
    assert [(b["seed"], b["temperature"]) for b in sent] == [(42, 0.0), (42, 0.0), (43, 0.0)]
    assert 64 in sent[1].values() and 64 not in sent[0].values()  # max_tokens, in the flavour's name
    again = await client.chat(HELLO, model=FAKE_MODEL, max_tokens=64, **DETERMINISTIC)
    assert again.receipt.cached and fake.count(CHAT) == 3

    # a request that may sample is never cached, however often it comes
    for fields in ({"seed": 42}, {"temperature": 0.0}, {"temperature": 0.8, "seed": 42}):
        for _ in range(2):
            result = await client.chat(HELLO, model=FAKE_MODEL, **fields)
            assert not result.receipt.cached
    assert fake.count(CHAT) == 9

    # another client, with its own identity, never gets the first client's answer by default
    other = await joined(nursery, tmp_path, executor, "client-b")
    assert other.key.peer_id != client.key.peer_id
    theirs = await other.chat(HELLO, model=FAKE_MODEL, **DETERMINISTIC)
    assert fake.count(CHAT) == 10 and not theirs.receipt.cached and theirs.receipt.client == other.key.peer_id
    stats = executor.server.caches.statistics()[FAKE_MODEL]
    assert (stats.hits, stats.misses, stats.entries) == (2, 4, 4)


@fail_after(90)
async def test_a_shared_cache_answers_another_client_and_a_free_receipt_is_accepted(nursery, tmp_path):
    fake = FakeOpenAI()
    executor = await start(nursery, tmp_path, fake, CacheTerms(shared=True, billing="free"))
    client = await joined(nursery, tmp_path, executor, "client")
    other = await joined(nursery, tmp_path, executor, "client-b")

    first = await client.chat(HELLO, model=FAKE_MODEL, **DETERMINISTIC)
    theirs = await other.chat(HELLO, model=FAKE_MODEL, **DETERMINISTIC)
    assert fake.count(CHAT) == 1 and theirs.text == first.text
    receipt = theirs.receipt
    assert receipt.cached and receipt.client == other.key.peer_id and receipt.cost == 0
    assert (receipt.price_in, receipt.price_out) == (0, 0) and receipt.output_tokens == first.receipt.output_tokens
    await booked_on_both_sides(executor, other, theirs)
    assert (await other.ledger.totals()).cost == 0
