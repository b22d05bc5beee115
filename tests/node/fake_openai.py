"""A faithful fake of the OpenAI-compatible servers the adapter talks to, for ``serve_app``.

Each ``flavour`` speaks as its runtime does (wire facts A1-A7): OpenAI, Groq and vLLM
send a usage chunk only when ``stream_options.include_usage`` asks (OpenAI then puts
``"usage": null`` on every other chunk); OpenRouter always sends usage and keep-alive
comments (``: OPENROUTER PROCESSING``); llama-cpp-python never sends usage and sends
ping comments; llama-server adds ``timings`` and serves ``/health``, ``/props``,
``/tokenize``, ``/apply-template``; vLLM serves ``/health`` and ``/tokenize``; LM Studio
serves ``/api/v0/models``; Groq repeats the usage in ``x_groq``.

Reasoning models stream their reasoning before the content in the flavour's field
(``reasoning_content``: llama-server, vLLM, LM Studio; ``reasoning``: OpenRouter, Groq;
OpenAI's own API returns no reasoning text) and report
``completion_tokens_details.reasoning_tokens`` inside ``completion_tokens``. A refused
prompt comes back as HTTP 200 with no content: ``finish_reason: content_filter``, or a
``refusal`` text (``delta.refusal`` in streams, ``message.refusal`` whole) with
``content: null`` and ``finish_reason: stop``.

Tests change the public attributes to script a case (usage chunk shape, tool-call
fragments, failures, a mid-stream error, a dropped connection, a slow first byte,
``[DONE]`` without a finish reason, a body that goes on after ``[DONE]``) and read ``requests`` to see what the adapter sent.

Tokenizer routes count whitespace-separated words, so tests know the answer.

``stop`` works as in every flavour: the answer ends where a stop sequence first appears
(the sequence left out) with ``finish_reason: "stop"``; more than 4 sequences is a 400
(OpenAI, Groq: "Up to 4 sequences"). ``unsupported`` names request fields the model
refuses, answered as OpenAI does (HTTP 400, ``code: "unsupported_parameter"``, ``param``):
o-series and GPT-5 models refuse ``stop``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from .asgi_server import DropConnection, read_json, send_chunk, send_json, start_stream
from .fake_stop import cut_at_stop

__all__ = ["Failure", "FakeOpenAI", "Recorded", "exceed_context_error", "llamacpp_error", "openai_error",
           "openrouter_error", "vllm_error_new", "vllm_error_old"]

CREATED = 1_760_000_000
USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


# ---------------------------------------------------------------- documented error bodies


def openai_error(message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> dict:
    """OpenAI (and Ollama /v1, Groq): ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def vllm_error_old(message: str, type: str = "BadRequestError", code: int = 400) -> dict:
    """vLLM's older ErrorResponse: flat, with ``object: "error"`` and an integer code."""
    return {"object": "error", "message": message, "type": type, "param": None, "code": code}


def vllm_error_new(message: str, type: str = "BadRequestError", code: int = 400) -> dict:
    """vLLM's newer ErrorResponse: nested under ``error``, integer code."""
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def llamacpp_error(code: int, message: str, type: str) -> dict:
    """llama-server: ``{"error": {code, message, type}}``; the HTTP status equals ``code``."""
    return {"error": {"code": code, "message": message, "type": type}}


def exceed_context_error(n_prompt_tokens: int = 3000, n_ctx: int = 2048) -> dict:
    body = llamacpp_error(400, f"request ({n_prompt_tokens} tokens) exceeds the available context size "
                               f"({n_ctx} tokens), try increasing it", "exceed_context_size_error")
    body["error"] |= {"n_prompt_tokens": n_prompt_tokens, "n_ctx": n_ctx}
    return body


def openrouter_error(code: int, message: str, metadata: dict | None = None) -> dict:
    error: dict[str, Any] = {"code": code, "message": message}
    if metadata is not None:
        error["metadata"] = metadata
    return {"error": error}


# ---------------------------------------------------------------- the fake


@dataclass
class Failure:
    """One scripted error response (consumed by the next request to any route)."""

    status: int
    body: dict | str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


Flavour = Literal["openai", "groq", "openrouter", "lmstudio", "llamacpp", "llama-cpp-python", "vllm"]


