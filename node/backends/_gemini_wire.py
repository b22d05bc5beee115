"""Gemini's ``GenerateContentRequest``/``Response`` as data (sans-IO).

See ``gemini`` for the theory of operation; everything here is pure. Generation options
go in ``generationConfig``: ``temperature``, ``topP``, ``maxOutputTokens``, ``seed``,
``stopSequences`` (up to 5; ours are at most 4), ``presencePenalty`` and
``frequencyPenalty`` (these two from Google's ``GenerationConfig`` reference, beyond the
stored wire facts). Gemini has no field for ``user``: it is not sent. Also beyond the
stored wire facts: a part with ``"thought": true`` is a thought summary (sent only when
``thinkingConfig.includeThoughts`` asks, which we do not), streamed as reasoning and
never as text.

Refusals: a prompt blocked before any candidate (``promptFeedback.blockReason``), or a
candidate stopped by a filter (``finishReason`` in :data:`FILTERED`) before any text or
function call, is ``CONTENT_FILTERED`` (see ``_refusal``). A filter that stops an answer
already under way finishes it as ``content_filter``. Any other abnormal ``finishReason``
(not in :data:`NORMAL`) before anything was produced (``MALFORMED_FUNCTION_CALL``,
``TOO_MANY_TOOL_CALLS``, ``OTHER``, a value added after these facts) is a retryable
``BACKEND_ERROR``: an empty answer is never booked as a success.

Usage: input = ``promptTokenCount + toolUsePromptTokenCount``; output =
``candidatesTokenCount + thoughtsTokenCount`` (thoughts are billed as output),
``reasoning_tokens`` = ``thoughtsTokenCount``. The API is proto3 JSON, which leaves out
counts that are 0: when the counts present add up to ``totalTokenCount`` the missing
ones are 0; otherwise a missing count is unknown (None).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec

from loomnet.protocol import BackendError, ErrorCode, ToolCall

from ._base import ChatParams, Finished, ReasoningDelta, TextDelta, Usage, token_count
from ._http import request_json as _loads
from ._refusal import content_filtered

__all__ = ["BLOCKED", "FILTERED", "FRAME", "NORMAL", "Answer", "Frame", "request_body"]

#: ``finishReason`` values of a candidate a filter stopped (Gemini's ``FinishReason``
#: enum: the text and image safety, recitation, language and blocklist filters)
FILTERED = frozenset({
    "SAFETY", "RECITATION", "LANGUAGE", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
    "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
})
#: ``finishReason`` values of a normal end; any other, before any text or function
#: call, is a failed answer (``MALFORMED_FUNCTION_CALL``, ``OTHER``, ...), never an
#: empty success
NORMAL = frozenset({"STOP", "MAX_TOKENS"})
#: ``promptFeedback.blockReason`` values
BLOCKED = frozenset({"SAFETY", "OTHER", "BLOCKLIST", "PROHIBITED_CONTENT", "IMAGE_SAFETY"})
_COUNTS = ("promptTokenCount", "toolUsePromptTokenCount", "candidatesTokenCount", "thoughtsTokenCount")

_FINISH = {"STOP": "stop", "MAX_TOKENS": "length"}
#: ``generationConfig`` field <- our generation option
_CONFIG = (("temperature", "temperature"), ("topP", "top_p"), ("maxOutputTokens", "max_tokens"), ("seed", "seed"),
           ("presencePenalty", "presence_penalty"), ("frequencyPenalty", "frequency_penalty"))
_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}


def request_body(params: ChatParams) -> dict[str, Any]:
    """The ``GenerateContentRequest`` for ``params``.

    Raises:
        BackendError: ``BAD_REQUEST`` for arguments or schemas that are not JSON, or a
            tool turn that answers no earlier call.
    """
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name, for functionResponse
    for message in params.messages:
        if message.role == "system":
            continue
        parts: list[dict[str, Any]] = []
        if message.role == "tool":
            if message.tool_call_id not in names:
                message_text = f"a tool turn answers no earlier tool call (id {message.tool_call_id!r})"
                raise BackendError(message_text, code=ErrorCode.BAD_REQUEST, public=message_text[:200])
            response = {"name": names[message.tool_call_id], "response": {"content": message.content}}
            parts.append({"functionResponse": response})
        else:
            for image in message.images:
                data = base64.b64encode(image.data).decode("ascii")
                parts.append({"inlineData": {"mimeType": image.media_type, "data": data}})
            if message.content or not (parts or message.tool_calls):
                parts.append({"text": message.content})
            for call in message.tool_calls:
                names[call.id] = call.name
                args = _loads(call.arguments, f"the arguments of tool call {call.name!r}")
                parts.append({"functionCall": {"name": call.name, "args": args}})
        role = "model" if message.role == "assistant" else "user"
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    body: dict[str, Any] = {"contents": contents}
    if system := "\n\n".join(m.content for m in params.messages if m.role == "system" and m.content):
        body["systemInstruction"] = {"parts": [{"text": system}]}
    config: dict[str, Any] = {key: value for key, name in _CONFIG if (value := getattr(params, name)) is not None}
    if params.stop:
        config["stopSequences"] = list(params.stop)
    if (fmt := params.response_format) is not None and fmt.type != "text":
        config["responseMimeType"] = "application/json"
        if fmt.type == "json_schema" and fmt.schema:
            config["responseSchema"] = _loads(fmt.schema, "the response_format schema")
    if config:
        body["generationConfig"] = config
    if params.tools:
        declarations = []
        for tool in params.tools:
            declaration: dict[str, Any] = {"name": tool.name, "description": tool.description}
            if schema := _loads(tool.parameters, f"the parameters of tool {tool.name!r}"):
                declaration["parameters"] = schema
            declarations.append(declaration)
        body["tools"] = [{"functionDeclarations": declarations}]
        if params.tool_choice:
            mode = _MODES.get(params.tool_choice)
            calling = {"mode": mode} if mode else {"mode": "ANY", "allowedFunctionNames": [params.tool_choice]}
            body["toolConfig"] = {"functionCallingConfig": calling}
    return body


def _usage(metadata: dict[str, Any]) -> Usage:
    """``usageMetadata`` as :class:`Usage` (see the module doc for missing counts)."""
    n = {key: value for key, value in metadata.items() if token_count(value) is not None}
    total = n.get("totalTokenCount")
    complete = total is not None and sum(n.get(key, 0) for key in _COUNTS) == total
    count = {key: n.get(key, 0 if complete else None) for key in _COUNTS}

    def added(a: str, b: str) -> int | None:  # the second of each pair is often left out when 0
        if count[a] is None:
            return None
        return count[a] + (count[b] or 0)

    return Usage(input_tokens=added("promptTokenCount", "toolUsePromptTokenCount"),
                 output_tokens=added("candidatesTokenCount", "thoughtsTokenCount"), source="backend",
                 reasoning_tokens=count["thoughtsTokenCount"])


class Part(msgspec.Struct, rename="camel"):
    text: Any = None
    thought: Any = None
    function_call: Any = None


class Content(msgspec.Struct):
    parts: list[Part] | None = None


class Candidate(msgspec.Struct, rename="camel"):
    content: Content | None = None
    finish_reason: Any = None


class Feedback(msgspec.Struct, rename="camel"):
    block_reason: Any = None


class Frame(msgspec.Struct, rename="camel"):
    """One ``GenerateContentResponse`` (a streamed frame or a whole answer), as far as
    the adapter reads it (``modelVersion``, ``safetyRatings``, ... are skipped unbuilt)."""

    candidates: list[Candidate] | None = None
    prompt_feedback: Feedback | None = None
    usage_metadata: Any = None
    error: Any = None


#: decodes one frame; build once, use per token
FRAME = msgspec.json.Decoder(Frame)


class Answer:
    """What the ``GenerateContentResponse`` frames of one answer add up to."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.block_reason: str | None = None  #: the prompt was blocked (``promptFeedback``)
        self.usage: dict[str, Any] | None = None
        self.calls: list[ToolCall] = []
        self.produced = False  #: any text or function call came

    @property
    def ended(self) -> bool:
        """A finish reason or a block reason came: the answer is complete."""
        return self.finish_reason is not None or self.block_reason is not None

    def feed(self, frame: Frame) -> list[TextDelta | ReasoningDelta]:
        """Take one frame; return its text and thought parts in order."""
        events: list[TextDelta | ReasoningDelta] = []
        feedback = frame.prompt_feedback
        if feedback is not None and isinstance(feedback.block_reason, str) and feedback.block_reason:
            self.block_reason = feedback.block_reason
        if frame.candidates:
            candidate = frame.candidates[0]
            content = candidate.content
            for part in (content.parts if content is not None else None) or ():
                if isinstance(text := part.text, str) and text:
                    events.append(ReasoningDelta(text) if part.thought is True else TextDelta(text))
                elif isinstance(call := part.function_call, dict):
                    name, arguments = str(call.get("name", "")), json.dumps(call.get("args") or {})
                    self.calls.append(ToolCall(id=f"call_{len(self.calls)}", name=name, arguments=arguments))
            if candidate.finish_reason:
                self.finish_reason = str(candidate.finish_reason)
        if isinstance(frame.usage_metadata, dict):
            self.usage = frame.usage_metadata  # complete on the final frame
        if not self.produced and (self.calls or any(isinstance(e, TextDelta) for e in events)):
            self.produced = True
        return events

    def finished(self) -> Finished:
        """The :class:`Finished` event of a complete answer.

        Raises:
            BackendError: ``CONTENT_FILTERED`` for a blocked prompt, or a filtered
                candidate before any text or function call; ``BACKEND_ERROR``
                (retryable) for any other abnormal end before anything was produced.
        """
        if self.block_reason is not None:
            raise content_filtered("Gemini", self.block_reason, BLOCKED, detail="the prompt was blocked")
        reason = self.finish_reason or "STOP"
        if reason in FILTERED and not self.produced:
            raise content_filtered("Gemini", reason, FILTERED)
        if reason not in NORMAL and not self.produced:
            raise BackendError(
                f"Gemini ended the answer with finishReason {reason[:64]} before any text or function call",
                code=ErrorCode.BACKEND_ERROR,
                retryable=True,
                public="the model's runtime ended its answer abnormally before producing anything",
            )
        finish = "content_filter" if reason in FILTERED else _FINISH.get(reason, reason.lower()[:64])
        if finish == "stop" and self.calls:
            finish = "tool_calls"
        usage = _usage(self.usage) if self.usage is not None else None
        return Finished(finish_reason=finish, usage=usage, tool_calls=self.calls)
