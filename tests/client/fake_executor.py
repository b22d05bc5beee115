"""An executor's side of one inference stream, scripted by a test, over trio memory streams.

The client side is the real ``ChatStream``; only the transport is in memory, with
``P2PStream``'s interface (per-read timeout mapped to ``NetworkTimeout``, end of stream
as ``b""``), so trio's autojump clock can drive deadlines without real sleeps.
"""

from __future__ import annotations

import contextlib

import trio
import trio.testing

from loomnet.client import ClientConfig, Ledger, LoomClient
from loomnet.client._chat_stream import ChatStream, RequestOptions
from loomnet.client._offers import Offer
from loomnet.client._route import Candidate, RequestShape, Route
from loomnet.protocol import (
    NEED_DATA,
    Advert,
    ChatMessage,
    ChunkFrame,
    EndOfStream,
    ErrorCode,
    ErrorFrame,
    InferenceConnection,
    InferenceRequest,
    ModelOffer,
    NetworkError,
    NetworkTimeout,
    Receipt,
    ReceiptFrame,
    RequestFrame,
    Role,
    SignedKind,
    SigningKey,
    StreamFrame,
    ToolCall,
    apportion,
    cost_of,
    digest,
    encode_tool_calls,
    open_envelope,
    output_caps,
    seal,
)

EXECUTOR_KEY = SigningKey(b"x" * 32)
CLIENT_KEY = SigningKey(b"y" * 32)
MODEL = ModelOffer(name="tiny", price_in=1_000_000, price_out=2_000_000)
OFFER = Offer(
    executor=EXECUTOR_KEY.peer_id,
    model=MODEL,
    advert=Advert(seq=1, issued_at=0.0, ttl=60.0, models=[MODEL]),
    expires_at=float("inf"),
)
HELLO = [ChatMessage("user", "Hello?")]


