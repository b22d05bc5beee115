"""The client library: ask the network for a completion, stream it, check the bill.

Typical use::

    async with open_client(ClientConfig(data_dir=...)) as client:
        result = await client.chat([ChatMessage("user", "Hi")], model="smollm2-135m")
        async with client.stream_chat(messages) as stream:
            async for text in stream:
                print(text, end="")
        print(stream.result.receipt.output_tokens)

Reasoning models stream their thinking apart from the answer: ``stream.events()``
yields typed deltas (``ReasoningDelta``, ``TextDelta``, ``ToolCallsDelta``) and
``result.reasoning`` holds it all; ``async for text in stream`` yields only text.

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

import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import trio

from loomnet.protocol import (
    GENERATION_FIELDS,
    ChatMessage,
    ErrorCode,
    GenerationOptions,
    InferenceRequest,
    NoOfferError,
    SigningKey,
    generation_fields,
)

from ._chat_stream import ChatResult, ChatStream, RequestOptions
from ._identity_file import load_or_create_identity
from ._ledger import Ledger
from ._local import local_executors
from ._member import Member
from ._offers import Offer
from ._p2p import NodeInfo, P2PConfig
from ._receipts import DEFAULT_MAX_HIDDEN_REASONING_TOKENS
from ._request_check import check_request
from ._router import rank_offers
from ._tokens import TokenCounter

__all__ = ["ClientConfig", "LoomClient", "open_client"]


def default_data_dir() -> Path:
    """``$LOOMNET_DATA_DIR``, else ``$XDG_DATA_HOME/loomnet``, else ``~/.local/share/loomnet``."""
    if explicit := os.environ.get("LOOMNET_DATA_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "loomnet"


class ClientConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    """How a client joins, how long it waits and what it pays for. Times are seconds.

    The three answer deadlines are each one deadline over their whole span, never per
    read (see ``_chat_stream``); a deadline that passes raises ``NetworkTimeout``.
    """

    #: identity and ledger live in ``<data_dir>/client``; None = ``default_data_dir()``
    data_dir: str | None = None
    listen: list[str] = msgspec.field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    #: full multiaddrs (with ``/p2p/<peer id>``) of peers to join through
    bootstrap: list[str] = []
    #: also join through executors announced on this machine (see ``_local``)
    discover_local: bool = True
    #: find and join executors announced on the LAN by multicast DNS (see ``_mdns``); a
    #: client only listens and asks, it never announces itself. Off by default: mDNS
    #: queries are multicast to every machine of the LAN, which some networks forbid
    mdns: bool = False
    #: longest dial and stream open
    connect_timeout: float = 5.0
    #: longest one peer may take to hand over its adverts, stream open to the last one
    #: (one deadline over the whole exchange; peers are asked at once, so joining waits
    #: for the dials plus at most this)
    join_timeout: float = 10.0
    #: longest wait from the request sent to the first complete frame (a progress chunk
    #: counts: the executor sends one every few seconds while its backend is silent)
    first_byte_timeout: float = 60.0
    #: longest wait for each next complete frame once the answer streams
    idle_timeout: float = 30.0
    #: longest a whole request may take, dial to receipt; generous, because a reasoning
    #: model may think for minutes before it answers
    total_timeout: float = 900.0
    #: how long ``chat`` waits for a matching offer to appear
    offer_timeout: float = 5.0
    #: most output tokens of reasoning a receipt may bill without streaming it (Gemini's
    #: thoughts, OpenAI's ``reasoning_tokens``): there are no bytes to check them against,
    #: so a receipt over this is booked as disputed and raises RECEIPT_MISMATCH
    max_hidden_reasoning_tokens: int = DEFAULT_MAX_HIDDEN_REASONING_TOKENS


class LoomClient:
    """A client peer. Create with :func:`open_client`, or run :meth:`run` in a nursery."""

    def __init__(self, config: ClientConfig, *, key: SigningKey | None = None) -> None:
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
        )
        self.tokens = TokenCounter()
        self.ledger: Ledger | None = None
        self.info: NodeInfo | None = None

    @property
    def peer_id(self) -> str:
        return self.key.peer_id

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Join the network and keep the offer table fresh until cancelled."""
        self.ledger = await Ledger.open(self.home / "ledger.sqlite")
        try:
            async with trio.open_nursery() as nursery:
                self.info = await nursery.start(self.member.run)
                task_status.started(self.info)
        finally:
            with trio.CancelScope(shield=True):
                await self.ledger.aclose()

    def offers(self) -> list[Offer]:
        """The live offers, cheapest first."""
        return rank_offers(self.member.table.offers(now=time.time()))

    async def wait_for_offers(
        self,
        *,
        model: str | None = None,
        max_price_in: int | None = None,
        max_price_out: int | None = None,
        timeout: float | None = None,
    ) -> list[Offer]:
        """Ranked offers for ``model``, waiting up to ``timeout`` for one to appear.

        Raises:
            NoOfferError: none appeared in time; the message says what was live.
        """
        with trio.move_on_after(self.config.offer_timeout if timeout is None else timeout):
            while True:
                changed = self.member.table_changed
                ranked = rank_offers(
                    self.member.table.offers(now=time.time()),
                    model=model,
                    max_price_in=max_price_in,
                    max_price_out=max_price_out,
                )
                if ranked:
                    return ranked
                await changed.wait()
        live = sorted({o.model.name for o in self.member.table.offers(now=time.time())})
        what = f"model {model!r}" if model else "any model"
        caps = "" if max_price_in is None and max_price_out is None else " within the price cap"
        raise NoOfferError(
            f"no live offer for {what}{caps}; live models: {', '.join(live) or 'none'}",
            code=ErrorCode.NO_OFFER,
            live_models=tuple(live),
        )

    @asynccontextmanager
    async def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str | None = None,
        max_price_in: int | None = None,
        max_price_out: int | None = None,
        max_cost: int | None = None,
        options: GenerationOptions | None = None,
        **generation: object,
    ) -> AsyncIterator[ChatStream]:
        """Open a streamed chat with the best offer; iterate the context value for text.

        How to generate is :class:`~loomnet.protocol.GenerationOptions`: pass an
        ``options`` object, or its fields as keywords (``max_tokens=``,
        ``temperature=``, ``top_p=``, ``seed=``, ``stop=``, ``presence_penalty=``,
        ``frequency_penalty=``, ``user=``, ``tools=``, ``tool_choice=``,
        ``response_format=``), which override ``options``' fields. Prices are
        micro-credits: ``max_price_in``/``max_price_out`` per million tokens, caps on
        the offers considered; ``max_cost`` for the whole request.

        After the iteration ends, ``stream.result`` holds the verified receipt, any
        tool calls and any reasoning; ``stream.events()`` yields typed deltas instead of
        text. A ``RemoteError`` after some text carries ``.result``: the receipt for
        exactly what was streamed, verified and booked.

        Raises:
            InvalidRequest: the request breaks the protocol's schema (``field`` names
                the field); raised before any offer is looked up or stream opened.
            TypeError: a keyword that is no generation option.
            NoOfferError, RemoteError, NetworkError (NetworkTimeout), ProtocolError,
            ReceiptError: see :meth:`ChatStream.events`.
        """
        options = request_options(
            options, generation, max_price_in=max_price_in, max_price_out=max_price_out, max_cost=max_cost
        )
        self.check_request(messages, model=model, options=options)
        if self.ledger is None:
            raise RuntimeError("the client is not running: use open_client() or run()")
        offers = await self.wait_for_offers(model=model, max_price_in=max_price_in, max_price_out=max_price_out)
        stream = ChatStream(self, offers[0], list(messages), options)
        try:
            await stream.open()
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
        """Like :meth:`stream_chat`, collected: returns the text and the verified receipt."""
        async with self.stream_chat(messages, **kwargs) as stream:
            async for _ in stream:
                pass
        assert stream.result is not None
        return stream.result


