"""The gateway's state and its one call into the client library.

One :class:`Gateway` per served port: the running :class:`~loomnet.client.LoomClient`
(one libp2p host, shared by every request), the keys with their budgets, and the
translation of a :class:`~._call.ChatCall` into ``stream_chat``. The HTTP side
(``_app``) owns requests and responses; this object owns nothing that needs closing.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import msgspec
import trio

from loomnet.protocol import ErrorCode, InvalidRequest

from .._budget import Budget, BudgetExceeded
from .._chat_stream import ChatStream
from .._client import LoomClient
from .._route import Route
from ._call import ChatCall
from ._config import GatewayConfig, GatewayKey
from ._errors import GatewayError
from ._keys import KeyTable
from ._models import ModelEntry, ModelList, model_entries, model_list

__all__ = ["Gateway", "GatewayStatistics"]

log = logging.getLogger("loomnet.gateway")


class GatewayStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counters since start (``Gateway.statistics()``)."""

    #: requests answered, by outcome: ``ok`` or the error kind (``no_offer``, ...)
    requests: dict[str, int]
    #: requests whose caller hung up before the answer ended (their network request
    #: was cancelled)
    hung_up: int
    #: requests being answered now
    in_flight: int


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

    async def open_budgets(self) -> None:
        """Derive each key's budget from the ledger (its accepted receipts this period)."""
        for key in self.config.keys:
            if key.budget is not None:
                self._budgets[key.name] = await self.client.account_budget(key.name, key.budget)

    def authorize(self, headers: Mapping[str, str]) -> GatewayKey | None:
        """See :meth:`KeyTable.check`."""
        return self.keys.check(headers)

    # ---------------------------------------------------------------- models

    def models(self) -> ModelList:
        return model_list(self.client.offers())

    def model(self, model_id: str) -> ModelEntry | None:
        return model_entries(self.client.offers()).get(model_id.casefold())

    def model_known(self, model: str) -> bool:
        """Whether ``model`` names something a live offer serves: a model or alias, a
        category one carries, or a strategy while any offer is live."""
        try:
            route = Route.parse(model)
        except InvalidRequest:
            return False
        offers = self.client.offers()
        if route.model is not None:
            wanted = route.model.casefold()
            tail = wanted.partition(":")[2]  # provider:model
            return any(
                name.casefold() in (wanted, tail) for o in offers for name in (o.model.name, *o.model.aliases)
            )
        if route.category is not None:
            wanted = route.category.casefold()
            return any(c.casefold() == wanted for o in offers for c in o.model.categories)
        return bool(offers)

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
        if not self.model_known(call.model) and self.settled():
            raise GatewayError("model_not_found", f"no model, alias or category {call.model[:128]!r} is offered on "
                               "the network now (GET /v1/models lists what is)", param="model")  # fmt: skip
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
        return GatewayStatistics(requests=dict(self._outcomes), hung_up=self.hung_up, in_flight=self.in_flight)


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
