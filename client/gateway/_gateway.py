"""The gateway's state and its one call into the client library.

One :class:`Gateway` per served port: the running :class:`~loomnet.client.LoomClient`
(one libp2p host, shared by every request), the keys with their budgets, and the
translation of a :class:`~._call.ChatCall` into ``stream_chat``. The HTTP side
(``_app``) owns requests and responses; this object owns nothing that needs closing.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager

import msgspec
import trio

from loomnet.protocol import ErrorCode, InvalidRequest, ModelOffer

from .._budget import Budget, BudgetExceeded
from .._chat_stream import ChatStream
from .._client import LoomClient
from .._route import Route
from .._shape import needed_capabilities
from ._call import ChatCall
from ._config import GatewayConfig, GatewayKey
from ._errors import GatewayError
from ._keys import KeyTable
from ._models import MAX_PAGE, ModelCatalog, ModelEntry, ModelList, page_of

__all__ = ["Gateway", "GatewayStatistics"]

log = logging.getLogger("loomnet.gateway")


class GatewayStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counters since start (``Gateway.statistics()``)."""

    #: requests answered, by outcome: ``ok`` or the error kind (``no_offer``, ...)
    requests: dict[str, int]
    #: requests whose caller hung up before the answer ended (their network request
    #: was cancelled)
    hung_up: int
    #: requests being answered now, and HTTP connections open now
    in_flight: int
    connections: int = 0


class Gateway:
    """See the module doc. ``client`` must be running (``open_client``)."""

    def __init__(self, client: LoomClient, config: GatewayConfig) -> None:
        self.client = client
        self.config = config
        self.keys = KeyTable(config.keys)
        self._budgets: dict[str, Budget] = {}
        self._started = trio.current_time()
        self._outcomes: dict[str, int] = {}
        self.hung_up = 0
        self.in_flight = 0
        #: requests in flight per key name (body reading included; ``admit``)
        self.key_in_flight: dict[str, int] = {}
        #: the HTTP server's cap on connections (``_http_server``; set by ``serve_gateway``)
        self.connections = None
        member = client.member
        self._catalog = ModelCatalog(lambda: member.table.offers(now=time.time()), lambda: member.table_changed)

    async def open_budgets(self) -> None:
        """Derive each key's budget from the ledger (its accepted receipts this period)."""
        for key in self.config.keys:
            if key.budget is not None:
                self._budgets[key.name] = await self.client.account_budget(key.name, key.budget)

    def authorize(self, headers: Mapping[str, str]) -> GatewayKey | None:
        """See :meth:`KeyTable.check`."""
        return self.keys.check(headers)

    def admit(self, key: GatewayKey | None) -> None:
        """Refuse at once, before its body is read, a request its key cannot make now:
        one over the key's ``max-requests-per-key`` (429: one key cannot hold every
        place), or one whose budget (the key's, or the gateway client's own) has nothing
        left this period (402). Counts the request as the key's until :meth:`release`.

        Raises:
            GatewayError: ``over_capacity`` or ``budget_exhausted``.
        """
        if key is None:
            return
        held = self.key_in_flight.get(key.name, 0)
        if held >= self.config.max_requests_per_key:
            raise GatewayError("over_capacity", f"this key has {held} requests in flight, its most at once",
                               code=ErrorCode.OVER_CAPACITY, retry_after=1.0)  # fmt: skip
        now = time.time()
        for budget in (self._budgets.get(key.name), self.client.budget):
            if budget is not None and budget.left(now=now) <= 0:
                raise _spent(budget, now)
        self.key_in_flight[key.name] = held + 1

    def release(self, key: GatewayKey | None) -> None:
        """The end of a request :meth:`admit` counted."""
        if key is not None:
            left = self.key_in_flight.get(key.name, 0) - 1
            if left > 0:
                self.key_in_flight[key.name] = left
            else:
                self.key_in_flight.pop(key.name, None)

    # ---------------------------------------------------------------- models

    async def models(self, *, limit: int = MAX_PAGE, after_id: str | None = None,
                     before_id: str | None = None) -> ModelList:  # fmt: skip
        """One page of the listing (``_models``)."""
        return page_of(await self._catalog.listing(), limit=limit, after_id=after_id, before_id=before_id)

    async def model(self, model_id: str) -> ModelEntry | None:
        """The listed id ``model_id`` names (``category:fast`` finds ``fast`` too)."""
        return await self._catalog.entry(model_id)

    def model_known(self, model: str) -> bool:
        """Whether ``model`` names something a live offer serves: a model or alias, a
        category one carries, or a strategy while any offer is live."""
        return next(self._named(model), None) is not None

    def named_offers(self, model: str, *, limit: int | None = None) -> list[ModelOffer]:
        """The live model offers ``model`` names (a model or alias, a category, or every
        offer for a strategy), whatever else the request needs; at most ``limit``."""
        return list(itertools.islice(self._named(model), limit))

    def _named(self, model: str) -> Iterator[ModelOffer]:
        """The offers ``model`` names, from the offer table's route indexes: a request
        for a name nothing offers costs a lookup, not a scan of the table."""
        try:
            route = Route.parse(model)
        except InvalidRequest:
            return
        table = self.client.member.table
        if route.model is not None:
            wanted = route.model.casefold()
            keys = dict.fromkeys(k for k in (wanted, wanted.partition(":")[2]) if k)  # provider:model too
            indexes = [table.name_index(k) for k in keys]
        elif route.category is not None:
            indexes = [table.category_index(route.category)]
        else:
            indexes = [table.all_index()]
        now = time.time()
        for index in indexes:
            for slot in index.slots() if index is not None else ():
                entry = table.entry_of(slot.executor)
                if entry is not None and entry.expires_at > now:
                    yield slot.model

    def settled(self) -> bool:
        """Whether the offer table has had ``offer-timeout`` to fill since start: from
        then on a model nothing offers is a 404 at once instead of after a wait."""
        return trio.current_time() - self._started >= self.client.config.offer_timeout

    # ---------------------------------------------------------------- one call

    @asynccontextmanager
    async def open(self, call: ChatCall, key: GatewayKey | None) -> AsyncIterator[ChatStream]:
        """The stream answering ``call`` for ``key``'s user (see ``stream_chat``).

        Raises:
            GatewayError: ``model_not_found`` when ``model`` names nothing live and the
                table has had time to fill; ``invalid_request`` for a ``model`` that is
                no valid route.
            LoomError: whatever ``stream_chat`` raises (``failure_of`` maps it).
        """
        if not call.model.strip():
            raise GatewayError("invalid_request", "model is empty: name a model, alias, category, 'cheapest' or "
                               "'fastest' (GET /v1/models lists them)", param="model")  # fmt: skip
        call = _without_unused_tools(call)
        named = self.named_offers(call.model, limit=_CHECKED_OFFERS)
        if not named and self.settled():
            raise GatewayError("model_not_found", f"no model, alias or category {call.model[:128]!r} is offered on "
                               "the network now (GET /v1/models lists what is)", code=ErrorCode.NO_OFFER,
                               param="model")  # fmt: skip
        _check_capabilities(call, named)
        account = key.name if key is not None else None
        budget = self._budgets.get(account) if account is not None else None
        entered = False
        try:
            async with self.client.stream_chat(
                call.messages,
                route=call.model,
                options=call.options,
                account=account,
                budget=budget,
                **call.steering.stream_chat_keywords(),
            ) as stream:
                entered = True
                yield stream
        except BudgetExceeded as exc:
            if entered:
                raise
            raise _budget_refusal(exc) from None

    def new_response_id(self, prefix: str) -> tuple[str, int]:
        """A fresh response id (``chatcmpl-<hex>``, ``msg_<hex>``) and the time, unix s."""
        return f"{prefix}{secrets.token_hex(12)}", int(time.time())

    def count(self, outcome: str) -> None:
        self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1

    def statistics(self) -> GatewayStatistics:
        return GatewayStatistics(requests=dict(self._outcomes), hung_up=self.hung_up, in_flight=self.in_flight,
                                 connections=self.connections.open if self.connections is not None else 0)  # fmt: skip


