"""The pieces of the bad-input suite (``test_bad_input*.py``): a real executor over real
py-libp2p on 127.0.0.1 serving an instant in-process backend that counts its calls, a
hostile peer (a bare libp2p host) that writes raw bytes on a real stream, an honest
client, and the check that a refusal left nothing behind.
"""

from __future__ import annotations

import os
import time

import msgspec
import trio
from loomnet.client import ClientConfig, LoomClient, P2PConfig, P2PNode, P2PStream
from loomnet.node import Executor, ExecutorConfig
from loomnet.node.backends._base import ModelInfo
from loomnet.node.config import ModelTerms
from loomnet.protocol import (
    END,
    INFER_PROTOCOL,
    NEED_DATA,
    ChatMessage,
    Envelope,
    ErrorFrame,
    FrameDecoder,
    InferenceRequest,
    LoomError,
    ReceiptFrame,
    RequestFrame,
    SignedKind,
    SigningKey,
    decode_frame,
    encode_frame,
    encode_frame_body,
    encode_payload,
    seal,
)

from ..node.server_harness import Finished, ScriptedBackend, TextDelta, Usage, events

HI = [ChatMessage("user", "Say hi.")]
MODEL = "m1"
PRICE_IN, PRICE_OUT = 1.5, 3.0  # credits per million tokens
#: the context window the backend reports for MODEL, tokens
CONTEXT = 512
#: the executor's ``request-read-timeout`` here, seconds: a whole request frame must
#: arrive within it (``node/_intake.py``)
READ_TIMEOUT = 2.0


class Instant(ScriptedBackend):
    """Answers at once, counts its generations (``entered``), reports a context window."""

    def __init__(self) -> None:
        usage = Usage(input_tokens=5, output_tokens=2, source="backend")
        super().__init__(events(TextDelta("Hello."), Finished(finish_reason="stop", usage=usage)), model=MODEL)

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(name=self.model, context_length=CONTEXT, capabilities=self.capabilities)]


async def start_executor(nursery: trio.Nursery, tmp_path, backend: Instant, **settings: object) -> Executor:
    fields: dict[str, object] = {
        "data_dir": str(tmp_path / "executor"),
        "listen": ["/ip4/127.0.0.1/tcp/0"],
        "announce_local": False,
        "models": [ModelTerms(name=MODEL, price_in=PRICE_IN, price_out=PRICE_OUT)],
        "request_read_timeout": READ_TIMEOUT,
        "ack_timeout": 5.0,
    }
    fields.update(settings)
    executor = Executor(ExecutorConfig(**fields), backends=[backend])  # type: ignore[arg-type]
    await nursery.start(executor.run)
    return executor


async def start_honest(nursery: trio.Nursery, tmp_path, executor: Executor, name: str = "honest") -> LoomClient:
    client = LoomClient(ClientConfig(
        data_dir=str(tmp_path / name), bootstrap=[executor.info.addrs[0]], discover_local=False,
        offer_timeout=10.0, first_byte_timeout=20.0,
    ))  # fmt: skip
    await nursery.start(client.run)
    await client.wait_for_offers(timeout=10)
    return client


class Hostile:
    """A bare libp2p host with its own identity: it signs what it likes and writes raw
    bytes on real streams to the executor."""

    def __init__(self, node: P2PNode, key: SigningKey, executor: Executor) -> None:
        self.node = node
        self.key = key
        self.executor = executor

    @classmethod
    async def start(cls, nursery: trio.Nursery, executor: Executor) -> Hostile:
        seed = os.urandom(32)
        node = P2PNode(seed, P2PConfig())
        await nursery.start(node.run)
        return cls(node, SigningKey(seed), executor)

    def request(self, **overrides: object) -> InferenceRequest:
        fields: dict[str, object] = {
            "audience": self.executor.peer_id, "nonce": os.urandom(16), "created_at": time.time(), "model": MODEL,
            "messages": HI, "max_tokens": 4,
        }  # fmt: skip
        fields.update(overrides)
        return InferenceRequest(**fields)  # type: ignore[arg-type]

    def sealed(self, request: InferenceRequest | None = None, *, key: SigningKey | None = None) -> Envelope:
        return seal(SignedKind.REQUEST, request or self.request(), key or self.key)

    def signed_raw(self, payload: object) -> Envelope:
        """Any payload (a dict of any fields and types), signed as a request."""
        data = msgspec.msgpack.encode(payload)
        return Envelope(payload=data, signer=self.key.public_key, sig=self.key.sign(SignedKind.REQUEST.prefix + data))

    async def open(self, protocol: str = INFER_PROTOCOL) -> P2PStream:
        return await self.node.open_stream(self.executor.peer_id, protocol, addrs=self.executor.info.addrs, timeout=10)

    async def exchange(
        self, data: bytes, protocol: str = INFER_PROTOCOL, *, half_close: bool = False, to_end: bool = False,
        timeout: float = 30.0,
    ) -> Reply:
        """Write ``data`` on a new stream (then half-close it if asked) and read what the
        executor sends back up to its first terminal frame or the stream's end (with
        ``to_end``, on to the end: ``Reply.ended`` says whether it came within ``timeout``)."""
        stream = await self.open(protocol)
        try:
            with trio.fail_after(timeout):
                await stream.send_all(data, timeout=5)
                if half_close:
                    await stream.close()
                reply = await read_reply(stream)
            if to_end and not reply.ended:
                with trio.move_on_after(timeout):
                    rest = await read_reply(stream)
                    reply.frames += rest.frames
                    reply.ended = rest.ended
            return reply
        finally:
            await stream.reset()


