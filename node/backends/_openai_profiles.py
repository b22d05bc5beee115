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

Reasoning text comes back in ``reasoning_content`` (llama-server, vLLM before 0.10, LM
Studio) or ``reasoning`` (OpenRouter, Groq, newer vLLM and LM Studio): each profile lists
the fields its runtime uses (``reasoning_fields``), read in order, the first non-empty
one per delta (OpenRouter may repeat the text under both names). OpenAI's own API and
llama-cpp-python return none.

Generation options go by their OpenAI names (``temperature``, ``top_p``, ``seed``, ``stop``,
``presence_penalty``, ``frequency_penalty``; the max-tokens field per the table), to every
provider: all of them document these (LM Studio's list, llama-server's OpenAI route and
samplers, vLLM, Groq's SDK, llama-cpp-python's ``create_chat_completion``). ``user`` (an end
user's id: personal data, perhaps) goes only where the provider documents it (``sends_user``:
openai, wire facts A1; groq, groq-python's ``CompletionCreateParams``; openrouter, its user
tracking guide) and is left out for the on-premise runtimes, whose facts do not list it. A model that refuses an option (OpenAI o-series and GPT-5 refuse ``stop``: HTTP 400
``unsupported_parameter``) is ``UNSUPPORTED_FEATURE`` (``_http.error_for_status``); an option
is never dropped to make a request pass.

Everything below is pure: request bodies from :class:`ChatParams` and model lists
parsed (answers are parsed in ``_openai_answers``). Malformed input raises
:class:`BackendError`; the adapter redacts and labels it.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import msgspec

from loomnet.protocol import ChatMessage

from ._base import ChatParams, ModelInfo
from ._http import request_json

__all__ = ["PROFILES", "SAMPLING", "TOKENIZE", "Profile", "build_body", "parse_models", "root_of", "served_context",
           "token_count"]


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
    #: message/delta fields that carry reasoning text, in the order they are read
    reasoning_fields: tuple[str, ...] = ("reasoning_content", "reasoning")
    #: send ``user`` (the end user's id): only where the provider documents the field
    sends_user: bool = False


_HOSTED = {"on_premise": False, "needs_key": True, "health": "models", "sends_user": True}
_VISION = ("chat", "tools", "json", "vision")
PROFILES: dict[str, Profile] = {
    "openai": Profile(endpoint="https://api.openai.com/v1", max_tokens_field="max_completion_tokens",
                      capabilities=_VISION, reasoning_fields=(), **_HOSTED),
    "groq": Profile(endpoint="https://api.groq.com/openai/v1", reasoning_fields=("reasoning",), **_HOSTED),
    "openrouter": Profile(endpoint="https://openrouter.ai/api/v1", ask_stream_usage=False, capabilities=_VISION,
                          headers=(("X-OpenRouter-Title", "loomnet"),), reasoning_fields=("reasoning",), **_HOSTED),
    "lmstudio": Profile(endpoint="http://localhost:1234/v1", health="lmstudio"),
    "llamacpp": Profile(endpoint="http://127.0.0.1:8080/v1", fallback_endpoints=("http://127.0.0.1:9931/v1",),
                        health="health", tokenizer="llama-server", reasoning_fields=("reasoning_content",)),
    "llama-cpp-python": Profile(endpoint="http://localhost:8000/v1", ask_stream_usage=False, health="tcp",
                                tokenizer="llama-cpp-python", capabilities=("chat", "json"), serial=True,
                                reasoning_fields=()),
    "vllm": Profile(endpoint="http://localhost:8000/v1", health="health", tokenizer="vllm"),
}


#: generation options every provider takes under these names, sent when set
SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")

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
    body.update((name, value) for name in SAMPLING if (value := getattr(params, name)) is not None)
    if params.stop:
        body["stop"] = list(params.stop)
    if params.user is not None and profile.sends_user:
        body["user"] = params.user
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
        spec = {"name": rf.name, "schema": schema, **({"strict": True} if rf.strict else {})}
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif rf is not None and rf.type != "text":
        body["response_format"] = {"type": "json_object"}
    return body


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
