"""Session streams (``/loomnet/infer/2``) after a request the executor refused part-way
through reading it: the real ``InferenceServer`` over in-memory streams, under trio's
autojump clock (review of issue 9).

docs/protocol.md, "Sessions": "A session ends when ... anything leaves the stream
unsound (a protocol violation, a frame not whole in time, ...)". ``FrameIO`` says the
same of a read that timed out: "the stream is only good for a reset". These tests hold
the executor to it: once it has answered a request it stopped reading in the middle,
nothing more on that session may be taken for a request.
"""

from __future__ import annotations


import pytest
import trio
import trio.testing

from loomnet.protocol import (
    INFER_SESSION_PROTOCOL,
    ChatMessage,
    ChunkFrame,
    EndOfStream,
    ErrorCode,
    ErrorFrame,
    InferenceConnection,
    ReceiptFrame,
    Role,
)

from ..node.server_harness import Finished, Harness, ScriptedBackend, TextDelta, events, next_frame, warm_tokens

HELLO = [ChatMessage("user", "Hello?")]


@pytest.fixture(autouse=True)
def _tokens():
    warm_tokens()


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0.5)


async def start(tmp_path, **settings) -> Harness:
    backend = ScriptedBackend(events(TextDelta("Hel"), TextDelta("lo"), Finished(finish_reason="stop")))
    return await Harness.start(tmp_path, [backend], ledger=":memory:", **settings)


async def test_a_request_refused_for_arriving_late_is_not_served_afterwards(tmp_path, autojump_clock):
    """A request frame that does not arrive whole within ``request-read-timeout`` is
    answered ``REQUEST_TIMEOUT`` (the client's request is over: its conn goes back to
    IDLE, and a ``ChatStream`` gives the session back to its pool). If the rest of that
    frame then arrives (a slow link), the executor must not serve it: the client was told
    it failed, is not reading an answer to it, and must not be billed for it.

    Today the session loop goes on after the error frame with the half-read frame still
    in the decoder; the late bytes complete it, and the executor serves the request it
    refused: it streams an answer, signs and books a receipt (``served`` 1), on a session
    the client takes for idle. The client's next request on that session then reads
    the old request's chunks and receipt as its own answer.
    """
    harness = await start(tmp_path, request_read_timeout=2.0)
    client_end, executor_end = harness.session()
    conn = InferenceConnection(Role.CLIENT, session=True)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.server.handle, executor_end)
            data = harness.request_frame(conn)
            await client_end.send_all(data[:100], timeout=5)  # the link is slow: part of it now
            first = await next_frame(client_end, conn)
            assert isinstance(first, ErrorFrame) and first.code == ErrorCode.REQUEST_TIMEOUT
            assert conn.state.value == "idle"  # the request is over for the client

            await client_end.send_all(data[100:], timeout=5)  # the rest arrives late
            await trio.sleep(5)
            stats = harness.server.statistics()
            booked = await harness.server.ledger.entries()
            nursery.cancel_scope.cancel()
    finally:
        await harness.aclose()
    # the executor answered "timed out"; it must not then serve and bill the same request
    assert stats.served == 0, f"the refused request was served anyway: {stats}"
    assert booked == [], f"a receipt was booked for the refused request: {booked}"


async def test_a_session_refused_mid_frame_for_the_byte_budget_serves_the_next_request(tmp_path, autojump_clock):
    """Two requests with large prompts from one client on two session streams at once:
    the second one's header announces more than the peer's byte budget has left, so it
    is refused ``PEER_LIMIT`` (retryable) from its header alone, its body unread. The
    session is back to IDLE on both sides; the client's next (small) request on it must
    be served, or the executor must end the session so the client opens a new one.

    Today the executor's session loop goes on reading *the refused request's body* as
    the next frame: its first bytes are taken for a length prefix, the executor answers
    with a bogus error (FRAME_TOO_LARGE here) and ends the session; the client, which
    has meanwhile sent its next request, reads that error as the answer to it: a valid
    small request fails with "frame too large".
    """
    harness = await start(tmp_path)
    big = [ChatMessage("user", "x" * 600_000)]  # ~600 KB frames: several unfinished ones fill the peer budget
    per_peer = harness.server.config.max_request_bytes_per_peer
    # enough unfinished frames on stream A that B's announced frame passes the peer's budget
    a_streams = []
    try:
        async with trio.open_nursery() as nursery:
            held = 0
            while held + 700_000 <= per_peer:  # streams A...: each a large request, only its header and a little sent
                a_client, a_executor = harness.session()
                nursery.start_soon(harness.server.handle, a_executor)
                a_conn = InferenceConnection(Role.CLIENT, session=True)
                data = harness.request_frame(a_conn, big)
                await a_client.send_all(data[:1000], timeout=5)
                a_streams.append(a_client)
                held += len(data)
            await trio.sleep(0.1)
            assert harness.server.intake.statistics().announced_bytes == held

            b_client, b_executor = harness.session()
            nursery.start_soon(harness.server.handle, b_executor)
            b_conn = InferenceConnection(Role.CLIENT, session=True)
            await b_client.send_all(harness.request_frame(b_conn, big), timeout=5)
            refusal = await next_frame(b_client, b_conn)
            assert isinstance(refusal, ErrorFrame) and refusal.code == ErrorCode.PEER_LIMIT and refusal.retryable
            assert b_conn.state.value == "idle"  # both sides: the session waits for the next request

            # the next request on the same session: a small one, well within every budget
            await b_client.send_all(harness.request_frame(b_conn), timeout=5)
            frames = []
            while True:
                try:
                    frame = await next_frame(b_client, b_conn)
                except Exception as exc:  # the stream ended under the request: a retry is the client's to make
                    frames.append(exc)
                    break
                frames.append(frame)
                if isinstance(frame, (ReceiptFrame, ErrorFrame, EndOfStream)):
                    break
            nursery.cancel_scope.cancel()
    finally:
        await harness.aclose()
    last = frames[-1]
    assert not isinstance(last, ErrorFrame), (
        f"the next request on the session got an error that is not its own: code {last.code} "
        f"({last.message!r}); frames: {frames}"
    )
    if isinstance(last, ReceiptFrame):
        assert "".join(f.text for f in frames if isinstance(f, ChunkFrame)) == "Hello"