def _spent(budget: Budget, now: float) -> GatewayError:
    """A 402 for a budget with nothing left this period (the key's own says how much;
    the gateway's own does not, as ``_budget_refusal``)."""
    stats = budget.statistics(now=now)
    renews = dt.datetime.fromtimestamp(stats.period_end, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if budget.account is None:
        words = f"the gateway's budget is spent for now; it renews {renews}"
    else:
        words = (f"the budget of key {budget.account!r} is spent: {stats.spent} of this {stats.period}'s "
                 f"{stats.amount} micro-credits (with {stats.reserved} held by requests in flight); it renews {renews}")
    return GatewayError("budget_exhausted", words, code=ErrorCode.BUDGET_EXCEEDED)


def _budget_refusal(exc: BudgetExceeded) -> GatewayError:
    """A 402 for ``exc``: a key's own budget is the key holder's to know (its amount,
    spending and renewal); the gateway's own budget is the operator's, so its user
    learns only that it is spent for now and when it renews."""
    if exc.account is not None:
        return GatewayError("budget_exhausted", exc.message, code=ErrorCode.BUDGET_EXCEEDED)
    renews = dt.datetime.fromtimestamp(exc.period_end, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return GatewayError(
        "budget_exhausted",
        f"the gateway's budget cannot cover this request's worst case now; it renews {renews}",
        code=ErrorCode.BUDGET_EXCEEDED,
    )


#: what each capability a request may need is called in an error
_NEEDS = {"tools": "tools (function calling)", "json": "JSON output (response_format)", "vision": "images"}


#: how many offers the capability check looks at: past it (a strategy over a huge
#: table), an answer it cannot give is left to the client library
_CHECKED_OFFERS = 10_000


def _check_capabilities(call: ChatCall, named: list[ModelOffer]) -> None:
    """Refuse at once, with a 400, a request that no live offer ``model`` names can
    serve for want of a capability (tools, JSON output, images): the client library
    would wait ``offer-timeout`` for such an offer and then say none is live, which an
    SDK reads as a 503 and retries. Nothing named yet (the table still filling): the
    client library decides."""
    if not named:
        return
    needed = needed_capabilities(call.messages, call.options)
    if not needed or len(named) >= _CHECKED_OFFERS or any(needed <= set(o.capabilities) for o in named):
        return
    best = max(named, key=lambda o: len(needed & set(o.capabilities)))
    missing = sorted(needed - set(best.capabilities))
    served = sorted({o.name for o in named})
    raise GatewayError(
        "invalid_request",
        f"{call.model[:128]!r} ({', '.join(served[:5])}) cannot do what this request needs: "
        f"{', '.join(_NEEDS.get(m, m) for m in missing)}",
        code=ErrorCode.UNSUPPORTED_FEATURE,
        param={"tools": "tools", "json": "response_format", "vision": "messages"}.get(missing[0]),
    )


def _without_unused_tools(call: ChatCall) -> ChatCall:
    """``tool_choice: "none"`` with tools and no tool turns in the history: the model
    may not call them, so they are dropped, and a model without function calling can
    answer (agent frameworks send their tools with every request)."""
    options = call.options
    if options.tool_choice != "none" or not options.tools:
        return call
    if any(m.tool_calls or m.role == "tool" for m in call.messages):
        return call
    return msgspec.structs.replace(call, options=msgspec.structs.replace(options, tools=[], tool_choice=None))
