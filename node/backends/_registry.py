"""Provider names → adapters. The one place that knows which providers exist.

Adapters are imported lazily, so an executor that serves only Ollama never imports
llama-cpp-python, and vice versa.
"""

from __future__ import annotations

import importlib

import msgspec

from loomnet.protocol import ConfigError

from ._base import Backend
from ._config import BackendConfig

__all__ = ["HOSTED_PROVIDERS", "PROVIDERS", "canonical_provider", "make_backend"]

#: provider → (module, class)
PROVIDERS: dict[str, tuple[str, str]] = {
    "embedded": ("embedded", "EmbeddedBackend"),
    "ollama": ("ollama", "OllamaBackend"),
    "lmstudio": ("openai_compat", "OpenAICompatBackend"),
    "llamacpp": ("openai_compat", "OpenAICompatBackend"),
    "llama-cpp-python": ("openai_compat", "OpenAICompatBackend"),
    "vllm": ("openai_compat", "OpenAICompatBackend"),
    "openai": ("openai_compat", "OpenAICompatBackend"),
    "groq": ("openai_compat", "OpenAICompatBackend"),
    "openrouter": ("openai_compat", "OpenAICompatBackend"),
    "anthropic": ("anthropic", "AnthropicBackend"),
    "gemini": ("gemini", "GeminiBackend"),
}

#: providers whose models run behind a hosted API, not on this machine's runtime
HOSTED_PROVIDERS = frozenset({"openai", "groq", "openrouter", "anthropic", "gemini"})

_ALIASES = {"lm-studio": "lmstudio", "llama.cpp": "llamacpp", "llama-server": "llamacpp", "llama_cpp_python": "llama-cpp-python"}


def canonical_provider(name: str) -> str:
    """The provider's canonical name; ``ConfigError`` naming the known ones if unknown."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in PROVIDERS:
        raise ConfigError(f"unknown provider {name!r}; known providers: {', '.join(sorted(PROVIDERS))}")
    return key


def make_backend(config: BackendConfig, *, embedded=None) -> Backend:
    """Build the adapter for ``config`` (``embedded`` is the [embedded] settings)."""
    provider = canonical_provider(config.provider)
    module_name, class_name = PROVIDERS[provider]
    module = importlib.import_module(f"{__package__}.{module_name}")
    cls = getattr(module, class_name)
    if provider == "embedded":
        return cls(embedded, label=config.name)  # its own settings are [embedded]; its name is the table's
    models = [_strip_provider(m, provider) for m in config.models]
    return cls(msgspec.structs.replace(config, provider=provider, models=models))


def _strip_provider(model: str, provider: str) -> str:
    """``ollama:llama3.2`` → ``llama3.2`` for the ollama backend; other names unchanged."""
    prefix, sep, name = model.partition(":")
    if sep and prefix.strip().lower() in (provider, *[a for a, c in _ALIASES.items() if c == provider]):
        return name
    return model
