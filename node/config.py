"""Executor configuration: TOML, then environment overrides, then validation.

Keys are kebab-case in TOML (``advert-interval``); unknown keys are errors, so a typo
never silently falls back to a default. Any top-level scalar or list setting can be
overridden from the environment as ``LOOMNET_<NAME>`` (``LOOMNET_LISTEN``,
``LOOMNET_ADVERT_INTERVAL``, ...); lists are comma-separated. ``[operator]`` keys are
``LOOMNET_OPERATOR_HOST``, ``_PORT``, ``_ENABLED`` and ``_ADMIN_TOKEN``.

Backends are ``[[backends]]`` tables. Secrets are written ``${ENV_VAR}`` and expanded
at load; a variable that is not set is an error, never an empty key. Expanded values
lose surrounding whitespace (a key read from a file keeps its trailing newline); a
control character inside one is an error that names the variable, never the value.
With no
``[[backends]]`` at all, the single-backend variables operators of older tools use
(``LLM_PROVIDER``, ``LLM_ENDPOINT``, ``LLM_MODEL``, ``LLM_API_KEY``,
``LLM_TIMEOUT_SECONDS``, ``LLM_MAX_RETRIES``; for the embedded model ``LLM_MODEL_PATH``,
``LLM_CONTEXT_SIZE``, ``LLM_THREADS``, ``LLM_MAX_TOKENS``, ``LLM_TEMPERATURE``) make one;
and with none of those either, the executor serves the embedded SmolLM2 model.

A model is named either plainly (``llama3.2``: whichever backend serves it) or as
``provider:model`` (``ollama:llama3.2``) wherever the executor config names one:
in a backend's ``models`` list and in ``[[models]]`` terms.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec

from loomnet.client._p2p_yamux import WINDOW as YAMUX_WINDOW
from loomnet.protocol import MAX_FRAME_SIZE, ConfigError, LoomError

from ._config_terms import (ModelTerms, NameTaken, OperatorConfig, PoolBackend, _Config, alias_clash,
                            backend_name_problem)
from .backends._config import BackendConfig, bad_character
from .backends._registry import HOSTED_PROVIDERS, canonical_provider
from .backends.embedded import EmbeddedConfig

__all__ = ["ExecutorConfig", "ModelTerms", "OperatorConfig", "PoolBackend", "expand_secrets", "load_config"]


class ExecutorConfig(_Config):
    """Everything an executor needs; every field has a sane default."""

    #: identity, ledger and cache live here; None = ``$LOOMNET_DATA_DIR`` or
    #: ``~/.local/share/loomnet`` (the executor uses its ``executor/`` subfolder)
    data_dir: str | None = None
    #: libp2p multiaddrs to listen on
    listen: list[str] = msgspec.field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    #: full multiaddrs (with /p2p/<peer id>) of peers to join through
    bootstrap: list[str] = []
    #: seconds between periodic adverts (they are also sent on every change)
    advert_interval: float = 10.0
    #: seconds an advert stays valid after it is issued
    advert_ttl: float = 30.0
    #: generations running at once, all models together (a model's own ``capacity`` in
    #: ``[[models]]`` may lower it for that model); a request finding no free slot waits
    #: in its model's queue (docs/protocol.md, "Capacity, queue and rate limits")
    capacity: int = 1
    #: requests that may wait for a slot, per model (0: none wait; a request finding no
    #: slot is refused at once with OVER_CAPACITY); a full queue refuses with
    #: OVER_CAPACITY (retryable) and ``retry_after``, the executor's estimate
    max_queue: int = 8
    #: seconds a request may wait for a slot before it is refused with OVER_CAPACITY.
    #: A waiting request gets no frame, so keep this well under the clients' first-byte
    #: deadline (60 s by default), leaving room for the model's time to first token
    queue_timeout: float = 20.0
    #: requests one client peer may start per minute (0: no limit), and tokens it may
    #: use per minute (input + output, as its receipts bill; 0: no limit); over either,
    #: RATE_LIMITED (retryable) with ``retry_after``
    peer_requests_per_minute: int = 600
    peer_tokens_per_minute: int = 0
    #: seconds a signed request stays acceptable, and the clock skew tolerated
    max_request_age: float = 60.0
    max_clock_skew: float = 5.0
    #: seconds to wait for a client's request frame and for its counter-signature;
    #: the request's is one deadline for the whole frame, however slowly it drips
    request_read_timeout: float = 10.0
    ack_timeout: float = 5.0
    #: seconds a session stream (``/loomnet/infer/2``, many requests on one stream) may
    #: wait for its next request before the executor ends it; clients stop reusing an
    #: idle session well before this (docs/protocol.md, "Sessions")
    session_idle_timeout: float = 60.0
    #: live connections in total, and live inbound connections one peer may hold;
    #: a closed connection frees its place at once (docs/network.md)
    max_connections: int = 1000
    max_connections_per_peer: int = 8
    #: inference streams one peer may have open at once; more are refused with
    #: PEER_LIMIT (retryable)
    max_streams_per_peer: int = 8
    #: inbound streams open at once on one connection, all protocols together (gossip,
    #: advert exchange, inference); more are reset (docs/network.md)
    max_streams_per_connection: int = 64
    #: bytes of not yet complete request frames held for one peer, and for all
    #: peers together; a request that would pass either is refused with PEER_LIMIT
    max_request_bytes_per_peer: int = 4 << 20
    max_request_bytes: int = 64 << 20
    #: bytes a peer may have sent on one connection that the executor has not read
    #: yet, and the same for all connections together; past either the connection
    #: is closed (an honest peer stays within yamux's flow-control windows)
    max_unread_bytes_per_connection: int = 16 << 20
    max_unread_bytes: int = 128 << 20
    #: seconds a shutdown (SIGTERM) lets admitted requests finish before cancelling
    #: them; meanwhile new requests are refused with SHUTTING_DOWN and the advert offers
    #: nothing
    drain_timeout: float = 5.0
    #: stream chunks are flushed at least this often (seconds) while tokens flow
    chunk_interval: float = 0.05
    #: seconds without any chunk after which a progress chunk goes out while the backend
    #: is silent (thinking, reading a long prompt); well under a client's idle deadline (30 s)
    progress_interval: float = 3.0
    #: seconds a backend's tokenizer may take, in all, to count one receipt; after that
    #: (or when it fails) the executor counts with tiktoken, then estimates
    count_timeout: float = 5.0
    #: seconds between health probes of every backend (a failing one leaves the advert);
    #: also each backend's deadline for one whole probe
    health_interval: float = 15.0
    #: seconds each backend may take to list its models at start (all are asked at once;
    #: loading a large local model counts); a slower one starts down, the health probe
    #: asks it again
    list_models_timeout: float = 120.0
    #: what the executor keeps of prompts, stated in the advert
    prompt_retention: str = "none"
    #: announce this executor to clients on the same machine (state file)
    announce_local: bool = True
    #: multicast DNS on the LAN: announce this executor (peer id and addresses) to every
    #: machine of the LAN, and find and join the peers announced there, without bootstrap
    #: addresses. Off by default: mDNS is unsolicited multicast that many networks (a
    #: bank's, a data centre's) forbid or alarm on; turn it on for a LAN you own
    mdns: bool = False
    #: a backend's circuit breaker (per model pool member): this many failures of the
    #: runtime within ``breaker-window`` seconds take it out of rotation for
    #: ``breaker-cooldown`` seconds; then one request probes it (``node/_breaker``)
    breaker_failures: int = 3
    breaker_window: float = 30.0
    breaker_cooldown: float = 15.0
    #: retries one request may make in all, its adapters' retries and the failovers to
    #: the next backend of its model's pool together
    retry_budget: int = 2
    #: refuse to start with any hosted-API backend (banks, air-gapped sites)
    on_premise_only: bool = False
    #: the operator's HTTP endpoint (status, metrics, health)
    operator: OperatorConfig = msgspec.field(default_factory=OperatorConfig)
    embedded: EmbeddedConfig = msgspec.field(default_factory=EmbeddedConfig)
    #: the runtimes and hosted APIs served; none = the embedded model
    backends: list[BackendConfig] = []
    models: list[ModelTerms] = []

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        if not 0 <= self.drain_timeout <= 3600:
            raise ValueError("drain-timeout must be from 0 to 3600 seconds")
        for name in ("max_queue", "queue_timeout", "peer_requests_per_minute", "peer_tokens_per_minute"):
            if not getattr(self, name) >= 0:  # NaN too
                raise ValueError(f"{name.replace('_', '-')} cannot be negative")
        if not 1 <= self.breaker_failures <= 1000:
            raise ValueError("breaker-failures must be from 1 to 1000")
        if not 0 <= self.retry_budget <= 10:
            raise ValueError("retry-budget must be from 0 to 10")
        for name in ("breaker_window", "breaker_cooldown"):
            if not 0 < getattr(self, name) <= 86400:
                raise ValueError(f"{name.replace('_', '-')} must be from 0 (exclusive) to 86400 seconds")
        labels = [b.label for b in self.effective_backends]
        for terms in self.models:
            for ref in terms.pool:
                if labels.count(ref.backend) != 1:
                    why = "no backend has" if ref.backend not in labels else "two backends have"
                    raise ValueError(f"model {terms.name!r}: {why} the name {ref.backend!r} "
                                     f"(backends: {', '.join(labels)}); give each backend a unique name")  # fmt: skip
        if (clash := alias_clash(self.models)) is not None:
            raise NameTaken(clash)
        for terms in self.models:
            if terms.capacity is not None and terms.capacity > self.capacity:
                raise ValueError(
                    f"model {terms.name!r}: capacity {terms.capacity} is above the executor's capacity {self.capacity}"
                )
        for name in (
            "advert_interval", "advert_ttl", "max_request_age", "request_read_timeout", "session_idle_timeout",
            "chunk_interval",
            "health_interval", "progress_interval", "count_timeout", "list_models_timeout",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive")
        for name in ("max_connections", "max_connections_per_peer", "max_streams_per_peer", "max_streams_per_connection"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1")
        if self.max_request_bytes_per_peer < MAX_FRAME_SIZE + 4:
            raise ValueError(f"max-request-bytes-per-peer must hold one maximal request ({MAX_FRAME_SIZE + 4} bytes)")
        if self.max_request_bytes < self.max_request_bytes_per_peer:
            raise ValueError("max-request-bytes must be at least max-request-bytes-per-peer")
        if self.max_unread_bytes_per_connection < YAMUX_WINDOW:
            raise ValueError(f"max-unread-bytes-per-connection must be at least {YAMUX_WINDOW} (one yamux window)")
        if self.max_unread_bytes < self.max_unread_bytes_per_connection:
            raise ValueError("max-unread-bytes must be at least max-unread-bytes-per-connection")
        if self.advert_ttl < self.advert_interval:
            raise ValueError("advert-ttl must be at least advert-interval, or adverts lapse between rounds")
        if not self.listen:
            raise ValueError("listen needs at least one address")
        for backend in self.backends:
            if (problem := backend_name_problem(backend.label)) is not None:
                raise ConfigError(f"backend {backend.label[:80]!r}: {problem} (the admin routes, logs and metric "
                                  "labels name it); give it a name that is")  # fmt: skip
            provider = canonical_provider(backend.provider)
            if self.on_premise_only and provider in HOSTED_PROVIDERS:
                raise ValueError(
                    f"on-premise-only is set, but backend {backend.label!r} ({provider}) is a hosted API; "
                    "remove it or unset on-premise-only"
                )

    @property
    def effective_backends(self) -> list[BackendConfig]:
        """The configured backends, or the embedded model when there are none."""
        return list(self.backends) or [BackendConfig(provider="embedded")]

    def terms_for(self, model: str, provider: str | None = None) -> ModelTerms:
        """The operator's terms for ``model``: ``provider:model`` entries win over plain ones."""
        plain = None
        for terms in self.models:
            prefix, sep, name = terms.name.partition(":")
            if sep and provider is not None and name == model and _same_provider(prefix, provider):
                return terms
            if terms.name == model and plain is None:
                plain = terms
        return plain or ModelTerms(name=model)


