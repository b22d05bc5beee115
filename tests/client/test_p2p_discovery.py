"""The adapter's dials, as discovery needs them: real py-libp2p hosts on 127.0.0.1.

Traps O (libp2p's negative dial cache) and P (libp2p dials one address per peer), each
test failing without its workaround in ``client/_p2p.py``; and the direction of each
connection, which ``loomnet peers`` shows.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

from loomnet.client._p2p import P2PConfig, P2PNode, P2PStream
from loomnet.protocol._errors import NetworkError

from ..limits import fail_after

pytestmark = pytest.mark.integration

ECHO = "/loomnet/test/echo/1.0.0"


@pytest.fixture
async def start_node(nursery: trio.Nursery) -> Any:
    nodes: list[P2PNode] = []

    async def start(config: P2PConfig | None = None) -> Any:
        node = P2PNode(os.urandom(32), config or P2PConfig())
        nodes.append(node)
        return node, await nursery.start(node.run)

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()


async def dead_addr(peer_id: str) -> str:
    """A loopback address where nobody listens, for ``peer_id``."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        return f"/ip4/127.0.0.1/tcp/{sock.getsockname()[1]}/p2p/{peer_id}"


async def echo(stream: P2PStream) -> None:
    await stream.send_all(await stream.receive_some(timeout=5), timeout=5)


@fail_after(30)
async def test_trap_q_a_failed_dial_does_not_block_the_next(start_node: Any) -> None:
    # libp2p refused every dial to a peer for 60 s after one failed on all its addresses,
    # new addresses included: a bootstrap peer back from a restart stayed undialable.
    server, info = await start_node()
    client, _ = await start_node()
    with pytest.raises(NetworkError):
        await client.connect(await dead_addr(server.peer_id))
    assert await client.connect(info.addrs[0]) == server.peer_id
    assert client.connected_peers() == [server.peer_id]


@fail_after(30)
async def test_trap_r_every_address_is_tried_in_order(start_node: Any) -> None:
    # libp2p dials the first TCP address its peerstore holds and no other: an advert
    # or an announcement whose first address is dead hid the peer's good one.
    server, info = await start_node()
    server.set_stream_handler(ECHO, echo)
    client, _ = await start_node()
    addrs = [await dead_addr(server.peer_id), await dead_addr(server.peer_id), info.addrs[0]]
    stream = await client.open_stream(server.peer_id, ECHO, addrs=addrs, timeout=20)
    try:
        await stream.send_all(b"ping", timeout=5)
        assert await stream.receive_some(timeout=5) == b"ping"
    finally:
        await stream.close()


@fail_after(30)
async def test_connections_say_who_dialed_whom(start_node: Any) -> None:
    server, info = await start_node()
    client, _ = await start_node()
    assert client.connections() == {}
    await client.connect(info.addrs[0])
    with trio.fail_after(10):
        while server.peer_id not in client.connections() or client.peer_id not in server.connections():
            await trio.sleep(0.01)
    assert client.connections() == {server.peer_id: "outbound"}
    assert server.connections() == {client.peer_id: "inbound"}
