"""Provider profiles of the OpenAI-compatible adapter, and its sans-IO wire mapping.

One adapter (``openai_compat``) speaks to every OpenAI-compatible runtime; what differs
between them is data, one :class:`Profile` per ``provider`` (the wire facts, A1-A7):

================  ==============================  ====  ====  =====================  ======  ==================
provider          default endpoint                here  key   max-tokens field       usage   health probe
================  ==============================  ====  ====  =====================  ======  ==================
openai            https://api.openai.com/v1       no    yes   max_completion_tokens  asked   GET /models
groq              https://api.groq.com/openai/v1  no    yes   max_tokens             asked   GET /models
openrouter        https://openrouter.ai/api/v1    no    yes   max_tokens             always  GET /models
lmstudio          http://localhost:1234/v1        yes   no    max_tokens             asked   GET /api/v0/models
llamacpp          http://127.0.0.1:8080/v1        yes   no    max_tokens             asked   GET /health
                  (then :9931, probed)
llama-cpp-python  http://localhost:8000/v1        yes   no    max_tokens             never   TCP connect
vllm              http://localhost:8000/v1        yes   no    max_tokens             asked   GET /health
================  ==============================  ====  ====  =====================  ======  ==================

"here" = ``on_premise``; "usage" = in streams: "asked" = ``stream_options.include_usage`` is
sent; OpenRouter always sends usage (the option is a deprecated no-op there) and
llama-cpp-python never does (it ignores the option).

Capabilities advertised: "chat" always; openai and openrouter add tools, json, vision; groq,
lmstudio, llamacpp and vllm add tools and json (plus vision per model where LM Studio says
``type: "vlm"`` or llama-server lists an image input modality); llama-cpp-python adds json
only (its ``response_format`` works with any GGUF; tool calls need special chat handlers).

Everything below is pure: request bodies from :class:`ChatParams`, stream events folded
by :class:`StreamParser`, whole answers and model lists parsed. Malformed input raises
:class:`BackendError`; the adapter redacts and labels it.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Literal

import msgspec

from loomnet.protocol import BackendError, ChatMessage, ToolCall

from ._base import ChatParams, Completion, ModelInfo, Usage
from ._http import request_json

__all__ = ["PROFILES", "TOKENIZE", "Profile", "StreamParser", "build_body", "parse_completion", "parse_models",
           "parse_usage", "root_of", "served_context", "token_count"]


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    """The quirks of one OpenAI-compatible provider."""

    #: base URL, ``/v1`` included, used when ``config.endpoint`` is None
    endpoint: str
    #: more base URLs probed in order (``GET {root}/health``) when no endpoint is configured
    fallback_endpoints: tuple[str, ...] = ()
    on_premise: bool = True
    #: a hosted API: no ``api-key`` is a configuration error
    needs_key: bool = False
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    #: send ``stream_options.include_usage`` with streamed requests
    ask_stream_usage: bool = True
    #: "health": GET {root}/health is 200; "lmstudio": GET {root}/api/v0/models (else /models);
    #: "models": GET {endpoint}/models; "tcp": a TCP connect, never an HTTP request
    health: Literal["health", "lmstudio", "models", "tcp"] = "models"
    #: the runtime's tokenizer route, if any
    tokenizer: Literal["llama-server", "llama-cpp-python", "vllm"] | None = None
    #: what every model behind this provider can do (runtimes may add "vision" per model)
    capabilities: tuple[str, ...] = ("chat", "tools", "json")
    headers: tuple[tuple[str, str], ...] = ()
    #: one request at a time: the runtime cuts a running stream when another request arrives
    serial: bool = False


_HOSTED = {"on_premise": False, "needs_key": True, "health": "models"}
_VISION = ("chat", "tools", "json", "vision")
PROFILES: dict[str, Profile] = {
    "openai": Profile(endpoint="https://api.openai.com/v1", max_tokens_field="max_completion_tokens",
                      capabilities=_VISION, **_HOSTED),
    "groq": Profile(endpoint="https://api.groq.com/openai/v1", **_HOSTED),
    "openrouter": Profile(endpoint="https://openrouter.ai/api/v1", ask_stream_usage=False, capabilities=_VISION,
                          headers=(("X-OpenRouter-Title", "loomnet"),), **_HOSTED),
    "lmstudio": Profile(endpoint="http://localhost:1234/v1", health="lmstudio"),
    "llamacpp": Profile(endpoint="http://127.0.0.1:8080/v1", fallback_endpoints=("http://127.0.0.1:9931/v1",),
                        health="health", tokenizer="llama-server"),
    "llama-cpp-python": Profile(endpoint="http://localhost:8000/v1", ask_stream_usage=False, health="tcp",
                                tokenizer="llama-cpp-python", capabilities=("chat", "json"), serial=True),
    "vllm": Profile(endpoint="http://localhost:8000/v1", health="health", tokenizer="vllm"),
}


#: tokenizer kind -> (model, text) -> (path under the server root, request body)
TOKENIZE = {
    "llama-server": lambda model, text: ("/tokenize", {"content": text}),
    "llama-cpp-python": lambda model, text: ("/extras/tokenize/count", {"model": model, "input": text}),
    "vllm": lambda model, text: ("/tokenize", {"model": model, "prompt": text}),
}


def token_count(data: Any) -> int | None:
    """The count in a tokenizer answer: ``{"tokens": [...]}`` or ``{"count": n}``."""
    value = data.get("count", data.get("tokens")) if isinstance(data, dict) else None
    if isinstance(value, list):
        return len(value)
    return value if type(value) is int and value >= 0 else None


def served_context(props: Any) -> int:
    """llama-server's served context (``/props`` ``default_generation_settings.n_ctx``), or 0."""
    settings = props.get("default_generation_settings") if isinstance(props, dict) else None
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    return n_ctx if type(n_ctx) is int and n_ctx > 0 else 0


