"""Answers and errors in the Anthropic Messages shapes: the whole ``message``, the named
SSE events of a streamed one, the error body (Structs in ``_anthropic_wire``).

Theory of operation (streaming): ``message_start`` carries the message with empty
``content`` and a usage of 0 input and 0 output tokens, because the real counts are
known only from the receipt, at the end; ``message_delta`` then carries both counts
(cumulative, as Anthropic's are), the ``stop_reason`` and the ``loomnet`` extension
object, and ``message_stop`` ends the stream (no ``[DONE]``). In between, each delta
goes into a content block: text into a ``text`` block, reasoning into a ``thinking``
block (empty ``signature``: the receipt signs loomnet's reasoning, not a vendor), and
a block is closed (``content_block_stop``) and the next one opened
(``content_block_start`` with the next ``index``) whenever the kind changes. loomnet
delivers tool calls whole, so each call is a ``tool_use`` block opened with empty
``input``, one ``input_json_delta`` with all its arguments, and closed at once. An
answer with no text and no tool calls still gets one (empty) text block, as the whole
message does, so both shapes of one answer read the same in an SDK.

Choices:

* ``stop_reason``: loomnet's OpenAI-style finish reasons map ``stop`` -> ``end_turn``,
  ``length`` -> ``max_tokens``, ``content_filter`` -> ``refusal``. An answer with tool
  calls is ``tool_use`` whatever its finish reason, and only such an answer: an agent
  loop that reads ``tool_use`` looks for a call to run, so a ``tool_calls`` finish with
  no call in it is ``end_turn``, as is any word loomnet does not define (``error``, a
  backend's own). ``stop_sequence`` is always null: the network does not say which
  sequence matched (a stop sequence ends the answer as ``end_turn``).
* tool arguments: ``input`` must be a JSON object. Arguments that are one are passed
  through as sent; empty arguments are ``{}`` (every adapter reads them so); anything
  else (a model that wrote broken JSON, or an array) is kept, not hidden, as
  ``{"loomnet_unparsed_arguments": "<the text>"}``: the caller's schema check then
  rejects the call visibly and the model can see what it wrote, where ``{}`` would
  look like a call with no arguments. The stream sends the same object.
* error types, by status: 400 ``invalid_request_error``, 401 ``authentication_error``,
  402 ``billing_error``, 404 ``not_found_error``, 413 ``request_too_large``, 429
  ``rate_limit_error``, 500 and 502 ``api_error``, 503 ``overloaded_error`` (no live
  offer: the nearest of Anthropic's types, whose clients read it as "try again later";
  the status stays 503, the SDKs' ``InternalServerError`` family, not Anthropic's own
  529). Every error object also has ``loomnet_code`` and, when a field is at fault,
  ``param``.
"""

from __future__ import annotations

import msgspec
from msgspec import UNSET, Raw

from loomnet.client import ChatResult, ReasoningDelta, TextDelta, ToolCallsDelta
from loomnet.protocol import ToolCall

from ._anthropic_wire import (
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    ErrorBody,
    ErrorObject,
    InputJSONDelta,
    LoomnetFacts,
    MessageDelta,
    MessageDeltaBody,
    MessageOut,
    MessageStart,
    MessageStop,
    Ping,
    StreamEvent,
    TextDeltaOut,
    TextOut,
    ThinkingDeltaOut,
    ThinkingOut,
    ToolUseOut,
    UsageOut,
)
from ._api import Answer, Delta
from ._errors import GatewayError

__all__ = [
    "UNPARSED_ARGUMENTS",
    "AnthropicStreamWriter",
    "error_body",
    "error_type",
    "message_of",
    "stop_reason",
    "tool_input",
]

#: the key under which arguments that are not a JSON object are passed on
UNPARSED_ARGUMENTS = "loomnet_unparsed_arguments"
_STOP = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}
_MICRO = 1_000_000
_encode = msgspec.json.Encoder().encode


def stop_reason(result: ChatResult) -> str:
    """The Anthropic ``stop_reason`` of ``result`` (see the module doc)."""
    if result.tool_calls:
        return "tool_use"
    return _STOP.get(result.receipt.finish_reason, "end_turn")


def tool_input(call: ToolCall) -> bytes:
    """``call``'s arguments as the JSON object a ``tool_use`` block's ``input`` is (see
    the module doc for arguments that are not one)."""
    text = call.arguments.strip()
    if not text:
        return b"{}"
    try:
        value = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):  # nested past the stack: not an object we can check
        value = None
    if isinstance(value, dict):
        return text.encode()
    return _encode({UNPARSED_ARGUMENTS: call.arguments})


def _usage(result: ChatResult) -> UsageOut:
    return UsageOut(input_tokens=result.receipt.input_tokens, output_tokens=result.receipt.output_tokens)


def _facts(result: ChatResult, answer: Answer) -> LoomnetFacts:
    return LoomnetFacts(executor=answer.executor, cost=answer.cost / _MICRO, receipt_id=answer.receipt_id,
                        count_source=result.receipt.count_source)  # fmt: skip


