"""How a streamed HTTP body becomes events: SSE and NDJSON framing, read to its end.

Theory of operation: the framing is sans-IO. :class:`LineSplitter`, :class:`SSEDecoder`
and :class:`NDJSONDecoder` take the body's bytes as they come, in chunks of any size, and
return what each chunk completes: whole lines, server-sent events, JSON lines, all still
*bytes* (each adapter decodes payloads with its own msgspec decoder, built once per
module; nothing here decodes JSON or text it does not need). Every line is bounded
(:data:`MAX_LINE`): a runtime that never sends a newline cannot make the executor buffer
without limit.

:func:`iter_sse` and :func:`iter_ndjson` drive a decoder over a response. Each takes a
``done`` callable: once the adapter has seen the stream's last event (OpenAI's
``[DONE]``, Ollama's ``done: true`` line, Anthropic's ``message_stop``), the iterator
stops yielding and reads the rest of the body (:func:`drain`: at most
:data:`DRAIN_LIMIT` bytes within :data:`DRAIN_SECONDS`), so httpx returns the
connection to its pool instead of closing it. Stopping at ``[DONE]`` without reading
the chunked body's end cost a new TCP connection per request (and a TLS handshake per
request on a hosted API). A body that does not end within those bounds, or a stream
left early (client gone, an error, cancellation), is closed by the response's
``aclose``, and httpcore drops a connection whose response was not read to its end: a
half-read connection never goes back to the pool.

:func:`event_stream` runs an adapter's event generator in its consumer's own task
(``contextlib.aclosing``) instead of a background task and channel
(``trio.as_safe_channel``): one task hop per delta fewer. That is safe because no
adapter generator yields inside a cancel scope or a nursery (PEP 789); one that needs
to must use ``trio.as_safe_channel`` instead.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any, ParamSpec, TypeVar

import httpx
import msgspec
import trio

from loomnet.protocol import BackendError, ErrorCode

__all__ = [
    "DRAIN_LIMIT",
    "DRAIN_SECONDS",
    "MAX_LINE",
    "LineSplitter",
    "NDJSONDecoder",
    "SSEDecoder",
    "SSEEvent",
    "drain",
    "event_stream",
    "iter_ndjson",
    "iter_sse",
]

#: bytes one line (an SSE field, an NDJSON object) may have
MAX_LINE = 4 * 1024 * 1024
#: bytes of a body read after the stream's last event, so its connection is reused
DRAIN_LIMIT = 64 * 1024
#: seconds allowed for that read; the body's end normally follows its last event at once
DRAIN_SECONDS = 1.0

_P = ParamSpec("_P")
_T = TypeVar("_T")


class SSEEvent(msgspec.Struct, frozen=True):
    """One server-sent event: its ``event:`` name ("message" when none) and its
    ``data:`` lines joined by newlines, as bytes (UTF-8 JSON, for msgspec to decode)."""

    event: str
    data: bytes


def _too_long(max_line: int, what: str = "a line") -> BackendError:
    return BackendError(f"backend sent {what} over {max_line} bytes", code=ErrorCode.BACKEND_ERROR)


class LineSplitter:
    """Bytes in, whole lines out (without ``\\n``; a ``\\r`` before it stays on the line).

    The unfinished line is kept in a ``bytearray`` and only each new chunk is searched for
    a newline, so a long line that trickles in costs time linear in its length (joining
    the pending bytes to every chunk cost quadratic time: 4 MiB sent 100 bytes at a time
    took minutes of CPU).

    Args:
        max_line: most bytes of an unfinished line (default :data:`MAX_LINE`).
    """

    __slots__ = ("_pending", "max_line")

    def __init__(self, *, max_line: int | None = None) -> None:
        self._pending = bytearray()
        self.max_line = MAX_LINE if max_line is None else max_line

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines ``chunk`` completes.

        Raises:
            BackendError: ``BACKEND_ERROR`` when the unfinished line exceeds ``max_line``.
        """
        if b"\n" not in chunk:
            self._pending += chunk
            if len(self._pending) > self.max_line:
                raise _too_long(self.max_line)
            return []
        lines = chunk.split(b"\n")
        if self._pending:
            self._pending += lines[0]
            lines[0] = bytes(self._pending)
        self._pending = bytearray(lines.pop())
        if len(self._pending) > self.max_line:
            raise _too_long(self.max_line)
        return lines

    def idle(self) -> bool:
        """No unfinished line is pending: the next chunk starts a line."""
        return not self._pending

    def held(self) -> int:
        """Bytes of the unfinished line (at most ``max_line``)."""
        return len(self._pending)

    def end(self) -> bytes:
        """What came after the last newline (b"" when nothing): the body's last line."""
        rest, self._pending = bytes(self._pending), bytearray()
        return rest