def _same_provider(a: str, b: str) -> bool:
    try:
        return canonical_provider(a) == canonical_provider(b)
    except LoomError:
        return False


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: LLM_* zero-config variables → (section, key)
_LLM_BACKEND_VARS = {
    "LLM_PROVIDER": "provider",
    "LLM_ENDPOINT": "endpoint",
    "LLM_API_KEY": "api-key",
    "LLM_TIMEOUT_SECONDS": "timeout",
    "LLM_MAX_RETRIES": "max-retries",
}
_LLM_EMBEDDED_VARS = {
    "LLM_MODEL_PATH": "model-path",
    "LLM_CONTEXT_SIZE": "context-size",
    "LLM_THREADS": "threads",
    "LLM_MAX_TOKENS": "max-tokens",
    "LLM_TEMPERATURE": "temperature",
}


def _env_value(name: str, where: str, environ: Mapping[str, str]) -> str:
    """``environ[name]`` without surrounding whitespace (a key read from a file keeps its
    trailing newline).

    Raises:
        ConfigError: the value holds a control or invisible character inside; the error
            names the variable and never shows the value.
    """
    value = environ[name].strip()
    if (problem := bad_character(value)) is not None:
        raise ConfigError(f"environment variable {name} (used in {where}) holds {problem} inside its value; "
                          "the value is not shown")
    return value