def request_options(
    options: GenerationOptions | None, overrides: dict[str, object], **costs: int | None
) -> RequestOptions:
    """One :class:`RequestOptions` from an ``options`` object, keyword overrides of its
    fields, and the cost limits.

    Raises:
        TypeError: an override that is no generation option (naming it).
    """
    unknown = sorted(set(overrides) - set(GENERATION_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown generation option(s): {', '.join(unknown)}; known: {', '.join(GENERATION_FIELDS)}"
        )
    fields = generation_fields(options) if options is not None else {}
    fields.update(overrides)
    if isinstance(fields.get("tools"), tuple):
        fields["tools"] = list(fields["tools"])  # a tuple is as good as a list to a caller
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]  # OpenAI accepts one stop string as well as a list
    return RequestOptions(**fields, **costs)


@asynccontextmanager
async def open_client(
    config: ClientConfig | None = None, *, key: SigningKey | None = None
) -> AsyncIterator[LoomClient]:
    """Run a :class:`LoomClient` for the duration of the ``async with`` block.

    Error handling: whatever leaves the block (``NoOfferError``, ``RemoteError``, the
    caller's own error, ``KeyboardInterrupt``, ``SystemExit``, any ``BaseException``)
    leaves ``open_client`` as itself, the same object, as httpx's clients do, never
    wrapped in the ``ExceptionGroup`` of the nursery that runs the client; so does an
    error starting the client (an unusable identity or ledger), or one error of the
    client's own tasks (a ``KeyboardInterrupt`` that trio delivers there).

    Cancellation: a cancelled enclosing scope ends the block with ``trio.Cancelled``,
    which leaves as itself too, so the scope that cancelled catches it as usual. The
    client's own tasks are cancelled and its ledger closed on every way out.
    """
    client = LoomClient(config or ClientConfig(), key=key)
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                try:
                    await nursery.start(client.run)
                except BaseExceptionGroup as group:  # from the client's own nurseries
                    raise _sole_error(group) from None
                try:
                    yield client
                finally:
                    client.member.stop()
                    nursery.cancel_scope.cancel()
            except BaseException as exc:  # re-raised below, outside the nursery, so it is not grouped
                error = exc
    except BaseExceptionGroup as group:
        # raised by the client's own tasks; one error (besides the cancellations our own
        # cancel caused) leaves as itself, several stay grouped. The block's own error
        # wins over the cancellation that the failing task caused in the block.
        leaves = _leaves(group)
        errors = [e for e in leaves if not isinstance(e, trio.Cancelled)] or leaves
        if len(errors) != 1:
            raise
        if error is None or isinstance(error, trio.Cancelled):
            error = errors[0]
    if error is not None:
        try:
            raise error
        finally:
            error = None  # no reference cycle through the traceback


def _sole_error(group: BaseExceptionGroup) -> BaseException:
    """The one error in ``group`` besides cancellations, or ``group`` itself when there
    are several."""
    leaves = _leaves(group)
    errors = [e for e in leaves if not isinstance(e, trio.Cancelled)] or leaves
    return errors[0] if len(errors) == 1 else group


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions in ``group`` and its nested groups."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