def message_of(result: ChatResult, answer: Answer) -> MessageOut:
    """The whole ``message`` of a finished answer: a ``thinking`` block when it reasoned,
    its text, then a ``tool_use`` block per call."""
    content: list[TextOut | ThinkingOut | ToolUseOut] = []
    if result.reasoning:
        content.append(ThinkingOut(thinking=result.reasoning))
    if result.text or not result.tool_calls:
        content.append(TextOut(text=result.text))
    content += [ToolUseOut(id=c.id, name=c.name, input=Raw(tool_input(c))) for c in result.tool_calls]
    return MessageOut(id=answer.response_id, content=content, model=result.model, stop_reason=stop_reason(result),
                      usage=_usage(result), loomnet=_facts(result, answer))  # fmt: skip


def error_type(error: GatewayError) -> str:
    """Anthropic's error ``type`` for ``error``'s status (see the module doc)."""
    return _ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")


def _error_object(error: GatewayError) -> ErrorObject:
    param = error.param if error.param is not None else UNSET
    return ErrorObject(type=error_type(error), message=error.message, loomnet_code=int(error.code), param=param)


def error_body(error: GatewayError) -> ErrorBody:
    """The body of an error response (``request_id`` null: the gateway has none)."""
    return ErrorBody(error=_error_object(error))


def _sse(event: StreamEvent) -> bytes:
    """One named SSE event; its name is its ``type``, as Anthropic's are."""
    name = type(event).__struct_config__.tag
    return b"event: " + name.encode() + b"\ndata: " + _encode(event) + b"\n\n"


class AnthropicStreamWriter:
    """One streamed answer as Anthropic's named SSE events (see the module doc).

    ``start`` is implicit: the first call of any method sends ``message_start`` first.
    After ``finish`` or ``error`` the stream is over and every call raises
    ``RuntimeError`` (a bug in the caller).
    """

    def __init__(self, *, model: str, response_id: str) -> None:
        self._model = model
        self._id = response_id
        self._started = False
        self._ended = False
        self._next_index = 0
        #: the open block's kind (``"text"`` or ``"thinking"``), None when none is open
        self._open: str | None = None
        #: whether a text or tool_use block was sent (else ``finish`` sends an empty text block)
        self._answered = False

    def _check(self) -> None:
        if self._ended:
            raise RuntimeError("the stream has already ended")

    def start(self) -> bytes:
        """``message_start``, once (later calls return nothing)."""
        self._check()
        if self._started:
            return b""
        self._started = True
        message = MessageOut(id=self._id, content=[], model=self._model, stop_reason=None,
                             usage=UsageOut(input_tokens=0, output_tokens=0))  # fmt: skip
        return _sse(MessageStart(message=message))

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return _sse(ContentBlockStop(index=self._next_index - 1))

    def _block(self, block: TextOut | ThinkingOut | ToolUseOut) -> bytes:
        """Close the open block, open ``block``."""
        out = self._close()
        self._open = type(block).__struct_config__.tag
        self._next_index += 1
        return out + _sse(ContentBlockStart(index=self._next_index - 1, content_block=block))

    def _text(self, kind: str, delta: TextDeltaOut | ThinkingDeltaOut) -> bytes:
        out = b""
        if self._open != kind:
            out = self._block(TextOut(text="") if kind == "text" else ThinkingOut(thinking=""))
        return out + _sse(ContentBlockDelta(index=self._next_index - 1, delta=delta))

    def event(self, delta: Delta) -> bytes:
        """The events of one delta: maybe a block closed and one opened, then its delta."""
        out = self.start()
        if isinstance(delta, TextDelta):
            if delta.text:
                self._answered = True
                out += self._text("text", TextDeltaOut(text=delta.text))
        elif isinstance(delta, ReasoningDelta):
            if delta.text:
                out += self._text("thinking", ThinkingDeltaOut(thinking=delta.text))
        elif isinstance(delta, ToolCallsDelta):
            for call in delta.tool_calls:
                self._answered = True
                out += self._block(ToolUseOut(id=call.id, name=call.name, input=Raw(b"{}")))
                arguments = InputJSONDelta(partial_json=tool_input(call).decode())
                out += _sse(ContentBlockDelta(index=self._next_index - 1, delta=arguments))
                out += self._close()
        else:
            raise TypeError(f"not a delta: {type(delta).__name__}")
        return out

    def finish(self, result: ChatResult, answer: Answer) -> bytes:
        """The open block closed, ``message_delta`` (stop reason, both token counts, the
        ``loomnet`` object), ``message_stop``."""
        out = self.start()
        if not self._answered:
            out += self._block(TextOut(text=""))
        out += self._close()
        self._ended = True
        delta = MessageDelta(delta=MessageDeltaBody(stop_reason=stop_reason(result)), usage=_usage(result),
                             loomnet=_facts(result, answer))  # fmt: skip
        return out + _sse(delta) + _sse(MessageStop())

    def ping(self) -> bytes:
        """A ``ping`` event (clients skip it), for a gateway to send while the answer is
        silent for long (a model thinking without streaming its reasoning), so that
        proxies and clients with idle timeouts keep the stream open. Not part of the
        :class:`~._api.EventWriter` seam."""
        out = self.start()
        return out + _sse(Ping())

    def error(self, error: GatewayError) -> bytes:
        """An ``error`` event; nothing may follow it."""
        self._check()
        self._ended = True
        return _sse(ErrorBody(error=_error_object(error), request_id=UNSET))
