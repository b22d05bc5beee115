"""Session streams (``/loomnet/infer/2``): the real ``ChatStream`` and the real
``InferenceServer`` over in-memory streams, under trio's autojump clock.

Each request on a session is as strict as on its own stream (its own signature, nonce,
receipt and ack); what changes is that the stream is opened once. These tests count the
streams opened; the bench measures what that saves.
"""

from __future__ import annotations

import os
import time

import pytest
import trio
import trio.testing

from loomnet.client import Ledger
from loomnet.client._chat_stream import ChatStream, RequestOptions, StreamKit
from loomnet.client._memory_stream import MemoryStreamOpener, stream_pair
from loomnet.client._offers import Offer
from loomnet.client._session_pool import SessionPool
from loomnet.protocol import (
    INFER_PROTOCOL,
    INFER_SESSION_PROTOCOL,
    NEED_DATA,
    AckFrame,
    Advert,
    ChatMessage,
    ErrorCode,
    ErrorFrame,
    InferenceConnection,
    InferenceRequest,
    ModelOffer,
    ReceiptAck,
    ReceiptFrame,
    RemoteError,
    RequestFrame,
    Role,
    SignedKind,
    SigningKey,
    digest,
    seal,
)

from ..node.server_harness import Finished, Harness, ScriptedBackend, TextDelta, events, warm_tokens

HELLO = [ChatMessage("user", "Hello?")]
MODEL = ModelOffer(name="m1")


@pytest.fixture(autouse=True)
def _tokens():
    warm_tokens()


@pytest.fixture
def autojump_clock():
    """Jumps only after 0.5 s of real quiet: ledger writes and token counts run in
    worker threads, which a zero-threshold clock would read as everyone asleep."""
    return trio.testing.MockClock(autojump_threshold=0.5)


def answer_of(*words: str, pause: float = 0.0):
    return events(*(TextDelta(w) for w in words), *([pause] if pause else []), Finished(finish_reason="stop"))


async def start(tmp_path, backend=None, *, protocols=(INFER_SESSION_PROTOCOL, INFER_PROTOCOL), **settings):
    harness = await Harness.start(
        tmp_path, [backend or ScriptedBackend(answer_of("Hel", "lo"))], ledger=":memory:", **settings
    )
    return harness


class Client:
    """A client's side: an opener into the harness's server, a pool, a ledger."""

    def __init__(self, harness: Harness, nursery: trio.Nursery, ledger: Ledger, *, protocols, **pool) -> None:
        self.harness = harness
        self.opener = MemoryStreamOpener(nursery, harness.client_key.peer_id)
        for protocol in protocols:
            self.opener.serve(harness.executor_key.peer_id, protocol, harness.server.handle)
        self.pool = SessionPool(self.opener, **pool)
        self.kit = StreamKit(
            opener=self.opener, key=harness.client_key, ledger=ledger, tokens=harness.server.tokens, sessions=self.pool
        )
        executor = harness.executor_key.peer_id
        self.offer = Offer(
            executor=executor, model=MODEL, advert=Advert(seq=1, issued_at=0.0, ttl=60.0, models=[MODEL]),
            expires_at=float("inf"),
        )

    async def chat(self, model: str = "m1", **options) -> str:
        offer = self.offer if model == "m1" else Offer(
            executor=self.offer.executor, model=ModelOffer(name=model), advert=self.offer.advert, expires_at=float("inf")
        )
        stream = ChatStream(self.kit, offer, HELLO, RequestOptions(**options))
        try:
            await stream.open()
            await stream.start()
            return "".join([t async for t in stream])
        finally:
            await stream.aclose()


@pytest.fixture
async def book():
    ledger = await Ledger.open(":memory:")
    yield ledger
    await ledger.aclose()


async def run_client(tmp_path, book, body, *, protocols=(INFER_SESSION_PROTOCOL, INFER_PROTOCOL), backend=None,
                     pool=None, **settings):
    harness = await start(tmp_path, backend, **settings)
    try:
        async with trio.open_nursery() as nursery:
            client = Client(harness, nursery, book, protocols=protocols, **(pool or {}))
            await body(client)
            await client.pool.aclose()
    finally:
        await harness.aclose()
    return harness


