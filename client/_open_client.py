"""``open_client``: run a client for the length of an ``async with`` block, and let
whatever ends the block leave as itself."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from loomnet.protocol import SigningKey

from ._budget import BudgetWarning
from ._client import ClientConfig, LoomClient
from ._tokens import TokenCounter

__all__ = ["open_client"]


@asynccontextmanager
async def open_client(
    config: ClientConfig | None = None,
    *,
    key: SigningKey | None = None,
    on_budget_warning: Callable[[BudgetWarning], None] | None = None,
    **parts: Any,
) -> AsyncIterator[LoomClient]:
    """Run a :class:`LoomClient` for the duration of the ``async with`` block.

    ``key``, ``on_budget_warning`` (called when spending reaches a warning threshold of
    ``config.budget``) and ``parts`` (``router=``, ``health=``, ``rng=``, ``opener=``)
    go to :class:`LoomClient`.

    Error handling: whatever leaves the block (``NoOfferError``, ``RemoteError``, the
    caller's own error, ``KeyboardInterrupt``, ``SystemExit``, any ``BaseException``)
    leaves ``open_client`` as itself, the same object, as httpx's clients do, never
    wrapped in the ``ExceptionGroup`` of the nursery that runs the client; so does an
    error starting the client (an unusable identity or ledger), or one error of the
    client's own tasks (a ``KeyboardInterrupt`` that trio delivers there).

    Once the client has started, tiktoken's default encoding loads in a worker thread
    meanwhile (``_warm_tokens``), so the first request does not pay for it.

    Cancellation: a cancelled enclosing scope ends the block with ``trio.Cancelled``,
    which leaves as itself too, so the scope that cancelled catches it as usual. The
    client's own tasks are cancelled and its ledger closed on every way out.
    """
    client = LoomClient(config or ClientConfig(), key=key, on_budget_warning=on_budget_warning, **parts)
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                try:
                    await nursery.start(client.run)
                except BaseExceptionGroup as group:  # from the client's own nurseries
                    raise _sole_error(group) from None
                nursery.start_soon(_warm_tokens, client.tokens)
                try:
                    yield client
                finally:
                    await client.close_sessions()  # the last ack reaches its executor before the host stops
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
        if error is None or _only_cancelled(error):
            error = errors[0]
    if error is not None:
        try:
            raise error
        finally:
            error = None  # no reference cycle through the traceback


#: the encoding loaded ahead: what a model name that is no OpenAI one counts with
_WARM_ENCODING = "cl100k_base"


async def _warm_tokens(tokens: TokenCounter) -> None:
    """Load tiktoken's default encoding in a worker thread (~0.2 s, offline, once per
    counter), so the first request's prompt count and the first receipt's count find it
    ready instead of loading it then; one that comes sooner waits for this same load.

    Started once the client has started, so the load never delays joining (tiktoken's
    Rust constructor holds the GIL for ~0.1 s of it). Abandoned on cancellation: a
    client block that ends first does not wait for it.
    """
    await trio.to_thread.run_sync(tokens.load, _WARM_ENCODING, abandon_on_cancel=True)


def _sole_error(group: BaseExceptionGroup) -> BaseException:
    """The one error in ``group`` besides cancellations, or ``group`` itself when there
    are several."""
    leaves = _leaves(group)
    errors = [e for e in leaves if not isinstance(e, trio.Cancelled)] or leaves
    return errors[0] if len(errors) == 1 else group


def _only_cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is a cancellation: ``trio.Cancelled``, or a group (nested
    nurseries in the block, an ASGI server's) holding nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(isinstance(e, trio.Cancelled) for e in _leaves(exc))
    return isinstance(exc, trio.Cancelled)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions in ``group`` and its nested groups."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
