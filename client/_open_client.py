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
