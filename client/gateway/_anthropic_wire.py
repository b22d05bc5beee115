"""The Anthropic Messages API (``POST /v1/messages``) as msgspec Structs: the request the
gateway accepts, the message and the stream events it sends back, the error body.

Requests: unknown fields are skipped (msgspec's default) at every level, because the
API grows new fields often and a client that sends one the gateway does not know
(``top_k``, ``thinking``, ``service_tier``, ``cache_control`` on a block, ...) must
still be served; see ``_anthropic`` for what each known field becomes. Content blocks,
image sources and tool choices are tagged unions on ``type``: a block of a type the
gateway cannot carry (``document``, ``search_result``, a server tool's result) fails to
decode, naming its path. The limits are the network's (``protocol/_messages.py``), so a
request over one is refused here, naming the Anthropic field, rather than later under
loomnet's own field names.

Responses and events are encoded only; their field names and ``type`` tags are A6's
(``/work/shared/reference/backend-wire-facts.md``), plus the ``loomnet`` extension
object and ``loomnet_code`` in errors.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from ._call import Steering
from ._decode import ABSENT, split_validation_error, too_deep
from ._errors import GatewayError

__all__ = [
    "ContentBlockDelta",
    "ContentBlockStart",
    "ContentBlockStop",
    "ErrorBody",
    "ErrorObject",
    "InputJSONDelta",
    "LoomnetFacts",
    "MessageDelta",
    "MessageDeltaBody",
    "MessageOut",
    "MessageStart",
    "MessageStop",
    "MessagesRequest",
    "Ping",
    "StreamEvent",
    "TextDeltaOut",
    "TextOut",
    "ThinkingDeltaOut",
    "ThinkingOut",
    "ToolUseOut",
    "UsageOut",
    "decode_request",
]

# The network's limits (protocol/_messages.py), applied under Anthropic's field names.
_Name = Annotated[str, Meta(min_length=1, max_length=128)]
_Id = Annotated[str, Meta(min_length=1, max_length=128)]
_Text = Annotated[str, Meta(max_length=512 * 1024)]
#: a JSON object passed through as it came (``_decode.object_text``): never built in Python
_Schema = Raw
_Stop = Annotated[str, Meta(min_length=1, max_length=256)]

# ------------------------------------------------------------------------ request


class _Block(Struct, frozen=True, kw_only=True, tag_field="type"):
    pass


class TextIn(_Block, tag="text"):
    text: _Text


class Base64Source(_Block, tag="base64"):
    media_type: Annotated[str, Meta(pattern=r"(?i)^image/[a-z0-9.+-]{1,40}$")]
    #: base64 text of the image bytes
    data: str


class URLSource(_Block, tag="url"):
    """Refused: the gateway never fetches anything."""

    url: str = ""


class FileSource(_Block, tag="file"):
    """Refused: the gateway has no Files API."""

    file_id: str = ""


class ImageIn(_Block, tag="image"):
    source: Base64Source | URLSource | FileSource


class ToolUseIn(_Block, tag="tool_use"):
    id: _Id
    name: _Name
    input: _Schema = Raw(b"{}")


class ToolResultIn(_Block, tag="tool_result"):
    tool_use_id: _Id
    content: _Text | list[TextIn | ImageIn] = ""
    #: not carried: loomnet's tool turns have no error flag
    is_error: bool | None = None


class ThinkingIn(_Block, tag="thinking"):
    """Dropped: earlier reasoning is not sent back to a model on loomnet."""

    thinking: str = ""
    signature: str = ""


class RedactedThinkingIn(_Block, tag="redacted_thinking"):
    """Dropped, as :class:`ThinkingIn`."""

    data: str = ""


BlockIn = TextIn | ImageIn | ToolUseIn | ToolResultIn | ThinkingIn | RedactedThinkingIn


class MessageIn(Struct, frozen=True, kw_only=True):
    role: Literal["user", "assistant"]
    content: _Text | Annotated[list[BlockIn], Meta(max_length=1024)]


class ToolIn(Struct, frozen=True, kw_only=True):
    name: _Name
    description: Annotated[str, Meta(max_length=8192)] = ""
    #: required for the client's own tools; server tools (``web_search_...``) have none
    input_schema: _Schema = ABSENT
    #: ``"custom"`` or absent for a client tool; anything else is a server tool (refused)
    type: str | None = None


class ToolChoiceAuto(_Block, tag="auto"):
    pass


class ToolChoiceAny(_Block, tag="any"):
    pass


class ToolChoiceTool(_Block, tag="tool"):
    name: _Name


class ToolChoiceNone(_Block, tag="none"):
    pass


ToolChoiceIn = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class MetadataIn(Struct, frozen=True, kw_only=True):
    user_id: Annotated[str, Meta(min_length=1, max_length=256)] | None = None


class JSONFormatIn(_Block, tag="json_schema"):
    schema: _Schema


class OutputConfigIn(Struct, frozen=True, kw_only=True):
    #: structured output: the answer is JSON matching this schema
    format: JSONFormatIn | None = None


class MessagesRequest(Struct, frozen=True, kw_only=True):
    """The body of ``POST /v1/messages`` (the fields the gateway reads)."""

    model: _Name
    #: required, as Anthropic requires it
    max_tokens: Annotated[int, Meta(ge=1, le=1 << 20)]
    messages: Annotated[list[MessageIn], Meta(min_length=1, max_length=1024)]
    system: _Text | list[TextIn] | None = None
    stop_sequences: Annotated[list[_Stop], Meta(max_length=4)] | None = None
    #: 0 to 2, the network's range (Anthropic's own is 0 to 1)
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    tools: Annotated[list[ToolIn], Meta(max_length=128)] | None = None
    tool_choice: ToolChoiceIn | None = None
    metadata: MetadataIn | None = None
    output_config: OutputConfigIn | None = None
    stream: bool | None = None
    #: routing choices (``_call``); the SDKs send it with ``extra_body``
    loomnet: Steering | None = None


_decoder = msgspec.json.Decoder(MessagesRequest)
#: msgspec's ``<reason> - at `$.<path>``` suffix, and its missing-field reason
_FIELD = re.compile(r"^Object (?:missing required|contains unknown) field `(?P<field>[^`]+)`$")
#: extra words for a field whose bad value is usually a client using a feature loomnet lacks
_HINTS = (
    (re.compile(r"content\[\d+\]\.type$"), "content blocks may be text, image, tool_use, tool_result or thinking"),
    (re.compile(r"^messages\[\d+\]\.role$"), "roles are user and assistant; the system prompt is the system field"),
    (re.compile(r"source\.type$"), "images are sent inline: source.type base64"),
    (re.compile(r"source\.media_type$"), "an image type such as image/png"),
)


def decode_request(body: bytes) -> MessagesRequest:
    """``body`` (JSON) as a :class:`MessagesRequest`.

    Raises:
        GatewayError: ``invalid_request``; ``param`` is the path of the field at fault
            (``messages[0].content[1].source.data``, ``max_tokens``), or None when the
            body as a whole is (not JSON, not an object). The message names it too.
    """
    try:
        return _decoder.decode(body)
    except RecursionError:
        raise too_deep() from None
    except msgspec.ValidationError as exc:
        reason, param = split_validation_error(exc)
        field = _FIELD.match(reason)
        if field is not None:
            reason = "is required" if "missing" in reason else "is not a known field"
        for pattern, hint in _HINTS:
            if param is not None and pattern.search(param):
                reason = f"{reason} ({hint})"
        if param is None:
            message = f"invalid request body: {reason}"
        else:
            message = f"{param} {reason}" if field is not None else f"{param}: {reason}"
        raise GatewayError("invalid_request", message, param=param) from None
    except msgspec.DecodeError as exc:
        raise GatewayError("invalid_request", f"the request body is not valid JSON: {exc}") from None


# ----------------------------------------------------------------------- response


class TextOut(_Block, tag="text"):
    text: str


class ThinkingOut(_Block, tag="thinking"):
    thinking: str
    #: always empty: loomnet's reasoning is not signed by the model's vendor (the
    #: receipt signs its digest instead)
    signature: str = ""


class ToolUseOut(_Block, tag="tool_use"):
    id: str
    name: str
    #: the arguments, a JSON object, as encoded bytes
    input: Raw


ContentOut = TextOut | ThinkingOut | ToolUseOut


class UsageOut(Struct, frozen=True, kw_only=True):
    input_tokens: int
    output_tokens: int
    #: loomnet has no prompt cache to report
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class LoomnetFacts(Struct, frozen=True, kw_only=True):
    """The ``loomnet`` extension object: who served the answer and what it cost."""

    #: the executor's peer id (never its address)
    executor: str
    #: credits (the receipt's micro-credits / 1e6)
    cost: float
    #: hex of the SHA-256 of the receipt's signed payload, as both ledgers book it
    receipt_id: str
    #: where the token counts come from (``backend``, ``tokenizer``, ...)
    count_source: str


class MessageOut(Struct, frozen=True, kw_only=True, tag_field="type", tag="message"):
    id: str
    role: Literal["assistant"] = "assistant"
    content: list[ContentOut]
    model: str
    stop_reason: str | None
    #: always null: loomnet does not say which stop sequence ended an answer
    stop_sequence: None = None
    usage: UsageOut
    loomnet: LoomnetFacts | UnsetType = UNSET


# -------------------------------------------------------------------- stream events


class _Event(Struct, frozen=True, kw_only=True, tag_field="type"):
    pass


class MessageStart(_Event, tag="message_start"):
    message: MessageOut


class ContentBlockStart(_Event, tag="content_block_start"):
    index: int
    content_block: ContentOut


class TextDeltaOut(_Block, tag="text_delta"):
    text: str


class ThinkingDeltaOut(_Block, tag="thinking_delta"):
    thinking: str


class InputJSONDelta(_Block, tag="input_json_delta"):
    partial_json: str


class ContentBlockDelta(_Event, tag="content_block_delta"):
    index: int
    delta: TextDeltaOut | ThinkingDeltaOut | InputJSONDelta


class ContentBlockStop(_Event, tag="content_block_stop"):
    index: int


class MessageDeltaBody(Struct, frozen=True, kw_only=True):
    stop_reason: str
    stop_sequence: None = None


class MessageDelta(_Event, tag="message_delta"):
    delta: MessageDeltaBody
    #: cumulative, and both counts: ``message_start`` could only say 0
    usage: UsageOut
    loomnet: LoomnetFacts


class MessageStop(_Event, tag="message_stop"):
    pass


class Ping(_Event, tag="ping"):
    """Keep-alive: clients skip it."""


class ErrorObject(Struct, frozen=True, kw_only=True):
    #: Anthropic's error type (``invalid_request_error``, ``not_found_error``, ...)
    type: str
    message: str
    #: loomnet's stable error code (``docs/errors.md``)
    loomnet_code: int
    #: the request field at fault, when one is
    param: str | UnsetType = UNSET


class ErrorBody(_Event, tag="error"):
    """An error response's body, and (without ``request_id``) the ``error`` event."""

    error: ErrorObject
    request_id: None | UnsetType = None


StreamEvent = (
    MessageStart
    | ContentBlockStart
    | ContentBlockDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
    | Ping
    | ErrorBody
)