@dataclass
class FakeOpenAI:
    flavour: Flavour = "openai"
    #: the content deltas of a stream; joined, the text of a whole answer
    pieces: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    #: None: no finishing chunk at all (llama-cpp-python cut short), then ``[DONE]``
    finish_reason: str | None = "stop"
    #: what usage the runtime reports; None = none, streamed or whole
    usage: dict | None = field(default_factory=lambda: dict(USAGE))
    #: "requested" (include_usage), "always", "never"; None = the flavour's
    stream_usage: Literal["requested", "always", "never"] | None = None
    #: reasoning deltas sent before the content, in ``reasoning_field`` (None = the flavour's)
    reasoning: list[str] = field(default_factory=list)
    reasoning_field: str | None = None
    #: ``completion_tokens_details.reasoning_tokens`` added to the usage; None = no details
    reasoning_tokens: int | None = None
    #: the model's refusal, sent instead of any content (pieces are then not sent)
    refusal: list[str] = field(default_factory=list)
    #: the usage chunk's ``choices``: [] ("empty"), null, missing, or usage on the final chunk
    usage_choices: Literal["empty", "null", "missing", "final"] = "empty"
    #: Groq only: usage in ``x_groq`` but not in the standard ``usage`` field
    groq_usage_only: bool = False
    #: SSE comments sent before the first chunk and between chunks; None = the flavour's
    comments: list[str] | None = None
    #: [{"id", "name", "arguments"}]; streamed as fragments of ``fragment_size`` characters
    tool_calls: list[dict] = field(default_factory=list)
    fragment_size: int = 4
    #: error responses for the next requests, in order
    failures: list[Failure] = field(default_factory=list)
    #: after this many pieces: a ``data: {"error": ...}`` event (the body in ``error_body``)
    error_event_after: int | None = None
    error_body: dict = field(default_factory=lambda: openai_error("The server had an error", "server_error"))
    #: after this many pieces: llama-server's non-standard ``error: {json}`` line
    error_line_after: int | None = None
    #: after this many pieces: abort the connection
    drop_after: int | None = None
    #: seconds before the response starts / between the headers and the first event
    first_byte_delay: float = 0.0
    body_delay: float = 0.0
    send_done: bool = True
    #: body text sent after ``[DONE]``, before the body ends (a proxy's padding, late comments)
    after_done: list[str] = field(default_factory=list)
    #: after ``[DONE]`` (and ``after_done``), keep the body open until ``release`` is set
    hold_after_done: bool = False
    release: trio.Event = field(default_factory=trio.Event)
    #: status of ``/health``: 503 while "loading" (llama-server) or with a dead engine (vLLM)
    health_status: int = 200
    #: the ``/v1/models`` list (``data``); None = the flavour's
    models: list[dict] | None = None
    lmstudio_v0: bool = True  #: LM Studio >= 0.3.6 (has ``/api/v0/models``)
    #: request fields this model refuses with HTTP 400 ``unsupported_parameter``
    unsupported: set[str] = field(default_factory=set)
    requests: list[Recorded] = field(default_factory=list)
    #: requests being answered now, and the most there ever were at once
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        if self.stream_usage is None:
            self.stream_usage = {"openrouter": "always", "llama-cpp-python": "never"}.get(self.flavour, "requested")
        if self.comments is None:
            self.comments = {"openrouter": [": OPENROUTER PROCESSING"],
                             "llama-cpp-python": [": ping - 2026-01-01 00:00:00.000000+00:00"]}.get(self.flavour, [])
        if self.models is None:
            self.models = _MODELS[self.flavour]
        if self.reasoning_field is None:
            self.reasoning_field = {"openrouter": "reasoning", "groq": "reasoning"}.get(self.flavour, "reasoning_content")
        if self.reasoning_tokens is not None and self.usage is not None:
            self.usage = {**self.usage, "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}

    @property
    def last(self) -> Recorded:
        """The last request to ``/v1/chat/completions``."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")][-1]

    def count(self, path: str) -> int:
        return sum(r.path == path for r in self.requests)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._serve(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _serve(self, scope, receive, send) -> None:
        body = await read_json(receive) if scope["method"] == "POST" else None
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        self.requests.append(Recorded(method, path, headers, body))
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure.body, str):
                await send({"type": "http.response.start", "status": failure.status,
                            "headers": [(k.encode(), v.encode()) for k, v in failure.headers.items()]})
                await send({"type": "http.response.body", "body": failure.body.encode()})
            else:
                await send_json(send, failure.status, failure.body, failure.headers)
            return
        route = self._route(method, path)
        if route is None:
            await send_json(send, 404, self._not_found(path))
        elif route == "chat" and (refused := self._refused(body)) is not None:
            await send_json(send, 400, refused)
        elif route == "chat" and body.get("stream"):
            await self._stream(send, body)
        elif route == "chat":
            await trio.sleep(self.first_byte_delay)
            await start_stream(send, "application/json")
            await trio.sleep(self.body_delay)
            await send_chunk(send, json.dumps(self._whole(body)), more=False)
        else:
            status, payload = self._answer(route, body)
            if payload is None:  # vLLM's /health: an empty body
                await send({"type": "http.response.start", "status": status, "headers": []})
                await send({"type": "http.response.body", "body": b""})
            else:
                await send_json(send, status, payload)

    def _route(self, method: str, path: str) -> str | None:
        f = self.flavour
        routes = {("POST", "/v1/chat/completions"): "chat", ("GET", "/v1/models"): "models"}
        if f in ("llamacpp", "vllm"):
            routes |= {("GET", "/health"): "health", ("POST", "/tokenize"): "tokenize"}
        if f == "llamacpp":
            routes |= {("GET", "/props"): "props", ("POST", "/apply-template"): "apply-template"}
        if f == "llama-cpp-python":
            routes |= {("POST", "/extras/tokenize/count"): "count"}
        if f == "lmstudio" and self.lmstudio_v0:
            routes |= {("GET", "/api/v0/models"): "lmstudio-models"}
        return routes.get((method, path))

    def _refused(self, body: dict) -> dict | None:
        """OpenAI's 400 for a field the model refuses or too many stop sequences, or None."""
        if refused := sorted(self.unsupported & set(body)):
            return openai_error(f"Unsupported parameter: '{refused[0]}' is not supported with this model.",
                                param=refused[0], code="unsupported_parameter")
        stop = body.get("stop")
        if isinstance(stop, list) and len(stop) > 4:
            return openai_error("Invalid 'stop': expected an array of maximum length 4", param="stop",
                                code="array_above_max_length")
        return None

    def _answer_pieces(self, body: dict) -> tuple[list[str], str | None]:
        """The content pieces, cut at a stop sequence, and the finish reason."""
        pieces, matched = cut_at_stop(self.pieces, body.get("stop"))
        return pieces, "stop" if matched is not None else self.finish_reason

    def _not_found(self, path: str) -> dict:
        if self.flavour == "llamacpp":
            return llamacpp_error(404, "File Not Found", "not_found_error")
        if self.flavour == "vllm":
            return vllm_error_new(f"{path} not found", "NotFoundError", 404)
        return openai_error(f"Unknown request URL: {path}", code="unknown_url")

    def _answer(self, route: str, body: Any) -> tuple[int, Any]:
        if route == "models":
            listing: dict[str, Any] = {"object": "list", "data": self.models}
            if self.flavour == "llamacpp":
                listing["models"] = [{"name": m["id"], "model": m["id"]} for m in self.models]
            return 200, listing
        if route == "lmstudio-models":
            return 200, {"object": "list", "data": _LMSTUDIO_V0}
        if route == "health" and self.flavour == "llamacpp":
            if self.health_status == 503:
                return 503, llamacpp_error(503, "Loading model", "unavailable_error")
            return self.health_status, {"status": "ok"}
        if route == "health":
            return self.health_status, None
        if route == "props":
            return 200, {"default_generation_settings": {"n_ctx": 4096, "params": {}}, "total_slots": 4,
                         "model_path": "/models/smollm2.gguf", "chat_template": "chatml"}
        if route == "apply-template":
            prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in body["messages"])
            return 200, {"prompt": prompt + "<|im_start|>assistant\n"}
        words = len((body.get("content") or body.get("prompt") or body.get("input") or "").split())
        if route == "count":
            return 200, {"count": words}
        if self.flavour == "vllm":
            return 200, {"count": words, "max_model_len": 32768, "tokens": list(range(words))}
        return 200, {"tokens": list(range(words))}

    def _whole(self, body: dict) -> dict:
        pieces, finish_reason = self._answer_pieces(body)
        message: dict[str, Any] = {"role": "assistant", "content": None if self.refusal else "".join(pieces) or None}
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.reasoning:
            message[self.reasoning_field] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in self.tool_calls]
        answer: dict[str, Any] = {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": CREATED, "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.usage is not None:
            answer["usage"] = self.usage
        if self.flavour == "llamacpp":
            answer["timings"] = _TIMINGS
        return answer

    async def _stream(self, send, body: dict) -> None:
        pieces, finish_reason = self._answer_pieces(body)
        asked = bool((body.get("stream_options") or {}).get("include_usage"))
        with_usage = self.usage is not None and (
            self.stream_usage == "always" or (self.stream_usage == "requested" and asked))
        nulls = self.stream_usage == "requested" and asked  # OpenAI: usage null on all other chunks
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED,
                "model": body.get("model")}

        def chunk(delta: dict, finish: str | None = None) -> dict:
            c = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return c | {"usage": None} if nulls else c

        async def event(payload: Any) -> None:
            await send_chunk(send, f"data: {json.dumps(payload)}\n\n")
            for comment in self.comments:
                await send_chunk(send, f"{comment}\n\n")

        await trio.sleep(self.first_byte_delay)
        await start_stream(send, "text/event-stream")
        await trio.sleep(self.body_delay)
        for comment in self.comments:
            await send_chunk(send, f"{comment}\n\n")
        first = {"role": "assistant"} if self.flavour == "llama-cpp-python" else {"role": "assistant", "content": ""}
        await event(chunk(first))
        for thought in self.reasoning:
            await event(chunk({"content": None, self.reasoning_field: thought}))
        for piece in self.refusal:
            await event(chunk({"content": None, "refusal": piece}))
        for i, piece in enumerate([] if self.refusal else pieces):
            if i == self.error_event_after:
                await send_chunk(send, f"data: {json.dumps(self.error_body)}\n\n")
                return await send_chunk(send, "", more=False)
            if i == self.error_line_after:
                await send_chunk(send, f"error: {json.dumps(self.error_body['error'])}\n\n")
                return await send_chunk(send, "", more=False)
            if i == self.drop_after:
                raise DropConnection(f"dropped after {i} pieces")
            await event(chunk({"content": piece}))
        for index, call in enumerate(self.tool_calls):
            head = {"index": index, "id": call["id"], "type": "function",
                    "function": {"name": call["name"], "arguments": ""}}
            await event(chunk({"tool_calls": [head]}))
            args, size = call["arguments"], self.fragment_size
            for start in range(0, len(args), size):
                fragment = {"index": index, "function": {"arguments": args[start:start + size]}}
                await event(chunk({"tool_calls": [fragment]}))
        if finish_reason is not None:
            final = chunk({}, finish_reason)
            if with_usage and self.usage_choices == "final":
                final["usage"] = self.usage
            if self.flavour == "llamacpp":
                final["timings"] = _TIMINGS
            if self.flavour == "groq":
                final["x_groq"] = {"id": "req_fake", "usage": self.usage} if with_usage else {"id": "req_fake"}
                if self.groq_usage_only:
                    final.pop("usage", None)
            await event(final)
        if with_usage and self.usage_choices != "final" and not self.groq_usage_only:
            tail: dict[str, Any] = {**base, "usage": self.usage}
            if self.usage_choices == "empty":
                tail["choices"] = []
            elif self.usage_choices == "null":
                tail["choices"] = None
            await event(tail)
        if self.send_done:
            await send_chunk(send, "data: [DONE]\n\n")
        for text in self.after_done:
            await send_chunk(send, text)
        if self.hold_after_done:
            await self.release.wait()
        await send_chunk(send, "", more=False)


