"""An in-memory pair of streams with ``P2PStream``'s interface, for driving the server
without libp2p (and under trio's autojump clock).

Semantics follow what ``reference/libp2p.md`` measured for yamux streams: a reset or a
close on one side reads as end of stream (``b""``) on the other; a write to a stream the
peer reset fails with ``NetworkError``; a read that outlives its ``timeout`` raises
``NetworkTimeout``. Writes never block (no flow control): the tests here do not need it.
"""

from __future__ import annotations

import trio

from loomnet.protocol import ErrorCode, NetworkError, NetworkTimeout

__all__ = ["MemoryP2PStream", "stream_pair"]


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


def stream_pair(client_peer: str, executor_peer: str, protocol: str = "/loomnet/infer/1") -> tuple[MemoryP2PStream, MemoryP2PStream]:
    """``(client_end, executor_end)``: each end's ``remote_peer`` is the other's id."""
    to_executor, to_client = _Pipe(), _Pipe()
    client = MemoryP2PStream(to_client, to_executor, remote_peer=executor_peer, protocol=protocol)
    executor = MemoryP2PStream(to_executor, to_client, remote_peer=client_peer, protocol=protocol)
    return client, executor
