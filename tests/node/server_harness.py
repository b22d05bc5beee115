"""Drive the real ``InferenceServer`` over in-memory streams: a signed request in, the
frames out, as a client would see them (no libp2p, so trio's autojump clock works).

Also: small in-process backends that script what a runtime does (silent, slow, failing,
reasoning, tool calls), for cases the HTTP fakes do not need to cover.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import trio

from loomnet.client import Ledger, TokenCounter
from loomnet.node._catalog import Catalog
from loomnet.node._server import InferenceServer
from loomnet.node.backends._base import Backend, ChatParams, Finished, ModelInfo, ReasoningDelta, StreamEvent, TextDelta, Usage
from loomnet.node.config import ExecutorConfig
from loomnet.protocol import (
    INFER_SESSION_PROTOCOL,
    NEED_DATA,
    AckFrame,
    ChatMessage,
    ChunkFrame,
    EndOfStream,
    Envelope,
    ErrorFrame,
    InferenceConnection,
    InferenceRequest,
    Receipt,
    ReceiptAck,
    ReceiptFrame,
    RequestFrame,
    Role,
    SignedKind,
    SigningKey,
    ToolCall,
    breakdown_problems,
    digest,
    encode_tool_calls,
    open_envelope,
    output_caps,
    seal,
)

from .memory_stream import MemoryP2PStream, stream_pair

HELLO = [ChatMessage("user", "Say hello.")]
#: a hidden-reasoning limit no test input reaches; tests compare the exact split instead
NO_HIDDEN_LIMIT = 1 << 20

_tokens = TokenCounter()  # one per test run: loading an encoding takes ~0.2 s


def warm_tokens() -> None:
    """Load tiktoken's encoding now, so no test waits 0.2 s on it in a worker thread."""
    _tokens.load("cl100k_base")


class Answer(msgspec.Struct, kw_only=True):
    """Everything one request got back, in order, with the trio time of each frame."""

    chunks: list[ChunkFrame] = []
    times: list[float] = []
    receipt: Receipt | None = None
    receipt_envelope: Envelope | None = None
    error: ErrorFrame | None = None
    error_receipt: Receipt | None = None

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def reasoning(self) -> str:
        return "".join(c.reasoning for c in self.chunks)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [call for c in self.chunks for call in c.tool_calls]

    @property
    def progress(self) -> list[ChunkFrame]:
        return [c for c in self.chunks if c.is_progress]

    def check(self, receipt: Receipt) -> list[str]:
        """What a client would object to in ``receipt`` (digests, counts, split); [] if honest."""
        problems = breakdown_problems(
            receipt, output_caps(self.text, self.reasoning, self.tool_calls), max_hidden_reasoning=NO_HIDDEN_LIMIT
        )
        if receipt.output_digest != digest(self.text.encode()):
            problems.append("output digest")
        if receipt.reasoning_digest != (digest(self.reasoning.encode()) if self.reasoning else b""):
            problems.append("reasoning digest")
        calls = self.tool_calls
        if receipt.tool_calls_digest != (digest(encode_tool_calls(calls)) if calls else b""):
            problems.append("tool calls digest")
        if receipt.chunks != len(self.chunks):
            problems.append("chunk count")
        return problems


class ClientEnd:
    """The client's side of one stream to the server."""

    def __init__(self, stream: MemoryP2PStream, key: SigningKey) -> None:
        self.stream = stream
        self.key = key
        self.conn = InferenceConnection(Role.CLIENT)
        self.answer = Answer()

    async def send_request(self, request: InferenceRequest) -> None:
        await self.stream.send_all(self.conn.send(RequestFrame(seal(SignedKind.REQUEST, request, self.key))), timeout=5)

    async def next_frame(self, timeout: float = math.inf):
        while (event := self.conn.next_event()) is NEED_DATA:
            self.conn.receive_data(await self.stream.receive_some(timeout=timeout))
        return event

    async def read_answer(self, *, ack: bool = True, until: Callable[[Answer], bool] = lambda a: False) -> Answer:
        """Read up to the terminal frame (or until ``until(answer)``), acknowledging a receipt."""
        answer = self.answer
        while not until(answer):
            frame = await self.next_frame()
            if isinstance(frame, ChunkFrame):
                answer.chunks.append(frame)
                answer.times.append(trio.current_time())
            elif isinstance(frame, ReceiptFrame):
                receipt, _ = open_envelope(SignedKind.RECEIPT, frame.envelope)
                answer.receipt, answer.receipt_envelope = receipt, frame.envelope
                if ack:
                    signed = seal(
                        SignedKind.RECEIPT_ACK,
                        ReceiptAck(receipt_digest=digest(frame.envelope.payload), accepted_at=time.time(), client_output_tokens=0),
                        self.key,
                    )
                    await self.stream.send_all(self.conn.send(AckFrame(signed)), timeout=5)
                await self.stream.close()
                break
            elif isinstance(frame, ErrorFrame):
                answer.error = frame
                if frame.receipt is not None:
                    answer.error_receipt, _ = open_envelope(SignedKind.RECEIPT, frame.receipt)
                break
            elif isinstance(frame, EndOfStream):  # pragma: no cover - the state machine raises first
                break
        return answer