class MemoryByteStream:
    """One end of a memory stream pair, shaped like ``P2PStream``."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self._stream = stream
        self.reset_called = False

    async def receive_some(self, max_bytes: int = 65536, *, timeout: float) -> bytes:
        try:
            with trio.fail_after(timeout):
                return await self._stream.receive_some(max_bytes)
        except trio.TooSlowError:
            raise NetworkTimeout("receive: deadline passed") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def send_all(self, data: bytes, *, timeout: float) -> None:
        try:
            with trio.fail_after(timeout):
                await self._stream.send_all(data)
        except trio.TooSlowError:
            raise NetworkTimeout("send: deadline passed") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise NetworkError(f"send: {exc!r}") from None

    async def close(self) -> None:
        try:
            await self._stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def reset(self) -> None:
        self.reset_called = True
        await self._stream.aclose()


class FakeExecutor:
    """Opens streams for the client (``open_stream``) and plays the executor on them."""

    def __init__(self, key: SigningKey = EXECUTOR_KEY, model: ModelOffer = MODEL) -> None:
        self.key = key
        self.model = model
        self.opened = 0
        self.client_end: MemoryByteStream | None = None
        self._server_end: trio.abc.HalfCloseableStream | None = None
        self._ready = trio.Event()
        self.conn = InferenceConnection(Role.EXECUTOR)
        self.request: InferenceRequest | None = None
        self.request_payload = b""
        self.sent_text: list[str] = []
        self.sent_reasoning: list[str] = []
        self.sent_calls: list[ToolCall] = []
        self.chunks = 0

    async def open_stream(self, peer_id, protocol, *, addrs=(), timeout=None) -> MemoryByteStream:
        assert peer_id == self.key.peer_id
        self.opened += 1
        client_end, self._server_end = trio.testing.memory_stream_pair()
        self.client_end = MemoryByteStream(client_end)
        self._ready.set()
        return self.client_end

    async def read_request(self) -> InferenceRequest:
        await self._ready.wait()
        assert self._server_end is not None
        while (event := self.conn.next_event()) is NEED_DATA:
            self.conn.receive_data(await self._server_end.receive_some())
        assert isinstance(event, RequestFrame)
        self.request, _ = open_envelope(SignedKind.REQUEST, event.envelope)
        self.request_payload = event.envelope.payload
        return self.request

    async def read_rest(self) -> list:
        """Every frame the client sends after the answer, until it closes its side."""
        frames = []
        while True:
            try:
                data = await self._server_end.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return frames
            self.conn.receive_data(data)
            while (event := self.conn.next_event()) is not NEED_DATA:
                if isinstance(event, EndOfStream):
                    return frames
                frames.append(event)

    async def send(self, frame: StreamFrame) -> None:
        if isinstance(frame, ChunkFrame):
            self.sent_text.append(frame.text)
            self.sent_reasoning.append(frame.reasoning)
            self.sent_calls.extend(frame.tool_calls)
            self.chunks += 1
        await self._server_end.send_all(self.conn.send(frame))

    async def chunk(self, text: str = "", *, reasoning: str = "", tool_calls=()) -> None:
        await self.send(ChunkFrame(seq=self.chunks, text=text, reasoning=reasoning, tool_calls=list(tool_calls)))

    async def drip(self, data: bytes, every: float) -> None:
        """Send ``data`` one byte at a time, ``every`` seconds apart (trio's clock)."""
        for i in range(len(data)):
            await trio.sleep(every)
            await self._server_end.send_all(data[i : i + 1])

    def raw(self, frame: StreamFrame) -> bytes:
        """A frame's bytes, for the test to send as it likes (say, dripping)."""
        if isinstance(frame, ChunkFrame):
            self.chunks += 1
        return self.conn.send(frame)

    def receipt(self, *, output_tokens: int | None = None, finish_reason: str = "stop", **parts: int):
        """A signed receipt for what was sent; honestly split unless parts are given."""
        text, reasoning = "".join(self.sent_text), "".join(self.sent_reasoning)
        if output_tokens is None:
            caps = output_caps(text, reasoning, self.sent_calls)
            output_tokens = len(text.encode()) + caps.reasoning // 2 + caps.tool_calls // 2  # within every bound
            split = apportion(output_tokens, caps=caps, counted_text=len(text), counted_reasoning=len(reasoning))
            parts = dict(reasoning_tokens=split.reasoning, tool_call_tokens=split.tool_calls)
        assert self.request is not None
        receipt = Receipt(
            request_digest=digest(self.request_payload),
            client=CLIENT_KEY.peer_id,
            model=self.model.name,
            input_tokens=12,
            output_tokens=output_tokens,
            count_source="backend",
            price_in=self.model.price_in,
            price_out=self.model.price_out,
            cost=cost_of(12, output_tokens, self.model.price_in, self.model.price_out),
            output_digest=digest(text.encode()),
            chunks=self.chunks,
            finish_reason=finish_reason,
            issued_at=1.0,
            tool_calls_digest=digest(encode_tool_calls(self.sent_calls)) if self.sent_calls else b"",
            reasoning_digest=digest(reasoning.encode()) if reasoning else b"",
            **parts,
        )
        return seal(SignedKind.RECEIPT, receipt, self.key)

    async def finish(self, **receipt_fields) -> None:
        await self.send(ReceiptFrame(self.receipt(**receipt_fields)))

    async def fail(self, code: int, message: str, *, with_receipt: bool = False, retryable: bool = True) -> None:
        receipt = self.receipt(finish_reason="error") if with_receipt else None
        await self.send(ErrorFrame(code=code, message=message, retryable=retryable, receipt=receipt))


def offer_of(key: SigningKey, model: ModelOffer = MODEL) -> Offer:
    """``model`` on the executor with ``key``, as a client's offer table holds it."""
    return Offer(
        executor=key.peer_id,
        model=model,
        advert=Advert(seq=1, issued_at=0.0, ttl=60.0, models=[model]),
        expires_at=float("inf"),
    )


#: a behaviour for a peer that cannot be dialed (killed, gone): the dial fails at once
UNREACHABLE = None


class FakeNetwork:
    """Several scripted executors behind one ``open_stream``: each stream to an executor
    gets its own :class:`FakeExecutor` session, played by that executor's behaviour
    (``async def behaviour(session)``) in ``nursery``. A behaviour of
    :data:`UNREACHABLE` makes the dial fail (CONNECT_FAILED). ``sessions`` keeps every
    session per peer id, in order, so a test sees what each executor was sent.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._behaviours: dict[str, tuple[SigningKey, ModelOffer, object]] = {}
        self.sessions: dict[str, list[FakeExecutor]] = {}
        self.dials: dict[str, int] = {}

    def add(self, key: SigningKey, behaviour, *, model: ModelOffer = MODEL) -> Offer:
        self._behaviours[key.peer_id] = (key, model, behaviour)
        self.sessions[key.peer_id] = []
        self.dials[key.peer_id] = 0
        return offer_of(key, model)

    async def open_stream(self, peer_id, protocol, *, addrs=(), timeout=None) -> MemoryByteStream:
        key, model, behaviour = self._behaviours[peer_id]
        self.dials[peer_id] += 1
        await trio.lowlevel.checkpoint()
        if behaviour is UNREACHABLE:
            raise NetworkError(f"open {protocol} to {peer_id}: connection refused", code=ErrorCode.CONNECT_FAILED)
        session = FakeExecutor(key, model)
        self.sessions[peer_id].append(session)
        end = await session.open_stream(peer_id, protocol)

        async def play() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # the client reset
                await behaviour(session)

        self._nursery.start_soon(play)
        return end

    def requests(self, peer_id: str) -> list[InferenceRequest]:
        """What ``peer_id`` was sent, in order (sessions that read their request)."""
        return [s.request for s in self.sessions[peer_id] if s.request is not None]


async def make_client(tmp_path, *, router=None, health=None, opener=None, on_budget_warning=None, **config) -> LoomClient:
    """A real client, not joined to any network (the fake executor is its transport),
    with its real ledger open (and its budget read from it, when the config has one).
    Close with ``await client.ledger.aclose()``."""
    cfg = ClientConfig(data_dir=str(tmp_path / "client"), discover_local=False, **config)
    client = LoomClient(
        cfg, key=CLIENT_KEY, router=router, health=health, opener=opener, on_budget_warning=on_budget_warning
    )
    client.ledger = await Ledger.open(client.home / "ledger.sqlite")
    await client._open_budget()  # noqa: SLF001 - what run() does after opening the ledger
    return client


def chat_stream(client: LoomClient, executor: FakeExecutor, **options) -> ChatStream:
    return ChatStream(client.stream_kit(opener=executor), OFFER, list(HELLO), RequestOptions(**options))


# ------------------------------------------------- router and health for the tests


class ListRouter:
    """A ``Router`` over a fixed list of offers, in the order given: it keeps those
    whose model or alias the route names (any, when it names none) and whose executor
    the health table does not bench. Enough to drive the attempt loop; ranking itself
    is the real router's business and tested with it."""

    def __init__(self, offers: list[Offer]) -> None:
        self.offers = offers
        self.asked: list[tuple[Route, RequestShape]] = []

    def rank(self, route: Route, shape: RequestShape, health, *, now: float, rng, wall=None, limit=None) -> list[Candidate]:
        self.asked.append((route, shape))
        out = []
        for offer in self.offers:
            names = {offer.model.name, *offer.model.aliases}
            if (route.model is None or route.model in names) and not health.benched(offer.executor, now=now):
                cost = cost_of(shape.prompt_tokens, shape.max_tokens, offer.model.price_in, offer.model.price_out)
                out.append(Candidate(offer=offer, expected_cost=cost, score=float(cost), why="listed"))
        return out


class RecordingHealth:
    """A ``Health`` that records every call (``calls``: ``(verb, executor)``) and benches
    an executor for ``bench_seconds`` after ``failures_to_bench`` consecutive failures."""

    def __init__(self, *, failures_to_bench: int = 3, bench_seconds: float = 30.0, benched: set[str] = frozenset()) -> None:
        self.calls: list[tuple[str, str]] = []
        self.in_flight: dict[str, int] = {}
        self.ttfts: dict[str, list[float]] = {}
        self.tokens: dict[str, list[int]] = {}
        self._failures: dict[str, int] = {}
        self._benched_until = {executor: float("inf") for executor in benched}
        self.failures_to_bench, self.bench_seconds = failures_to_bench, bench_seconds

    def started(self, executor, model, *, now):
        self.calls.append(("started", executor))
        self.in_flight[executor] = self.in_flight.get(executor, 0) + 1

    def first_token(self, executor, model, *, ttft, now):
        self.calls.append(("first_token", executor))
        self.ttfts.setdefault(executor, []).append(ttft)

    def finished(self, executor, model, *, output_tokens, seconds, now):
        self.calls.append(("finished", executor))
        self.in_flight[executor] -= 1
        self.tokens.setdefault(executor, []).append(output_tokens)
        self._failures[executor] = 0

    def failed(self, executor, model, *, now):
        self.calls.append(("failed", executor))
        self.in_flight[executor] -= 1
        self._failures[executor] = self._failures.get(executor, 0) + 1
        if self._failures[executor] >= self.failures_to_bench:
            self._benched_until[executor] = now + self.bench_seconds

    def estimate(self, executor, model, *, now, prior_ttft, prior_tps):
        return None  # no measurements: the attempt loop keeps the router's order

    def cancelled(self, executor, model, *, now):
        self.calls.append(("cancelled", executor))
        self.in_flight[executor] -= 1

    def benched(self, executor, *, now, model=None):
        return now < self._benched_until.get(executor, float("-inf"))

    def verbs(self, executor: str) -> list[str]:
        return [verb for verb, who in self.calls if who == executor]
