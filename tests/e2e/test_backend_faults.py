"""Backend faults end to end over the network: two real executors on loopback (py-libp2p
hosts, the real server), each serving one model through the real OpenAI-compatible
adapter, which talks real HTTP to a faithful fake runtime (``tests/node/fake_openai.py``
on ``serve_app``). The cheaper executor's runtime fails; the client, with its default
router, tries it first.

- Before the first chunk (a runtime that hangs before its first byte, or that answers
  HTTP 200 with a body that is no answer at all): the client fails over to the other
  executor within a bound, gets the answer and a receipt from it, and the failed
  executor books nothing.
- After the first chunk (the runtime dies mid-stream: the connection drops; or the
  stream turns into bytes that are not server-sent events of chunks): the client gets a
  ``RemoteError`` with a stable code, and the receipt riding on it covers exactly the
  text the client received (its digest, its chunks), nothing the runtime sent after.
- In every case the client's ledger and the executors' ledgers hold the same receipts,
  byte for byte.

(In-process scripted backends that stay silent or fail after a chunk are in
``test_failover.py``; a pool of two HTTP backends failing over on a 503 inside one
executor in ``test_backend_pool.py``.)
"""

from __future__ import annotations

import hashlib
import json
import logging

import msgspec
import pytest
import trio
from loomnet.client import ClientConfig, LoomClient
from loomnet.node import Executor, ExecutorConfig, ModelTerms
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.protocol import ChatMessage, ErrorCode, Receipt, RemoteError

from ..limits import fail_after
from ..node.asgi_server import DropConnection, send_chunk, serve_app, start_stream
from ..node.fake_openai import FakeOpenAI

pytestmark = pytest.mark.integration

HELLO = [ChatMessage("user", "Say hello.")]
MODEL = "m1"
#: the faulty runtime's adapter: seconds for connect, first byte and between bytes
BACKEND_TIMEOUT = 2.0
#: seconds a failover may take, end to end, on a loaded 2-core machine (the hang costs
#: BACKEND_TIMEOUT of it)
FAILOVER_BOUND = 15.0
PIECES = ["Hello", ", ", "brave ", "new ", "world", "!"]

#: what a proxy, captive portal or misrouted port answers instead of the runtime: 200 OK
#: and a page that is not an answer
NOT_AN_ANSWER = b"<!DOCTYPE html><html><head><title>Welcome</title></head><body>It works!</body></html>"
#: what a stream turns into part-way: neither an SSE event of a chunk nor JSON
GARBAGE = b"data: {\"choices\": [{\"delta\": \x00\xff\xfe<<garbage>>\n\ndata: \x89PNG\r\n\x1a\n\n\n"


def fake_runtime(pieces: list[str] = PIECES) -> FakeOpenAI:
    fake = FakeOpenAI(flavour="vllm", pieces=list(pieces))
    fake.models = [{"id": MODEL, "object": "model", "created": 0, "owned_by": "vllm", "root": MODEL,
                    "parent": None, "max_model_len": 4096, "permission": []}]  # fmt: skip
    return fake


