"""Configuration of one runtime or hosted-API backend (``[[backends]]`` in TOML)."""

from __future__ import annotations

import msgspec

__all__ = ["BackendConfig", "redact"]


class BackendConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    """One backend. Secrets may be written ``${ENV_VAR}``; they are expanded at load.

    ``api_key`` never appears in ``repr``, adverts, status, logs or errors.
    """

    #: ollama | lmstudio | llamacpp | llama-cpp-python | vllm | openai | groq |
    #: openrouter | anthropic | gemini | embedded
    provider: str
    #: base URL; None = the provider's default (e.g. http://localhost:1234/v1 for LM Studio)
    endpoint: str | None = None
    api_key: str | None = None
    #: seconds for connect, first byte and between bytes of a stream
    timeout: float = 60.0
    #: retries of a failed request before any output was streamed
    max_retries: int = 2
    #: models to serve; empty = every model the runtime lists (required for hosted APIs)
    models: list[str] = []
    #: a label to tell two backends of one provider apart in logs (never a secret)
    name: str | None = None

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"backend {self.label}: timeout must be positive")
        if not 0 <= self.max_retries <= 10:
            raise ValueError(f"backend {self.label}: max-retries must be between 0 and 10")

    @property
    def label(self) -> str:
        return self.name or self.provider

    def __repr__(self) -> str:  # never show the key
        key = "<set>" if self.api_key else None
        return f"BackendConfig(provider={self.provider!r}, endpoint={self.endpoint!r}, api_key={key}, models={self.models!r})"


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every secret replaced, for messages that may quote a request."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