async def test_sequential_requests_share_one_session_stream(tmp_path, book, autojump_clock):
    async def body(client):
        for _ in range(4):
            assert await client.chat() == "Hello"
        assert client.opener.opened == {INFER_SESSION_PROTOCOL: 1}
        stats = client.pool.statistics()
        assert (stats.opened, stats.reused, stats.idle) == (1, 3, 1)
        # every request has its own receipt, booked and acknowledged on both sides
        assert len(await book.entries(status="accepted")) == 4
        with trio.fail_after(10):  # the executor books the last ack just after the client sends it
            while len(await client.harness.server.ledger.entries(status="acknowledged")) < 4:
                await trio.sleep(0.1)

    harness = await run_client(tmp_path, book, body)
    stats = harness.server.statistics()
    assert (stats.served, stats.sessions, stats.session_requests, stats.sessions_open) == (4, 1, 3, 0)


async def test_concurrent_requests_use_as_many_sessions_then_reuse_them(tmp_path, book, autojump_clock):
    slow = ScriptedBackend(answer_of("a", "b", pause=1.0))

    async def body(client):
        for _ in range(2):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(client.chat)
        assert client.opener.opened == {INFER_SESSION_PROTOCOL: 3}
        assert client.pool.statistics().reused == 3

    await run_client(tmp_path, book, body, backend=slow, capacity=3)


async def test_an_executor_without_sessions_gets_one_stream_per_request(tmp_path, book, autojump_clock):
    async def body(client):
        for _ in range(3):
            assert await client.chat() == "Hello"
        assert client.opener.opened == {INFER_PROTOCOL: 3}
        stats = client.pool.statistics()
        assert (stats.opened_single, stats.reused, stats.idle) == (3, 0, 0)

    await run_client(tmp_path, book, body, protocols=(INFER_PROTOCOL,))


async def test_after_a_refusal_the_client_does_not_reuse_the_session(tmp_path, book, autojump_clock):
    # the executor may end a session right after an error frame (a request refused part-way
    # through its frame: review of issue 9), so a client keeps sessions after receipts only
    async def body(client):
        with pytest.raises(RemoteError) as caught:
            await client.chat(model="nope")
        assert caught.value.code is ErrorCode.UNKNOWN_MODEL
        assert client.pool.statistics().idle == 0
        assert await client.chat() == "Hello"
        assert await client.chat() == "Hello"
        assert client.opener.opened == {INFER_SESSION_PROTOCOL: 2}
        assert client.pool.statistics().stale_retries == 0

    await run_client(tmp_path, book, body)


async def test_a_session_the_executor_ended_is_retried_once_on_a_new_stream(tmp_path, book, autojump_clock):
    async def body(client):
        assert await client.chat() == "Hello"
        await trio.sleep(5)  # the executor ends the idle session after 2 s; the client keeps it 20 s
        assert await client.chat() == "Hello"
        stats = client.pool.statistics()
        assert (stats.opened, stats.stale_retries) == (2, 1)

    harness = await run_client(tmp_path, book, body, session_idle_timeout=2.0)
    assert harness.server.statistics().served == 2


async def test_the_client_closes_sessions_idle_past_its_timeout(tmp_path, book, autojump_clock):
    async def body(client):
        assert await client.chat() == "Hello"
        await trio.sleep(30)  # past the client's 20 s
        assert await client.chat() == "Hello"
        stats = client.pool.statistics()
        assert (stats.opened, stats.expired, stats.stale_retries) == (2, 1, 0)

    await run_client(tmp_path, book, body)


async def test_idle_sessions_are_bounded_per_executor(tmp_path, book, autojump_clock):
    slow = ScriptedBackend(answer_of("a", pause=1.0))

    async def body(client):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(client.chat)
        stats = client.pool.statistics()
        assert (stats.opened, stats.idle, stats.expired) == (5, 2, 3)

    await run_client(tmp_path, book, body, backend=slow, capacity=5, pool={"max_idle_per_peer": 2})


async def test_a_client_that_leaves_mid_answer_resets_and_the_session_is_not_reused(tmp_path, book, autojump_clock):
    slow = ScriptedBackend(events(TextDelta("first"), 10.0, TextDelta("never"), Finished(finish_reason="stop")))

    async def body(client):
        stream = ChatStream(client.kit, client.offer, HELLO, RequestOptions())
        await stream.open()
        await stream.start()
        await stream.aclose()  # left after the first delta
        await trio.sleep(1)
        assert slow.exited == 1  # the generation stopped
        assert client.pool.statistics().idle == 0

    await run_client(tmp_path, book, body, backend=slow)


# ---------------------------------------------------------------- raw frames: same guarantees


