"""Refuse an obviously invalid request locally, before any traffic.

The check is the executor's own: the request is encoded as it will be signed and
decoded with the protocol's typed decoder, so every constraint of the
``InferenceRequest`` schema (``protocol/_messages.py``: temperature in [0, 2] and not
NaN, ``max_tokens`` ≥ 1, 1 to 1024 messages, a known role, string and list lengths,
image types, seeds, price caps, ...) applies here exactly as it will there, and the
two can never drift apart. What the schema cannot say (the whole request must fit in
one frame) is checked against the same ``MAX_FRAME_SIZE`` the executor enforces.

What no schema says, but every backend needs, is checked too, so a request no
executor could serve never leaves the process: ``tool_choice`` is ``"auto"``,
``"none"``, ``"required"`` (with at least one tool) or the name of one of the
request's tools; a ``tool`` turn carries the ``tool_call_id`` of a call an earlier
assistant turn made; a tool's ``parameters``, a ``json_schema`` response format's
``schema`` and the ``arguments`` of an assistant's tool calls are JSON objects
(empty text counts as ``{}``, as every adapter reads it).
"""

from __future__ import annotations

import json
import re

import msgspec

from loomnet.protocol import (
    MAX_FRAME_SIZE,
    ChatMessage,
    Envelope,
    InferenceRequest,
    InvalidRequest,
    RequestFrame,
    ResponseFormat,
    ToolSpec,
    encode_frame_body,
    encode_payload,
)

__all__ = ["check_request"]

_decoder = msgspec.msgpack.Decoder(InferenceRequest)
#: msgspec's "<what> - at `$.<path>`" error suffix.
_AT = re.compile(r"^(?P<reason>.*) - at `\$\.?(?P<path>[^`]*)`$", re.DOTALL)


def check_request(request: InferenceRequest) -> bytes:
    """Validate ``request`` as its executor will; returns its payload bytes.

    Raises:
        InvalidRequest: a field breaks the schema (``field`` names it, e.g.
            ``"messages[0].role"``), or one of the rules in the module doc (e.g.
            ``"tools[1].parameters"``); a value cannot be encoded at all; or the
            request is too large for one frame.
    """
    _check_types(request)
    try:
        payload = encode_payload(request)
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError, UnicodeError):
        field, reason = _unencodable(request)
        raise InvalidRequest(f"invalid request: {field or 'the request'}: {reason}", field=field) from None
    try:
        _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT.match(text)
        field = match["path"] if match else None
        reason = match["reason"] if match else text
        raise InvalidRequest(f"invalid request: {field or 'the request'}: {reason}", field=field or None) from None
    _check_semantics(request)
    # The frame as it will travel, with a signer and signature of their fixed sizes.
    frame = encode_frame_body(RequestFrame(Envelope(payload=payload, signer=bytes(32), sig=bytes(64))))
    if len(frame) > MAX_FRAME_SIZE:
        raise InvalidRequest(
            f"invalid request: its frame is {len(frame)} bytes, over the protocol's maximum of "
            f"{MAX_FRAME_SIZE}; send fewer or smaller messages or images",
            field="messages",
        )
    return payload


#: the Struct each list of the request holds, for a clear error instead of an AttributeError
_ITEM_TYPES = {"messages": ChatMessage, "tools": ToolSpec}


def _check_types(request: InferenceRequest) -> None:
    """Refuse a message or tool that is not the protocol's Struct (an OpenAI-style dict is
    the usual slip), naming it."""
    for name, kind in _ITEM_TYPES.items():
        for i, item in enumerate(getattr(request, name)):
            if not isinstance(item, kind):
                raise InvalidRequest(
                    f"invalid request: {name}[{i}]: a loomnet.protocol.{kind.__name__} is needed, not "
                    f"{type(item).__name__}", field=f"{name}[{i}]",
                )
    if request.response_format is not None and not isinstance(request.response_format, ResponseFormat):
        raise InvalidRequest(
            f"invalid request: response_format: a loomnet.protocol.ResponseFormat is needed, not "
            f"{type(request.response_format).__name__}", field="response_format",
        )


def _unencodable(value: object, path: str = "") -> tuple[str | None, str]:
    """The path of the first value msgpack cannot encode (an int over 64 bits, a string
    with a lone surrogate, an object of no known type) and why, in our words."""
    if isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            found = _unencodable(getattr(value, name), f"{path}.{name}" if path else name)
            if found[0] is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _unencodable(item, f"{path}[{i}]")
            if found[0] is not None:
                return found
    else:
        try:
            msgspec.msgpack.encode(value)
        except (msgspec.EncodeError, TypeError, ValueError, OverflowError, UnicodeError):
            if isinstance(value, int):
                return path, "a whole number far outside the range this field allows"
            if isinstance(value, str):
                return path, "text that is not valid Unicode (a lone surrogate?)"
            return path, f"a {type(value).__name__} cannot be sent"
    return None, "it cannot be encoded"


_TOOL_CHOICES = ("auto", "none", "required")


def _check_semantics(request: InferenceRequest) -> None:
    """The rules of the module doc, on a request that already fits the schema."""
    names = [tool.name for tool in request.tools]
    choice = request.tool_choice
    if choice == "required" and not names:
        message = 'invalid request: tool_choice: "required" but the request has no tools'
        raise InvalidRequest(message, field="tool_choice")
    if choice is not None and choice not in _TOOL_CHOICES and choice not in names:
        offered = ", ".join(repr(n) for n in names[:8]) or "none"
        raise InvalidRequest(
            f"invalid request: tool_choice: {choice[:64]!r} names no tool of the request (tools: {offered})",
            field="tool_choice",
        )
    for i, tool in enumerate(request.tools):
        _json_object(tool.parameters, f"tools[{i}].parameters")
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.schema is not None:
        _json_object(fmt.schema, "response_format.schema")
    called: set[str] = set()  # ids of the tool calls earlier assistant turns made
    for i, message in enumerate(request.messages):
        for j, call in enumerate(message.tool_calls):
            _json_object(call.arguments, f"messages[{i}].tool_calls[{j}].arguments")
            called.add(call.id)
        if message.role == "tool":
            _answers_a_call(message.tool_call_id, called, f"messages[{i}].tool_call_id")


def _answers_a_call(call_id: str | None, called: set[str], field: str) -> None:
    """Refuse a tool turn that answers no tool call of an earlier assistant turn (OpenAI
    answers HTTP 400, and the Anthropic and Gemini adapters cannot map it)."""
    if not call_id:
        raise InvalidRequest(f"invalid request: {field}: a tool turn needs the id of the call it answers",
                             field=field)
    if call_id not in called:
        raise InvalidRequest(
            f"invalid request: {field}: {call_id[:64]!r} answers no tool call of an earlier assistant turn",
            field=field,
        )


def _json_object(text: str, field: str) -> None:
    """Refuse ``text`` unless it is a JSON object (or empty, which adapters read as ``{}``)."""
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"invalid request: {field}: not valid JSON ({exc})", field=field) from None
    except RecursionError:
        raise InvalidRequest(f"invalid request: {field}: JSON nested too deeply", field=field) from None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"invalid request: {field}: a JSON object is needed, not {type(value).__name__}", field=field
        )
