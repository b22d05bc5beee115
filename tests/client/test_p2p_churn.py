"""Trap M: every connection stays known until closed, against real py-libp2p hosts on 127.0.0.1.

py-libp2p 0.8.1 could leave a node with a live connection its swarm no longer
tracked: libp2p's pubsub retries dialed a peer we were disconnecting from, and
``Swarm.close_peer`` dropped the peer's whole entry, forgetting the connection that
dial had just registered. Nothing closed it, not even stopping the node; the far
side counted it as live. Each test fails with its hook in ``client/_p2p_guard.py``
(``dial_on_request``, ``close_peer_fully``, ``PeerGuard.close_all``, ``_keepalive``)
removed.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

from loomnet.client._p2p import P2PConfig, P2PNode

from ..limits import fail_after
from .test_p2p_limits import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def start_node(nursery: trio.Nursery) -> Any:
    """Start ``P2PNode``s in the test's nursery; ``stop`` them all at teardown."""
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


def inbound(node: P2PNode) -> int:
    return node.statistics().connections_inbound


@fail_after(30)
async def test_libp2p_does_not_redial_a_peer_we_disconnected(start_node: Any) -> None:
    # The dial seen under load: pubsub's stream-registration retry for a peer whose
    # connection had just closed; swarm.new_stream dials when there is none.
    server, info = await start_node(P2PConfig(topics=["t"]))
    client, _ = await start_node()
    await client.connect(info.addrs[0])
    await wait_until(lambda: inbound(server) == 1)
    await client.disconnect(server.peer_id)
    await wait_until(lambda: inbound(server) == 0)
    await client._pubsub._handle_new_peer_with_retry(server._host.get_id(), timeout=5)
    assert client.connected_peers() == []  # libp2p dialed the server again
    await trio.sleep(0.5)  # a dial that got through would be in by now
    assert inbound(server) == 0
    assert client.statistics().dials_refused == 1
    await client.connect(info.addrs[0])  # dials loomnet asks for still happen
    await wait_until(lambda: inbound(server) == 1)


@fail_after(30)
async def test_a_disconnect_leaves_no_connection_a_racing_dial_made(start_node: Any) -> None:
    # libp2p's close_peer awaits each connection's close (which notifies the
    # disconnect after the swarm has forgotten that connection), then drops the
    # peer's entry: a connection dialed in that window was forgotten while open.
    server, info = await start_node()
    client, _ = await start_node()
    await client.connect(info.addrs[0])
    await wait_until(lambda: inbound(server) == 1)
    swarm = client._host.get_network()
    notify_disconnected = swarm.notify_disconnected
    raced = []

    async def dial_in_the_window(conn: Any) -> None:
        if not raced:  # exactly in the window, whatever the machine's speed
            raced.append(await client.connect(info.addrs[0]))
        await notify_disconnected(conn)

    swarm.notify_disconnected = dial_in_the_window
    await client.disconnect(server.peer_id)
    assert raced == [server.peer_id]
    # What the client's libp2p knows and what the server holds agree: nothing.
    assert client.connected_peers() == []
    await wait_until(lambda: inbound(server) == 0)


@fail_after(30)
async def test_disconnect_and_stop_close_connections_libp2p_forgot(start_node: Any) -> None:
    server, info = await start_node()
    clients = [(await start_node())[0] for _ in range(2)]
    for client in clients:
        await client.connect(info.addrs[0])
    await wait_until(lambda: inbound(server) == 2)
    for client in clients:  # what libp2p's close_peer left behind: open, untracked
        client._host.get_network().connections.clear()
        assert client.connected_peers() == []
    await clients[0].disconnect(server.peer_id)
    await wait_until(lambda: inbound(server) == 1)
    clients[1].stop()  # libp2p's own close closes only the connections it tracks
    await wait_until(lambda: inbound(server) == 0)


@fail_after(30)
async def test_a_connection_whose_peer_stopped_answering_is_closed(start_node: Any) -> None:
    # A peer whose libp2p stopped serving a connection without closing its socket
    # (its process, and kernel, live on) held it forever: yamux's pings only
    # measured the RTT, and nothing else is sent to a peer that asks for nothing.
    server, info = await start_node(P2PConfig(keepalive_interval=0.5, keepalive_timeout=1.0))
    client, _ = await start_node()
    await client.connect(info.addrs[0])
    await wait_until(lambda: inbound(server) == 1)
    await trio.sleep(3)  # a live peer answers every ping
    assert inbound(server) == 1 and server.statistics().connections_dead == 0
    (muxer,) = client._guard.open_muxers(server.peer_id)

    async def frozen(*args: Any) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    muxer.secured_conn.read = frozen  # the client reads nothing more; its socket stays open
    await wait_until(lambda: inbound(server) == 0)
    assert server.statistics().connections_dead == 1
