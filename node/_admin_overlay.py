"""The admin's overlay: the operator's runtime changes over the executor's TOML, as
stored (``executor.admin.json``, see ``_admin``'s module doc) and applied at start.

Models are found by the name clients see (:func:`advertised_name`, :func:`find_terms`),
so ``gpt-4o-mini`` changes the ``[[models]]`` entry spelled ``openai:gpt-4o-mini``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

from loomnet.protocol import ConfigError

from .backends._registry import canonical_provider
from .config import ModelTerms, PoolBackend

__all__ = ["AdminOverlay", "ModelChange", "advertised_name", "apply_overlay", "find_terms", "load_overlay",
           "merge_change", "overlay_path_for"]


class ModelChange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    """What an admin sets on one model (None: left as it is)."""

    price_in: float | None = None
    price_out: float | None = None
    aliases: list[str] | None = None
    categories: list[str] | None = None
    #: which backends serve it, in order (``[[models]] backends``): switch or reorder
    backends: list[str | PoolBackend] | None = None
    strategy: str | None = None


class AdminOverlay(msgspec.Struct, kw_only=True):
    """The admin's changes over the TOML (see the module doc)."""

    version: int = 1
    #: backend tables added or updated, as sent (kebab-case keys, secrets as ``${VAR}``)
    backends: list[dict[str, Any]] = []
    #: names of the TOML's backends the admin removed
    removed: list[str] = []
    #: names of backends switched off
    disabled: list[str] = []
    #: per model name
    models: dict[str, ModelChange] = {}


def overlay_path_for(config_path: str | os.PathLike | None, home: Path) -> Path:
    """Next to the TOML (``x.toml`` → ``x.admin.json``) when one is there already or
    the TOML's folder is writable; else (no TOML, or a read-only ``/etc`` under
    systemd's ``ProtectSystem`` or a container's read-only root) ``<home>/admin.json``,
    in the executor's data folder."""
    if config_path is None:
        return home / "admin.json"
    path = Path(config_path)
    beside = path.with_name(path.stem + ".admin.json")
    if beside.exists() or os.access(path.parent, os.W_OK):
        return beside
    return home / "admin.json"


def load_overlay(path: Path) -> AdminOverlay:
    """The overlay at ``path``; an empty one when there is none.

    Raises:
        ConfigError: the file is unreadable or not an overlay (naming the file).
    """
    try:
        return msgspec.json.decode(path.read_bytes(), type=AdminOverlay)
    except FileNotFoundError:
        return AdminOverlay()
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"admin overlay {path}: {exc}") from None


def _label(table: dict[str, Any]) -> str:
    return str(table.get("name") or table.get("provider") or "")


def _is_provider(prefix: str) -> bool:
    try:
        canonical_provider(prefix)
    except ConfigError:
        return False
    return True


def advertised_name(terms: dict[str, Any] | ModelTerms) -> str:
    """The name a ``[[models]]`` entry is advertised under: its ``name``, less a
    ``provider:`` prefix when it names no pool (``openai:gpt-4o-mini`` → ``gpt-4o-mini``)."""
    name, backends = (terms.get("name"), terms.get("backends")) if isinstance(terms, dict) else (terms.name, terms.backends)
    name = str(name or "")
    prefix, sep, rest = name.partition(":")
    return rest if sep and not backends and _is_provider(prefix) else name


def find_terms(models: list[Any], name: str, *, provider: str | None = None) -> int | None:
    """The index of the ``[[models]]`` entry (dicts or :class:`ModelTerms`) that sets the
    terms of the model advertised as ``name`` (casefolded, as clients match names):
    one spelled ``name`` itself, else a ``provider:name`` one (of ``provider``, when
    given: the provider of the backend serving it); None when there is none."""
    folded = name.casefold()

    def spelled(m: Any) -> str:
        return str(m.get("name") if isinstance(m, dict) else m.name)

    exact = next((i for i, m in enumerate(models) if spelled(m).casefold() == folded), None)
    if exact is not None:
        return exact
    for i, m in enumerate(models):
        prefix = spelled(m).partition(":")[0]
        if advertised_name(m).casefold() == folded and spelled(m).casefold() != folded and (
                provider is None or (_is_provider(prefix) and canonical_provider(prefix) == canonical_provider(provider))):  # fmt: skip
            return i
    return None


def merge_change(entry: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``entry`` (a ``[[models]]`` table) with ``change``'s set keys over it. A switch to
    a pool (``backends``) of an entry spelled ``provider:model`` renames it to the
    advertised ``model``: a pool's entry is advertised under its name as written, and
    the switch must not rename what clients see. Prices, aliases, categories stay."""
    out = dict(entry)
    was = advertised_name(entry)
    out.update({k: v for k, v in change.items() if v is not None})
    if out.get("backends"):
        out["name"] = was
    return out


def apply_overlay(raw: dict[str, Any], overlay: AdminOverlay) -> dict[str, Any]:
    """The raw TOML dict with the admin's changes: removed backends gone (and out of
    every model's ``backends``), added or updated ones in (replacing one of the same
    name), model terms merged into the ``[[models]]`` entry advertised under their
    name (:func:`find_terms`: ``openai:gpt-4o-mini`` takes ``gpt-4o-mini``'s), or
    added as a new entry when none is."""
    replaced = {_label(t) for t in overlay.backends}
    gone = set(overlay.removed)
    backends = [t for t in raw.get("backends", []) if isinstance(t, dict) and _label(t) not in replaced | gone]
    backends += [dict(t) for t in overlay.backends if _label(t) not in gone]
    models = [dict(m) for m in raw.get("models", []) if isinstance(m, dict)]
    for entry in models:
        if isinstance(entry.get("backends"), list):
            entry["backends"] = [b for b in entry["backends"]
                                 if (b if isinstance(b, str) else b.get("backend")) not in gone]  # fmt: skip
    for name, change in overlay.models.items():
        i = find_terms(models, name)
        if i is None:
            models.append({"name": name})
            i = len(models) - 1
        models[i] = merge_change(models[i], msgspec.to_builtins(change))
    out = dict(raw)
    if backends or "backends" in raw or overlay.backends:
        out["backends"] = backends
    out["models"] = models
    return out
