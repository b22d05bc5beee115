"""The client library: ask the network for a completion, stream it, check the bill.

Typical use::

    async with open_client(ClientConfig(data_dir=...)) as client:
        result = await client.chat([ChatMessage("user", "Hi")], model="smollm2-135m")
        async with client.stream_chat(messages) as stream:
            async for text in stream:
                print(text, end="")
        print(stream.result.receipt.output_tokens)

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
    ChatMessage,
    ResponseFormat,
    ToolSpec,
    ErrorCode,
    NoOfferError,
    SigningKey,
)

from ._chat_stream import ChatResult, ChatStream, RequestOptions
from ._identity_file import load_or_create_identity
from ._ledger import Ledger
from ._local import local_executors
from ._member import Member
from ._offers import Offer
from ._p2p import NodeInfo, P2PConfig
from ._router import rank_offers
from ._tokens import TokenCounter

__all__ = ["ClientConfig", "LoomClient", "open_client"]


def default_data_dir() -> Path:
    """``$LOOMNET_DATA_DIR``, else ``$XDG_DATA_HOME/loomnet``, else ``~/.local/share/loomnet``."""
    if explicit := os.environ.get("LOOMNET_DATA_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "loomnet"


class ClientConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a client joins and how long it waits. Times are seconds."""

    #: identity and ledger live in ``<data_dir>/client``; None = ``default_data_dir()``
    data_dir: str | None = None
    listen: list[str] = msgspec.field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    #: full multiaddrs (with ``/p2p/<peer id>``) of peers to join through
    bootstrap: list[str] = []
    #: also join through executors announced on this machine (see ``_local``)
    discover_local: bool = True
    connect_timeout: float = 5.0
    #: longest wait for the first chunk (or terminal frame) of an answer
    first_byte_timeout: float = 60.0
    #: longest silence between two frames once the answer streams
    idle_timeout: float = 30.0
    #: how long ``chat`` waits for a matching offer to appear
    offer_timeout: float = 5.0


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
            P2PConfig(listen=config.listen, bootstrap=bootstrap, dial_timeout=config.connect_timeout),
            read_timeout=config.connect_timeout,
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
        )

    @asynccontextmanager
    async def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str | None = None,
        tools: Sequence[ToolSpec] = (),
        tool_choice: str | None = None,
        response_format: ResponseFormat | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        max_price_in: int | None = None,
        max_price_out: int | None = None,
    ) -> AsyncIterator[ChatStream]:
        """Open a streamed chat with the best offer; iterate the context value for text.

        After the iteration ends, ``stream.result`` holds the verified receipt and any
        tool calls. A ``RemoteError`` after some text carries ``.result``: the receipt
        for exactly what was streamed, verified and booked.

        Raises:
            NoOfferError, RemoteError, NetworkError, ProtocolError, ReceiptError.
        """
        if self.ledger is None:
            raise RuntimeError("the client is not running: use open_client() or run()")
        offers = await self.wait_for_offers(model=model, max_price_in=max_price_in, max_price_out=max_price_out)
        offer = offers[0]
        options = RequestOptions(
            tools=list(tools),
            tool_choice=tool_choice,
            response_format=response_format,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            max_price_in=max_price_in,
            max_price_out=max_price_out,
        )
        stream = ChatStream(self, offer, list(messages), options)
        try:
            await stream.open()
            yield stream
        finally:
            await stream.aclose()

    async def chat(self, messages: Sequence[ChatMessage], **kwargs) -> ChatResult:
        """Like :meth:`stream_chat`, collected: returns the text and the verified receipt."""
        async with self.stream_chat(messages, **kwargs) as stream:
            async for _ in stream:
                pass
        assert stream.result is not None
        return stream.result


@asynccontextmanager
async def open_client(config: ClientConfig | None = None, *, key: SigningKey | None = None):
    """Run a :class:`LoomClient` for the duration of the ``async with`` block."""
    client = LoomClient(config or ClientConfig(), key=key)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        try:
            yield client
        finally:
            client.member.stop()
            nursery.cancel_scope.cancel()