class Faulty:
    """An ASGI app in front of a fake runtime: every route is the runtime's, but
    ``/v1/chat/completions`` fails as ``mode`` says (None: not at all):

    - ``"hang"``: the request is read, and then nothing comes back, not even headers;
    - ``"not-an-answer"``: HTTP 200, ``text/html``, a page (a proxy or a wrong port);
    - ``"garbage"``: the runtime's stream passes through up to ``after`` content
      events (its role chunk not counted), then bytes that are not events, then the
      body ends;
    - ``"drop"``: as ``"garbage"``, but then the connection drops (the runtime died).

    ``delivered`` is the content of the events that passed, ``entered`` the chat
    requests that came, ``cancelled`` those the adapter gave up (closed the connection)
    on while hanging.
    """

    def __init__(self, fake: FakeOpenAI, mode: str | None = None, *, after: int = 2) -> None:
        self.fake, self.mode, self.after = fake, mode, after
        self.delivered: list[str] = []
        self.entered = self.cancelled = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("path") != "/v1/chat/completions" or self.mode is None:
            return await self.fake(scope, receive, send)
        self.entered += 1
        if self.mode == "hang":
            while (await receive()).get("more_body"):
                pass
            # nothing is sent; the next message is the client's going (``http.disconnect``)
            if (await receive())["type"] == "http.disconnect":
                self.cancelled += 1
            return
        if self.mode == "not-an-answer":
            while (await receive()).get("more_body"):
                pass
            await start_stream(send, "text/html; charset=utf-8")
            return await send_chunk(send, NOT_AN_ANSWER, more=False)
        events = 0

        async def relay(message: dict) -> None:
            nonlocal events
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or not body.startswith(b"data: {"):
                return await send(message)
            delta = json.loads(body[len(b"data: "):])["choices"][0]["delta"]
            if delta.get("content"):
                if events == self.after:
                    await trio.sleep(0.3)  # the pieces before went out as a chunk first
                    if self.mode == "drop":
                        raise DropConnection("the runtime died")
                    await send_chunk(send, GARBAGE)
                    await send_chunk(send, b"", more=False)
                    raise _Done
                events += 1
                self.delivered.append(delta["content"])
            await send(message)

        try:
            await self.fake(scope, receive, relay)
        except _Done:
            pass


class _Done(Exception):
    """The garbage was sent and the body ended: the fake's own stream stops here."""


async def start_executor(nursery, tmp_path, name: str, app, *, price_out: float) -> Executor:
    """An executor serving MODEL through the OpenAI-compatible adapter in front of ``app``."""
    url = await serve_app(nursery, app)
    backend = OpenAICompatBackend(BackendConfig(provider="vllm", name=name, endpoint=url + "/v1", models=[MODEL],
                                                timeout=BACKEND_TIMEOUT, max_retries=0))  # fmt: skip
    config = ExecutorConfig(
        data_dir=str(tmp_path / name), listen=["/ip4/127.0.0.1/tcp/0"], announce_local=False,
        request_read_timeout=10.0, ack_timeout=10.0, health_interval=600.0,
        backends=[BackendConfig(provider="vllm", name=name)],
        models=[ModelTerms(name=MODEL, price_in=0.0, price_out=price_out, backends=[name])],
    )  # fmt: skip
    executor = Executor(config, backends=[backend])
    await nursery.start(executor.run)
    return executor


async def start_client(nursery, tmp_path, executors: list[Executor]) -> LoomClient:
    client = LoomClient(ClientConfig(
        data_dir=str(tmp_path / "client"), discover_local=False, bootstrap=[e.info.addrs[0] for e in executors],
        offer_timeout=10.0, first_byte_timeout=10.0, idle_timeout=30.0,
    ))  # fmt: skip
    await nursery.start(client.run)
    with trio.fail_after(20):
        while len(client.offers()) < len(executors):
            await client.member.table_changed.wait()
    return client


async def setup(nursery, tmp_path, mode: str) -> tuple[Faulty, Executor, FakeOpenAI, Executor, LoomClient]:
    """The faulty executor (cheapest: tried first) and a good one, and a client."""
    faulty = Faulty(fake_runtime(), mode)
    bad = await start_executor(nursery, tmp_path, "faulty", faulty, price_out=1.0)
    good_fake = fake_runtime(pieces=["Hello from ", "the good one."])
    good = await start_executor(nursery, tmp_path, "good", good_fake, price_out=2.0)
    client = await start_client(nursery, tmp_path, [bad, good])
    return faulty, bad, good_fake, good, client


async def assert_ledgers_agree(client: LoomClient, *executors: Executor) -> list[bytes]:
    """Every receipt in the client's ledger is in the executor's, byte for byte, and the
    executors hold none the client lacks; returns the receipts' payloads."""
    mine = {e.receipt_digest: e.receipt_payload for e in await client.ledger.entries()}
    theirs: dict[bytes, bytes] = {}
    with trio.fail_after(10):  # an executor books the ack beside its next request, or when the stream ends
        while True:
            theirs = {e.receipt_digest: e.receipt_payload
                      for x in executors for e in await x.server.ledger.entries()}  # fmt: skip
            if theirs == mine:
                break
            await trio.sleep(0.05)
    return list(mine.values())


