"""An in-memory pair of streams with ``P2PStream``'s interface: the transport seam's
other side, in the spirit of ``trio.testing.memory_stream_pair``.

The client (``ChatStream``), the server (``InferenceServer.handle``) and the benches
take any stream shaped like ``ByteStream`` (``_stream_kit``) with ``remote_peer`` and
``protocol``; this pair lets them run with no libp2p at all, under trio's autojump
clock in tests, and measures loomnet's own cost apart from libp2p's in ``bench/``.

Semantics follow what ``reference/libp2p.md`` measured for yamux streams: a reset or a
close on one side reads as end of stream (``b""``) on the other; a write to a stream the
peer reset fails with ``NetworkError``; a read that outlives its ``timeout`` raises
``NetworkTimeout``. Writes never block (no flow control): the tests here do not need it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import trio

from loomnet.protocol import ErrorCode, NetworkError, NetworkTimeout

__all__ = ["MemoryP2PStream", "MemoryStreamOpener", "stream_pair"]


class _Pipe:
    """One direction: bytes written by one side, read by the other."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False  # the writer closed its side
        self.broken = False  # either side reset
        self._changed = trio.Event()

    def wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self) -> None:
        await self._changed.wait()


class MemoryP2PStream:
    """One end of a :func:`stream_pair`; ``remote_peer`` is the other end's peer id."""

    def __init__(self, incoming: _Pipe, outgoing: _Pipe, *, remote_peer: str, protocol: str) -> None:
        self._in = incoming
        self._out = outgoing
        self.remote_peer = remote_peer
        self.protocol = protocol
        self.was_reset = False
        self.was_closed = False

    async def receive_some(self, max_bytes: int = 65536, *, timeout: float) -> bytes:
        with trio.move_on_after(timeout) as scope:
            while not self._in.buffer and not (self._in.eof or self._in.broken):
                await self._in.wait()
        if scope.cancelled_caught:
            raise NetworkTimeout("receive: deadline passed")
        await trio.lowlevel.checkpoint()
        if self._in.broken and not self._in.buffer:
            return b""
        data = bytes(self._in.buffer[:max_bytes])
        del self._in.buffer[:max_bytes]
        return data

    async def send_all(self, data: bytes, *, timeout: float) -> None:
        await trio.lowlevel.checkpoint()
        if self._out.broken or self._out.eof:
            raise NetworkError("send: the stream is reset or closed", code=ErrorCode.STREAM_FAILED)
        self._out.buffer += data
        self._out.wake()

    async def close(self) -> None:
        self.was_closed = True
        self._out.eof = True
        self._out.wake()
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        self.was_reset = True
        for pipe in (self._in, self._out):
            pipe.broken = True
            pipe.buffer.clear()
            pipe.wake()
        await trio.lowlevel.checkpoint()


def stream_pair(
    client_peer: str, executor_peer: str, protocol: str = "/loomnet/infer/1"
) -> tuple[MemoryP2PStream, MemoryP2PStream]:
    """``(client_end, executor_end)``: each end's ``remote_peer`` is the other's id."""
    to_executor, to_client = _Pipe(), _Pipe()
    client = MemoryP2PStream(to_client, to_executor, remote_peer=executor_peer, protocol=protocol)
    executor = MemoryP2PStream(to_executor, to_client, remote_peer=client_peer, protocol=protocol)
    return client, executor


class MemoryStreamOpener:
    """A ``StreamOpener`` whose streams lead to in-process handlers, no libp2p.

    ``serve(peer_id, protocol, handler)`` registers what answers; ``open_stream`` makes
    a :func:`stream_pair`, starts ``handler(executor_end)`` in ``nursery`` and returns
    the client end. Protocols are negotiated as libp2p does: the first of the
    caller's protocols the peer serves wins, and the stream's ``protocol`` says which.

    Args:
        nursery: where the handlers run (one task per stream).
        client_peer: the peer id the handlers see as ``remote_peer``.
    """

    def __init__(self, nursery: trio.Nursery, client_peer: str) -> None:
        self._nursery = nursery
        self._client_peer = client_peer
        self._handlers: dict[tuple[str, str], Callable[[MemoryP2PStream], Awaitable[None]]] = {}
        #: streams opened, per protocol
        self.opened: dict[str, int] = {}

    def serve(self, peer_id: str, protocol: str, handler: Callable[[MemoryP2PStream], Awaitable[None]]) -> None:
        self._handlers[(peer_id, protocol)] = handler

    async def open_stream(
        self, peer_id: str, protocol: str | Sequence[str], *, addrs: Sequence[str] = (), timeout: float | None = None
    ) -> MemoryP2PStream:
        await trio.lowlevel.checkpoint()
        for wanted in [protocol] if isinstance(protocol, str) else protocol:
            handler = self._handlers.get((peer_id, wanted))
            if handler is not None:
                break
        else:
            raise NetworkError(f"open {protocol} to {peer_id}: no such peer or protocol", code=ErrorCode.CONNECT_FAILED)
        client_end, executor_end = stream_pair(self._client_peer, peer_id, wanted)
        self.opened[wanted] = self.opened.get(wanted, 0) + 1
        self._nursery.start_soon(self._serve, handler, executor_end)
        return client_end

    @staticmethod
    async def _serve(handler: Callable[[MemoryP2PStream], Awaitable[None]], end: MemoryP2PStream) -> None:
        try:
            await handler(end)
        finally:  # as the libp2p guard does: the handler's side is closed when it returns
            await end.close()
