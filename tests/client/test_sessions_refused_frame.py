"""Review of issue 9: an honest client whose request the executor refuses *while reading
it* (PEER_LIMIT at the frame's header: its other requests already announce the
per-peer byte budget) must not find that session broken later.

The executor consumed the refused frame's header but not its body, answered
PEER_LIMIT (retryable) and kept serving the session, reading the body as the next
frame. The client, told its request was refused, gave the session back to its pool as
idle; the executor's answer to the misread body (an error frame) then sat on it, and the
client's next request there got that error as its own answer.
"""

from __future__ import annotations

import pytest
import trio

from loomnet.client._chat_stream import ChatStream, RequestOptions
from loomnet.protocol import ChatMessage, ErrorCode, RemoteError

from .test_sessions import Client, answer_of, book, start  # noqa: F401 - fixtures
from ..node.server_harness import ScriptedBackend, warm_tokens

BIG = [ChatMessage("user", "x" * 300_000), ChatMessage("user", "y" * 300_000)]  # two at once announce more than the per-peer budget
LIMIT = (1 << 20) + 4


@pytest.fixture(autouse=True)
def _tokens():
    warm_tokens()


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0.5)


async def chat(client: Client, messages) -> str | RemoteError:
    stream = ChatStream(client.kit, client.offer, messages, RequestOptions())
    try:
        await stream.open()
        await stream.start()
        return "".join([t async for t in stream])
    except RemoteError as exc:
        return exc
    finally:
        await stream.aclose()


async def test_a_request_refused_at_its_header_leaves_no_broken_session_behind(tmp_path, book, autojump_clock):  # noqa: F811
    harness = await start(
        tmp_path, ScriptedBackend(answer_of("Hel", "lo", pause=1.0)), capacity=4,
        max_request_bytes_per_peer=LIMIT, max_request_bytes=4 * LIMIT,
    )
    try:
        async with trio.open_nursery() as nursery:
            client = Client(harness, nursery, book, protocols=(("/loomnet/infer/2",)))
            first: list = []

            async def one(messages):
                first.append(await chat(client, messages))

            async with trio.open_nursery() as both:
                both.start_soon(one, BIG)
                both.start_soon(one, BIG)
            refused = [r for r in first if isinstance(r, RemoteError)]
            assert refused and refused[0].code == ErrorCode.PEER_LIMIT, first  # the premise
            await trio.sleep(2)
            # every pooled session must serve a request now (small ones: no budget issue)
            second: list = []

            async def small():
                second.append(await chat(client, [ChatMessage("user", "hi")]))

            async with trio.open_nursery() as both:
                both.start_soon(small)
                both.start_soon(small)
            assert second == ["Hello", "Hello"], second
            await client.pool.aclose()
            nursery.cancel_scope.cancel()
    finally:
        await harness.aclose()
