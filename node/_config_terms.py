"""The parts of an executor's configuration about what it offers and how it is
operated: a model's terms (``[[models]]``, with its pool of backends and its response
cache), and the operator endpoint (``[operator]``). ``config`` assembles them into
``ExecutorConfig`` and loads it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

from loomnet.client._route import CATEGORIES
from loomnet.protocol import ConfigError, ErrorCode, ModelOffer

from ._response_cache import CacheTerms
from .backends._config import bad_character

__all__ = ["BACKEND_NAME_RULE", "MAX_PRICE", "OFFER_BOUNDS", "name_problem", "ModelTerms", "NameTaken", "OperatorConfig", "PoolBackend", "Strategy",
           "alias_clash", "backend_name_problem"]  # fmt: skip


class _Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    pass


#: the highest price a model may have, credits per million tokens
MAX_PRICE = 1_000_000.0


Strategy = Literal["priority", "round_robin", "least_connections", "weighted"]

#: what a backend's name may be: one path segment of an admin URL
#: (``/admin/backends/<name>``), safe in a log line and a metric label
BACKEND_NAME_RULE = "1 to 64 characters, each one of A-Z a-z 0-9 . _ -"
_BACKEND_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def backend_name_problem(name: object) -> str | None:
    """None when ``name`` can be a backend's name (:data:`BACKEND_NAME_RULE`); else why
    not, naming the rule. The one check of a backend's name: the TOML's (at load) and
    the admin's (at runtime) alike, so every configured backend is addressable by the
    admin routes."""
    if isinstance(name, str) and _BACKEND_NAME.fullmatch(name):
        return None
    shown = repr(name[:80]) if isinstance(name, str) else type(name).__name__
    return f"backend name {shown} is not usable: a backend's name is {BACKEND_NAME_RULE}"


class PoolBackend(_Config):
    """One backend of a model's pool, when it needs more than its name (``[[models]]``
    ``backends = [{backend = "hosted", model = "gpt-4o-mini", weight = 1}]``)."""

    #: the backend's ``name`` (its provider when it has none)
    backend: str
    #: what that backend calls the model; None = the advertised name (without a
    #: ``provider:`` prefix)
    model: str | None = None
    #: its share of requests under ``strategy = "weighted"``
    weight: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.weight <= 1000:
            raise ValueError(f"backend {self.backend!r}: weight must be from 1 to 1000")


class _OfferBounds(msgspec.Struct, frozen=True):
    name: tuple[int, int]
    aliases: int
    alias: tuple[int, int]
    categories: int
    category: tuple[int, int]


def _offer_bounds() -> _OfferBounds:
    """The advert schema's own bounds on a model's name, aliases and categories
    (``protocol.ModelOffer``), read from it so the two can never disagree: terms past
    them would make every advert invalid, refused by every peer."""
    fields = {f.name: f.type for f in msgspec.inspect.type_info(ModelOffer).fields}

    def length(t) -> tuple[int, int]:
        return (max(1, t.min_length or 0), t.max_length)  # an empty name or category is no use to a client

    name, aliases, categories = fields["name"], fields["aliases"], fields["categories"]
    return _OfferBounds(name=length(name), aliases=aliases.max_length, alias=length(aliases.item_type),
                        categories=categories.max_length, category=length(categories.item_type))  # fmt: skip


#: what an advert allows (:func:`_offer_bounds`)
OFFER_BOUNDS = _offer_bounds()


def name_problem(what: str, name: object, bounds: tuple[int, int]) -> str | None:
    """None when ``name`` can be advertised as a model's name, alias or category: a
    string of ``bounds`` characters without a control, invisible formatting or line
    separator character; else why not (never the whole value)."""
    if not isinstance(name, str):
        return f"{what} must be a string"
    low, high = bounds
    if not low <= len(name) <= high:
        return f"{what} {name[:40]!r} must be {low} to {high} characters (the advert's limit)"
    if (problem := bad_character(name)) is not None:
        return f"{what} {name[:40]!r} holds {problem}"
    return None


class ModelTerms(_Config):
    """How one served model is offered: aliases, categories, price, and which backends
    serve it (a pool, ``node/_pool``)."""

    #: the model's name: the backend's model name, or with ``backends`` set, the name it
    #: is advertised under
    name: str
    aliases: list[str] = []
    #: e.g. "fast", "balanced", "quality", or your own
    categories: list[str] = []
    #: credits per million input / output tokens
    price_in: float = 0.0
    price_out: float = 0.0
    #: generations of this model that may run at once; None = the executor's ``capacity``
    capacity: int | None = None
    #: requests of this model that may wait for a slot; None = the executor's ``max-queue``
    max_queue: int | None = None
    #: the backends serving it, by ``name``, in order (a plain name, or a
    #: :class:`PoolBackend` table); empty = every backend that lists the model, in the
    #: order of ``[[backends]]``
    backends: list[str | PoolBackend] = []
    #: how a request picks among them: ``priority`` (a fallback chain, in order),
    #: ``round_robin``, ``least_connections`` or ``weighted`` (``weight`` per backend)
    strategy: Strategy = "priority"
    #: ``[models.cache]``: answer identical deterministic requests from memory
    #: (``_response_cache``); None (no table) = off
    cache: CacheTerms | None = None

    def __post_init__(self) -> None:
        self._check_names()
        for which, price in (("price-in", self.price_in), ("price-out", self.price_out)):
            # NaN fails both comparisons; the cap keeps every receipt's cost within the
            # wire's integer range (2**31 tokens at this price is ~4e15 micro-credits)
            if not 0 <= price <= MAX_PRICE:
                raise ValueError(
                    f"model {self.name!r}: {which} must be a number from 0 to {MAX_PRICE:g} credits per "
                    f"million tokens, not {price}"
                )
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"model {self.name!r}: capacity must be at least 1")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"model {self.name!r}: max-queue cannot be negative")
        names = [b if isinstance(b, str) else b.backend for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError(f"model {self.name!r}: a backend is listed twice in its backends")

    def _check_names(self) -> None:
        """The name, aliases and categories within what an advert allows (``OFFER_BOUNDS``).

        Raises:
            ValueError: one is not (a config load's ``ConfigError``, an admin's 400).
        """
        bounds = OFFER_BOUNDS
        problems = [name_problem("the name", self.name, bounds.name)]
        if len(self.aliases) > bounds.aliases:
            problems.append(f"at most {bounds.aliases} aliases (the advert's limit), not {len(self.aliases)}")
        if len(self.categories) > bounds.categories:
            problems.append(f"at most {bounds.categories} categories (the advert's limit), not {len(self.categories)}")
        problems += [name_problem("alias", a, bounds.alias) for a in self.aliases]
        problems += [name_problem("category", c, bounds.category) for c in self.categories]
        if (problem := next((p for p in problems if p is not None), None)) is not None:
            raise ValueError(f"model {self.name[:64]!r}: {problem}")

    @property
    def pool(self) -> list[PoolBackend]:
        """``backends`` as :class:`PoolBackend` entries."""
        return [PoolBackend(backend=b) if isinstance(b, str) else b for b in self.backends]


class NameTaken(ConfigError):
    """A model's alias is already a name (:func:`alias_clash`): ``NAME_TAKEN``."""

    code = ErrorCode.NAME_TAKEN