def root_of(endpoint: str) -> str:
    """The server root of a ``.../v1`` base URL (where /health, /tokenize, /extras live)."""
    endpoint = endpoint.rstrip("/")
    return endpoint[:-3] if endpoint.endswith("/v1") else endpoint


def _message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
        for image in m.images:
            url = f"data:{image.media_type};base64,{base64.b64encode(image.data).decode('ascii')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        out["content"] = parts
    if m.tool_calls:
        out["content"] = m.content or None
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    if m.role == "tool" and m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def build_body(profile: Profile, params: ChatParams, *, stream: bool) -> dict[str, Any]:
    """The ``/chat/completions`` request body for ``params``.

    Raises:
        BackendError: ``BAD_REQUEST`` when a tool's parameters or the JSON schema is not JSON.
    """
    body: dict[str, Any] = {"model": params.model, "messages": [_message(m) for m in params.messages],
                            "stream": stream}
    if stream and profile.ask_stream_usage:
        body["stream_options"] = {"include_usage": True}
    if params.max_tokens is not None:
        body[profile.max_tokens_field] = params.max_tokens
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.seed is not None:
        body["seed"] = params.seed
    if params.tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description,
            "parameters": request_json(t.parameters, f"parameters of tool {t.name!r}")}} for t in params.tools]
    if params.tool_choice in ("auto", "none", "required"):
        body["tool_choice"] = params.tool_choice
    elif params.tool_choice is not None:
        body["tool_choice"] = {"type": "function", "function": {"name": params.tool_choice}}
    rf = params.response_format
    if rf is not None and rf.type == "json_schema" and rf.schema is not None:
        schema = request_json(rf.schema, "the response format's schema")
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": rf.name, "schema": schema}}
    elif rf is not None and rf.type != "text":
        body["response_format"] = {"type": "json_object"}
    return body


def parse_usage(raw: Any) -> Usage | None:
    """``{"prompt_tokens", "completion_tokens", ...}`` as :class:`Usage`, or None."""
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        return None
    return Usage(input_tokens=prompt, output_tokens=completion, source="backend")


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        error = error.get("message") or error.get("error") or json.dumps(error)[:300]
    return str(error)[:500]


def _tool_call(index: int, call_id: Any, name: Any, arguments: Any) -> ToolCall:
    if not isinstance(name, str) or not name:
        raise BackendError("backend sent a tool call without a function name", retryable=True)
    if not isinstance(arguments, str):  # some runtimes send an object, OpenAI a JSON string
        arguments = json.dumps(arguments if arguments is not None else {})
    call_id = call_id if isinstance(call_id, str) and call_id else f"call_{index}"
    return ToolCall(id=call_id, name=name, arguments=arguments or "{}")


