"""Per-peer limits of the libp2p adapter (trap I), against real py-libp2p hosts on 127.0.0.1.

Each test has a hostile peer hold more than it may (live connections, streams,
unread bytes) while an honest peer is served, and checks the counters return to
zero once the hostile peer is gone. Each fails with ``client/_p2p_guard.py``'s hooks
removed: libp2p 0.8.1 limits none of these per peer.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

from loomnet.client._p2p import P2PConfig, P2PNode, P2PStream
from loomnet.client._p2p_guard import PeerGuard
from loomnet.protocol._errors import LoomError

from ..limits import fail_after

pytestmark = pytest.mark.integration

ECHO = "/loomnet/test/echo/1.0.0"
HOLD = "/loomnet/test/hold/1.0.0"


@pytest.fixture
async def start_node(nursery: trio.Nursery) -> Any:
    """Start ``P2PNode``s in the test's nursery; ``stop`` them all at teardown."""
    nodes: list[P2PNode] = []

    async def start(config: P2PConfig = P2PConfig(), seed: bytes | None = None) -> Any:
        node = P2PNode(seed or os.urandom(32), config)
        nodes.append(node)
        return node, await nursery.start(node.run)

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()


async def echo_upper(stream: P2PStream) -> None:
    request = b""
    while chunk := await stream.receive_some(timeout=5):
        request += chunk
    await stream.send_all(request.upper(), timeout=5)


async def ask(node: P2PNode, peer: str, addrs: list[str], data: bytes) -> bytes:
    stream = await node.open_stream(peer, ECHO, addrs=addrs, timeout=5)
    try:
        await stream.send_all(data, timeout=5)
        await stream.close()
        response = b""
        while chunk := await stream.receive_some(timeout=5):
            response += chunk
        return response
    finally:
        await stream.close()


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


@fail_after(60)
async def test_a_peer_is_held_to_its_live_connections_and_others_are_served(start_node: Any) -> None:
    # libp2p would let one peer take every inbound slot: 6 here, its max_connections
    server, info = await start_node(P2PConfig(max_connections=6, max_connections_per_peer=2))
    server.set_stream_handler(ECHO, echo_upper)
    hostile_seed = os.urandom(32)
    hostile = [(await start_node(seed=hostile_seed))[0] for _ in range(8)]  # one identity, 8 hosts
    for node in hostile:
        try:
            await node.connect(info.addrs[0], timeout=5)
        except LoomError:
            pass  # refused right after the handshake: libp2p may report either way
    await wait_until(lambda: server.statistics().connections_refused == 6)
    assert server.statistics().connections_inbound == 2
    honest, _ = await start_node()
    assert await ask(honest, server.peer_id, info.addrs, b"hello") == b"HELLO"
    for node in hostile:
        node.stop()
    await wait_until(lambda: server.statistics().connections_inbound == 1)  # the honest one


@fail_after(60)
async def test_a_peer_is_held_to_its_streams_and_told_why(start_node: Any) -> None:
    server, info = await start_node(P2PConfig(max_streams_per_peer=3))
    release = trio.Event()
    refused: list[str] = []

    async def hold(stream: P2PStream) -> None:
        await stream.send_all(b"held", timeout=5)
        await release.wait()

    async def refuse(stream: P2PStream) -> None:
        refused.append(stream.remote_peer)
        await stream.send_all(b"too many", timeout=5)

    server.set_stream_handler(HOLD, hold, refuse=refuse)
    server.set_stream_handler(ECHO, echo_upper)
    hostile, _ = await start_node()
    streams = [await hostile.open_stream(server.peer_id, HOLD, addrs=info.addrs, timeout=5) for _ in range(7)]
    try:
        answers = [await s.receive_some(timeout=5) for s in streams]
        assert answers.count(b"held") == 3 and answers.count(b"too many") == 4
        assert refused == [hostile.peer_id] * 4
        stats = server.statistics()
        assert stats.streams_inbound == 3 and stats.streams_refused == 4
        # the limit is per peer and per protocol: the same peer on another protocol,
        # and another peer on this one, are served
        assert await ask(hostile, server.peer_id, info.addrs, b"echo") == b"ECHO"
        honest, _ = await start_node()
        other = await honest.open_stream(server.peer_id, HOLD, addrs=info.addrs, timeout=5)
        try:
            assert await other.receive_some(timeout=5) == b"held"
        finally:
            await other.reset()
    finally:
        for s in streams:
            await s.reset()
    release.set()
    await wait_until(lambda: server.statistics().streams_inbound == 0)


@fail_after(60)
async def test_a_peer_that_ignores_flow_control_is_cut_off(start_node: Any) -> None:
    bound = 2 << 20  # at least one window (trap Z)
    server, info = await start_node(P2PConfig(max_unread_bytes_per_connection=bound, max_unread_bytes=2 * bound))
    never_read = trio.Event()

    async def sink(stream: P2PStream) -> None:
        await never_read.wait()  # reads nothing: whatever arrives stays buffered

    server.set_stream_handler(HOLD, sink)
    server.set_stream_handler(ECHO, echo_upper)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, server.statistics().unread_bytes)
            await trio.sleep(0)

    hostile, _ = await start_node()
    stream = await hostile.open_stream(server.peer_id, HOLD, addrs=info.addrs, timeout=5)
    stream._stream.muxed_stream.send_window = 1 << 30  # a peer that ignores its window
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        with pytest.raises(LoomError):  # its connection is closed under it
            await stream.send_all(b"x" * (8 * bound), timeout=10)
        await wait_until(lambda: server.statistics().connections_flooded == 1)
        nursery.cancel_scope.cancel()
    await stream.reset()
    assert peak <= bound
    honest, _ = await start_node()
    assert await ask(honest, server.peer_id, info.addrs, b"still here") == b"STILL HERE"
    await wait_until(lambda: server.statistics().unread_bytes == 0 and server.statistics().connections_inbound == 1)
    never_read.set()


def test_the_guard_forgets_peers_that_left() -> None:
    guard = PeerGuard(P2PConfig(max_connections_per_peer=2, max_streams_per_peer=1))
    assert guard.admit_connection("a") and guard.admit_connection("a")
    assert not guard.admit_connection("a") and guard.admit_connection("b")
    with guard.stream_slot("/p", "a") as first, guard.stream_slot("/p", "a") as second:
        assert first and not second
    for peer in ("a", "a", "b"):
        guard.connection_closed(peer)
    assert guard.connections_inbound == 0 and guard.streams_inbound == 0
    assert guard._inbound == {} and guard._streams == {}  # no entry per departed peer
    expected = {"connections_refused": 1, "streams_refused": 1}
    expected |= {"connections_flooded": 0, "connections_dead": 0, "dials_refused": 0, "dials": 0}
    assert guard.counts == expected
