"""The seam between the gateway and one HTTP API it speaks (OpenAI Chat Completions in
``_openai``, Anthropic Messages in ``_anthropic``): sans-IO, bytes in and bytes out, so
each API is tested without a socket (and against its official SDK through an in-memory
httpx transport).

The gateway (``_gateway``, ``_app``) owns everything else: keys, routing, the client
library call, response headers, the client hanging up. An API module only

* parses a request body into a :class:`~._call.ChatCall` (``parse``),
* renders a finished answer whole (``whole``) or as a stream of SSE bytes
  (``writer``: ``start`` once, ``event`` per delta, ``finish`` with the verified
  result, or ``error`` when the stream fails after it started),
* renders an error in its own shape (``error_body``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import msgspec

from loomnet.protocol import digest
from loomnet.client import ChatResult, ReasoningDelta, TextDelta, ToolCallsDelta

from ._call import ChatCall
from ._errors import GatewayError

__all__ = ["Answer", "ChatAPI", "Delta", "EventWriter", "receipt_id_of"]

#: the events a writer renders while the answer streams (``Done`` goes to ``finish``)
Delta = TextDelta | ReasoningDelta | ToolCallsDelta


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway knows of a finished answer besides the :class:`ChatResult`."""

    #: the response's id (``chatcmpl-...``, ``msg_...``), unique per request
    response_id: str
    #: unix seconds the request was accepted
    created: int
    #: the receipt's id: hex of the SHA-256 of the receipt's signed payload, as booked
    #: in both ledgers (``receipt_id_of``)
    receipt_id: str
    #: the executor (peer id) that served and signed the receipt
    executor: str
    #: the answer's cost, micro-credits (the receipt's)
    cost: int


def receipt_id_of(result: ChatResult) -> str:
    """The id both ledgers book ``result``'s receipt under, as hex."""
    return digest(result.receipt_envelope.payload).hex()


class EventWriter(Protocol):
    """Renders one streamed answer as SSE bytes (each call returns whole events, maybe
    several, maybe none)."""

    def start(self) -> bytes:
        """The first bytes, sent as soon as the first content arrived (OpenAI: a chunk
        with the role; Anthropic: ``message_start``)."""

    def event(self, delta: Delta) -> bytes:
        """One delta of the answer as it arrived."""

    def finish(self, result: ChatResult, answer: Answer) -> bytes:
        """The end: finish reason, usage (and the cost and receipt id as the
        ``loomnet`` extension object), the API's terminator."""

    def error(self, error: GatewayError) -> bytes:
        """The end of a stream that failed after it started: an error event in the API's
        shape; nothing may follow it."""


class ChatAPI(Protocol):
    """One HTTP API the gateway serves."""

    #: ``"openai"`` or ``"anthropic"``: metrics, logs
    name: str

    def parse(self, body: bytes, headers: Mapping[str, str]) -> ChatCall:
        """The request in ``body`` (JSON).

        Raises:
            GatewayError: ``invalid_request`` (400) naming the field (``param``) that is
                missing, of the wrong type, out of range, or asks for something the
                gateway cannot do (a remote image URL, ``n`` > 1).
        """

    def whole(self, call: ChatCall, result: ChatResult, answer: Answer) -> bytes:
        """The JSON body of a whole (not streamed) answer."""

    def writer(self, call: ChatCall, *, model: str, response_id: str, created: int) -> EventWriter:
        """A writer for one streamed answer from ``model`` (the model that serves it)."""

    def error_body(self, error: GatewayError) -> bytes:
        """The JSON body of an error response in the API's own shape."""
