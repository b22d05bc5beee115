"""What OpenAI-compatible runtimes answer, folded into loomnet's events (sans-IO).

A stream's SSE events go through :class:`StreamParser` (text, reasoning, tool-call
fragments, the finish reason, usage); a whole ``chat.completion`` through
:func:`parse_completion`. Both treat an answer that carries nothing but a refusal
(``finish_reason: content_filter``, or a ``refusal`` text in place of content) as
:func:`~._refusal.content_filtered`, never as an empty success.

Usage keeps each count the runtime gave and None for one it left out;
``completion_tokens_details.reasoning_tokens`` (OpenAI, OpenRouter, vLLM) becomes
``Usage.reasoning_tokens``, a part of ``completion_tokens``.

Malformed input raises :class:`BackendError`; the adapter redacts and labels it.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from loomnet.protocol import BackendError, ToolCall

from ._base import Completion, Finished, ReasoningDelta, TextDelta, Usage, token_count
from ._openai_profiles import Profile
from ._payloads import json_value, typed
from ._refusal import content_filtered

__all__ = ["StreamParser", "parse_completion", "parse_usage", "refusal_error"]

#: the reasons OpenAI-compatible runtimes give for refusing (finish reason, refusal text)
_REFUSALS = frozenset({"content_filter", "refusal"})


_count = token_count


def parse_usage(raw: Any) -> Usage | None:
    """``{"prompt_tokens", "completion_tokens", "completion_tokens_details", ...}`` as
    :class:`Usage` (a count left out or not a count is None), or None without any count."""
    if not isinstance(raw, dict):
        return None
    prompt, completion = _count(raw.get("prompt_tokens")), _count(raw.get("completion_tokens"))
    if prompt is None and completion is None:
        return None
    details = raw.get("completion_tokens_details")
    reasoning = _count(details.get("reasoning_tokens")) if isinstance(details, dict) else None
    return Usage(input_tokens=prompt, output_tokens=completion, source="backend", reasoning_tokens=reasoning)


def _error_text(error: Any) -> str:
    """A runtime's error, whole: the adapter redacts it, then clips it."""
    if isinstance(error, dict):
        error = error.get("message") or error.get("error") or json.dumps(error)
    return str(error)


def _tool_call(index: int, call_id: Any, name: Any, arguments: Any) -> ToolCall:
    if not isinstance(name, str) or not name:
        raise BackendError("backend sent a tool call without a function name", retryable=True)
    if not isinstance(arguments, str):  # some runtimes send an object, OpenAI a JSON string
        arguments = json.dumps(arguments if arguments is not None else {})
    call_id = call_id if isinstance(call_id, str) and call_id else f"call_{index}"
    return ToolCall(id=call_id, name=name, arguments=arguments or "{}")


def _reasoning(profile: Profile, message: dict[str, Any]) -> str:
    """The reasoning text of a delta or message: the first non-empty profile field."""
    for name in profile.reasoning_fields:
        if isinstance(value := message.get(name), str) and value:
            return value
    return ""


def refusal_error(finish_reason: str | None, refusal: str, produced: bool) -> BackendError | None:
    """The error for an answer that is only a refusal, or None.

    Args:
        finish_reason: the answer's finish reason.
        refusal: the ``refusal`` text the model gave instead of content ("" for none).
        produced: whether any text or tool call came (then a filter only cut the answer).
    """
    if produced:
        return None
    if finish_reason == "content_filter":
        return content_filtered("the runtime", "content_filter", _REFUSALS)
    if refusal:
        return content_filtered("the runtime", "refusal", _REFUSALS, detail=refusal)
    return None


class _Function(msgspec.Struct):
    name: Any = None
    arguments: Any = None  #: a JSON string (OpenAI) or an object (some runtimes)


class _ToolFragment(msgspec.Struct):
    index: Any = None
    id: Any = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    """A delta's fields the parser reads; every name in a profile's ``reasoning_fields``
    must be one of them (a test checks)."""

    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolFragment] | None = None


class _Choice(msgspec.Struct):
    index: Any = 0
    delta: _Delta | None = None
    finish_reason: Any = None


class _Chunk(msgspec.Struct):
    """One ``chat.completion.chunk``, as far as the parser reads it (``id``, ``model``,
    ``logprobs``, ``timings``, ... are skipped unbuilt)."""

    choices: list[_Choice] | None = None
    usage: Any = None
    error: Any = None
    x_groq: Any = None


_CHUNK = msgspec.json.Decoder(_Chunk)
_DONE = b"[DONE]"