#: what the executor's log says ended the request: the fault itself was seen, not another
REASONS = {
    "hang": "timed out while streaming a chat",
    "not-an-answer": "answered HTTP 200 without any stream event",
    "drop": "peer closed connection without sending complete message body",
    "garbage": "sent a stream event that is not JSON",
}


def logged(caplog, mode: str) -> bool:
    return any(REASONS[mode] in r.getMessage() for r in caplog.records if r.name == "loomnet.server")


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


# ------------------------------------------------------------ before the first chunk: failover


@fail_after(90)
@pytest.mark.parametrize("mode", ["hang", "not-an-answer"])
async def test_a_backend_failing_before_the_first_chunk_is_failed_over(nursery, tmp_path, caplog, mode):
    caplog.set_level(logging.INFO, logger="loomnet.server")
    faulty, bad, good_fake, good, client = await setup(nursery, tmp_path, mode)

    started = trio.current_time()
    result = await client.chat(HELLO, model=MODEL, max_tokens=16)
    elapsed = trio.current_time() - started

    assert result.executor == good.peer_id and result.text == "Hello from the good one."
    assert elapsed < FAILOVER_BOUND, f"failover took {elapsed:.1f} s"
    [attempt] = result.attempts
    assert attempt.executor == bad.peer_id
    expected = {"hang": ErrorCode.BACKEND_TIMEOUT, "not-an-answer": ErrorCode.BACKEND_ERROR}[mode]
    assert attempt.outcome == expected.name, (attempt.outcome, attempt.detail)
    assert logged(caplog, mode)
    assert faulty.entered == 1 and good_fake.count("/v1/chat/completions") == 1
    if mode == "hang":
        assert elapsed >= BACKEND_TIMEOUT  # the adapter's first-byte deadline, not luck
        with trio.fail_after(10):  # the adapter gave up the request: the runtime saw it go
            while not faulty.cancelled:
                await trio.sleep(0.05)
    [payload] = await assert_ledgers_agree(client, bad, good)
    receipt = msgspec.msgpack.decode(payload, type=Receipt)
    assert receipt == result.receipt and receipt.output_digest == digest(result.text)
    assert await bad.server.ledger.entries() == []  # no content went out: nothing billed there


# ------------------------------------------------------------ after the first chunk: a typed error


@fail_after(90)
@pytest.mark.parametrize("mode", ["drop", "garbage"])
async def test_a_backend_failing_after_the_first_chunk_is_a_typed_error_with_a_receipt_for_what_was_sent(
    nursery, tmp_path, caplog, mode
):
    caplog.set_level(logging.INFO, logger="loomnet.server")
    faulty, bad, good_fake, good, client = await setup(nursery, tmp_path, mode)

    seen: list[str] = []
    with trio.fail_after(FAILOVER_BOUND), pytest.raises(RemoteError) as info:
        async with client.stream_chat(HELLO, model=MODEL, max_tokens=16) as stream:
            async for text in stream:
                seen.append(text)

    error = info.value
    assert stream.executor == bad.peer_id and seen
    assert error.code == ErrorCode.BACKEND_ERROR, (error.code, error.message)
    assert logged(caplog, mode)
    assert error.retryable  # the backend's fault, yet not retried: text went out
    received = "".join(seen)
    assert received == "".join(faulty.delivered) == "Hello, "  # the pieces before the fault, nothing after
    receipt = error.result.receipt
    assert receipt.finish_reason == "error" and receipt.output_digest == digest(received)
    assert error.result.text == received
    assert receipt.chunks >= 1 and receipt.output_tokens >= 1
    assert good_fake.count("/v1/chat/completions") == 0  # never failed over
    [payload] = await assert_ledgers_agree(client, bad, good)
    assert msgspec.msgpack.decode(payload, type=Receipt) == receipt
    [entry] = await client.ledger.entries()
    assert entry.executor == bad.peer_id and entry.status == "accepted"
    assert await good.server.ledger.entries() == []
