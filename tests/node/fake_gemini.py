"""A faithful fake of Google's Gemini API (v1beta), an ASGI app for ``serve_app``.

Served under ``/v1beta``. It checks the ``x-goog-api-key`` header, the
``models/{model}:generateContent`` / ``:streamGenerateContent`` paths, roles
``user`` / ``model`` and non-empty parts, records every request, and answers as the
wire facts (A7) describe: with ``alt=sse`` one ``GenerateContentResponse`` per
``data:`` event and no ``[DONE]``, partial ``usageMetadata`` on every frame and the
complete one with ``finishReason`` on the last; without ``alt=sse`` a JSON array;
errors as ``{"error": {"code", "message", "status"}}``. ``usageMetadata`` is proto3 JSON:
a count that is 0 is left out. A blocked prompt is one frame with
``promptFeedback.blockReason`` and no candidates; a candidate a filter stopped
(``finishReason: SAFETY``, ...) before any text has no ``content``. Thought summaries
(what the API sends with ``thinkingConfig.includeThoughts``) are text parts with
``"thought": true`` before the answer.

Generation options: a request field or ``generationConfig`` field the API does not
know is a 400 (proto3 JSON: "Unknown name ... Cannot find field"), as are more than 5
``stopSequences``. The text ends where a stop sequence first appears (the sequence left
out), ``finishReason: STOP``. With ``penalties`` False (models without them) a
``presencePenalty`` or ``frequencyPenalty`` is a 400 "Penalty is not enabled".

Configure it per test by setting attributes; faults are opt-in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import trio

from .asgi_server import DropConnection, read_json, send_chunk, send_json, start_stream
from .fake_stop import cut_at_stop

KEY = "sk-ant-SECRET123"  # a recognisable secret: it must never show in an error
MODEL = "gemini-test-flash"
PREFIX = "/v1beta"
#: ``GenerateContentRequest`` fields, and its ``generationConfig`` fields (wire facts A7,
#: with ``presencePenalty`` / ``frequencyPenalty`` from Google's GenerationConfig reference)
REQUEST_FIELDS = frozenset({"contents", "systemInstruction", "generationConfig", "tools", "toolConfig",
                            "safetySettings", "cachedContent"})
CONFIG_FIELDS = frozenset({"temperature", "topP", "topK", "maxOutputTokens", "stopSequences", "candidateCount",
                           "responseMimeType", "responseSchema", "seed", "thinkingConfig", "presencePenalty",
                           "frequencyPenalty"})
_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
           500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: dict


@dataclass
class Failure:
    """One error response, served in order before any normal answer."""

    code: int
    message: str = "something went wrong"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeGemini:
    key: str = KEY
    url: str = ""  #: the base URL with ``/v1beta``, set by the fixture once served
    requests: list[Recorded] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: [MODEL])
    # the answer
    text: list[str] = field(default_factory=lambda: ["Hello", ", world", "!"])
    #: (name, args object) of functionCall parts on the last frame
    function_calls: list[tuple[str, dict]] = field(default_factory=list)
    #: thought summaries, parts with ``"thought": true`` before the text
    thoughts: list[str] = field(default_factory=list)
    finish_reason: str = "STOP"
    #: the prompt is blocked: one frame with promptFeedback.blockReason, no candidates
    block_reason: str | None = None
    usage: dict = field(default_factory=lambda: {
        "promptTokenCount": 11, "candidatesTokenCount": 6, "thoughtsTokenCount": 4,
        "toolUsePromptTokenCount": 2, "cachedContentTokenCount": 5, "totalTokenCount": 23})
    # stream faults
    error_frame: int | None = None  #: an error code sent as a frame after the first text
    error_message: str = "The model is overloaded."  #: its message
    drop_after_first_frame: bool = False
    omit_finish_reason: bool = False
    first_byte_delay: float = 0.0  #: seconds before the response starts
    #: the model takes presencePenalty / frequencyPenalty (Gemini 2.5 models do not)
    penalties: bool = True

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    async def __call__(self, scope, receive, send) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        body = await read_json(receive) if scope["method"] == "POST" else {}
        self.requests.append(Recorded(scope["method"], scope["path"], scope["query_string"].decode(), headers, body))
        if self.first_byte_delay:
            await trio.sleep(self.first_byte_delay)
        path = scope["path"].removeprefix(PREFIX)
        if (problem := self._check(scope["method"], path, headers, body)) is not None:
            return await _error(send, problem)
        if self.failures:
            return await _error(send, self.failures.pop(0))
        if scope["method"] == "GET":
            models = [{"name": f"models/{m}", "displayName": m, "inputTokenLimit": 1_048_576} for m in self.models]
            return await send_json(send, 200, {"models": models})
        frames = self._frames(body)
        if path.endswith(":generateContent"):
            return await send_json(send, 200, _merge(frames))
        if "alt=sse" not in scope["query_string"].decode():
            return await send_json(send, 200, frames)  # without alt=sse: one JSON array
        await start_stream(send, "text/event-stream")
        for n, frame in enumerate(frames):
            await send_chunk(send, f"data: {json.dumps(frame)}\r\n\r\n")
            if n == 0 and self.error_frame is not None:
                code = self.error_frame
                error = {"error": {"code": code, "message": self.error_message, "status": _STATUS[code]}}
                await send_chunk(send, f"data: {json.dumps(error)}\r\n\r\n", more=False)
                return
            if n == 0 and self.drop_after_first_frame:
                raise DropConnection
        await send_chunk(send, b"", more=False)

    def _check(self, method: str, path: str, headers: dict[str, str], body: dict) -> Failure | None:
        if "x-goog-api-key" not in headers:
            return Failure(403, "Method doesn't allow unregistered callers (callers without established identity).")
        if headers["x-goog-api-key"] != self.key:
            return Failure(400, "API key not valid. Please pass a valid API key.")
        if method == "GET":
            return None if path == "/models" else Failure(404, f"{path} not found")
        name, _, action = path.removeprefix("/models/").partition(":")
        if not path.startswith("/models/") or action not in ("generateContent", "streamGenerateContent"):
            return Failure(404, f"{path} not found")
        if name not in self.models:
            return Failure(404, f"models/{name} is not found for API version v1beta")
        config = body.get("generationConfig") or {}
        unknown = [f'"{k}"' for k in sorted(set(body) - REQUEST_FIELDS)]
        unknown += [f'"{k}" at \'generation_config\'' for k in sorted(set(config) - CONFIG_FIELDS)]
        if unknown:
            return Failure(400, f"Invalid JSON payload received. Unknown name {unknown[0]}: Cannot find field.")
        if len(config.get("stopSequences") or []) > 5:
            return Failure(400, "* GenerateContentRequest.generation_config.stop_sequences: at most 5 stop sequences")
        if not self.penalties and {"presencePenalty", "frequencyPenalty"} & set(config):
            return Failure(400, f"Penalty is not enabled for models/{name}")
        for content in body.get("contents") or [None]:
            if not content or content.get("role") not in ("user", "model") or not content.get("parts"):
                return Failure(400, "* GenerateContentRequest.contents: contents is not specified or malformed")
            for part in content["parts"]:
                if "functionResponse" in part and not part["functionResponse"].get("name"):
                    return Failure(400, "* function_response.name: Name cannot be empty.")
        return None

    def _frames(self, body: dict) -> list[dict]:
        if self.block_reason is not None:
            prompt = self.usage["promptTokenCount"]
            feedback = {"blockReason": self.block_reason, "safetyRatings": _RATINGS}
            usage = {"promptTokenCount": prompt, "totalTokenCount": prompt}
            return [{"promptFeedback": feedback, "usageMetadata": usage, "modelVersion": self.models[0]}]
        frames = []
        thoughts = [{"text": t, "thought": True} for t in self.thoughts]
        pieces, matched = cut_at_stop(self.text, (body.get("generationConfig") or {}).get("stopSequences"))
        pieces = pieces or [""]
        finish_reason = "STOP" if matched is not None else self.finish_reason
        for n, piece in enumerate(pieces):
            parts: list[dict] = ([{"text": piece}] if piece else [])
            if n == 0:
                parts = thoughts + parts
            candidate: dict = {"content": {"parts": parts, "role": "model"}, "index": 0}
            usage = {"promptTokenCount": self.usage["promptTokenCount"], "candidatesTokenCount": n + 1,
                     "totalTokenCount": self.usage["promptTokenCount"] + n + 1}
            if n == len(pieces) - 1:
                parts += [{"functionCall": {"name": name, "args": args}} for name, args in self.function_calls]
                if not self.omit_finish_reason:
                    candidate["finishReason"] = finish_reason
                    usage = dict(self.usage)
                if not parts and finish_reason not in ("STOP", "MAX_TOKENS"):
                    del candidate["content"]  # stopped by a filter before any text
                    candidate["safetyRatings"] = _RATINGS
            usage = {key: value for key, value in usage.items() if value != 0}  # proto3 JSON
            frames.append({"candidates": [candidate], "usageMetadata": usage, "modelVersion": self.models[0]})
        return frames


_RATINGS = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]


def _merge(frames: list[dict]) -> dict:
    """The one response ``generateContent`` gives for what the stream would send."""
    if "candidates" not in frames[-1]:  # a blocked prompt
        return frames[-1]
    parts = [p for f in frames for p in f["candidates"][0].get("content", {}).get("parts", [])]
    thoughts = "".join(p["text"] for p in parts if p.get("thought"))
    texts = "".join(p["text"] for p in parts if "text" in p and not p.get("thought"))
    merged = ([{"text": thoughts, "thought": True}] if thoughts else []) + ([{"text": texts}] if texts else [])
    merged += [p for p in parts if "text" not in p]
    candidate = dict(frames[-1]["candidates"][0])
    if "content" in candidate:
        candidate["content"] = {"parts": merged, "role": "model"}
    return dict(frames[-1], candidates=[candidate])


async def _error(send, failure: Failure) -> None:
    status = _STATUS.get(failure.code, "UNKNOWN")
    await send_json(send, failure.code, {"error": {"code": failure.code, "message": failure.message, "status": status}},
                    failure.headers)
