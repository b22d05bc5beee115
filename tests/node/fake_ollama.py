"""A faithful fake of Ollama's native API, to serve with ``serve_app`` (real HTTP).

No real Ollama can run here (shared/reference/embedded-model.md §6), so this fake is
built from shared/reference/backend-wire-facts.md §A2 alone:

* ``GET|HEAD /`` → 200 ``Ollama is running``; ``GET /api/version`` → ``{"version"}``.
* ``GET /api/tags`` → ``{"models": [{name, model, modified_at, size, digest, details}]}``
  with ``details.quantization_level``.
* ``POST /api/show`` ``{model}`` → ``details``, ``model_info`` (``general.architecture``,
  ``<arch>.context_length``), ``capabilities``; 404 ``{"error"}`` for a missing model.
* ``POST /api/chat`` streams NDJSON (``application/x-ndjson``, default ``stream: true``):
  a thinking model's ``done: false`` lines with ``message.thinking`` (content ``""``)
  first, then ``done: false`` lines with ``message.content``, tool calls whole
  (arguments an object) in a ``done: false`` line, then one ``done: true`` line with
  ``done_reason``, durations (ns) and ``prompt_eval_count`` / ``eval_count`` (thinking
  included in ``eval_count``; older Ollama leaves ``prompt_eval_count`` out for a cached
  prompt: ``omit_counts``). ``"stream": false`` → one object with the same fields
  (``message.thinking`` joined). Errors are ``{"error": "..."}`` with the HTTP status;
  after HTTP 200 an ``{"error"}`` line. Like Ollama, a name without a tag means
  ``:latest``, images must be base64 and tool arguments objects (Go decodes them into
  ``[]byte`` and a map).
* A chat with no messages only loads the model (routes.go): one JSON object, streamed
  or not, ``{"message": {"role": "assistant", "content": ""}, "done_reason": "load",
  "done": true}`` without counts.

* ``options.stop`` ends the answer where a stop sequence first appears (the sequence left
  out), ``done_reason: "stop"``.

Per test, set the attributes (reply, failures, cuts, delays); the fake records every
``/api/chat`` body and the last request's headers.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

import trio

from .asgi_server import DropConnection, read_json, send_chunk, send_json, start_stream
from .fake_stop import cut_at_stop

__all__ = ["BUSY", "FakeModel", "FakeOllama", "Failure"]

#: Ollama's answer when its queue (``OLLAMA_MAX_QUEUE``) is full, with HTTP 503
BUSY = "server busy, please try again.  maximum pending requests exceeded"
_CREATED_AT = "2026-08-21T10:00:00.123456789Z"
_ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class FakeModel:
    name: str  #: with its tag, as /api/tags lists it ("llama3.2:latest")
    architecture: str = "llama"
    context_length: int = 131072
    capabilities: list[str] = field(default_factory=lambda: ["completion", "tools"])
    quantization_level: str = "Q4_K_M"
    parameter_size: str = "3.2B"


@dataclass
class Failure:
    status: int
    error: str
    headers: dict[str, str] = field(default_factory=dict)


class FakeOllama:
    """An ASGI app; configure by setting attributes before (or between) requests."""

    def __init__(self, models: list[FakeModel] | None = None) -> None:
        self.models = models if models is not None else [FakeModel("llama3.2:latest")]
        self.version = "0.12.6"
        #: streamed content pieces; the whole answer is their concatenation
        self.pieces: list[str] = ["Hello", ", ", "world", "!"]
        #: Ollama's tool calls, e.g. [{"function": {"name": "f", "arguments": {"x": 1}}}]
        self.tool_calls: list[dict] = []
        #: a thinking model's reasoning, streamed before the content
        self.thinking: list[str] = []
        self.done_reason = "stop"
        self.prompt_eval_count = 26
        self.eval_count: int | None = None  # None = one per piece (thinking included)
        #: counts left out of the done line ("prompt_eval_count": an older Ollama, cached prompt)
        self.omit_counts: set[str] = set()
        #: answered, one per /api/chat request, before any normal answer
        self.failures: list[Failure] = []
        #: show failures by model name (as asked)
        self.show_failures: dict[str, Failure] = {}
        self.root_status = 200
        #: after this many stream lines: send an {"error"} line and end (HTTP 200 kept)
        self.error_after: int | None = None
        self.error_line = "an error was encountered while running the model: unexpected EOF"
        #: after this many stream lines: abort the connection
        self.drop_after: int | None = None
        #: end the stream without its done: true line
        self.omit_done = False
        #: body text sent after the done line, before the body ends
        self.after_done: list[str] = []
        #: after the done line (and ``after_done``), keep the body open until ``release`` is set
        self.hold_after_done = False
        self.release = trio.Event()
        #: seconds before the response headers / before the first NDJSON line
        self.first_byte_delay = 0.0
        self.first_line_delay = 0.0
        self.chat_requests: list[dict] = []
        self.paths: list[str] = []
        self.last_headers: dict[str, str] = {}

    @property
    def last_request(self) -> dict:
        return self.chat_requests[-1]

    def find(self, name: str) -> FakeModel | None:
        full = name if ":" in name else f"{name}:latest"
        return next((m for m in self.models if m.name == full), None)

    async def __call__(self, scope, receive, send) -> None:
        method, path = scope["method"], scope["path"]
        self.paths.append(f"{method} {path}")
        self.last_headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if path == "/" and method in ("GET", "HEAD"):
            body = b"Ollama is running"
            await send({"type": "http.response.start", "status": self.root_status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        elif path == "/api/version" and method == "GET":
            await send_json(send, 200, {"version": self.version})
        elif path == "/api/tags" and method == "GET":
            await send_json(send, 200, {"models": [self._tag(m) for m in self.models]})
        elif path == "/api/show" and method == "POST":
            await self._show(await read_json(receive), send)
        elif path == "/api/chat" and method == "POST":
            await self._chat(await read_json(receive), send)
        else:
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"404 page not found"})

    def _tag(self, m: FakeModel) -> dict:
        details = {"parent_model": "", "format": "gguf", "family": m.architecture, "families": [m.architecture],
                   "parameter_size": m.parameter_size, "quantization_level": m.quantization_level}
        return {"name": m.name, "model": m.name, "modified_at": "2026-08-01T09:00:00.000000000Z",
                "size": 2019393189, "digest": "a80c4f17acd5" + "0" * 52, "details": details}

    async def _show(self, body: dict, send) -> None:
        name = body.get("model") or body.get("name") or ""
        if (failure := self.show_failures.get(name)) is not None:
            return await send_json(send, failure.status, {"error": failure.error}, failure.headers)
        m = self.find(name)
        if m is None:
            return await send_json(send, 404, {"error": f"model '{name}' not found"})
        arch = m.architecture
        model_info = {"general.architecture": arch, "general.parameter_count": 3212749888,
                      f"{arch}.context_length": m.context_length, f"{arch}.embedding_length": 3072}
        await send_json(send, 200, {
            "modelfile": f"FROM {m.name}\n", "parameters": 'stop "<|eot_id|>"', "template": "{{ .Prompt }}",
            "details": self._tag(m)["details"], "model_info": model_info, "capabilities": m.capabilities,
            "modified_at": "2026-08-01T09:00:00.000000000Z",
        })

    def _invalid(self, body: dict) -> tuple[int, str] | None:
        """What Ollama refuses in a chat body, as (status, error)."""
        if not body.get("model"):
            return 400, "model is required"
        if self.find(body["model"]) is None:
            return 404, f'model "{body["model"]}" not found, try pulling it first'
        fmt = body.get("format")
        if fmt is not None and fmt not in ("", "json") and not isinstance(fmt, dict):
            return 400, f"invalid format: {json.dumps(fmt)}"
        if not isinstance(body.get("options", {}), dict):
            return 400, "json: cannot unmarshal options into Go struct field ChatRequest.options"
        for message in body.get("messages") or []:
            if message.get("role") not in _ROLES:
                return 400, f"invalid role: {message.get('role')!r}"
            for image in message.get("images") or []:
                try:
                    base64.b64decode(image, validate=True)
                except (binascii.Error, TypeError, ValueError):
                    return 400, "illegal base64 data at input byte 0"
            for call in message.get("tool_calls") or []:
                if not isinstance(call.get("function", {}).get("arguments"), dict):
                    return 400, "json: cannot unmarshal string into Go value of type api.ToolCallFunctionArguments"
        return None

    def _final(self, model: str, content: str, *, whole: bool, stopped: bool = False) -> dict:
        message: dict = {"role": "assistant", "content": content}
        if whole and self.thinking:
            message["thinking"] = "".join(self.thinking)
        if whole and self.tool_calls:
            message["tool_calls"] = self.tool_calls
        eval_count = len(self.pieces) + len(self.thinking) if self.eval_count is None else self.eval_count
        final = {
            "model": model, "created_at": _CREATED_AT, "message": message,
            "done_reason": "stop" if stopped else self.done_reason,
            "done": True, "total_duration": 4883583458, "load_duration": 1334875,
            "prompt_eval_count": self.prompt_eval_count, "prompt_eval_duration": 342546000,
            "eval_count": eval_count, "eval_duration": 4535599000,
        }
        return {key: value for key, value in final.items() if key not in self.omit_counts}

    async def _chat(self, body: dict, send) -> None:
        self.chat_requests.append(body)
        if self.first_byte_delay:
            await trio.sleep(self.first_byte_delay)
        if self.failures:
            failure = self.failures.pop(0)
            return await send_json(send, failure.status, {"error": failure.error}, failure.headers)
        if (refused := self._invalid(body)) is not None:
            return await send_json(send, refused[0], {"error": refused[1]})
        model = body["model"]
        if not body.get("messages"):  # Ollama only loads the model
            return await send_json(send, 200, {"model": model, "created_at": _CREATED_AT, "message": {
                "role": "assistant", "content": ""}, "done_reason": "load", "done": True})
        pieces, matched = cut_at_stop(self.pieces, (body.get("options") or {}).get("stop"))
        stopped = matched is not None
        if body.get("stream", True) is False:
            return await send_json(send, 200, self._final(model, "".join(pieces), whole=True, stopped=stopped))
        lines = [{"model": model, "created_at": _CREATED_AT,
                  "message": {"role": "assistant", "content": "", "thinking": t}, "done": False}
                 for t in self.thinking]
        lines += [{"model": model, "created_at": _CREATED_AT, "message": {"role": "assistant", "content": p},
                   "done": False} for p in pieces]
        if self.tool_calls:
            lines.append({"model": model, "created_at": _CREATED_AT,
                          "message": {"role": "assistant", "content": "", "tool_calls": self.tool_calls},
                          "done": False})
        if not self.omit_done:
            lines.append(self._final(model, "", whole=False, stopped=stopped))
        await start_stream(send, "application/x-ndjson")
        if self.first_line_delay:
            await trio.sleep(self.first_line_delay)
        for n, line in enumerate(lines):
            if n == self.error_after:
                await send_chunk(send, json.dumps({"error": self.error_line}) + "\n")
                break
            if n == self.drop_after:
                raise DropConnection("fake Ollama drops the connection mid-stream")
            await send_chunk(send, json.dumps(line) + "\n")
        else:
            for text in self.after_done:
                await send_chunk(send, text)
            if self.hold_after_done:
                await self.release.wait()
        await send_chunk(send, b"", more=False)
