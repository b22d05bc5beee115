"""Configuration of one runtime or hosted-API backend (``[[backends]]`` in TOML)."""

from __future__ import annotations

import unicodedata

import msgspec

from loomnet.client import BudgetConfig

from .._redact import Redactor, url_secrets

__all__ = ["BackendConfig", "bad_character", "redact"]


def bad_character(value: str) -> str | None:
    """What is wrong with a secret or endpoint that will travel in an HTTP header or
    URL, or None: a control character (a line break, a NUL, ...), an invisible format
    character (a zero-width space pasted with the key) or a line separator. Says which
    kind, never where or what the value is."""
    for char in value:
        category = unicodedata.category(char)
        if category == "Cc":
            return "a control character (a line break, tab or similar)"
        if category in ("Cf", "Zl", "Zp"):
            return "an invisible formatting character"
    return None


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
    #: a unique name: what ``[[models]]`` ``backends`` and the operator's status call it
    #: (never a secret); none = the provider's name
    name: str | None = None
    #: requests this backend answers at once before the pools it serves prefer their
    #: next backend (a busy local runtime spills over to the hosted one); None: no limit
    capacity: int | None = None
    #: what the provider charges the operator, credits per million input / output tokens
    #: (the unit of ``[[models]]`` prices, so the ledger gives the margin); 0 = free
    provider_price_in: float = 0.0
    provider_price_out: float = 0.0
    #: the most this backend may cost per period (``amount`` micro-credits, ``period``,
    #: ``warn-at``); when spent, it leaves every pool until the period renews (``node/_spend``)
    spend_budget: BudgetConfig | None = None

    def __post_init__(self) -> None:
        # Keys read from files keep their trailing newline: strip what surrounds a value,
        # refuse what is inside it (an HTTP library would quote the key in its error).
        for field in ("api_key", "endpoint"):
            value = getattr(self, field)
            if value is not None:
                msgspec.structs.force_setattr(self, field, value.strip() or None)
                problem = bad_character(value.strip())
                if field == "api_key" and problem is None and not value.isascii():
                    problem = "a character outside ASCII (HTTP headers cannot carry it)"
                if problem is not None:
                    name = field.replace("_", "-")
                    raise ValueError(f"backend {self.label}: {name} holds {problem}; the value is not shown")
        for which in ("provider_price_in", "provider_price_out"):
            if not 0 <= getattr(self, which) <= 1_000_000:  # NaN too
                raise ValueError(f"backend {self.label}: {which.replace('_', '-')} must be from 0 to 1000000 "
                                 "credits per million tokens")  # fmt: skip
        if self.capacity is not None and not 1 <= self.capacity <= 100_000:
            raise ValueError(f"backend {self.label}: capacity must be from 1 to 100000")
        if self.timeout <= 0:
            raise ValueError(f"backend {self.label}: timeout must be positive")
        if not 0 <= self.max_retries <= 10:
            raise ValueError(f"backend {self.label}: max-retries must be between 0 and 10")

    @property
    def label(self) -> str:
        return self.name or self.provider

    def redactor(self) -> Redactor:
        """A :class:`Redactor` for this backend's secrets: the key and the endpoint's
        credentials (``user:password@``, ``?key=...``)."""
        return Redactor([self.api_key, *url_secrets(self.endpoint)])

    def __repr__(self) -> str:  # never show the key
        key = "<set>" if self.api_key else None
        endpoint = self.redactor()(self.endpoint) if self.endpoint else None
        return f"BackendConfig(provider={self.provider!r}, endpoint={endpoint!r}, api_key={key}, models={self.models!r})"


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every secret replaced in every form (see :mod:`loomnet.node._redact`)."""
    return Redactor(secrets)(text)