class SSEDecoder:
    """Server-sent events from a byte stream (sans-IO). Comments (``: OPENROUTER
    PROCESSING``, pings) are skipped; llama-server's non-standard ``error: {json}``
    lines come out as ``error`` events; fields other than ``data``, ``event`` and
    ``error`` (``id``, ``retry``) are ignored.

    Args:
        max_line: most bytes of an unfinished line, and of one event's ``data`` lines
            together (default :data:`MAX_LINE`): a runtime that sends ``data:`` lines
            and never the blank line that ends the event is refused, not buffered.
    """

    __slots__ = ("_lines", "_event", "_data", "_size")

    def __init__(self, *, max_line: int | None = None) -> None:
        self._lines = LineSplitter(max_line=max_line)
        self._event = ""
        self._data: list[bytes] = []
        self._size = 0  # bytes in _data

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events ``chunk`` completes, in order.

        Raises:
            BackendError: ``BACKEND_ERROR`` for a line, or an event's data, over ``max_line`` bytes.
        """
        if not self._data and chunk[:5] == b"data:" and self._lines.idle() and len(chunk) <= self._lines.max_line:
            # the usual chunk: one whole event of one data line (no splitting, no line by line)
            line = chunk[:-2] if chunk[-2:] == b"\n\n" else chunk[:-4] if chunk[-4:] == b"\r\n\r\n" else b""
            if line and b"\n" not in line and line[-1:] != b"\r":
                event, self._event = self._event or "message", ""
                return [SSEEvent(event, line[6:] if line[5:6] == b" " else line[5:])]
        events: list[SSEEvent] = []
        for line in self._lines.feed(chunk):
            self._line(line, events)
        return events

    def end(self) -> list[SSEEvent]:
        """The events the body's end completes (an event without its blank line)."""
        events: list[SSEEvent] = []
        if rest := self._lines.end():
            self._line(rest, events)
        if self._data:
            self._line(b"", events)
        return events

    def held(self) -> int:
        """Bytes held between chunks: the unfinished line, or the unfinished event's
        data (each at most ``max_line``)."""
        return max(self._lines.held(), self._size)

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        if line[-1:] == b"\r":
            line = line[:-1]
        if not line:  # the blank line: the event is complete
            if data := self._data:
                events.append(SSEEvent(self._event or "message", data[0] if len(data) == 1 else b"\n".join(data)))
                self._data, self._size = [], 0
            self._event = ""
            return
        if line[0] == 58:  # b":": a comment
            return
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._size += len(value) + 1
            if self._size > self._lines.max_line:
                raise _too_long(self._lines.max_line, "an event")
            self._data.append(value)
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")
        elif field == b"error":
            events.append(SSEEvent("error", value))


