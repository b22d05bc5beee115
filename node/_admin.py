"""The operator's changes at runtime: add, update, remove, enable and disable backends,
set a model's price, aliases and categories, drain. Applied at once (the next advert
shows them), persisted as an **overlay**, and written to an **audit log**.

The overlay (:class:`AdminOverlay`, JSON) lives next to the executor's TOML
(``executor.toml`` → ``executor.admin.json``), or in the executor's data folder when it
runs without one or the TOML's folder is read-only (:func:`overlay_path_for`). It holds backend tables as the operator sent them: a secret is a
``${VAR}`` reference there, expanded from the executor's environment when applied, and
an admin request carrying a literal key is refused, so no secret is ever written to
disk. At start the overlay is applied over the TOML (:func:`apply_overlay`), so the
precedence is: the admin's changes, then the TOML, then the ``LOOMNET_*`` environment
overrides (which set top-level scalars only; the admin changes backends and models).

The audit log (``<data-dir>/executor/audit.log``) gets one JSON line per action: when
(UTC, ISO-8601), who (``admin``: the bearer of the admin token), what, on what, and the
change without secrets.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio

from loomnet.protocol import ConfigError, ErrorCode

from .backends._config import BackendConfig
from .backends._registry import HOSTED_PROVIDERS, canonical_provider, make_backend
from ._config_terms import OFFER_BOUNDS, NameTaken, alias_clash, backend_name_problem, name_problem
from ._redact import query_secret_names
from ._admin_overlay import (
    AdminOverlay,
    ModelChange,
    _label,
    advertised_name,
    apply_overlay,
    find_terms,
    load_overlay,
    merge_change,
    overlay_path_for,
)
from .config import ExecutorConfig, ModelTerms, expand_secrets

__all__ = ["MAX_ADMIN_BODY", "Admin", "AdminError", "AdminOverlay", "ModelChange", "advertised_name", "apply_overlay",
           "check_model_name", "find_terms", "load_overlay", "merge_change", "overlay_path_for"]

log = logging.getLogger("loomnet.admin")

_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
_ANY_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: the most bytes an admin request body may have
MAX_ADMIN_BODY = 64 * 1024
#: backend table keys whose value is a secret: only a ``${VAR}`` reference is accepted
_SECRET_KEYS = ("api-key",)


class AdminError(Exception):
    """An admin request that cannot be applied; ``status`` is the HTTP status to answer,
    ``code`` the loomnet error code the answer carries (``"code"``), when one fits."""

    def __init__(self, message: str, status: int = 400, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def check_model_name(name: str) -> str:
    """``name`` if it can be a model's name: what an advert allows (1 to 128
    characters, ``OFFER_BOUNDS``), none a control or invisible character (it is shown in
    terminals and pages, and advertised to the network).

    Raises:
        AdminError: anything else (400).
    """
    if (problem := name_problem("a model name", name, OFFER_BOUNDS.name)) is not None:
        raise AdminError(problem)
    return name


class Admin:
    """The admin actions of one running executor (see the module doc). ``executor``
    is the ``Executor``: its catalog, config, advertiser and nursery."""

    def __init__(self, executor, *, overlay_path: Path, audit_path: Path,
                 environ: dict[str, str] | None = None) -> None:  # fmt: skip
        self.executor = executor
        self.overlay_path = overlay_path
        self.audit_path = audit_path
        self.overlay = load_overlay(overlay_path)
        self._environ = environ
        self._lock = trio.Lock()
        for model in self.overlay.models:  # a model renamed or gone from the TOML: say so, never silently
            if executor.catalog is not None and executor.catalog.lookup(model) is None:
                log.warning("admin overlay %s: model %r matches no model served now; its stored terms apply "
                            "only if a backend lists it again", overlay_path, model[:64])  # fmt: skip

    # ---------------------------------------------------------------- reading

    def backends(self) -> list[dict[str, Any]]:
        catalog = self.executor.catalog
        out = []
        for name, backend in zip(catalog.names, catalog.backends):
            models = sorted({e.offer.name for e in catalog.entries if e.pool is not None
                             for m in e.pool.members if m.name == name})  # fmt: skip
            out.append({"name": name, "kind": backend.kind, "enabled": catalog.loads[name].enabled,
                        "healthy": catalog.is_up(backend), "on_premise": backend.on_premise, "models": models})  # fmt: skip
        return out

    # ---------------------------------------------------------------- backends

    async def add_backend(self, table: dict[str, Any]) -> dict[str, Any]:
        """Add a backend (or replace the one of the same ``name``) from a ``[[backends]]``
        table; returns its entry in :meth:`backends`, with ``down`` saying why it
        starts down, if it does.

        Raises:
            AdminError: no name, a literal secret, an invalid table, a hosted backend
                on an on-premise-only executor, an unset ``${VAR}``.
        """
        async with self._lock:
            name = table.get("name")
            if (problem := backend_name_problem(name)) is not None:
                raise AdminError(f"a backend added at runtime needs a name: {problem}")
            for key in _SECRET_KEYS:
                if key in table and not (isinstance(table[key], str) and _REFERENCE.match(table[key])):
                    raise AdminError(f"{key} must be a ${{VAR}} reference to the executor's environment, never the "
                                     "secret itself (the overlay is written to disk)")  # fmt: skip
            endpoint = table.get("endpoint")
            if isinstance(endpoint, str) and "@" in endpoint.partition("://")[2].partition("/")[0]:
                raise AdminError("endpoint must not carry credentials (user:password@): give api-key as a ${VAR}")
            if isinstance(endpoint, str) and (keys := query_secret_names(endpoint, allowed=_REFERENCE)):
                raise AdminError(f"endpoint's query parameter {keys[0]!r} carries a credential: write it as a ${{VAR}} "
                                 "reference to the executor's environment, never the secret itself (the overlay and "
                                 "the audit log are written to disk)")  # fmt: skip
            allowed = set(self.executor.config.operator.admin_variables)
            for variable in _ANY_REFERENCE.findall(json.dumps(table)):
                if variable not in allowed:
                    raise AdminError(f"${{{variable}}} is not one of [operator] admin-variables: an admin may only "
                                     "hand a backend the variables the operator listed there")  # fmt: skip
            config = self._backend_config(table)
            try:  # everything that can refuse it, before the backend it replaces is touched
                backend = make_backend(config, embedded=self.executor.config.embedded)
            except (ConfigError, ValueError) as exc:
                raise AdminError(f"backend {name!r}: {getattr(exc, 'message', exc)}") from None
            catalog = self.executor.catalog
            if name in catalog.names:
                await self._remove(name, persist=False)
            self.executor.add_redaction(backend.redactor())
            why = await catalog.add_backend(backend, name, timeout=self.executor.config.list_models_timeout)
            current = self.executor.config
            known = [b for b in current.effective_backends if b.label != name]
            self._set_config(msgspec.structs.replace(current, backends=[*known, config]))
            self.overlay.backends = [t for t in self.overlay.backends if _label(t) != name] + [dict(table)]
            self.overlay.removed = [n for n in self.overlay.removed if n != name]
            self.overlay.disabled = [n for n in self.overlay.disabled if n != name]  # a new backend starts enabled
            await self._save("add backend", name, {k: v for k, v in table.items() if k not in _SECRET_KEYS})
            entry = next(b for b in self.backends() if b["name"] == name)
            return {**entry, "down": why}

    async def remove_backend(self, name: str) -> None:
        """Remove a backend: out of every pool at once; requests under way on it go on
        (it is closed once they are done, within 30 s).

        Raises:
            AdminError: no such backend (404).
        """
        async with self._lock:
            await self._remove(name, persist=True)

    async def _remove(self, name: str, *, persist: bool) -> None:
        catalog = self.executor.catalog
        if name not in catalog.names:
            raise AdminError(f"no backend named {name[:64]!r}", status=404, code=ErrorCode.ADMIN_NO_SUCH_BACKEND)
        load = catalog.loads[name]
        backend = catalog.remove_backend(name)
        self._set_config(_without_backend(self.executor.config, name))
        self.executor.close_later(backend, lambda: load.in_flight == 0)
        for model in list(self.overlay.models):  # the admin's chains lose it too, or a restart would refuse them
            chain = self.overlay.models[model].backends
            if chain is not None:
                kept = [b for b in chain if (b if isinstance(b, str) else b.backend) != name]
                self.overlay.models[model] = msgspec.structs.replace(self.overlay.models[model], backends=kept)
        if persist:
            self.overlay.backends = [t for t in self.overlay.backends if _label(t) != name]
            if name not in self.overlay.removed:
                self.overlay.removed.append(name)
            self.overlay.disabled = [n for n in self.overlay.disabled if n != name]
            await self._save("remove backend", name, {})

    async def set_enabled(self, name: str, enabled: bool) -> None:
        """Switch a backend on or off (off: in no chain; its health probe goes on).

        Raises:
            AdminError: no such backend (404).
        """
        async with self._lock:
            catalog = self.executor.catalog
            if name not in catalog.names:
                raise AdminError(f"no backend named {name[:64]!r}", status=404, code=ErrorCode.ADMIN_NO_SUCH_BACKEND)
            catalog.set_enabled(name, enabled)
            self.overlay.disabled = [n for n in self.overlay.disabled if n != name] + ([] if enabled else [name])
            await self._save("enable backend" if enabled else "disable backend", name, {})

    # ---------------------------------------------------------------- models

    async def set_model(self, name: str, change: ModelChange) -> str:
        """Set a model's price, aliases, categories or pool; the next advert shows them.
        ``name`` is the model's advertised name or an alias, whatever the TOML's
        spelling (``openai:gpt-4o-mini`` is changed by ``gpt-4o-mini``): exactly the
        ``[[models]]`` entry giving that model its terms is changed (one is made for a
        model a backend lists without terms). A switch (``backends``) keeps its prices,
        aliases and categories. Returns the model's advertised name.

        Raises:
            AdminError: a model neither served nor configured (404,
                ``ADMIN_NO_SUCH_MODEL``: nothing is changed, persisted or logged); an
                invalid value (a price out of range, an alias the advert schema
                refuses...); an alias that is already a name (409, ``NAME_TAKEN``:
                ``_config_terms.alias_clash``).
        """
        check_model_name(name)
        if change.backends is not None and not change.backends:
            raise AdminError("backends must name at least one backend (disable its backends to withdraw a model)")
        async with self._lock:
            config = self.executor.config
            models = list(config.models)
            target, i = self._resolve_model(name)
            base = msgspec.to_builtins(models[i]) if i is not None else {"name": target}
            try:
                terms = msgspec.convert(merge_change(base, msgspec.to_builtins(change)), ModelTerms)
                if i is None:
                    models.append(terms)
                else:
                    models[i] = terms
                updated = msgspec.structs.replace(config, models=models)
            except NameTaken as exc:
                raise AdminError(exc.message, status=409, code=exc.code) from None
            except ConfigError as exc:
                raise AdminError(f"model {target[:64]!r}: {exc.message}", code=exc.code) from None
            except (msgspec.ValidationError, ValueError, TypeError) as exc:
                raise AdminError(f"model {target[:64]!r}: {exc}") from None
            configured = {n.casefold() for terms in models for n in (terms.name, terms.name.partition(":")[2])}
            listed = [e.offer.name for e in self.executor.catalog.entries if e.offer.name.casefold() not in configured]
            if (clash := alias_clash(models, listed)) is not None:  # the names only a backend's listing gives, too
                raise AdminError(clash, status=409, code=ErrorCode.NAME_TAKEN)
            self._set_config(updated)
            key = next((k for k in self.overlay.models if k.casefold() == target.casefold()), target)
            merged = msgspec.to_builtins(self.overlay.models.pop(key, ModelChange()))
            merged.update({k: v for k, v in msgspec.to_builtins(change).items() if v is not None})
            self.overlay.models[target] = msgspec.convert(merged, ModelChange)
            await self._save("set model", target, msgspec.to_builtins(change))
            return target

    def _resolve_model(self, name: str) -> tuple[str, int | None]:
        """(the advertised name of the model ``name`` names, the index in the config's
        ``models`` of the entry giving it its terms, or None when it has none yet).

        Raises:
            AdminError: no model is served or configured under that name or alias (404).
        """
        config = self.executor.config
        entry = self.executor.catalog.lookup(name)
        if entry is not None:
            target = entry.offer.name
            pooled = next((k for k, m in enumerate(config.models) if m.backends and m.name == target), None)
            if pooled is not None:
                return target, pooled
            terms = config.terms_for(target, entry.backend.kind)  # the terms the catalog gave it
            return target, next((k for k, m in enumerate(config.models) if m is terms), None)
        i = find_terms(list(config.models), name)
        if i is None:  # an alias of a configured model not served now (its backend down)
            folded = name.casefold()
            i = next((k for k, m in enumerate(config.models) if folded in {a.casefold() for a in m.aliases}), None)
        if i is None:
            raise AdminError(f"no model named {name[:64]!r} is served or configured here (name it as /status "
                             "shows it, or by an alias)", status=404, code=ErrorCode.ADMIN_NO_SUCH_MODEL)  # fmt: skip
        return advertised_name(config.models[i]), i

    async def drain(self) -> None:
        """Stop taking requests (SHUTTING_DOWN) and let those in flight finish."""
        await self._audit("drain", None, {})
        self.executor.start_drain()

    # ---------------------------------------------------------------- internals

    def _backend_config(self, table: dict[str, Any]) -> BackendConfig:
        environ = self._environ if self._environ is not None else dict(os.environ)
        try:
            expanded = expand_secrets(table, f"backend {_label(table)!r}", environ)
            config = msgspec.convert(expanded, BackendConfig, strict=False)
        except ConfigError as exc:
            raise AdminError(exc.message) from None
        except (msgspec.ValidationError, ValueError, TypeError) as exc:
            raise AdminError(f"backend {_label(table)[:64]!r}: {exc}") from None
        try:
            canonical_provider(config.provider)
        except Exception as exc:  # noqa: BLE001 - an unknown provider is the request's fault
            raise AdminError(f"backend {config.label!r}: {getattr(exc, 'message', exc)}") from None
        scheme, host = _scheme_and_host(config.endpoint)
        if config.endpoint is not None and (scheme not in ("http", "https") or not host):
            raise AdminError(f"backend {config.label!r}: endpoint must be an http:// or https:// URL with a host "
                             f"(not {scheme or 'no scheme'}:)")  # fmt: skip
        if self.executor.config.on_premise_only and canonical_provider(config.provider) in HOSTED_PROVIDERS:
            raise AdminError(f"this executor is on-premise-only: backend {config.label!r} ({config.provider}) is a "
                             "hosted API")  # fmt: skip
        return config

    def _set_config(self, config: ExecutorConfig) -> None:
        try:
            config = msgspec.convert(msgspec.to_builtins(config), ExecutorConfig)  # every check of a loaded config
        except NameTaken as exc:
            raise AdminError(exc.message[:500], status=409, code=exc.code) from None
        except ConfigError as exc:
            raise AdminError(exc.message[:500]) from None
        except (msgspec.ValidationError, ValueError, TypeError) as exc:
            raise AdminError(str(exc)[:500]) from None
        self.executor.config = config
        self.executor.catalog.reconfigure(config)
        if self.executor.server is not None:
            self.executor.server.config = config

    async def _save(self, action: str, target: str | None, change: dict[str, Any]) -> None:
        data = msgspec.json.format(msgspec.json.encode(self.overlay), indent=2)

        def write() -> None:  # 0600: the admin's changes are the operator's business only
            self.overlay_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.overlay_path.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)  # a leftover one may have another mode
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            tmp.replace(self.overlay_path)

        await trio.to_thread.run_sync(write)
        await self._audit(action, target, change)

    #: where the admin request being applied came from (``_operator`` sets it)
    source: str | None = None

    async def _audit(self, action: str, target: str | None, change: dict[str, Any]) -> None:
        line = json.dumps({"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "who": "admin",
                           "from": self.source, "action": action, "target": target, "change": change},
                          default=str) + "\n"  # fmt: skip

        def append() -> None:  # 0600, as the overlay
            self.audit_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.audit_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(line)

        await trio.to_thread.run_sync(append)
        log.warning("admin: %s %s", action, target or "")


def _scheme_and_host(url: str | None) -> tuple[str, str]:
    """(``url``'s scheme, lower-case, and host), empty strings when it has none."""
    try:
        parts = urlsplit(url or "")
        return parts.scheme.lower()[:16], parts.hostname or ""
    except ValueError:
        return "", ""


def _without_backend(config: ExecutorConfig, name: str) -> ExecutorConfig:
    """``config`` less backend ``name``: out of ``backends`` and every model's pool."""
    backends = [b for b in config.backends if b.label != name]
    models = []
    for terms in config.models:
        kept = [b for b in terms.backends if (b if isinstance(b, str) else b.backend) != name]
        models.append(msgspec.structs.replace(terms, backends=kept) if kept != list(terms.backends) else terms)
    return msgspec.structs.replace(config, backends=backends, models=models)