class Reply(msgspec.Struct):
    """What a hostile peer got back on one stream."""

    frames: list[object]
    #: the executor ended the stream (EOF or reset) before or right after its frames
    ended: bool
    #: trio seconds from the first read to the last event
    elapsed: float

    @property
    def error(self) -> ErrorFrame:
        assert self.frames and isinstance(self.frames[-1], ErrorFrame), self.frames
        assert self.frames[-1].message  # a reason, not only a number
        return self.frames[-1]

    @property
    def code(self) -> int:
        return self.error.code


async def read_reply(stream: P2PStream) -> Reply:
    decoder, frames = FrameDecoder(), []
    start = trio.current_time()
    while True:
        try:
            data = await stream.receive_some(timeout=60)
        except LoomError:
            return Reply(frames, True, trio.current_time() - start)  # reset
        decoder.receive_data(data)
        while (body := decoder.next_frame()) is not NEED_DATA:
            if body is END:
                return Reply(frames, True, trio.current_time() - start)
            frames.append(decode_frame(body))
            if isinstance(frames[-1], (ErrorFrame, ReceiptFrame)):
                return Reply(frames, False, trio.current_time() - start)


def framed(envelope: Envelope) -> bytes:
    return encode_frame(encode_frame_body(RequestFrame(envelope)))


def request_fields(request: InferenceRequest) -> dict[str, object]:
    """A request as the plain map its payload encodes (to add or retype fields)."""
    return msgspec.msgpack.decode(encode_payload(request))


async def wait_until(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def assert_no_effect(
    executor: Executor, backend: Instant, *, entries: int = 0, calls: int = 0, sessions: int = 0
) -> None:
    """The refusal left nothing: no ledger entry and no backend call beyond those
    expected, no stream, session, slot or buffered byte held (but ``sessions``: honest
    clients' pooled session streams, which stay open between requests)."""
    server = executor.server
    await wait_until(lambda: executor.member.node.statistics().streams_inbound == sessions)
    assert server.statistics().sessions_open == sessions
    assert (server.slots.running, server.slots.queued, server.active) == (0, 0, 0)
    assert server.intake.statistics().buffered_bytes == 0
    assert backend.entered == calls
    assert len(await executor.ledger.entries()) == entries


async def honest_is_served(nursery: trio.Nursery, tmp_path, executor: Executor, backend: Instant,
                           name: str = "honest") -> None:  # fmt: skip
    calls, entries = backend.entered, len(await executor.ledger.entries())
    client = await start_honest(nursery, tmp_path, executor, name)
    with trio.fail_after(30):
        result = await client.chat(HI, model=MODEL, max_tokens=4)
    assert result.text == "Hello." and result.receipt.output_tokens == 2
    assert backend.entered == calls + 1
    await wait_until(lambda: executor.server.served >= 1)
    assert len(await executor.ledger.entries()) == entries + 1


__all__ = [
    "CONTEXT", "HI", "MODEL", "PRICE_IN", "PRICE_OUT", "READ_TIMEOUT", "Hostile", "Instant", "Reply",
    "assert_no_effect", "framed", "honest_is_served", "read_reply", "request_fields", "start_executor",
    "start_honest", "wait_until",
]

