"""Waiting for a generation slot while the client's stream is watched.

A request that finds no free slot waits in its model's queue (``_queue``) and gets no
frame meanwhile; a client that leaves (resets or closes its stream, its process dies)
must leave the queue at once instead of holding its place until ``queue-timeout``.
"""

from __future__ import annotations

import trio

from loomnet.client import P2PStream
from loomnet.protocol import LoomError

from ._queue import Lane, OverCapacity, Slot, Slots
from ._relay import wait_client_left

__all__ = ["wait_for_slot"]


async def wait_for_slot(slots: Slots, lane: Lane, stream: P2PStream) -> Slot:
    """A generation slot in ``lane``: at once, or after waiting in its queue while the
    client's ``stream`` is watched.

    Raises:
        OverCapacity: the queue is full, or no slot came within ``queue-timeout``.
        ClientGone: the client left while it waited (it left the queue at once).
        UnexpectedFrame: the client sent data while it waited.
    """
    try:
        return slots.acquire_nowait(lane)
    except trio.WouldBlock:
        pass
    result: Slot | OverCapacity | None = None
    left: LoomError | None = None

    async def watch(scope: trio.CancelScope) -> None:
        nonlocal left
        left = await wait_client_left(stream)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        try:
            result = await slots.acquire(lane)
        except OverCapacity as exc:  # raised below, outside the nursery: no ExceptionGroup
            result = exc
        nursery.cancel_scope.cancel()
    if left is not None:
        if isinstance(result, Slot):
            result.release()
        raise left
    if isinstance(result, OverCapacity):
        raise result
    assert result is not None
    return result
