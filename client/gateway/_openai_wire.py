"""OpenAI Chat Completions on the wire: the request as the gateway reads it and the
response objects it writes, as msgspec Structs (``reference/backend-wire-facts.md``, A1).

Requests skip unknown fields: the API grows fields often, and an SDK newer than the
gateway may send one; fields the gateway reads but cannot honour are refused by
``_openai`` with a 400 naming them, never silently dropped when they change the answer.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Raw

from ._call import Steering
from ._decode import ABSENT

__all__ = [
    "Chunk",
    "ChunkChoice",
    "Completion",
    "CompletionChoice",
    "CompletionMessage",
    "Delta",
    "ErrorBody",
    "ErrorObject",
    "OpenAIRequest",
    "UsageObject",
]


# ------------------------------------------------------------------- the request

# Lists are bounded as the network bounds them (protocol/_messages.py), so a body cannot
# make the gateway build millions of objects before refusing it; JSON objects passed
# through (tool parameters, schemas) stay raw bytes (``_decode.object_text``).


class ImageURL(msgspec.Struct, frozen=True):
    url: str
    detail: str | None = None


class TextPart(msgspec.Struct, frozen=True, tag="text", tag_field="type"):
    text: str


class ImageURLPart(msgspec.Struct, frozen=True, tag="image_url", tag_field="type"):
    image_url: ImageURL


class RefusalPart(msgspec.Struct, frozen=True, tag="refusal", tag_field="type"):
    refusal: str


ContentPart = TextPart | ImageURLPart | RefusalPart


class FunctionCall(msgspec.Struct, frozen=True):
    name: str
    arguments: str = "{}"


class ToolCallIn(msgspec.Struct, frozen=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class MessageIn(msgspec.Struct, frozen=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Meta(max_length=1024)] | None = None
    tool_calls: Annotated[list[ToolCallIn], Meta(max_length=64)] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionSpec(msgspec.Struct, frozen=True):
    name: str
    description: str | None = None
    #: a JSON Schema object, as it came
    parameters: Raw = ABSENT
    strict: bool | None = None


class ToolIn(msgspec.Struct, frozen=True):
    function: FunctionSpec
    type: Literal["function"] = "function"


class NamedFunction(msgspec.Struct, frozen=True):
    name: str


class ToolChoiceFunction(msgspec.Struct, frozen=True):
    function: NamedFunction
    type: Literal["function"] = "function"


class JSONSchemaSpec(msgspec.Struct, frozen=True):
    name: str = "response"
    schema: Raw = ABSENT
    description: str | None = None
    strict: bool | None = None


class ResponseFormatIn(msgspec.Struct, frozen=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class OpenAIRequest(msgspec.Struct, frozen=True):
    """``POST /v1/chat/completions``, the fields the gateway reads."""

    model: str
    messages: Annotated[list[MessageIn], Meta(max_length=1024)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    n: int | None = None
    logprobs: bool | None = None
    tools: Annotated[list[ToolIn], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    response_format: ResponseFormatIn | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    #: loomnet's extension object (``_call``)
    loomnet: Steering | None = None


# ------------------------------------------------------------------- the response


class FunctionOut(msgspec.Struct, frozen=True, omit_defaults=True):
    arguments: str
    name: str | None = None


class ToolCallOut(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionOut


class ToolCallDelta(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    id: str
    type: str = "function"
    function: FunctionOut


class CompletionTokensDetails(msgspec.Struct, frozen=True, kw_only=True):
    reasoning_tokens: int = 0


class UsageObject(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails = CompletionTokensDetails()


class LoomnetFacts(msgspec.Struct, frozen=True, kw_only=True):
    """The ``loomnet`` extension object on a finished answer (also in response headers
    of a whole one)."""

    #: the executor's peer id (never its address)
    executor: str
    #: credits
    cost: float
    receipt_id: str
    #: where the token counts came from (``backend``, ``tokenizer``, ``tiktoken``, ``estimate``)
    count_source: str


class CompletionMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | msgspec.UnsetType = msgspec.UNSET
    reasoning_content: str | msgspec.UnsetType = msgspec.UNSET


class CompletionChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int = 0
    message: CompletionMessage
    logprobs: None = None
    finish_reason: str


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageObject
    system_fingerprint: None = None
    loomnet: LoomnetFacts


class Delta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class Chunk(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChunkChoice]
    #: null on every chunk but the last when ``include_usage``; absent otherwise
    usage: UsageObject | None | msgspec.UnsetType = msgspec.UNSET
    loomnet: LoomnetFacts | msgspec.UnsetType = msgspec.UNSET


class ErrorObject(msgspec.Struct, frozen=True, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None
    #: the loomnet error code (``docs/errors.md``)
    loomnet_code: int


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorObject

