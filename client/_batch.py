"""Many prompts at once: ``LoomClient.chat_many`` and ``LoomClient.chat_as_completed``.

Theory of operation. A batch is a list of :class:`ChatRequest` (the messages and the
keywords :meth:`LoomClient.chat` takes). ``concurrency`` worker tasks (never one task per
item: a batch of a million items holds ``concurrency`` tasks and requests) take the next
item's index from one shared counter, run it through ``LoomClient.chat`` (route →
attempt → stream → settle, failover before the first content included), and record its
**outcome**: the :class:`~loomnet.client.ChatResult`, or the :class:`LoomError` it ended
with, whose ``code`` is the stable one of ``docs/errors.md``. One item's failure never
touches another's: the batch always ends with one outcome per item, in input order
(``chat_many``), or hands each out as it ends (``chat_as_completed``).

Spreading. Every item is routed on its own by the client's router, which reads this
client's health table: the requests each executor has in flight *from this client*. For
candidates of equal expected cost (the same price; for ``route="fastest"`` any two) the
router's power of two choices sends the next item to the one with fewer in flight
(``docs/routing.md``), so a batch over two equal executors is split about evenly; a
cheaper executor is preferred, as for any request, until it has
``max-streams-per-executor`` requests from this client in flight: the next ones wait
(in order, up to the first-byte deadline) for one of them to end, then fail over.
``tests/client/test_chat_many.py`` measures both.

Errors that are bugs (not a :class:`LoomError`) are logged with their traceback and end
their item as ``LoomError`` code ``INTERNAL``; cancellation ends the whole batch (every
request in flight is reset and its budget reservation released).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import msgspec
import trio

from loomnet.protocol import ChatMessage, ErrorCode, GenerationOptions, InvalidRequest, LoomError

from ._route import Route
from ._stream_kit import ChatResult

if TYPE_CHECKING:
    from ._budget import Budget
    from ._client import LoomClient

__all__ = [
    "MAX_CONCURRENCY",
    "BatchProgress",
    "ChatRequest",
    "Outcome",
    "chat_as_completed",
    "chat_many",
    "run_batch",
]

log = logging.getLogger("loomnet.client")

#: the most requests one batch may have in flight at once
MAX_CONCURRENCY = 1024

#: what one item of a batch ends with
Outcome = ChatResult | LoomError


class ChatRequest(msgspec.Struct, frozen=True):
    """One item of a batch: ``messages`` and the keywords of :meth:`LoomClient.chat`,
    with the same names and meanings (see ``stream_chat``). Prices are micro-credits
    (per million tokens for the caps); ``options`` holds the generation options
    (``GenerationOptions(max_tokens=..., temperature=..., seed=...)``). A plain Struct:
    it decodes from JSON or msgpack (``msgspec.json.decode(data, type=ChatRequest)``).
    """

    messages: list[ChatMessage]
    #: a model name or alias (never served by another model)
    model: str | None = None
    #: a route string (``"cheapest"``, ``"fastest"``, ``"category:fast"``, a model) or a Route
    route: str | Route | None = None
    max_price_in: int | None = None
    max_price_out: int | None = None
    #: the most the whole request may cost, micro-credits
    max_cost: int | None = None
    on_premise_only: bool = False
    no_retention_only: bool = False
    #: executor peer ids: only these may serve / these may not
    pin: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()
    options: GenerationOptions | None = None
    #: the account the receipt is booked under (None: the client's own)
    account: str | None = None

    def keywords(self) -> dict[str, object]:
        """Every field but ``messages``, as keywords of ``LoomClient.chat``."""
        return {name: getattr(self, name) for name in self.__struct_fields__ if name != "messages"}


class BatchProgress(msgspec.Struct, frozen=True, kw_only=True):
    """Where a batch stands, handed to ``on_progress`` once at the start and after each
    item ends."""

    #: items ended, with a result or an error
    done: int
    #: of ``done``, those that ended with an error
    failed: int
    #: items in the batch
    total: int
    #: items started and not ended
    running: int

    @property
    def succeeded(self) -> int:
        return self.done - self.failed


def _check_batch(requests: Iterable[ChatRequest], concurrency: int) -> list[ChatRequest]:
    """``requests`` as a list, checked.

    Raises:
        InvalidRequest: ``concurrency`` is not a whole number from 1 to
            :data:`MAX_CONCURRENCY` (``field="concurrency"``).
        TypeError: an item that is no :class:`ChatRequest` (naming its index).
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise InvalidRequest(f"concurrency is a whole number from 1 to {MAX_CONCURRENCY}, not {concurrency!r}",
                             field="concurrency")  # fmt: skip
    items = list(requests)
    for i, item in enumerate(items):
        if not isinstance(item, ChatRequest):
            raise TypeError(f"batch item {i} is a {type(item).__name__}, not a ChatRequest")
    return items


