"""OpenAI Chat Completions (``POST /v1/chat/completions``) on loomnet: the
:class:`~._api.ChatAPI` for OpenAI clients (``docs/gateway.md``).

What maps to what:

* roles ``system`` and ``developer`` are system messages; ``tool`` messages keep their
  ``tool_call_id``; an assistant's ``tool_calls`` travel as loomnet tool calls.
* content parts: ``text``, ``image_url`` with a ``data:`` URL (never fetched from
  elsewhere; ``_decode``), ``refusal`` (as text, in assistant history).
* ``max_completion_tokens`` wins over the deprecated ``max_tokens`` when both are
  given; ``stop`` (a string or up to 4), ``seed``, ``top_p``, ``temperature``,
  penalties, ``user``, ``tools``, ``tool_choice``, ``response_format`` (JSON object and
  JSON schema) travel as loomnet's generation options.
* refused with a 400 naming the field: ``n`` other than 1 and ``logprobs`` (one answer,
  no log probabilities on loomnet); unknown fields are skipped.

Streaming: a first chunk with the role, then one chunk per delta as it arrives
(``content``, ``reasoning_content`` for reasoning, ``tool_calls`` with ``index``: loomnet
delivers each call whole, so a call is one delta carrying its id, name and all its
arguments), then a chunk with ``finish_reason``, then, with
``stream_options.include_usage``, a chunk with empty ``choices`` and the usage (other
chunks then carry ``usage: null``), then ``data: [DONE]``. The last chunk carries the
``loomnet`` extension object (executor, cost in credits, receipt id). A failure after the
stream started ends it with ``data: {"error": {...}}`` (the SDKs raise on it) and no
``[DONE]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import msgspec

from loomnet.client import ChatResult, ReasoningDelta, TextDelta, ToolCallsDelta
from loomnet.protocol import ChatMessage, GenerationOptions, ImagePart, ResponseFormat, ToolCall, ToolSpec

from ._api import Answer, Delta
from ._call import ChatCall, merge_steering, steering_from_headers
from ._decode import decode_body, image_from_data_url, is_absent, object_text, split_validation_error
from ._errors import GatewayError
from ._openai_wire import (
    Chunk,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionMessage,
    CompletionTokensDetails,
    ErrorBody,
    ErrorObject,
    FunctionOut,
    ImageURLPart,
    LoomnetFacts,
    MessageIn,
    OpenAIRequest,
    RefusalPart,
    TextPart,
    ToolCallDelta,
    ToolCallOut,
    UsageObject,
)
from ._openai_wire import Delta as DeltaObject

__all__ = ["OpenAIAPI"]

#: finish reasons OpenAI clients know; loomnet's others (``error``, ``client_gone``,
#: ``max_cost``, a backend's own word) are reported as ``stop``
_FINISH = frozenset({"stop", "length", "tool_calls", "content_filter"})

#: error kind -> OpenAI's ``type`` (the SDKs choose their exception by status)
_TYPES = {
    "invalid_request": "invalid_request_error",
    "unauthorized": "invalid_request_error",
    "budget_exhausted": "insufficient_quota",
    "model_not_found": "invalid_request_error",
    "unknown_url": "invalid_request_error",
    "request_timeout": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "rate_limited": "rate_limit_error",
    "over_capacity": "rate_limit_error",
    "internal": "server_error",
    "executor_failed": "server_error",
    "no_offer": "server_error",
}
#: error kind -> OpenAI's ``code``
_CODES = {
    "unauthorized": "invalid_api_key",
    "budget_exhausted": "insufficient_quota",
    "model_not_found": "model_not_found",
    "unknown_url": "unknown_url",
    "rate_limited": "rate_limit_exceeded",
    "over_capacity": "over_capacity",
    "no_offer": "no_offer",
    "executor_failed": "executor_failed",
    "request_too_large": "request_too_large",
    "request_timeout": "request_timeout",
}

_encode = msgspec.json.Encoder().encode


def _sse(obj: object) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def finish_reason(result: ChatResult) -> str:
    """The OpenAI ``finish_reason`` of ``result``."""
    if result.tool_calls:
        return "tool_calls"
    reason = result.receipt.finish_reason
    return reason if reason in _FINISH else "stop"


def usage_of(result: ChatResult) -> UsageObject:
    r = result.receipt
    return UsageObject(
        prompt_tokens=r.input_tokens,
        completion_tokens=r.output_tokens,
        total_tokens=r.input_tokens + r.output_tokens,
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=r.reasoning_tokens + r.hidden_reasoning_tokens),
    )


def facts_of(result: ChatResult, answer: Answer) -> LoomnetFacts:
    return LoomnetFacts(
        executor=answer.executor,
        cost=answer.cost / 1e6,
        receipt_id=answer.receipt_id,
        count_source=result.receipt.count_source,
    )


def _content(message: MessageIn, index: int) -> tuple[str, list[ImagePart]]:
    """The text and images of one message's ``content``."""
    content = message.content
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[ImagePart] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):
            texts.append(part.refusal)
        elif isinstance(part, ImageURLPart):
            if message.role != "user":
                raise GatewayError("invalid_request", "only user messages may carry images",
                                   param=f"messages[{index}].content[{j}]")  # fmt: skip
            images.append(image_from_data_url(part.image_url.url, param=f"messages[{index}].content[{j}].image_url.url"))
    return "".join(texts), images