class StreamParser:
    """Folds the SSE events of one streamed chat into events, a finish reason, usage and
    tool calls. Feed every event in order; read the results once the stream has ended.

    Usage is taken from whichever chunk carries it (``choices`` empty, null, missing or
    not), and Groq's ``x_groq.usage`` when no standard one came; the last one wins.
    """

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.done = False  #: ``[DONE]`` arrived
        self.chunks = 0  #: JSON chunks seen
        self.produced = False  #: any text or tool-call fragment came
        self.refusal: list[str] = []  #: ``delta.refusal`` pieces
        self._calls: dict[int, list[Any]] = {}  # index -> [id, name, argument fragments]
        self._reasoning = profile.reasoning_fields

    def feed(self, event: str, data: bytes) -> tuple[TextDelta | ReasoningDelta, ...]:
        """The deltas one event adds, reasoning before text.

        Raises:
            BackendError: ``BACKEND_ERROR``, retryable: an ``error`` event or an ``error``
                key in a chunk (a failure after HTTP 200), or a chunk that is not JSON.
        """
        if event == "error":
            raise BackendError(f"stream failed: {_error_text(_maybe_json(data))}", retryable=True)
        if data == _DONE or data.strip() == _DONE:
            self.done = True
            return ()
        try:
            chunk = typed(_CHUNK, data)
        except ValueError:
            raise BackendError("backend sent a stream event that is not JSON", retryable=True) from None
        self.chunks += 1
        if chunk is None:
            return ()
        x_groq = chunk.x_groq if type(chunk.x_groq) is dict else None
        if chunk.error or (x_groq and x_groq.get("error")):
            error = chunk.error or x_groq["error"]  # type: ignore[index]
            raise BackendError(f"stream failed: {_error_text(error)}", retryable=True)
        if chunk.usage is not None or x_groq:
            usage = parse_usage(chunk.usage) or parse_usage(x_groq.get("usage") if x_groq else None)
            if usage is not None:
                self.usage = usage
        if not chunk.choices:
            return ()
        thought = text = ""
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta is not None:
                for name in self._reasoning:
                    if value := getattr(delta, name):
                        thought += value
                        break
                if delta.content:
                    text += delta.content
                if delta.refusal is not None:
                    self.refusal.append(delta.refusal)
                if delta.tool_calls:
                    for fragment in delta.tool_calls:
                        self._add_fragment(fragment)
            if choice.finish_reason and isinstance(choice.finish_reason, str):
                self.finish_reason = choice.finish_reason
        if text or self._calls:
            self.produced = True
        if not thought:
            return (TextDelta(text),) if text else ()
        return (ReasoningDelta(thought), TextDelta(text)) if text else (ReasoningDelta(thought),)

    def _add_fragment(self, fragment: _ToolFragment) -> None:
        index, call_id = fragment.index, fragment.id
        if type(index) is not int:  # no index: a new call when a new id comes, else the last
            known = [i for i, c in self._calls.items() if c[0] == call_id]
            index = known[0] if known else (len(self._calls) if call_id or not self._calls else max(self._calls))
        call = self._calls.setdefault(index, [None, None, []])
        function = fragment.function or _NO_FUNCTION
        call[0] = call[0] or call_id  # id and name come with the first fragment only
        call[1] = call[1] or function.name
        if isinstance(function.arguments, str):
            call[2].append(function.arguments)
        elif isinstance(function.arguments, dict):
            call[2].append(json.dumps(function.arguments))

    def finished(self) -> Finished:
        """The stream's :class:`Finished`, once it has ended: usage (None when none came),
        the complete tool calls in index order, and ``"interrupted"`` without a finish
        reason (llama-cpp-python cut short by a newer request).

        Raises:
            BackendError: ``CONTENT_FILTERED`` when the answer is only a refusal; retryable
                for a tool call without a name.
        """
        if (error := refusal_error(self.finish_reason, "".join(self.refusal), self.produced)) is not None:
            raise error
        calls = [_tool_call(i, c[0], c[1], "".join(c[2])) for i, c in sorted(self._calls.items())]
        return Finished(finish_reason=self.finish_reason or "interrupted", usage=self.usage, tool_calls=calls)


_NO_FUNCTION = _Function()


def _maybe_json(data: bytes) -> Any:
    try:
        return json_value(data)
    except ValueError:
        return data.decode("utf-8", "replace")


def parse_completion(profile: Profile, data: Any) -> Completion:
    """A whole ``chat.completion`` answer.

    Raises:
        BackendError: retryable, when the answer carries an ``error`` or has no choice;
            ``CONTENT_FILTERED`` when it is only a refusal.
    """
    if isinstance(data, dict) and data.get("error"):
        raise BackendError(f"answer is an error: {_error_text(data['error'])}", retryable=True)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendError("answer has no choices", retryable=True)
    message = choices[0].get("message") if isinstance(choices[0].get("message"), dict) else {}
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    content = content if isinstance(content, str) else ""
    calls = []
    for i, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else {}
        calls.append(_tool_call(i, call.get("id") if isinstance(call, dict) else None, function.get("name"),
                                function.get("arguments")))
    finish = choices[0].get("finish_reason")
    refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else ""
    if (error := refusal_error(finish, refusal, bool(content or calls))) is not None:
        raise error
    finish = finish if isinstance(finish, str) and finish else ("tool_calls" if calls else "stop")
    return Completion(text=content, finish_reason=finish, usage=parse_usage(data.get("usage")), tool_calls=calls,
                      reasoning=_reasoning(profile, message))