class _Progress:
    """Counts a batch's items and tells ``on_progress`` (whose exceptions are logged:
    the application's bug must not end a batch that is spending money)."""

    def __init__(self, total: int, on_progress: Callable[[BatchProgress], None] | None) -> None:
        self.total, self.done, self.failed, self.running = total, 0, 0, 0
        self._on_progress = on_progress

    def tell(self) -> None:
        if self._on_progress is None:
            return
        try:
            self._on_progress(BatchProgress(done=self.done, failed=self.failed, total=self.total, running=self.running))
        except Exception:  # noqa: BLE001 - see the class doc
            log.exception("the batch progress callback failed")


async def _outcome(ask: Callable[[ChatRequest], Awaitable[ChatResult]], request: ChatRequest) -> Outcome:
    """What ``ask(request)`` ended with: its result, its LoomError, or a bug as INTERNAL."""
    try:
        return await ask(request)
    except LoomError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - one item's bug must not sink the batch
        log.exception("a batch item failed with an unexpected error")
        error = LoomError(f"{type(exc).__name__}: {exc}", code=ErrorCode.INTERNAL)
        error.__cause__ = exc
        return error


async def run_batch(
    ask: Callable[[ChatRequest], Awaitable[ChatResult]],
    requests: Iterable[ChatRequest],
    deliver: Callable[[int, Outcome], Awaitable[None]],
    *,
    concurrency: int = 4,
    on_progress: Callable[[BatchProgress], None] | None = None,
) -> None:
    """Run every request through ``ask``, at most ``concurrency`` at once, in input
    order of start; ``deliver(index, outcome)`` as each ends (see the module doc). The
    engine under ``chat_many`` and ``chat_as_completed``; ``ask`` is
    ``LoomClient.chat`` there, a fake in tests.

    Raises:
        InvalidRequest, TypeError: see :func:`_check_batch` (before anything runs).

    Cancellation: the workers and their requests are cancelled.
    """
    items = _check_batch(requests, concurrency)
    progress = _Progress(len(items), on_progress)
    progress.tell()
    if not items:
        return
    indexes = iter(range(len(items)))  # shared: next() never awaits, so no two workers take one index

    async def worker() -> None:
        for i in indexes:
            progress.running += 1
            outcome = await _outcome(ask, items[i])
            progress.running -= 1
            progress.done += 1
            progress.failed += isinstance(outcome, LoomError)
            progress.tell()
            await deliver(i, outcome)

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, len(items))):
            nursery.start_soon(worker)


def _asker(client: LoomClient, budget: Budget | None) -> Callable[[ChatRequest], Awaitable[ChatResult]]:
    """``LoomClient.chat`` for one item, with the batch's ``budget``.

    Raises:
        RuntimeError: the client is not running (checked once, before the batch).
    """
    if client.ledger is None:
        raise RuntimeError("the client is not running: use open_client() or run()")

    async def ask(request: ChatRequest) -> ChatResult:
        return await client.chat(request.messages, budget=budget, **request.keywords())

    return ask


async def chat_many(
    client: LoomClient,
    requests: Iterable[ChatRequest],
    *,
    concurrency: int = 4,
    budget: Budget | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
) -> list[Outcome]:
    """``LoomClient.chat_many``: every request's outcome, in input order (module doc)."""
    ask = _asker(client, budget)
    items = _check_batch(requests, concurrency)
    outcomes: list[Outcome | None] = [None] * len(items)

    async def keep(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome

    await run_batch(ask, items, keep, concurrency=concurrency, on_progress=on_progress)
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


def chat_as_completed(
    client: LoomClient,
    requests: Iterable[ChatRequest],
    *,
    concurrency: int = 4,
    budget: Budget | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
) -> AbstractAsyncContextManager[trio.abc.ReceiveChannel[tuple[int, Outcome]]]:
    """``LoomClient.chat_as_completed``: ``(index, outcome)`` as each item ends (module
    doc). The batch is checked here, before the context is entered."""
    ask = _asker(client, budget)
    items = _check_batch(requests, concurrency)
    return _as_completed(ask, items, concurrency, on_progress)


@trio.as_safe_channel
async def _as_completed(
    ask: Callable[[ChatRequest], Awaitable[ChatResult]],
    items: list[ChatRequest],
    concurrency: int,
    on_progress: Callable[[BatchProgress], None] | None,
) -> AsyncIterator[tuple[int, Outcome]]:
    send, receive = trio.open_memory_channel[tuple[int, Outcome]](0)

    async def produce() -> None:
        async with send:
            await run_batch(ask, items, lambda i, o: send.send((i, o)), concurrency=concurrency,
                            on_progress=on_progress)  # fmt: skip

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async with receive:
            async for pair in receive:
                yield pair