def _message(message: MessageIn, index: int) -> ChatMessage:
    text, images = _content(message, index)
    role = "system" if message.role == "developer" else message.role
    if message.role == "tool":
        if not message.tool_call_id:
            raise GatewayError("invalid_request", "a tool message needs its tool_call_id",
                               param=f"messages[{index}].tool_call_id")  # fmt: skip
        return ChatMessage("tool", text, tool_call_id=message.tool_call_id)
    calls = []
    if message.tool_calls:
        if message.role != "assistant":
            raise GatewayError("invalid_request", "only assistant messages may carry tool_calls",
                               param=f"messages[{index}].tool_calls")  # fmt: skip
        calls = [ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in message.tool_calls]
    return ChatMessage(role, text, images=images, tool_calls=calls)


def _options(request: OpenAIRequest) -> GenerationOptions:
    if request.n not in (None, 1):
        raise GatewayError("invalid_request", "n must be 1: loomnet returns one answer per request", param="n")
    if request.logprobs:
        raise GatewayError("invalid_request", "logprobs are not available on loomnet", param="logprobs")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    tools = [
        ToolSpec(
            name=t.function.name,
            description=t.function.description or "",
            parameters="{}" if is_absent(t.function.parameters)
            else object_text(t.function.parameters, param=f"tools[{k}].function.parameters"),
        )
        for k, t in enumerate(request.tools or [])
    ]
    choice = request.tool_choice
    tool_choice = choice if isinstance(choice, str) or choice is None else choice.function.name
    response_format = None
    if request.response_format is not None and request.response_format.type != "text":
        spec = request.response_format.json_schema
        if request.response_format.type == "json_schema":
            if spec is None or is_absent(spec.schema):  # OpenAI accepts it: any JSON object
                response_format = ResponseFormat(type="json_object")
            else:
                response_format = ResponseFormat(type="json_schema", schema=object_text(spec.schema, param="response_format.json_schema.schema"),
                                                 name=spec.name, strict=bool(spec.strict))  # fmt: skip
        else:
            response_format = ResponseFormat(type="json_object")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return _checked(GenerationOptions(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=stop,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        user=request.user,
        tools=tools,
        tool_choice=tool_choice,
        response_format=response_format,
    ), request)  # fmt: skip


#: where a generation option came from in the request: loomnet's path -> OpenAI's
_OPTION_PATHS = [
    (re.compile(r"^tools\[(\d+)\]\.(name|description|parameters)"), r"tools[\1].function.\2"),
    (re.compile(r"^response_format\.(name|schema)"), r"response_format.json_schema.\1"),
]


def _checked(options: GenerationOptions, request: OpenAIRequest) -> GenerationOptions:
    """``options``, checked against the protocol's limits here, so that a 400 names the
    field as the caller wrote it (``max_completion_tokens``, ``tools[0].function.name``);
    the client library checks them again, in its own names.

    Raises:
        GatewayError: ``invalid_request`` naming the field.
    """
    try:
        msgspec.convert(msgspec.to_builtins(options), GenerationOptions)
    except msgspec.ValidationError as exc:
        words, path = split_validation_error(exc)
        param = path or ""
        if param == "max_tokens" and request.max_completion_tokens is not None:
            param = "max_completion_tokens"
        elif param.startswith("stop") and isinstance(request.stop, str):
            param = "stop"
        elif param == "tool_choice" and request.tool_choice is not None and not isinstance(request.tool_choice, str):
            param = "tool_choice.function.name"
        for pattern, replacement in _OPTION_PATHS:
            param = pattern.sub(replacement, param)
        raise GatewayError("invalid_request", f"invalid {param or 'request'}: {words}", param=param or None) from None
    return options