_TIMINGS = {"cache_n": 0, "prompt_n": 11, "prompt_ms": 20.0, "prompt_per_token_ms": 1.8, "prompt_per_second": 550.0,
            "predicted_n": 4, "predicted_ms": 30.0, "predicted_per_token_ms": 7.5, "predicted_per_second": 133.3}

_MODELS: dict[str, list[dict]] = {
    "openai": [{"id": "gpt-4.1-mini", "object": "model", "created": CREATED, "owned_by": "system"}],
    "groq": [{"id": "llama-3.1-8b-instant", "object": "model", "created": CREATED, "owned_by": "Meta"}],
    "openrouter": [{"id": "meta-llama/llama-3.1-8b-instruct", "object": "model", "created": CREATED,
                    "owned_by": "meta-llama"}],
    "lmstudio": [{"id": "qwen2.5-7b-instruct", "object": "model", "owned_by": "organization_owner"},
                 {"id": "text-embedding-nomic-embed-text-v1.5", "object": "model", "owned_by": "organization_owner"}],
    "llamacpp": [{"id": "smollm2-135m", "object": "model", "created": CREATED, "owned_by": "llamacpp",
                  "meta": {"vocab_type": 2, "n_vocab": 49152, "n_ctx_train": 8192, "n_embd": 576,
                           "n_params": 134515008, "size": 98349056}}],
    "llama-cpp-python": [{"id": "smollm2-135m", "object": "model", "owned_by": "me", "permissions": []}],
    "vllm": [{"id": "Qwen/Qwen2.5-7B-Instruct", "object": "model", "created": CREATED, "owned_by": "vllm",
              "root": "Qwen/Qwen2.5-7B-Instruct", "parent": None, "max_model_len": 32768, "permission": []}],
}

_LMSTUDIO_V0 = [
    {"id": "qwen2.5-7b-instruct", "object": "model", "type": "llm", "publisher": "lmstudio-community",
     "arch": "qwen2", "compatibility_type": "gguf", "quantization": "Q4_K_M", "state": "loaded",
     "max_context_length": 32768},
    {"id": "qwen2-vl-2b-instruct", "object": "model", "type": "vlm", "publisher": "mlx-community", "arch": "qwen2_vl",
     "compatibility_type": "mlx", "quantization": "4bit", "state": "not-loaded", "max_context_length": 32768},
    {"id": "text-embedding-nomic-embed-text-v1.5", "object": "model", "type": "embeddings", "publisher": "nomic-ai",
     "arch": "nomic-bert", "compatibility_type": "gguf", "quantization": "Q4_0", "state": "not-loaded",
     "max_context_length": 2048},
]
