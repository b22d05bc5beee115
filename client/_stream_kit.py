"""What one chat stream needs, and nothing more: a way to open streams, a key to sign
with, a receipt book, a token counter and its deadlines (the ``StreamKit``), plus the
request's options and the result it ends with.

A ``ChatStream`` used to take the whole client; it takes a kit now, so a test (or a
gateway) builds one from parts, and the attempt loop can hand each attempt the same kit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec

from loomnet.protocol import Envelope, GenerationOptions, LoomError, Receipt, SigningKey, ToolCall

from ._events import Attempt
from ._receipts import DEFAULT_MAX_HIDDEN_REASONING_TOKENS

if TYPE_CHECKING:
    from ._ledger import Ledger
    from ._session_pool import SessionPool
    from ._tokens import TokenCounter

__all__ = [
    "ByteStream",
    "ChatResult",
    "Deadlines",
    "RequestOptions",
    "StreamKit",
    "StreamObserver",
    "StreamOpener",
]


class ByteStream(Protocol):
    """What a chat needs of a stream: ``P2PStream``, or an in-memory fake in tests."""

    async def receive_some(self, max_bytes: int = 65536, *, timeout: float) -> bytes: ...
    async def send_all(self, data: bytes, *, timeout: float) -> None: ...
    async def close(self) -> None: ...
    async def reset(self) -> None: ...


class StreamOpener(Protocol):
    """What opens a stream to an executor: ``P2PNode``, or a fake in tests."""

    async def open_stream(
        self, peer_id: str, protocol: str | Sequence[str], *, addrs: Sequence[str] = (), timeout: float | None = None
    ) -> ByteStream:
        """A stream for the first of ``protocol`` (one id, or several, best first) the
        peer serves; the stream's ``protocol`` attribute, when it has one, says which."""
        ...


class Deadlines(msgspec.Struct, frozen=True, kw_only=True):
    """A chat's deadlines, seconds (``ClientConfig`` has each one's meaning)."""

    connect: float = 5.0
    first_byte: float = 60.0
    first_content: float = 300.0
    idle: float = 30.0
    total: float = 900.0


class StreamObserver(Protocol):
    """Told how one attempt goes (the attempt loop's health and budget bookkeeping).

    ``started`` comes first, ``sent`` and ``first_frame`` at most once each, ``ended``
    exactly once. Times are trio seconds.
    """

    def started(self, *, now: float) -> None:
        """The attempt begins: dial, then send."""

    def sent(self, *, now: float) -> None:
        """The request is sent (the first-byte deadline starts)."""

    def first_frame(self, *, now: float) -> None:
        """The first complete frame arrived (a progress chunk counts)."""

    def ended(self, *, now: float, receipt: Receipt | None, accepted: bool, error: LoomError | None) -> None:
        """The attempt is over. ``receipt``: the verified receipt booked for it, if any
        (``accepted`` False: booked as disputed); ``error``: what ended it, None when it
        completed or the caller left before the end."""


#: default most bytes of one answer a client holds (``ClientConfig.max_answer_bytes``)
MAX_ANSWER_BYTES = 64 << 20


class StreamKit(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a :class:`ChatStream` uses besides the request itself."""

    opener: StreamOpener
    #: signs requests and receipt acks; its peer id is the client's
    key: SigningKey
    #: where receipts are booked (the client's ledger, open)
    ledger: "Ledger"
    #: the client's own count of the output, for the ack
    tokens: "TokenCounter"
    deadlines: Deadlines = Deadlines()
    max_hidden_reasoning_tokens: int = DEFAULT_MAX_HIDDEN_REASONING_TOKENS
    #: most UTF-8 bytes of one answer the stream holds (see ``ClientConfig``)
    max_answer_bytes: int = MAX_ANSWER_BYTES
    #: idle session streams to reuse (``_session_pool``); None: a new one-request
    #: stream (``/loomnet/infer/1``) from ``opener`` for every request
    sessions: "SessionPool | None" = None
    #: the account the request is made for: its receipt is booked under it (the
    #: ledger's ``account``; ``LoomClient.stream_chat(account=)``); None: the client's own
    account: str | None = None


class RequestOptions(GenerationOptions, frozen=True, kw_only=True):
    """Everything about one request but its messages and model: how to generate
    (:class:`~loomnet.protocol.GenerationOptions`) and what it may cost."""

    #: micro-credits per million tokens
    max_price_in: int | None = None
    max_price_out: int | None = None
    #: micro-credits, the most this request may cost (the executor enforces it too)
    max_cost: int | None = None


class ChatResult(msgspec.Struct, frozen=True, kw_only=True):
    """A finished chat: the text and the receipt both sides booked."""

    text: str
    #: the executor (peer id) that served the answer; the receipt is signed by it
    executor: str
    #: function calls the model asked for (complete; arguments are JSON text)
    tool_calls: list[ToolCall] = []
    receipt: Receipt
    receipt_envelope: Envelope
    #: the client's own count of the output tokens (tiktoken or estimate), for the record
    client_output_tokens: int
    #: the model's reasoning ("thinking") the executor streamed; never part of ``text``
    reasoning: str = ""
    #: the executors tried before this one, in order, and why each was passed over
    attempts: list[Attempt] = []

    @property
    def model(self) -> str:
        """The model that answered, as the receipt names it."""
        return self.receipt.model