class OpenAIAPI:
    """``POST /v1/chat/completions`` (see the module doc)."""

    name = "openai"

    def parse(self, body: bytes, headers: Mapping[str, str]) -> ChatCall:
        request = decode_body(body, OpenAIRequest)
        if not request.messages:
            raise GatewayError("invalid_request", "messages must not be empty", param="messages")
        messages = [_message(m, i) for i, m in enumerate(request.messages)]
        stream = bool(request.stream)
        return ChatCall(
            model=request.model,
            messages=messages,
            options=_options(request),
            stream=stream,
            include_usage=stream and request.stream_options is not None and request.stream_options.include_usage,
            steering=merge_steering(request.loomnet, steering_from_headers(headers)),
        )

    def whole(self, call: ChatCall, result: ChatResult, answer: Answer) -> bytes:
        calls = [ToolCallOut(id=c.id, function=FunctionOut(name=c.name, arguments=c.arguments)) for c in result.tool_calls]
        message = CompletionMessage(
            content=result.text if result.text or not calls else None,
            tool_calls=calls or msgspec.UNSET,
            reasoning_content=result.reasoning or msgspec.UNSET,
        )
        completion = Completion(
            id=answer.response_id,
            created=answer.created,
            model=result.model,
            choices=[CompletionChoice(message=message, finish_reason=finish_reason(result))],
            usage=usage_of(result),
            loomnet=facts_of(result, answer),
        )
        return _encode(completion)

    def writer(self, call: ChatCall, *, model: str, response_id: str, created: int) -> "OpenAIStreamWriter":
        return OpenAIStreamWriter(call, model=model, response_id=response_id, created=created)

    def error_body(self, error: GatewayError) -> bytes:
        return _encode(ErrorBody(error=_error_object(error)))


def _error_object(error: GatewayError) -> ErrorObject:
    return ErrorObject(
        message=error.message,
        type=_TYPES[error.kind],
        param=error.param,
        code=_CODES.get(error.kind),
        loomnet_code=int(error.code),
    )


class OpenAIStreamWriter:
    """One streamed answer as ``chat.completion.chunk`` SSE events (see the module doc)."""

    def __init__(self, call: ChatCall, *, model: str, response_id: str, created: int) -> None:
        self._model = model
        self._id = response_id
        self._created = created
        self._include_usage = call.include_usage
        self._tool_calls = 0  # the next tool call's index

    def _chunk(self, delta: DeltaObject, *, finish: str | None = None, **extra) -> bytes:
        usage = None if self._include_usage else msgspec.UNSET
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return _sse(Chunk(id=self._id, created=self._created, model=self._model, choices=[choice], usage=usage, **extra))

    def start(self) -> bytes:
        return self._chunk(DeltaObject(role="assistant", content=""))

    def event(self, delta: Delta) -> bytes:
        if isinstance(delta, TextDelta):
            return self._chunk(DeltaObject(content=delta.text)) if delta.text else b""
        if isinstance(delta, ReasoningDelta):
            return self._chunk(DeltaObject(reasoning_content=delta.text)) if delta.text else b""
        if isinstance(delta, ToolCallsDelta):
            calls = []
            for call in delta.tool_calls:
                calls.append(ToolCallDelta(index=self._tool_calls, id=call.id,
                                           function=FunctionOut(name=call.name, arguments=call.arguments)))  # fmt: skip
                self._tool_calls += 1
            return self._chunk(DeltaObject(tool_calls=calls)) if calls else b""
        raise TypeError(f"not a delta: {type(delta).__name__}")

    def finish(self, result: ChatResult, answer: Answer) -> bytes:
        facts = facts_of(result, answer)
        reason = finish_reason(result)
        if not self._include_usage:
            return self._chunk(DeltaObject(), finish=reason, loomnet=facts) + b"data: [DONE]\n\n"
        last = self._chunk(DeltaObject(), finish=reason)
        usage = Chunk(id=self._id, created=self._created, model=self._model, choices=[], usage=usage_of(result),
                      loomnet=facts)  # fmt: skip
        return last + _sse(usage) + b"data: [DONE]\n\n"

    def error(self, error: GatewayError) -> bytes:
        return _sse(ErrorBody(error=_error_object(error)))