def _expand_secrets(value: object, where: str, environ: Mapping[str, str]) -> object:
    """Replace ``${VAR}`` in every string under ``value``; unset variables are errors."""
    if isinstance(value, str):
        def sub(match: re.Match) -> str:
            name = match.group(1)
            if name not in environ:
                raise ConfigError(f"environment variable {name} (used in {where}) is not set")
            return _env_value(name, where, environ)

        return _ENV_REF.sub(sub, value)
    if isinstance(value, list):
        return [_expand_secrets(v, f"{where}[{i}]", environ) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand_secrets(v, f"{where}.{k}", environ) for k, v in value.items()}
    return value


def expand_secrets(value: object, where: str, environ: Mapping[str, str]) -> object:
    """Replace every ``${VAR}`` in the strings under ``value`` from ``environ``.

    Raises:
        ConfigError: a variable is not set, or holds a control character (naming it,
            never its value).
    """
    return _expand_secrets(value, where, environ)


def _llm_zero_config(raw: dict[str, object], environ: Mapping[str, str]) -> None:
    """Apply the LLM_* variables when the file configures no backend."""
    if raw.get("backends"):
        return
    embedded = {key: environ[var] for var, key in _LLM_EMBEDDED_VARS.items() if environ.get(var)}
    provider = environ.get("LLM_PROVIDER", "").strip()
    if embedded:
        section = raw.setdefault("embedded", {})
        if isinstance(section, dict):
            section.update(embedded)
    if not provider:
        if environ.get("LLM_MODEL") and isinstance(raw.get("embedded"), dict):
            raw["embedded"].setdefault("model-name", environ["LLM_MODEL"])  # type: ignore[union-attr]
        return
    canonical_provider(provider)  # an unknown provider is a start-up error, never a fallback
    backend = {key: _env_value(var, "the LLM_* backend", environ) for var, key in _LLM_BACKEND_VARS.items() if environ.get(var)}
    if environ.get("LLM_MODEL"):
        if canonical_provider(provider) == "embedded":
            raw.setdefault("embedded", {}).setdefault("model-name", environ["LLM_MODEL"])  # type: ignore[union-attr]
        else:
            backend["models"] = [environ["LLM_MODEL"]]
    raw["backends"] = [backend]