class Harness:
    """One executor's ``InferenceServer`` on a temporary ledger, and a client key."""

    def __init__(self, server: InferenceServer, executor_key: SigningKey, client_key: SigningKey) -> None:
        self.server = server
        self.executor_key = executor_key
        self.client_key = client_key

    @classmethod
    async def start(
        cls, tmp_path: Path, backends: Sequence[Backend], *, ledger: str | None = None, **settings: object
    ) -> "Harness":
        """``ledger=":memory:"`` keeps SQLite off the disk (autojump-clock tests: a slow
        fsync in a worker thread would let the clock jump)."""
        config = ExecutorConfig(data_dir=str(tmp_path), listen=["/ip4/127.0.0.1/tcp/0"], **settings)  # type: ignore[arg-type]
        executor_key, client_key = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
        book = await Ledger.open(ledger or tmp_path / f"ledger-{os.urandom(4).hex()}.sqlite")
        catalog = await Catalog.build(list(backends), config)
        return cls(InferenceServer(executor_key, config, catalog, book, tokens=_tokens), executor_key, client_key)

    def request(self, model: str, messages: list[ChatMessage] = HELLO, **fields: object) -> InferenceRequest:
        return InferenceRequest(
            audience=self.executor_key.peer_id, nonce=os.urandom(16), created_at=time.time(),
            model=model, messages=messages, **fields,  # type: ignore[arg-type]
        )

    async def open(self, nursery: trio.Nursery, model: str, messages: list[ChatMessage] = HELLO, **fields: object) -> ClientEnd:
        """Start the server on a new stream (in ``nursery``) and send it a request."""
        client_stream, executor_stream = stream_pair(self.client_key.peer_id, self.executor_key.peer_id)
        end = ClientEnd(client_stream, self.client_key)
        end.executor_stream = executor_stream  # type: ignore[attr-defined]
        nursery.start_soon(self.server.handle, executor_stream)
        await end.send_request(self.request(model, messages, **fields))
        return end

    async def ask(self, model: str, messages: list[ChatMessage] = HELLO, *, ack: bool = True, **fields: object) -> Answer:
        """One whole request; returns once the server's handler has finished."""
        async with trio.open_nursery() as nursery:
            end = await self.open(nursery, model, messages, **fields)
            answer = await end.read_answer(ack=ack)
        return answer

    def session(self) -> tuple[MemoryP2PStream, MemoryP2PStream]:
        """``(client_end, executor_end)`` of a new session stream (``/loomnet/infer/2``)."""
        return stream_pair(self.client_key.peer_id, self.executor_key.peer_id, INFER_SESSION_PROTOCOL)

    def request_frame(self, conn: InferenceConnection, model: str = "m1", messages: list[ChatMessage] = HELLO,
                      **fields: object) -> bytes:  # fmt: skip
        """A signed request for ``model``, as ``conn`` sends it."""
        request = self.request(model, messages, **fields)
        return conn.send(RequestFrame(seal(SignedKind.REQUEST, request, self.client_key)))

    async def aclose(self) -> None:
        await self.server.ledger.aclose()


async def next_frame(stream: MemoryP2PStream, conn: InferenceConnection, timeout: float = 60.0):
    """The next event ``conn`` yields from ``stream``, a whole frame or the end."""
    while (event := conn.next_event()) is NEED_DATA:
        conn.receive_data(await stream.receive_some(timeout=timeout))
    return event


# --------------------------------------------------------------------- scripted backends


class ScriptedBackend(Backend):
    """A runtime in process: ``script(params)`` yields its events (sleeps included).

    ``entered``/``exited`` count the ``stream_chat`` contexts opened and left, so a test
    sees that a generation was stopped; ``count_tokens``/``count_prompt_tokens`` answer
    with ``counter`` (None: no tokenizer) or raise what ``count_error`` holds.
    """

    kind = "scripted"

    def __init__(
        self,
        script: Callable[[ChatParams], AsyncIterator[StreamEvent]],
        *,
        model: str = "m1",
        capabilities: Sequence[str] = ("chat", "tools"),
        counter: Callable[[str], int] | None = None,
        count_error: Exception | None = None,
        count_delay: float = 0.0,
    ) -> None:
        self.script = script
        self.model = model
        self.capabilities = list(capabilities)
        self.counter = counter
        self.count_error = count_error
        self.count_delay = count_delay
        self.entered = self.exited = 0
        self.count_calls = 0

    @asynccontextmanager
    async def stream_chat(self, params: ChatParams) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        self.entered += 1
        try:
            yield self.script(params)
        finally:
            self.exited += 1

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(name=self.model, capabilities=self.capabilities)]

    async def health(self) -> bool:
        return True

    async def _count(self, text: str) -> int | None:
        self.count_calls += 1
        if self.count_delay:
            await trio.sleep(self.count_delay)
        if self.count_error is not None:
            raise self.count_error
        return None if self.counter is None else self.counter(text)

    async def count_tokens(self, model: str, text: str) -> int | None:
        return await self._count(text)

    async def count_prompt_tokens(self, params: ChatParams) -> int | None:
        return await self._count("\n".join(m.content for m in params.messages))


def events(*items: StreamEvent | float) -> Callable[[ChatParams], AsyncIterator[StreamEvent]]:
    """A script from events; a number is a pause of that many seconds."""

    async def script(params: ChatParams) -> AsyncIterator[StreamEvent]:
        for item in items:
            if isinstance(item, (int, float)):
                await trio.sleep(item)
            else:
                yield item

    return script


__all__ = [
    "HELLO", "NO_HIDDEN_LIMIT", "warm_tokens", "Answer", "ClientEnd", "Harness", "ScriptedBackend", "events", "next_frame",
    "Finished", "ReasoningDelta", "TextDelta", "Usage",
]
