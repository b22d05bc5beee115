"""Answering a request from the model's response cache (``_response_cache``): the
stored answer streams through the same relay as a live one (its batching, its client
watch, the drain's abort), needs no slot and no backend, and its receipt says
``cached``, priced per the model's ``billing``.

A mixin of :class:`~loomnet.node._server.InferenceServer` (its ``config``, ``abort``,
``metrics``, ``_settle_failure`` and ``_deliver``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import trio

from loomnet.client import P2PStream
from loomnet.protocol import Envelope, InferenceConnection, Receipt

from ._catalog import CatalogEntry
from ._metering import Output
from ._relay import relay_answer
from ._response_cache import CacheLookup

__all__ = ["CachedAnswers"]


class CachedAnswers:
    """See the module doc."""

    async def _serve_cached(
        self, stream: P2PStream, conn: InferenceConnection, entry: CatalogEntry, cache: CacheLookup,
        book: Callable[..., Awaitable[tuple[Envelope, bytes, Receipt]]], bookings: trio.Nursery,
    ) -> object | None:
        """Answer from the response cache: the stored answer streams as chunk frames (the
        relay's batching and client watch, no slot, no backend); the receipt says
        ``cached``, is counted from the stored usage and priced per the model's ``billing``."""
        assert cache.hit is not None
        book = functools.partial(book, entry=cache.billed(entry), cached=True)
        output = Output()
        admitted = trio.current_time()
        try:
            finished = await relay_answer(
                stream, conn, cache.hit.replay, output, chunk_interval=self.config.chunk_interval,
                progress_interval=self.config.progress_interval, send_timeout=self.config.ack_timeout,
                abort=self.abort,
            )
        except Exception as exc:  # the client left or broke the protocol: bill what it got
            error = await self._settle_failure(exc, output, book)
            self.metrics.request_done(entry.offer.name, error.code, duration=trio.current_time() - admitted)
            raise error from None
        finish_reason = str(finished.finish_reason)
        envelope, receipt_digest, receipt = await book(output=output, finish_reason=finish_reason, usage=finished.usage)
        return await self._deliver(stream, conn, entry, envelope, receipt_digest, receipt, output, admitted, bookings)
