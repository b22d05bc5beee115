"""Anthropic Messages (``POST /v1/messages``) on loomnet: the :class:`~._api.ChatAPI` for
Anthropic clients (``docs/gateway-anthropic.md``).

What maps to what (request Structs in ``_anthropic_wire``, answers in
``_anthropic_render``):

* ``system`` (a string or text blocks) is a leading system message; ``messages`` keep
  their order. Text blocks of one turn are joined with a blank line (as the network's
  Anthropic adapter joins system messages).
* user turns: ``text``; ``image`` with a ``base64`` source (an ``url`` or ``file``
  source is refused: the gateway never fetches anything, deployments are often
  air-gapped); ``tool_result`` blocks each become a ``tool`` message with its
  ``tool_call_id`` (content a string or text blocks), placed before the turn's own
  text and images. ``is_error`` is not carried (loomnet's tool turns have no flag). A
  turn's text travels as one piece with its images beside it: their order within the
  turn is not kept.
* assistant turns: ``text``; ``tool_use`` blocks become the turn's tool calls (``input``
  as JSON text); ``thinking`` and ``redacted_thinking`` blocks are dropped.
* ``max_tokens`` (required, as Anthropic requires it), ``stop_sequences`` (up to 4),
  ``temperature`` (0 to 2, the network's range), ``top_p``, ``metadata.user_id`` (as
  ``user``), ``tools`` (client tools: ``input_schema`` as JSON text; server tools are
  refused), ``tool_choice`` (``auto``, ``any`` as ``required``, ``tool`` as the tool's
  name, ``none``; ``disable_parallel_tool_use`` is not carried), ``output_config.format``
  (a JSON schema: structured output) and ``stream``.
* ``loomnet`` (body) and ``X-Loomnet-*`` headers: routing choices (``_call``).
* ignored: ``top_k`` (loomnet has no such option), ``thinking`` and
  ``output_config.effort`` (a model reasons as its executor runs it; its reasoning comes
  back as ``thinking`` blocks), ``cache_control`` (no prompt cache), ``service_tier``,
  ``container``, ``mcp_servers`` and any other field: unknown fields are skipped.

Every bad body is a 400 ``invalid_request`` naming the field (``param``), in Anthropic's
field names.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from loomnet.client import ChatResult
from loomnet.protocol import (
    ChatMessage,
    GenerationOptions,
    ImagePart,
    ResponseFormat,
    ToolCall,
    ToolSpec,
)

from ._anthropic_render import AnthropicStreamWriter, error_body, message_of
from ._anthropic_wire import (
    Base64Source,
    ImageIn,
    MessageIn,
    MessagesRequest,
    RedactedThinkingIn,
    TextIn,
    ThinkingIn,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceIn,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultIn,
    ToolUseIn,
    URLSource,
    decode_request,
)
from ._api import Answer
from ._call import ChatCall, merge_steering, steering_from_headers
from ._decode import image_from_base64, is_absent, object_text
from ._errors import GatewayError

__all__ = ["AnthropicAPI", "AnthropicStreamWriter"]

_encode = msgspec.json.Encoder().encode
#: how text blocks of one turn (or of ``system``) are joined
_JOIN = "\n\n"
#: images one message may carry (``ChatMessage.images``)
_MAX_IMAGES = 16
#: the blocks each role may send
_ALLOWED = {
    "user": (TextIn, ImageIn, ToolResultIn),
    "assistant": (TextIn, ToolUseIn, ThinkingIn, RedactedThinkingIn),
}


def _refuse(message: str, param: str) -> GatewayError:
    return GatewayError("invalid_request", f"{param}: {message}", param=param)


def _image(block: ImageIn, param: str) -> ImagePart:
    """The bytes of an inline image.

    Raises:
        GatewayError: the source is a URL or a file id (never fetched), the data is
            not base64, empty, or over the network's 1 MiB per image.
    """
    source = block.source
    if not isinstance(source, Base64Source):
        kind = "a URL" if isinstance(source, URLSource) else "a file"
        raise _refuse(f"images must be sent inline (source.type base64): the gateway never fetches {kind}",
                      f"{param}.source")  # fmt: skip
    return image_from_base64(source.media_type, source.data, param=f"{param}.source.data")


def _tool_result(block: ToolResultIn, param: str) -> str:
    if isinstance(block.content, str):
        return block.content
    for k, part in enumerate(block.content):
        if not isinstance(part, TextIn):
            raise _refuse("a tool_result may carry text only on loomnet; send the image in an image block of the "
                          "user turn", f"{param}.content[{k}]")  # fmt: skip
    return _JOIN.join(part.text for part in block.content if isinstance(part, TextIn))


def _turn(message: MessageIn, i: int, calls_made: set[str]) -> list[ChatMessage]:
    """The loomnet messages of the ``i``-th turn. ``calls_made``: the ids of the tool
    calls earlier assistant turns made (grows with this turn's)."""
    if isinstance(message.content, str):
        return [ChatMessage(message.role, message.content)]
    texts: list[str] = []
    images: list[ImagePart] = []
    calls: list[ToolCall] = []
    results: list[ChatMessage] = []
    for j, block in enumerate(message.content):
        param = f"messages[{i}].content[{j}]"
        if not isinstance(block, _ALLOWED[message.role]):
            raise _refuse(f"{message.role} turns cannot carry {type(block).__struct_config__.tag} blocks",
                          f"{param}.type")  # fmt: skip
        if isinstance(block, TextIn):
            texts.append(block.text)
        elif isinstance(block, ImageIn):
            if len(images) == _MAX_IMAGES:
                raise _refuse(f"a turn may carry at most {_MAX_IMAGES} images", param)
            images.append(_image(block, param))
        elif isinstance(block, ToolUseIn):
            arguments = object_text(block.input, param=f"{param}.input")
            calls.append(ToolCall(id=block.id, name=block.name, arguments=arguments))
        elif isinstance(block, ToolResultIn):
            if block.tool_use_id not in calls_made:
                raise _refuse(f"no earlier assistant turn made a tool_use with id {block.tool_use_id!r}",
                              f"{param}.tool_use_id")  # fmt: skip
            results.append(ChatMessage("tool", _tool_result(block, param), tool_call_id=block.tool_use_id))
        # thinking and redacted_thinking: dropped
    calls_made.update(call.id for call in calls)
    if results and not (texts or images):
        return results
    return [*results, ChatMessage(message.role, _JOIN.join(texts), images=images, tool_calls=calls)]


def _tool_choice(choice: ToolChoiceIn | None, tools: list[ToolSpec]) -> str | None:
    if choice is None:
        return None
    if isinstance(choice, ToolChoiceAuto):
        return "auto"
    if isinstance(choice, ToolChoiceNone):
        return "none"
    if not tools:
        raise _refuse(f"tool_choice {type(choice).__struct_config__.tag!r} needs tools", "tool_choice")
    if isinstance(choice, ToolChoiceAny):
        return "required"
    assert isinstance(choice, ToolChoiceTool)
    if choice.name not in {tool.name for tool in tools}:
        raise _refuse(f"no tool is named {choice.name!r}", "tool_choice.name")
    return choice.name


def _tools(request: MessagesRequest) -> list[ToolSpec]:
    tools = []
    for k, tool in enumerate(request.tools or []):
        if tool.type not in (None, "custom"):
            raise _refuse(f"server tools ({tool.type!r}) are not available on loomnet; give client tools "
                          "(name, description, input_schema)", f"tools[{k}].type")  # fmt: skip
        if is_absent(tool.input_schema):
            raise _refuse("a tool needs its input_schema", f"tools[{k}].input_schema")
        schema = object_text(tool.input_schema, param=f"tools[{k}].input_schema")
        tools.append(ToolSpec(name=tool.name, description=tool.description, parameters=schema))
    return tools


def _options(request: MessagesRequest) -> GenerationOptions:
    tools = _tools(request)
    response_format = None
    if request.output_config is not None and request.output_config.format is not None:
        schema = object_text(request.output_config.format.schema, param="output_config.format.schema")
        response_format = ResponseFormat(type="json_schema", schema=schema)
    return GenerationOptions(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=list(request.stop_sequences or []),
        user=request.metadata.user_id if request.metadata is not None else None,
        tools=tools,
        tool_choice=_tool_choice(request.tool_choice, tools),
        response_format=response_format,
    )


def _system(system: str | list[TextIn] | None) -> list[ChatMessage]:
    text = system if isinstance(system, str) or system is None else _JOIN.join(block.text for block in system)
    return [ChatMessage("system", text)] if text else []


class AnthropicAPI:
    """``POST /v1/messages`` (see the module doc). Stateless: one instance serves every
    request."""

    name = "anthropic"

    def parse(self, body: bytes, headers: Mapping[str, str]) -> ChatCall:
        """The request in ``body`` (JSON), with the ``X-Loomnet-*`` routing ``headers``.

        Raises:
            GatewayError: ``invalid_request`` naming the field at fault (``param``, in
                Anthropic's names: ``messages[1].content[0].source``, ``max_tokens``).
        """
        request = decode_request(body)
        messages = _system(request.system)
        calls_made: set[str] = set()
        for i, message in enumerate(request.messages):
            messages.extend(_turn(message, i, calls_made))
        return ChatCall(
            model=request.model,
            messages=messages,
            options=_options(request),
            stream=bool(request.stream),
            steering=merge_steering(request.loomnet, steering_from_headers(headers)),
        )

    def whole(self, call: ChatCall, result: ChatResult, answer: Answer) -> bytes:
        """The ``message`` object of a finished answer (``_anthropic_render.message_of``)."""
        return _encode(message_of(result, answer))

    def writer(self, call: ChatCall, *, model: str, response_id: str, created: int) -> AnthropicStreamWriter:
        return AnthropicStreamWriter(model=model, response_id=response_id)

    def error_body(self, error: GatewayError) -> bytes:
        return _encode(error_body(error))
