"""Executor configuration: TOML, then environment overrides, then validation.

Keys are kebab-case in TOML (``advert-interval``); unknown keys are errors, so a typo
never silently falls back to a default. Any top-level scalar or list setting can be
overridden from the environment as ``LOOMNET_<NAME>`` (``LOOMNET_LISTEN``,
``LOOMNET_ADVERT_INTERVAL``, ...); lists are comma-separated. With no ``[embedded]``
section and no other backend the executor serves the embedded SmolLM2 model.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec

from loomnet.protocol import ConfigError

from .backends.embedded import EmbeddedConfig

__all__ = ["ExecutorConfig", "ModelTerms", "load_config"]


class _Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    pass


class ModelTerms(_Config):
    """How one served model is offered: aliases, categories and price."""

    #: the backend's model name this entry is about
    name: str
    aliases: list[str] = []
    #: e.g. "fast", "balanced", "quality", or your own
    categories: list[str] = []
    #: credits per million input / output tokens
    price_in: float = 0.0
    price_out: float = 0.0

    def __post_init__(self) -> None:
        if self.price_in < 0 or self.price_out < 0:
            raise ValueError(f"model {self.name!r}: prices cannot be negative")


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
    #: concurrent requests accepted; more get OVER_CAPACITY (retryable)
    capacity: int = 1
    #: seconds a signed request stays acceptable, and the clock skew tolerated
    max_request_age: float = 60.0
    max_clock_skew: float = 5.0
    #: seconds to wait for a client's request frame and for its counter-signature
    request_read_timeout: float = 10.0
    ack_timeout: float = 5.0
    #: stream chunks are flushed at least this often (seconds) while tokens flow
    chunk_interval: float = 0.05
    #: what the executor keeps of prompts, stated in the advert
    prompt_retention: str = "none"
    #: announce this executor to clients on the same machine (state file)
    announce_local: bool = True
    embedded: EmbeddedConfig = msgspec.field(default_factory=EmbeddedConfig)
    models: list[ModelTerms] = []

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        for name in ("advert_interval", "advert_ttl", "max_request_age", "request_read_timeout", "chunk_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive")
        if self.advert_ttl < self.advert_interval:
            raise ValueError("advert-ttl must be at least advert-interval, or adverts lapse between rounds")
        if not self.listen:
            raise ValueError("listen needs at least one address")

    def terms_for(self, model: str) -> ModelTerms:
        for terms in self.models:
            if terms.name == model:
                return terms
        return ModelTerms(name=model)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for field in msgspec.structs.fields(ExecutorConfig):
        value = environ.get("LOOMNET_" + field.name.upper())
        if value is None or field.name in ("embedded", "models"):
            continue
        is_list = getattr(field.type, "__origin__", None) is list
        overrides[field.encode_name] = [v.strip() for v in value.split(",") if v.strip()] if is_list else value
    return overrides


def load_config(path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None) -> ExecutorConfig:
    """Read ``path`` (TOML; None = defaults), apply ``LOOMNET_*`` overrides, validate.

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
    raw.update(_env_overrides(environ))
    try:
        return msgspec.convert(raw, ExecutorConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config {where}: {exc}") from None