async def test_each_request_of_a_session_is_checked_as_on_its_own_stream(tmp_path, autojump_clock):
    harness = await start(tmp_path)
    client_stream, executor_stream = stream_pair(
        harness.client_key.peer_id, harness.executor_key.peer_id, INFER_SESSION_PROTOCOL
    )
    conn = InferenceConnection(Role.CLIENT, session=True)
    mallory = SigningKey(os.urandom(32))

    async def exchange(envelope):
        await client_stream.send_all(conn.send(RequestFrame(envelope)), timeout=5)
        while True:
            while (event := conn.next_event()) is NEED_DATA:
                conn.receive_data(await client_stream.receive_some(timeout=5))
            if isinstance(event, (ReceiptFrame, ErrorFrame)):
                return event

    def request(**fields):
        values = dict(
            audience=harness.executor_key.peer_id, nonce=os.urandom(16), created_at=time.time(),
            model="m1", messages=HELLO,
        )
        values.update(fields)
        return InferenceRequest(**values)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.server.handle, executor_stream)
            signed = seal(SignedKind.REQUEST, request(), harness.client_key)
            first = await exchange(signed)
            assert isinstance(first, ReceiptFrame)
            ack = ReceiptAck(receipt_digest=digest(first.envelope.payload), accepted_at=1.0, client_output_tokens=2)
            await client_stream.send_all(conn.send(AckFrame(seal(SignedKind.RECEIPT_ACK, ack, harness.client_key))), timeout=5)
            replayed = await exchange(signed)  # the same signed request again: refused, the session goes on
            assert isinstance(replayed, ErrorFrame) and replayed.code == ErrorCode.REPLAYED_NONCE
            foreign = await exchange(seal(SignedKind.REQUEST, request(), mallory))  # signed by someone else
            assert isinstance(foreign, ErrorFrame) and foreign.code == ErrorCode.SIGNER_MISMATCH
            elsewhere = await exchange(seal(SignedKind.REQUEST, request(audience=mallory.peer_id), harness.client_key))
            assert isinstance(elsewhere, ErrorFrame) and elsewhere.code == ErrorCode.WRONG_AUDIENCE
            again = await exchange(seal(SignedKind.REQUEST, request(), harness.client_key))
            assert isinstance(again, ReceiptFrame)
            await client_stream.close()  # the client ends the session between requests
    finally:
        await harness.aclose()
    stats = harness.server.statistics()
    assert (stats.served, stats.refused, stats.sessions_open) == (2, 3, 0)


async def test_a_session_idle_past_its_timeout_is_ended_by_the_executor(tmp_path, book, autojump_clock):
    async def body(client):
        assert await client.chat() == "Hello"
        server = client.harness.server
        await trio.sleep(6.5)
        assert server.statistics().sessions_open == 1
        await trio.sleep(1)  # past session-idle-timeout (7 s) after the ack
        assert server.statistics().sessions_open == 0

    await run_client(tmp_path, book, body, session_idle_timeout=7.0)


async def test_the_next_request_of_a_session_does_not_wait_for_the_last_ack_to_be_booked(tmp_path, book, autojump_clock):
    # the executor booked each counter-signature (an fsync'd write) before reading the next
    # request, so every request of a session waited for the last one's ack write (issue 9)
    async def body(client):
        ledger = client.harness.server.ledger
        record_ack = ledger.record_ack
        booked = []

        async def slow_record_ack(*args, **kwargs):
            await trio.sleep(5)  # a disk that takes its time
            await record_ack(*args, **kwargs)
            booked.append(trio.current_time())

        ledger.record_ack = slow_record_ack
        assert await client.chat() == "Hello"
        started = trio.current_time()
        assert await client.chat() == "Hello"
        assert trio.current_time() - started < 1  # not held behind the first ack's 5 s
        assert client.opener.opened == {INFER_SESSION_PROTOCOL: 1}
        with trio.fail_after(20):
            while len(booked) < 2:  # both acks are booked all the same
                await trio.sleep(0.5)

    await run_client(tmp_path, book, body)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"session_idle_timeout": 0.0}, "session-idle-timeout must be positive"),
        ({"session_idle_timeout": float("nan")}, "session-idle-timeout must be positive"),
        ({"max_idle_sessions": -1}, "max-idle-sessions must be from 0 to 64"),
        ({"max_idle_sessions": 65}, "max-idle-sessions must be from 0 to 64"),
    ],
)
def test_session_settings_out_of_range_are_refused_naming_the_key(fields, says):
    from loomnet.client import ClientConfig

    with pytest.raises(ValueError, match=says):
        ClientConfig(**fields)