#: words a client's route reads before any model name (``client/_route``)
_ROUTE_KEYWORDS = ("cheapest", "fastest")


def _advertised(terms: ModelTerms) -> set[str]:
    """The names ``terms`` may be advertised under, casefolded: its name, and without
    a pool the model's name without its ``provider:`` prefix."""
    names = {terms.name.casefold()}
    if not terms.backends and ":" in terms.name:
        names.add(terms.name.partition(":")[2].casefold())
    return names


def alias_clash(models: Sequence[ModelTerms], offered: Iterable[str] = ()) -> str | None:
    """None when every alias in ``models`` names its own model only; else why one does
    not. An alias may not be (casefolded, as clients match names) another model's name
    (of ``models``, or ``offered``: names a backend lists without terms), another
    model's alias, a category (built-in or of any model), ``cheapest`` or ``fastest``, or
    start with ``category:``: a client asking for it would get something else."""
    taken: dict[str, tuple[int | None, str]] = {}  # word -> (the model holding it, if one; what it is)
    for word in _ROUTE_KEYWORDS:
        taken[word] = (None, f"the route keyword {word!r}")
    for word in sorted(CATEGORIES):
        taken[word] = (None, f"the built-in category {word!r}")
    for terms in models:
        for category in terms.categories:
            taken.setdefault(category.casefold(), (None, f"a category (of model {terms.name!r})"))
    for i, terms in enumerate(models):
        for name in _advertised(terms):
            taken.setdefault(name, (i, f"the name of model {terms.name!r}"))
    for name in offered:
        taken.setdefault(name.casefold(), (None, f"the name of model {name!r}"))
    for i, terms in enumerate(models):
        own = _advertised(terms)
        for alias in terms.aliases:
            word = alias.casefold()
            if word in own:
                continue  # its own name again: harmless
            if word.startswith("category:"):
                return f"model {terms.name!r}: alias {alias!r} starts with 'category:', which clients read as one"
            holder, what = taken.get(word, (i, ""))
            if holder != i:
                return (f"model {terms.name!r}: alias {alias!r} is already {what}; a client asking for it would not "
                        "reach this model")  # fmt: skip
            taken[word] = (i, f"an alias of model {terms.name!r}")
    return None


class OperatorConfig(_Config):
    """The operator's HTTP endpoint: ``/status``, ``/metrics``, ``/healthz``,
    ``/readyz`` (``node/_operator``). On by default, on this machine only."""

    enabled: bool = True
    #: 127.0.0.1: only this machine (Prometheus on another host: its address, and a firewall)
    host: str = "127.0.0.1"
    #: None: 8401, or a free port when another process holds it (the URL is printed at
    #: start and written to the local state file, where ``loomnet status`` finds it);
    #: a port given here that is taken stops the executor at start
    port: int | None = None
    #: the bearer token of the admin routes (``/admin/...``); write ``${VAR}``, never
    #: the token; none: the admin routes refuse every request
    admin_token: str | None = None
    #: the environment variables an admin may hand a backend added at runtime as
    #: ``${VAR}`` (its api-key): none by default, so the admin token is not a way to send
    #: every secret of the executor's environment to an endpoint of the admin's choosing
    admin_variables: list[str] = []

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError("operator port must be from 0 to 65535")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("operator admin-token must be at least 16 characters")

    def __repr__(self) -> str:  # never show the token
        token = "<set>" if self.admin_token else None
        return f"OperatorConfig(enabled={self.enabled}, host={self.host!r}, port={self.port}, admin_token={token})"
