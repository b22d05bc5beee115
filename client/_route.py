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
"""

from __future__ import annotations

import random
from typing import Literal, Protocol

import msgspec

from ._offers import Offer

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

        Raises:
            InvalidRequest: an empty string or an empty ``category:`` name.
        """
        raise NotImplementedError  # implemented with the router (issue 8)


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

    def benched(self, executor: str, *, now: float) -> bool:
        """True while the circuit breaker keeps ``executor`` out of rankings."""


class Router(Protocol):
    """Ranks live offers for one request (see the module doc)."""

    def rank(
        self, route: Route, shape: RequestShape, health: Health, *, now: float, rng: random.Random
    ) -> list[Candidate]:
        """Candidates for ``route``, best first; empty when none qualifies."""
