"""A stream a handler is done with leaves its yamux connection's tables at once (trap Y),
against real py-libp2p hosts on 127.0.0.1.

py-libp2p 0.8.1 kept an entry (the stream, its receive buffer, its event) for every
stream the peer reset before the handler had read all it sent: such a stream the
handler then closed was marked open again, and the sweeper (60 s grace) skips open
streams, so the entry stayed for the connection's life. An executor refusing a request
flood (the request's body left unread) grew by ~20 entries a second
(``bench/slow_peers.py``). Fails without ``client/_p2p_types._settle_yamux_stream``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

from loomnet.client._p2p import P2PNode, P2PStream

from ..limits import fail_after

pytestmark = pytest.mark.integration

REFUSE = "/loomnet/test/refuse/1.0.0"
#: streams each test opens
STREAMS = 20


def left(node: P2PNode, ids: set[int]) -> list[tuple]:
    """The streams of ``ids`` still in ``node``'s connections' yamux tables: (id, closed,
    send_closed, recv_closed, reset_received, bytes buffered)."""
    return [(sid, s.closed, s.send_closed, s.recv_closed, s.reset_received, len(m.stream_buffers.get(sid, b"")))
            for m in node._guard.open_muxers() for sid, s in m.streams.items() if sid in ids] + [
            (sid, "buffer only") for m in node._guard.open_muxers() for sid in m.stream_buffers
            if sid in ids and sid not in m.streams]  # fmt: skip


def muxed_id(stream: P2PStream) -> int:
    return stream._stream.muxed_stream.stream_id


async def wait_until(predicate: Any, timeout: float = 10.0, why: Any = None) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(why() if why else "timed out")


@pytest.mark.parametrize("peer_resets", ["before the handler ends", "after the handler ends"])
@fail_after(60)
async def test_a_stream_left_unread_and_reset_leaves_no_entry_behind(nodes: Any, peer_resets: str) -> None:
    server, info = await nodes()
    client, _ = await nodes()
    done = 0
    reset = trio.Event()
    ids: set[int] = set()  # the server's ids of the streams the test opened

    async def refuse(stream: P2PStream) -> None:
        """Reads a 4-byte header and refuses, leaving the body unread (an executor's
        refusal of an over-rate request)."""
        nonlocal done
        ids.add(muxed_id(stream))
        assert len(await stream.receive_some(4, timeout=5)) == 4
        if peer_resets == "before the handler ends":
            await reset.wait()
            await trio.sleep(0.05)  # the RST has arrived
        done += 1

    server.set_stream_handler(REFUSE, refuse)
    for i in range(STREAMS):
        reset = trio.Event()
        stream = await client.open_stream(info.peer_id, REFUSE, addrs=info.addrs, timeout=5)
        await stream.send_all(b"\0\0\4\0" + os.urandom(1024), timeout=5)
        if peer_resets == "after the handler ends":
            await wait_until(lambda i=i: done == i + 1)
        await stream.reset()
        reset.set()
        await wait_until(lambda i=i: done == i + 1)
    # every stream is over on both sides: the server's connection keeps none of them
    assert len(ids) == STREAMS
    await wait_until(lambda: not left(server, ids), timeout=5, why=lambda: left(server, ids))


@fail_after(60)
async def test_a_stream_we_reset_drops_what_it_had_not_read(nodes: Any) -> None:
    server, info = await nodes()
    client, _ = await nodes()
    got = trio.Event()
    ids: set[int] = set()

    async def sink(stream: P2PStream) -> None:
        ids.add(muxed_id(stream))
        await stream.receive_some(1, timeout=5)
        got.set()
        await stream.reset()  # with ~1 KiB still unread; the peer's side stays open

    server.set_stream_handler(REFUSE, sink)
    stream = await client.open_stream(info.peer_id, REFUSE, addrs=info.addrs, timeout=5)
    await stream.send_all(os.urandom(1024), timeout=5)
    await got.wait()
    await wait_until(lambda: not left(server, ids), timeout=5, why=lambda: left(server, ids))
    await stream.reset()


@fail_after(60)
async def test_refused_bodies_arriving_after_the_handler_ends_are_dropped(nodes: Any) -> None:
    """An executor refuses a 1 MiB request from its header (rate limit, budget) and its
    handler ends; the rest of the body keeps arriving. It used to wait in yamux's buffer
    until the client closed, counting toward trap K's unread bound: the tenth refusal in
    a row on one connection had it closed as flooded (review of trap Z). Now what
    arrives for a stream nobody will read is dropped."""
    server, info = await nodes()
    client, _ = await nodes()
    refusal = b"\0\0\0\7REFUSED"
    size = 1 << 20

    async def refuse(stream: P2PStream) -> None:
        assert len(await stream.receive_some(4, timeout=5)) == 4
        await stream.send_all(refusal, timeout=5)

    server.set_stream_handler(REFUSE, refuse)
    for _ in range(24):  # 24 MiB in all: past trap K's 16 MiB bound if it were kept
        stream = await client.open_stream(info.peer_id, REFUSE, addrs=info.addrs, timeout=5)
        await stream.send_all(size.to_bytes(4, "big") + os.urandom(size), timeout=10)
        got = b""
        while len(got) < len(refusal):
            got += await stream.receive_some(64, timeout=5)
        assert got == refusal
        await stream.close()
    # the last handler's stream is settled once the guard sees the handler end
    await wait_until(lambda: server.statistics().unread_bytes < 256 * 1024, why=lambda: server.statistics())
    assert server.statistics().connections_flooded == 0 and client.statistics().connections_flooded == 0