class StreamParser:
    """Folds the SSE events of one streamed chat into text, a finish reason, usage and
    tool calls. Feed every event in order; read the results once the stream has ended.

    Usage is taken from whichever chunk carries it (``choices`` empty, null, missing or
    not), and Groq's ``x_groq.usage`` when no standard one came; the last one wins.
    """

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.done = False  #: ``[DONE]`` arrived
        self.chunks = 0  #: JSON chunks seen
        self._calls: dict[int, list[Any]] = {}  # index -> [id, name, argument fragments]

    def feed(self, event: str, data: str) -> str:
        """The text one event adds ("" for none).

        Raises:
            BackendError: ``BACKEND_ERROR``, retryable: an ``error`` event or an ``error``
                key in a chunk (a failure after HTTP 200), or a chunk that is not JSON.
        """
        if event == "error":
            raise BackendError(f"stream failed: {_error_text(_maybe_json(data))}", retryable=True)
        if data.strip() == "[DONE]":
            self.done = True
            return ""
        chunk = _maybe_json(data)
        if chunk is data:
            raise BackendError("backend sent a stream event that is not JSON", retryable=True)
        self.chunks += 1
        if not isinstance(chunk, dict):
            return ""
        x_groq = chunk.get("x_groq") if isinstance(chunk.get("x_groq"), dict) else {}
        if chunk.get("error") or x_groq.get("error"):
            raise BackendError(f"stream failed: {_error_text(chunk.get('error') or x_groq['error'])}", retryable=True)
        if (usage := parse_usage(chunk.get("usage")) or parse_usage(x_groq.get("usage"))) is not None:
            self.usage = usage
        text = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            if isinstance(delta.get("content"), str):
                text.append(delta["content"])
            for fragment in delta.get("tool_calls") or ():
                if isinstance(fragment, dict):
                    self._add_fragment(fragment)
            if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
                self.finish_reason = choice["finish_reason"]
        return "".join(text)

    def _add_fragment(self, fragment: dict[str, Any]) -> None:
        index, call_id = fragment.get("index"), fragment.get("id")
        if type(index) is not int:  # no index: a new call when a new id comes, else the last
            known = [i for i, c in self._calls.items() if c[0] == call_id]
            index = known[0] if known else (len(self._calls) if call_id or not self._calls else max(self._calls))
        call = self._calls.setdefault(index, [None, None, []])
        function = fragment.get("function") if isinstance(fragment.get("function"), dict) else {}
        call[0] = call[0] or call_id  # id and name come with the first fragment only
        call[1] = call[1] or function.get("name")
        if isinstance(function.get("arguments"), str):
            call[2].append(function["arguments"])
        elif isinstance(function.get("arguments"), dict):
            call[2].append(json.dumps(function["arguments"]))

    def tool_calls(self) -> list[ToolCall]:
        """The complete tool calls, in index order."""
        return [_tool_call(i, c[0], c[1], "".join(c[2])) for i, c in sorted(self._calls.items())]


def _maybe_json(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data


def parse_completion(data: Any) -> Completion:
    """A whole ``chat.completion`` answer.

    Raises:
        BackendError: retryable, when the answer carries an ``error`` or has no choice.
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
    calls = []
    for i, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else {}
        calls.append(_tool_call(i, call.get("id") if isinstance(call, dict) else None, function.get("name"),
                                function.get("arguments")))
    finish = choices[0].get("finish_reason")
    finish = finish if isinstance(finish, str) and finish else ("tool_calls" if calls else "stop")
    return Completion(text=content if isinstance(content, str) else "", finish_reason=finish,
                      usage=parse_usage(data.get("usage")), tool_calls=calls)


def parse_models(profile: Profile, data: Any, *, n_ctx: int = 0) -> list[ModelInfo]:
    """Chat models of a ``/models`` list (OpenAI, vLLM cards, llama-server ``meta``, LM Studio
    ``/api/v0/models``). ``n_ctx`` is llama-server's served context (``/props``), when known."""
    items = data.get("data") if isinstance(data, dict) else None
    models = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or item.get("type") == "embeddings":
            continue
        meta = item.get("meta") if isinstance(item.get("meta"), dict) else {}
        lengths = (n_ctx, item.get("max_model_len"), item.get("max_context_length"), meta.get("n_ctx_train"))
        context = next((n for n in lengths if type(n) is int and n > 0), 0)
        capabilities = list(profile.capabilities)
        arch = item.get("architecture") if isinstance(item.get("architecture"), dict) else {}
        sees = item.get("type") == "vlm" or "image" in (arch.get("input_modalities") or ())
        if sees and "vision" not in capabilities:
            capabilities.append("vision")
        quant = item.get("quantization")
        models.append(ModelInfo(name=item["id"], context_length=context, capabilities=capabilities,
                                quantization=quant if isinstance(quant, str) else None))
    return models