#: ``LOOMNET_OPERATOR_*`` variables → ``[operator]`` keys (a container sets these)
_OPERATOR_VARS = {"LOOMNET_OPERATOR_HOST": "host", "LOOMNET_OPERATOR_PORT": "port",
                  "LOOMNET_OPERATOR_ENABLED": "enabled", "LOOMNET_OPERATOR_ADMIN_TOKEN": "admin-token"}  # fmt: skip


def _env_overrides(environ: Mapping[str, str]) -> dict[str, object]:
    overrides: dict[str, object] = {}
    operator = {key: environ[var].strip() for var, key in _OPERATOR_VARS.items() if environ.get(var, "").strip()}
    if operator:
        overrides["operator"] = operator
    for field in msgspec.structs.fields(ExecutorConfig):
        value = environ.get("LOOMNET_" + field.name.upper())
        if value is None or field.name in ("embedded", "models", "backends", "operator"):
            continue
        is_list = getattr(field.type, "__origin__", None) is list
        overrides[field.encode_name] = [v.strip() for v in value.split(",") if v.strip()] if is_list else value
    return overrides


def load_config(path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None,
                overlay: object | None = None) -> ExecutorConfig:
    """Read ``path`` (TOML; None = defaults), apply ``LOOMNET_*`` overrides and the
    admin's ``overlay`` (``_admin.AdminOverlay``), validate.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key, wrong type or bad value;
            the message names the file and the key.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {where}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {where} is not valid TOML: {exc}") from None
    env = _env_overrides(environ)
    if isinstance(env.get("operator"), dict) and isinstance(raw.get("operator"), dict):
        env["operator"] = {**raw["operator"], **env["operator"]}  # the variables override the table key by key
    raw.update(env)
    if overlay is not None:  # the admin's changes at runtime, persisted (``_admin``)
        from ._admin import apply_overlay

        raw = apply_overlay(raw, overlay)  # type: ignore[arg-type]
    try:
        _llm_zero_config(raw, environ)
        if isinstance(raw.get("backends"), list):
            raw["backends"] = _expand_secrets(raw["backends"], "backends", environ)
        if isinstance(raw.get("operator"), dict):
            raw["operator"] = _expand_secrets(raw["operator"], "operator", environ)
        return msgspec.convert(raw, ExecutorConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config {where}: {exc}") from None
    except ConfigError as exc:  # its code stays (NAME_TAKEN...)
        raise type(exc)(f"config {where}: {exc.message}", code=exc.code) from None
