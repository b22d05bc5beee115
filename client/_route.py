"""What a caller asks the router for, and the contract between the dispatch pipeline's parts.

The client is a pipeline (``shared/DESIGN.md``): **route** (pure: offers, health and
``now`` in, ranked candidates out) → **attempt** (dial, send, read the first event
under the first-byte deadline; on a retryable failure, the next candidate) → **stream**
(typed events) → **settle** (verify, book, counter-sign). Budgets reserve before the
attempt and settle after. This module holds the data that crosses those seams and the
two interfaces the attempt loop depends on:

* :class:`Router`: ``rank(route, shape, health, now)`` → candidates, best first.
  Pure: no I/O, no clock of its own, randomness only through the ``random.Random`` it
  is given (power of two choices), so every decision is reproducible in a test.
* :class:`Health`: what the attempt loop tells the router's health table (a request
  started, its first token came, it finished, it failed) and asks of it (is this
  executor benched). Per executor and model: peak-EWMA of time to first token (TTFT)
  and of output tokens/s, in-flight count, consecutive failures, benched-until (the
  circuit breaker: open after repeated failures, a single probe once the bench time
  passes, closed again by a success).

Route strings (``Route.parse``): ``"cheapest"``, ``"fastest"``, ``"category:<name>"``,
a built-in category name (:data:`CATEGORIES`), or else a model name or alias
(``"provider:model"`` is accepted: the part after the first ``:`` is tried when the
whole string names no model, because adverts never say which provider serves a model).
An explicit model fails closed: it is never served by another model.

Implementations: ``_router.OfferRouter`` (over an ``OfferTable``) and
``_health.ExecutorHealth``; how they rank is in ``docs/routing.md``. Added with the
router (issue 8), without renaming anything: ``Router.rank`` takes ``wall`` (the
wall clock adverts expire by) and ``limit``; ``Health.benched`` takes ``model``; and
``Health`` has ``cancelled``, ``tracks``, ``tracked`` and ``estimate``, which the
router reads.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec

from loomnet.protocol import InvalidRequest

from ._offers import Offer

if TYPE_CHECKING:
    from ._health import Estimate

__all__ = ["CATEGORIES", "Candidate", "Health", "RequestShape", "Route", "Router", "Strategy"]

#: category names a route string means without the ``category:`` prefix
CATEGORIES = frozenset({"fast", "balanced", "quality"})

#: how candidates are ordered: ``best`` (the default for a model or category: cheapest
#: expected cost, then measured speed, then load), ``cheapest``, ``fastest``
Strategy = Literal["best", "cheapest", "fastest"]


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """What a request may be served by. Empty filters accept everything.

    ``model`` and ``category`` are exclusive; with neither, any model is eligible (the
    ``cheapest``/``fastest`` strategies choose among models). Prices are micro-credits
    per million tokens.
    """

    #: a model name or alias (case-insensitive), or ``provider:model``; never falls back
    model: str | None = None
    #: a category tag an offer must carry (``fast``, ``balanced``, ``quality``, custom)
    category: str | None = None
    strategy: Strategy = "best"
    max_price_in: int | None = None
    max_price_out: int | None = None
    #: capabilities every candidate must have (``tools``, ``vision``, ``json``)
    capabilities: frozenset[str] = frozenset()
    #: the smallest context length a candidate must have, tokens (prompt + max tokens);
    #: None = not checked (an offer advertising 0 = unknown always passes)
    min_context: int | None = None
    #: only executors whose advert says every model runs on premise
    on_premise_only: bool = False
    #: only executors whose advert says they keep no prompts (``prompt_retention == "none"``)
    no_retention_only: bool = False
    #: executor peer ids: when any, only these may serve
    pinned: frozenset[str] = frozenset()
    #: executor peer ids that may not serve
    excluded: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str | None, **filters: object) -> "Route":
        """The route a string names (see the module doc), with ``filters`` as fields.

        ``text``: ``None`` (any model, strategy ``best``), ``"cheapest"``,
        ``"fastest"``, ``"category:<name>"``, a built-in category name, else a model
        name or alias; keywords and built-in category names are matched
        case-insensitively, surrounding blanks ignored. ``filters`` are Route fields
        (``strategy=``, ``max_price_in=``, ``capabilities=``, ``pinned=``, ...):
        collections may be any iterable of strings; capabilities are casefolded.

        Raises:
            InvalidRequest: an empty string or an empty ``category:`` name; a model and
                a category both; a strategy that contradicts the text; a filter of the
                wrong type or a negative number (``field`` names it).
            TypeError: a filter that is no Route field.
        """
        unknown = sorted(set(filters) - set(cls.__struct_fields__))
        if unknown:
            raise TypeError(f"unknown route filter(s): {', '.join(unknown)}; known: {', '.join(cls.__struct_fields__)}")
        fields: dict[str, object] = {k: _check_filter(k, v) for k, v in filters.items()}
        if text is not None:
            if not isinstance(text, str):
                raise InvalidRequest(f"a route is a string, not {type(text).__name__}", field="route")
            word = text.strip()
            lowered = word.casefold()
            named: dict[str, object]
            if not word:
                raise InvalidRequest("an empty route names nothing: use a model, a category, 'cheapest' or 'fastest'", field="route")
            if lowered in ("cheapest", "fastest"):
                named = {"strategy": lowered}
            elif lowered.startswith("category:"):
                name = word[len("category:") :].strip()
                if not name:
                    raise InvalidRequest("'category:' needs a category name, as in 'category:coding'", field="route")
                named = {"category": name}
            elif lowered in CATEGORIES:
                named = {"category": lowered}
            else:
                named = {"model": word}
            for k, v in named.items():
                if k in fields and fields[k] != v:
                    raise InvalidRequest(f"route {text!r} sets {k} to {v!r} but the filters say {fields[k]!r}", field=k)
                fields[k] = v
        if fields.get("model") is not None and fields.get("category") is not None:
            raise InvalidRequest("a route names a model or a category, not both", field="category")
        return cls(**fields)  # type: ignore[arg-type]


_SETS = {"capabilities", "pinned", "excluded"}
_COUNTS = {"max_price_in", "max_price_out", "min_context"}
_FLAGS = {"on_premise_only", "no_retention_only"}


def _check_filter(name: str, value: object) -> object:
    """``value`` as the Route field ``name`` holds it. Raises InvalidRequest."""
    if name in _SETS:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise InvalidRequest(f"{name} is a collection of strings, not {type(value).__name__}", field=name)
        items = list(value)  # type: ignore[call-overload]
        if not all(isinstance(v, str) and v for v in items):
            raise InvalidRequest(f"{name} holds non-empty strings only", field=name)
        return frozenset(v.casefold() for v in items) if name == "capabilities" else frozenset(items)
    if name in _COUNTS:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequest(f"{name} is a whole number ≥ 0 or None, not {value!r}", field=name)
        return value
    if name in _FLAGS:
        if not isinstance(value, bool):
            raise InvalidRequest(f"{name} is True or False, not {value!r}", field=name)
        return value
    if name == "strategy":
        if value not in ("best", "cheapest", "fastest"):
            raise InvalidRequest(f"strategy is 'best', 'cheapest' or 'fastest', not {value!r}", field=name)
        return value
    if value is not None and (not isinstance(value, str) or not value.strip()):  # model, category
        raise InvalidRequest(f"{name} is a non-empty string or None, not {value!r}", field=name)
    return value.strip() if isinstance(value, str) else value


class RequestShape(msgspec.Struct, frozen=True, kw_only=True):
    """What the router needs to know of the request itself."""

    #: the prompt's tokens as the client counts them (tiktoken or estimate)
    prompt_tokens: int
    #: ``max_tokens`` as sent, or the client's assumption when the request has none
    max_tokens: int


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """One offer the router would use, and why it is where it is in the ranking."""

    offer: Offer
    #: worst-case cost of this request at this offer's prices, micro-credits (rounded up):
    #: prompt tokens × price_in + max tokens × price_out, per million
    expected_cost: int
    #: the ranking key's headline number, lower is better (cost, or expected seconds)
    score: float
    #: one line a person reads in ``loomnet route --explain``
    why: str


class Health(Protocol):
    """The health table as the attempt loop uses it. Times are trio/monotonic seconds
    passed in by the caller (``now``), never read inside."""

    def started(self, executor: str, model: str, *, now: float) -> None:
        """A request was sent: in-flight + 1."""

    def first_token(self, executor: str, model: str, *, ttft: float, now: float) -> None:
        """The first frame arrived ``ttft`` seconds after the request was sent."""

    def finished(self, executor: str, model: str, *, output_tokens: int, seconds: float, now: float) -> None:
        """The receipt arrived: in-flight − 1, tokens/s measured, failures reset, breaker closed."""

    def failed(self, executor: str, model: str, *, now: float) -> None:
        """The attempt failed (refused retryably, broke, or timed out): in-flight − 1,
        consecutive failures + 1; enough of them bench the executor."""

    def benched(self, executor: str, *, now: float, model: str | None = None) -> bool:
        """True while the circuit breaker keeps ``executor`` out of rankings (for
        ``model`` only when given; any of its models when not)."""

    # Added with the router (issue 8): what the router reads of the table.

    def cancelled(self, executor: str, model: str, *, now: float) -> None:
        """The caller gave the request up (no fault of the executor's): in-flight − 1."""

    def tracks(self, executor: str, model: str) -> bool:
        """True when the pair has a record (measured, in flight, or failed)."""

    def tracked(self, model: str | None = None) -> Iterable[tuple[str, str]]:
        """The (executor, model) pairs with a record; only ``model``'s when given."""

    def estimate(
        self, executor: str, model: str, *, now: float, prior_ttft: float, prior_tps: float
    ) -> "Estimate | None":
        """The pair's measured TTFT and tokens/s decayed toward the priors, its in-flight
        count and breaker state; None when it has no record."""


class Router(Protocol):
    """Ranks live offers for one request (see the module doc)."""

    def rank(
        self,
        route: Route,
        shape: RequestShape,
        health: Health,
        *,
        now: float,
        rng: random.Random,
        wall: float | None = None,
        limit: int | None = None,
    ) -> list[Candidate]:
        """Candidates for ``route``, best first; empty when none qualifies.

        Added with the router (issue 8): ``wall`` is wall-clock seconds (the clock
        adverts expire by; ``now`` is the health table's monotonic clock): offers
        expired by then are left out; None = not checked. ``limit``: most candidates
        returned (the attempt loop never tries more); None = the router's default."""