class NDJSONDecoder:
    """One JSON value a line (Ollama's native streaming), as bytes; blank lines skipped.

    Args:
        max_line: most bytes of an unfinished line (default :data:`MAX_LINE`).
    """

    __slots__ = ("_lines",)

    def __init__(self, *, max_line: int | None = None) -> None:
        self._lines = LineSplitter(max_line=max_line)

    def feed(self, chunk: bytes) -> list[bytes]:
        """The non-blank lines ``chunk`` completes.

        Raises:
            BackendError: ``BACKEND_ERROR`` for a line over ``max_line`` bytes.
        """
        return [line for line in self._lines.feed(chunk) if line.strip()]

    def held(self) -> int:
        """Bytes of the unfinished line held between chunks (at most ``max_line``)."""
        return self._lines.held()

    def end(self) -> list[bytes]:
        """The body's last line, if it had no newline."""
        rest = self._lines.end()
        return [rest] if rest.strip() else []


async def drain(chunks: AsyncIterator[bytes], *, limit: int | None = None, seconds: float | None = None) -> bool:
    """Read what is left of a body whose answer is complete, so that httpx can return
    its connection to the pool. Returns True when the body ended within ``limit`` bytes
    (default :data:`DRAIN_LIMIT`) and ``seconds`` (default :data:`DRAIN_SECONDS`); False
    otherwise (then closing the response closes the connection). A failure while
    reading is not an error: the answer was already whole."""
    limit = DRAIN_LIMIT if limit is None else limit
    seconds = DRAIN_SECONDS if seconds is None else seconds
    seen = 0
    with trio.move_on_after(seconds):
        try:
            async for chunk in chunks:
                seen += len(chunk)
                if seen > limit:
                    return False
        except httpx.HTTPError:
            return False
        return True
    return False


def iter_sse(response: httpx.Response, done: Callable[[], bool] = lambda: False) -> AsyncIterator[SSEEvent]:
    """The events of a streamed SSE body, until ``done()`` is true after an event; then
    the rest of the body is drained (see :func:`drain`) and the iteration ends.

    Raises:
        BackendError: ``BACKEND_ERROR`` for a line over :data:`MAX_LINE` bytes.
        httpx.HTTPError: a read failed (``HttpBackend.map_errors`` maps it).
    """
    return _iter_decoded(response, SSEDecoder(), done)


def iter_ndjson(response: httpx.Response, done: Callable[[], bool] = lambda: False) -> AsyncIterator[bytes]:
    """The non-blank lines of a streamed NDJSON body, until ``done()`` is true after a
    line; then the rest of the body is drained (see :func:`drain`).

    Raises: as :func:`iter_sse`.
    """
    return _iter_decoded(response, NDJSONDecoder(), done)


async def _iter_decoded(response: httpx.Response, decoder: Any, done: Callable[[], bool]) -> AsyncIterator[Any]:
    """What ``decoder`` (``feed(bytes)`` and ``end()``, each a list of items) makes of
    the body, item by item, until ``done()``; then the rest is drained."""
    chunks = response.aiter_bytes()
    async for chunk in chunks:
        for item in decoder.feed(chunk):
            yield item
            if done():
                await drain(chunks)
                return
    for item in decoder.end():
        yield item
        if done():
            return


def event_stream(
    fn: Callable[_P, AsyncGenerator[_T, None]],
) -> Callable[_P, AbstractAsyncContextManager[AsyncIterator[_T]]]:
    """Decorate an adapter's event generator so that calling it returns
    ``async with ... as events: async for event in events``, run in the consumer's task.

    Leaving the ``async with`` (finished, broken out of, cancelled, or failed) closes the
    generator, which runs its ``finally`` blocks there and then (an HTTP response is
    closed, and with it a connection not read to its end). An exception raised by the
    generator comes out of the ``async for`` and leaves the ``async with`` as it is.
    The generator must not yield inside a cancel scope or a nursery (see module doc).
    """

    @functools.wraps(fn)
    def open_events(*args: _P.args, **kwargs: _P.kwargs) -> AbstractAsyncContextManager[AsyncIterator[_T]]:
        return aclosing(fn(*args, **kwargs))

    return open_events