async def test_a_session_refused_for_the_stream_limit_is_not_pooled(tmp_path, autojump_clock):
    """A client with more requests in flight to one executor than its
    ``max-streams-per-peer`` (8 by default): the network layer refuses the extra stream
    with ``Intake.refuse_stream`` (an error frame ``PEER_LIMIT``, retryable) and closes
    it, as ``PeerGuard.guarded_handler`` does. The client's ``ChatStream`` raises
    ``RemoteError(PEER_LIMIT)`` (right), but its session machine went OPEN -> IDLE on the
    error frame, so ``SessionPool.reusable`` says yes and the closed stream is put back in
    the pool as an idle session. The next request leases that dead stream, fails, and
    has to be sent again on a new one (``stale_retries``), and the pool's ``idle`` counts
    a stream the executor has ended.

    Expected: a stream the executor ended after its error frame is not pooled
    (``idle`` 0 after the refusal; no stale retry on the next request).
    """
    from loomnet.client._chat_stream import ChatStream, RequestOptions, StreamKit
    from loomnet.client._memory_stream import MemoryStreamOpener
    from loomnet.client._offers import Offer
    from loomnet.client._session_pool import SessionPool
    from loomnet.client import Ledger
    from loomnet.protocol import Advert, ModelOffer, RemoteError

    backend = ScriptedBackend(events(TextDelta("Hel"), 2.0, TextDelta("lo"), Finished(finish_reason="stop")))
    harness = await Harness.start(tmp_path, [backend], ledger=":memory:")
    server = harness.server
    live = {"n": 0}
    limit = 1  # max-streams-per-peer, small so that two requests pass it

    async def guarded(stream):  # PeerGuard.guarded_handler: the slot, or the refusal
        if live["n"] >= limit:
            await server.intake.refuse_stream(stream)
            return  # the opener closes the executor's end, as the guard's finally does
        live["n"] += 1
        try:
            await server.handle(stream)
        finally:
            live["n"] -= 1

    book = await Ledger.open(":memory:")
    try:
        async with trio.open_nursery() as nursery:
            opener = MemoryStreamOpener(nursery, harness.client_key.peer_id)
            opener.serve(harness.executor_key.peer_id, INFER_SESSION_PROTOCOL, guarded)
            pool = SessionPool(opener)
            kit = StreamKit(opener=opener, key=harness.client_key, ledger=book, tokens=server.tokens, sessions=pool)
            model = ModelOffer(name="m1")
            offer = Offer(executor=harness.executor_key.peer_id, model=model,
                          advert=Advert(seq=1, issued_at=0.0, ttl=60.0, models=[model]), expires_at=float("inf"))  # fmt: skip

            async def chat() -> str:
                stream = ChatStream(kit, offer, HELLO, RequestOptions())
                try:
                    await stream.open()
                    await stream.start()
                    return "".join([t async for t in stream])
                finally:
                    await stream.aclose()

            outcomes = []

            async def first():
                outcomes.append(await chat())

            nursery.start_soon(first)
            await trio.sleep(0.5)  # the first request holds the executor's only stream place
            with pytest.raises(RemoteError) as caught:
                await chat()
            assert caught.value.code is ErrorCode.PEER_LIMIT and caught.value.retryable
            idle_after_refusal = pool.statistics().idle
            await trio.sleep(5)  # the first request is done; its session is idle in the pool
            assert outcomes == ["Hello"]
            assert await chat() == "Hello"
            stats = pool.statistics()
            await pool.aclose()
    finally:
        await book.aclose()
        await harness.aclose()
    assert idle_after_refusal == 0, "the stream the executor refused and closed was pooled as an idle session"
    assert stats.stale_retries == 0, f"a later request leased the refused, closed stream: {stats}"
