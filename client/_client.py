"""The client library: ask the network for a completion, stream it, check the bill.

Typical use::

    async with open_client(ClientConfig(data_dir=...)) as client:
        result = await client.chat([ChatMessage("user", "Hi")], model="smollm2-135m")
        async with client.stream_chat(messages) as stream:
            async for text in stream:
                print(text, end="")
        print(stream.result.receipt.output_tokens)

Reasoning models stream their thinking apart from the answer: ``stream.events()``
yields typed events (``ReasoningDelta``, ``TextDelta``, ``ToolCallsDelta``, and last
``Done`` with the usage and the verified receipt) and ``result.reasoning`` holds it
all; ``async for text in stream`` yields only text.

Each request is dispatched (``docs/client.md``): **route** (the router ranks live
offers for the route: a model, a category, ``cheapest``, ``fastest``, plus filters and
what the request itself needs) → **attempt** (``_attempt``: the first candidates in
turn until one starts answering; failover before the first content, never after) →
**stream** → **settle** (the receipt checked, booked, counter-signed). An optional
budget (``_budget``) reserves each attempt's worst-case cost and settles it from the
receipt. A request made for an *account* (``stream_chat(account=, budget=)``, say a
gateway's user) books its receipt under that account and must fit the account's budget
(:meth:`LoomClient.account_budget`) as well as the client's own.

Errors raise as themselves, never wrapped in an ``ExceptionGroup``, so
``except RemoteError:`` works around ``open_client`` as around any call. A request
that breaks the protocol's limits raises ``InvalidRequest`` before any traffic.

Every request is signed by the client's key and addressed to the chosen executor.
The stream's remote peer is authenticated by libp2p's Noise handshake, so each
chunk provably comes from the executor we dialed; the signed receipt at the end
covers a digest of all the text, its token counts and its cost, which the client
recomputes before it counter-signs and books it.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import trio
from loomnet.protocol import (
    ChatMessage,
    ErrorCode,
    GenerationOptions,
    InferenceRequest,
    InvalidRequest,
    NoOfferError,
    SigningKey,
    generation_fields,
)

from ._attempt import open_first
from ._batch import BatchProgress, ChatRequest, Outcome, chat_as_completed, chat_many
from ._budget import Budget, BudgetConfig, BudgetWarning, JointBudget, period_bounds
from ._chat_stream import (
    ChatResult,
    ChatStream,
    RequestOptions,
    StreamKit,
    StreamOpener,
)
from ._client_config import ClientConfig, default_data_dir
from ._identity_file import load_or_create_identity
from ._ledger import Ledger, check_account
from ._local import local_executors
from ._member import Member
from ._offers import Offer
from ._p2p import NodeInfo, P2PConfig
from ._request_check import check_request
from ._route import Candidate, Health, RequestShape, Route, Router
from ._routing import describe_route, dispatch_parts, request_options, route_of
from ._session_pool import SessionPool
from ._shape import acount_prompt_tokens, needed_capabilities, shaped_route
from ._tokens import TokenCounter

__all__ = ["ClientConfig", "LoomClient", "default_data_dir", "request_options"]

log = logging.getLogger("loomnet.client")

#: seconds a client's shutdown gives its idle session streams to close
_SESSION_CLOSE_TIMEOUT = 2.0
#: seconds a stopping client waits, at most, for its executors to end its sessions
#: (so the last acknowledgement is read before the connection goes; ``close_sessions``)
_SESSION_LINGER = 1.0
#: seconds between rankings while a request waits for an offer and the table is quiet
#: (a benched executor's bench may end meanwhile: ``_health``)
_RERANK = 0.5


class LoomClient:
    """A client peer. Create with :func:`open_client`, or run :meth:`run` in a nursery.

    Args:
        config: how it joins, waits and spends.
        key: its identity; default: ``<data_dir>/client/identity.key``, created if missing.
        router, health: the dispatch pipeline's router and health table; default
            :func:`dispatch_parts`.
        on_budget_warning: called with a :class:`BudgetWarning` when spending reaches a
            warning threshold (``config.budget``); it should not block.
        rng: the randomness the router may use (power of two choices); seed it for
            reproducible routing.
        opener: opens streams to executors; default the client's libp2p node (tests
            and benchmarks pass in-memory executors).
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        key: SigningKey | None = None,
        router: Router | None = None,
        health: Health | None = None,
        on_budget_warning: Callable[[BudgetWarning], None] | None = None,
        rng: random.Random | None = None,
        opener: StreamOpener | None = None,
    ) -> None:
        self.config = config
        base = Path(config.data_dir) if config.data_dir else default_data_dir()
        self.home = base / "client"
        self.key = key or load_or_create_identity(self.home / "identity.key")
        bootstrap = list(config.bootstrap)
        if config.discover_local:
            for local in local_executors():
                if local.peer_id != self.key.peer_id:  # same machine: loopback is enough
                    addrs = [a for a in local.addrs if "/127.0.0.1/" in a] or local.addrs
                    bootstrap += [a for a in addrs if a not in bootstrap]
        self.member = Member(
            self.key,
            P2PConfig(listen=config.listen, bootstrap=bootstrap, dial_timeout=config.connect_timeout, mdns=config.mdns),
            exchange_timeout=config.join_timeout,
            watch_local=config.discover_local,
        )
        self.tokens = TokenCounter()
        self.ledger: Ledger | None = None
        self.info: NodeInfo | None = None
        default_router, default_health = dispatch_parts(self.member.table)
        self.router: Router = router if router is not None else default_router
        self.health: Health = health if health is not None else default_health
        #: the spending limit, once :meth:`run` has read this period's spending
        self.budget: Budget | None = None
        self._on_budget_warning = on_budget_warning
        self._rng = rng or random.Random()
        self._opener = opener
        #: idle session streams per executor, for the next request (``_session_pool``)
        self._sessions: SessionPool | None = None

    @property
    def peer_id(self) -> str:
        return self.key.peer_id

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Join the network and keep the offer table fresh until cancelled."""
        self.ledger = await Ledger.open(self.home / "ledger.sqlite")
        try:
            await self._open_budget()
            async with trio.open_nursery() as nursery:
                self.info = await nursery.start(self.member.run)
                task_status.started(self.info)
        finally:
            with trio.CancelScope(shield=True):
                if self._sessions is not None:
                    with trio.move_on_after(_SESSION_CLOSE_TIMEOUT):
                        await self._sessions.aclose()
                await self.ledger.aclose()

    async def close_sessions(self, *, linger: float = _SESSION_LINGER) -> None:
        """End this client's idle sessions gracefully before its host stops
        (``SessionPool.aclose``): each executor reads the last acknowledgement sent on
        them before the connection goes, within ``linger`` seconds in all. Never raises;
        finishes (bounded) even when the caller is cancelled."""
        if self._sessions is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(linger + 0.5):
            try:
                await self._sessions.aclose(linger=linger)
            except Exception:  # noqa: BLE001 - a failing close never stops the shutdown
                log.debug("closing sessions failed", exc_info=True)

    async def _open_budget(self) -> None:
        """Read this period's spending from the ledger (accepted receipts; ``_budget``)."""
        config = self.config.budget
        if config is None or self.ledger is None:
            return
        now = time.time()
        start, _ = period_bounds(config.period, now)
        spent = (await self.ledger.totals(status="accepted", since=start)).cost
        self.budget = Budget(config, spent=spent, now=now, on_warning=self._on_budget_warning)

    async def account_budget(
        self, account: str, config: BudgetConfig, *, on_warning: Callable[[BudgetWarning], None] | None = None
    ) -> Budget:
        """A budget for ``account`` (see ``_budget``): ``config``'s amount per period,
        with what the account has spent this period already, its accepted receipts in
        the ledger (``Ledger.totals(status="accepted", account=, since=)``), so it
        survives restarts as the client's own budget does. Pass it as ``budget=`` with
        ``account=`` to :meth:`stream_chat`; it applies on top of the client's own.
        Warnings are logged naming the account, and go to ``on_warning`` when given.

        Make one per account and keep it while the client runs: a second one for the
        same account would not see the first one's reservations in flight.

        Raises:
            InvalidRequest: a bad account name (``field="account"``).
            RuntimeError: the client is not running (no ledger open).
            LedgerError: the ledger could not be read.
        """
        check_account(account)
        if self.ledger is None:
            raise RuntimeError("the client is not running: use open_client() or run()")
        now = time.time()
        start, _ = period_bounds(config.period, now)
        spent = (await self.ledger.totals(status="accepted", since=start, account=account)).cost
        return Budget(config, spent=spent, now=now, on_warning=on_warning, account=account)

    def _spending(self, account: str | None, budget: Budget | None) -> Budget | JointBudget | None:
        """What a request for ``account`` reserves in: ``budget`` (first: its refusal is
        the one the caller gets when both are short) and the client's own, either, or none.

        Raises:
            InvalidRequest: a bad account name, or ``budget`` is another account's.
        """
        if account is not None:
            check_account(account)
        if budget is not None and budget.account is not None and budget.account != account:
            raise InvalidRequest(
                f"the budget is account {budget.account!r}'s, but the request is made for "
                f"{'the client itself' if account is None else repr(account)}",
                field="budget",
            )
        budgets = [b for b in (budget, self.budget) if b is not None]
        if not budgets:
            return None
        joint = JointBudget(*budgets)
        return joint.budgets[0] if len(joint.budgets) == 1 else joint

    def offers(self) -> list[Offer]:
        """The live offers, cheapest first."""
        return sorted(
            self.member.table.offers(now=time.time()),
            key=lambda o: (o.model.price_in + o.model.price_out, o.advert.load / max(o.advert.capacity, 1), o.executor),
        )

    async def wait_for_offers(
        self,
        *,
        model: str | None = None,
        max_price_in: int | None = None,
        max_price_out: int | None = None,
        timeout: float | None = None,
        route: str | Route | None = None,
    ) -> list[Offer]:
        """Ranked offers for ``model`` (or ``route``), waiting up to ``timeout`` for one
        to appear (default ``offer_timeout``).

        Raises:
            NoOfferError: none appeared in time; the message says what was live.
        """
        wanted = route_of(model, route, max_price_in=max_price_in, max_price_out=max_price_out)
        shape = RequestShape(prompt_tokens=0, max_tokens=1)
        return [c.offer for c in await self._ranked(wanted, shape, timeout=timeout)]

    async def _ranked(self, route: Route, shape: RequestShape, *, timeout: float | None = None) -> list[Candidate]:
        """The router's candidates for ``route``, waiting until there is one, up to
        ``timeout`` (default ``offer_timeout``): ranked again whenever the offer table
        changes, and at least every ``_RERANK`` seconds, since the health table changes
        with time alone (a benched executor comes back when its bench ends: an executor
        that restarted is tried again then, not at its next advert, seconds later).

        Raises:
            NoOfferError: none in time.
        """
        with trio.move_on_after(self.config.offer_timeout if timeout is None else timeout):
            while True:
                changed = self.member.table_changed
                ranked = self.router.rank(
                    route, shape, self.health, now=trio.current_time(), rng=self._rng, wall=time.time()
                )
                if ranked:
                    return ranked
                with trio.move_on_after(_RERANK):
                    await changed.wait()
        live = sorted({o.model.name for o in self.member.table.offers(now=time.time())})
        raise NoOfferError(
            f"no live offer for {describe_route(route)}{self._why_none(route, shape)}; "
            f"live models: {', '.join(live) or 'none'}",
            code=ErrorCode.NO_OFFER,
            live_models=tuple(live),
        )

    def _why_none(self, route: Route, shape: RequestShape) -> str:
        """Why the offers the route names were all left out, counted by reason (say,
        ``2 benched by the circuit breaker after failures``), or "" when it names none."""
        explain = getattr(self.router, "explain", None)  # a router passed in may have none
        if explain is None:
            return ""
        explained = explain(route, shape, self.health, now=trio.current_time(), rng=self._rng, wall=time.time())
        reasons = collections.Counter(r.reason for r in explained.rejected)
        if not reasons:
            return ""
        details = {r.reason: r.detail for r in explained.rejected}
        return ": " + ", ".join(f"{n} {details[reason]}" for reason, n in reasons.most_common(4))

    @property
    def sessions(self) -> SessionPool | None:
        """The pool of idle session streams (None before the first request)."""
        return self._sessions

    def stream_kit(self, opener: StreamOpener | None = None, *, account: str | None = None) -> StreamKit:
        """What each chat stream uses: the libp2p node (or ``opener``), the session pool,
        the key, the ledger, the token counter, the deadlines, and the ``account`` its
        receipts are booked under (None: the client's own).

        Raises:
            RuntimeError: the client is not running (no ledger open).
            InvalidRequest: a bad account name.
        """
        if account is not None:
            check_account(account)
        if self.ledger is None:
            raise RuntimeError("the client is not running: use open_client() or run()")
        own = self._opener or self.member.node
        if opener is None and self._sessions is None:
            self._sessions = SessionPool(
                own, idle_timeout=self.config.session_idle_timeout, max_idle_per_peer=self.config.max_idle_sessions,
                max_active_per_peer=self.config.max_streams_per_executor,
            )  # fmt: skip
        return StreamKit(
            # the client's own opener reuses session streams; another one (a test's) gets
            # one-request streams, since nothing here would close its idle sessions
            sessions=self._sessions if opener is None else None,
            opener=opener or own,
            key=self.key,
            ledger=self.ledger,
            tokens=self.tokens,
            deadlines=self.config.deadlines,
            max_hidden_reasoning_tokens=self.config.max_hidden_reasoning_tokens,
            max_answer_bytes=self.config.max_answer_bytes,
            account=account,
        )

    @asynccontextmanager
    async def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str | None = None,
        route: str | Route | None = None,
        max_price_in: int | None = None,
        max_price_out: int | None = None,
        max_cost: int | None = None,
        on_premise_only: bool = False,
        no_retention_only: bool = False,
        pin: Iterable[str] = (),
        exclude: Iterable[str] = (),
        options: GenerationOptions | None = None,
        account: str | None = None,
        budget: Budget | None = None,
        **generation: object,
    ) -> AsyncIterator[ChatStream]:
        """Open a streamed chat with the best candidate that answers; iterate the context
        value for text.

        Where it goes: ``model`` (a name or alias; never served by another model) or
        ``route`` (see :func:`route_of`: ``"cheapest"``, ``"fastest"``,
        ``"category:fast"``, a model, or a ``Route``); neither: any model. Filters:
        ``max_price_in``/``max_price_out`` (micro-credits per million tokens),
        ``on_premise_only``, ``no_retention_only``, ``pin``/``exclude`` (executor peer
        ids). What the request needs is added: capabilities (tools, vision, JSON) and a
        context of at least its prompt and max tokens. ``max_cost`` (micro-credits)
        bounds the whole request.

        Whom it is for: ``account`` (1 to 64 of ``A-Z a-z 0-9 . _ -``) books the receipt
        under that account in the ledger (None: the client's own); ``budget`` (say
        :meth:`account_budget`'s) applies *in addition to* the client's own
        (``ClientConfig.budget``): each attempt's worst case must fit both and is
        reserved in both, then settled from the receipt or released in both.

        How to generate is :class:`~loomnet.protocol.GenerationOptions`: pass an
        ``options`` object, or its fields as keywords (``max_tokens=``,
        ``temperature=``, ``top_p=``, ``seed=``, ``stop=``, ``presence_penalty=``,
        ``frequency_penalty=``, ``user=``, ``tools=``, ``tool_choice=``,
        ``response_format=``), which override ``options``' fields.

        The candidates are tried in turn until one starts answering (``_attempt``):
        ``stream.executor`` is the one that did, ``stream.attempts`` the ones before.
        After the iteration ends, ``stream.result`` holds the verified receipt, any
        tool calls and any reasoning; ``stream.events()`` yields typed events instead of
        text. A ``RemoteError`` after some text carries ``.result``: the receipt for
        exactly what was streamed, verified and booked.

        Raises:
            InvalidRequest: the request breaks the protocol's schema (``field`` names
                the field), ``model`` and ``route`` both name what to serve, a bad
                ``account`` name, or a ``budget`` of another account; raised before any
                offer is looked up or stream opened.
            TypeError: a keyword that is no generation option.
            NoOfferError: no live offer fits the route within ``offer_timeout``.
            BudgetExceeded: a budget (``budget`` or the client's own) cannot cover the
                cheapest candidate's worst case; ``.account`` says whose.
            RemoteError, NetworkError (NetworkTimeout), ProtocolError: every attempt
                failed (``.attempts`` says how), or one failed in a way no other
                executor would change; then, see :meth:`ChatStream.events`.
            ReceiptError: see :meth:`ChatStream.events`.
        """
        options = request_options(
            options, generation, max_price_in=max_price_in, max_price_out=max_price_out, max_cost=max_cost
        )
        self.check_request(messages, model=model, options=options)
        spending = self._spending(account, budget)
        wanted = route_of(
            model, route, max_price_in=max_price_in, max_price_out=max_price_out, on_premise_only=on_premise_only,
            no_retention_only=no_retention_only, pin=pin, exclude=exclude,
        )  # fmt: skip
        kit = self.stream_kit(account=account)
        messages = list(messages)
        prompt_tokens = await acount_prompt_tokens(self.tokens, messages, options, model)
        shape = RequestShape(
            prompt_tokens=prompt_tokens,
            max_tokens=options.max_tokens if options.max_tokens is not None else self.config.assumed_max_tokens,
        )
        wanted = shaped_route(wanted, shape, needed_capabilities(messages, options))
        candidates = await self._ranked(wanted, shape)
        stream = await open_first(
            kit, candidates, messages, options,
            shape=shape, health=self.health, budget=spending, max_attempts=self.config.max_attempts,
        )  # fmt: skip
        try:
            yield stream
        finally:
            await stream.aclose()

    def check_request(self, messages: Sequence[ChatMessage], *, model: str | None, options: RequestOptions) -> None:
        """Refuse a request the protocol's schema forbids, before routing it anywhere.

        The executor and model are not chosen yet, so they are stand-ins here; the
        request is checked again, whole, just before it is sent.

        Raises:
            InvalidRequest: naming the offending field.
        """
        check_request(
            InferenceRequest(
                audience=self.peer_id,
                nonce=bytes(16),
                created_at=time.time(),
                model="any" if model is None else model,
                messages=list(messages),
                max_price_in=options.max_price_in,
                max_price_out=options.max_price_out,
                max_cost=options.max_cost,
                **generation_fields(options),
            )
        )

    async def chat(self, messages: Sequence[ChatMessage], **kwargs) -> ChatResult:
        """Like :meth:`stream_chat` (the same keywords, ``account`` and ``budget``
        included), collected: returns the text and the verified receipt."""
        async with self.stream_chat(messages, **kwargs) as stream:
            async for _ in stream:
                pass
        assert stream.result is not None
        return stream.result

    async def chat_many(
        self,
        requests: Iterable[ChatRequest],
        *,
        concurrency: int = 4,
        budget: Budget | None = None,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> list[Outcome]:
        """Many chats at once (``_batch``; ``docs/client.md``, "Many prompts at once"):
        each :class:`ChatRequest` (messages and :meth:`chat`'s keywords) runs as
        :meth:`chat`, at most ``concurrency`` at once, each routed, failed over and
        settled on its own; ``budget`` applies to every item (as :meth:`chat`'s).

        Returns:
            One outcome per request, in input order: its :class:`ChatResult`, or the
            ``LoomError`` it ended with (``.code``: the stable code). One item's failure
            never ends the others.

        Raises:
            InvalidRequest: ``concurrency`` is not from 1 to 1024 (before anything is sent).
            TypeError: an item that is no ``ChatRequest``.
            RuntimeError: the client is not running.
        """
        return await chat_many(self, requests, concurrency=concurrency, budget=budget, on_progress=on_progress)

    def chat_as_completed(
        self,
        requests: Iterable[ChatRequest],
        *,
        concurrency: int = 4,
        budget: Budget | None = None,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> AbstractAsyncContextManager[trio.abc.ReceiveChannel[tuple[int, Outcome]]]:
        """:meth:`chat_many`, handing out ``(index, outcome)`` as each item ends::

            async with client.chat_as_completed(requests, concurrency=8) as finished:
                async for index, outcome in finished:
                    ...

        Leaving the ``async with`` early cancels the items still running. Raises as
        :meth:`chat_many`, at the call."""
        return chat_as_completed(self, requests, concurrency=concurrency, budget=budget, on_progress=on_progress)
