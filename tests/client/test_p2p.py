"""The libp2p adapter against real py-libp2p hosts on 127.0.0.1, port 0.

One test (at least) per trap in ``reference/libp2p.md``; each fails if its
workaround in ``client/_p2p.py`` is removed. Every test runs under a Trio-clock
limit, so a hang fails instead of hanging CI.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import threading
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
import trio

from loomnet.client._p2p import NodeInfo, P2PConfig, P2PNode, P2PStream
from loomnet.protocol._errors import (
    ConfigError,
    ErrorCode,
    FrameError,
    NetworkError,
    NetworkTimeout,
)
from loomnet.protocol._identity import SigningKey, peer_id_from_public_key
from ..limits import fail_after

pytestmark = pytest.mark.integration

ECHO = "/loomnet/test/echo/1.0.0"
TOPIC = "loomnet/test/gossip"
PLAIN = P2PConfig()
GOSSIP = P2PConfig(topics=[TOPIC])

Starter = Callable[..., Awaitable[tuple[P2PNode, NodeInfo]]]




@pytest.fixture
async def start_node(nursery: trio.Nursery) -> Any:
    """Start ``P2PNode``s in the test's nursery; stop them all at teardown."""
    nodes: list[P2PNode] = []

    async def start(config: P2PConfig = PLAIN, seed: bytes | None = None) -> Any:
        node = P2PNode(seed or os.urandom(32), config)
        nodes.append(node)
        return node, await nursery.start(node.run)

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()


async def echo_upper(stream: P2PStream) -> None:
    """Read the whole request, answer it in upper case; the adapter closes."""
    request = b""
    while chunk := await stream.receive_some(timeout=5):
        request += chunk
    await stream.send_all(request.upper(), timeout=5)


async def request(node: P2PNode, peer: str, data: bytes, **kwargs: Any) -> bytes:
    """One request/response on a new stream, closed in a ``finally`` (trap C)."""
    stream = await node.open_stream(peer, ECHO, timeout=5, **kwargs)
    try:
        await stream.send_all(data, timeout=5)
        await stream.close()
        response = b""
        while chunk := await stream.receive_some(timeout=5):
            response += chunk
        return response
    finally:
        await stream.close()


async def connected_pair(start_node: Starter, config: P2PConfig = PLAIN) -> Any:
    a, _ = await start_node(config)
    b, info_b = await start_node(config)
    await a.connect(info_b.addrs[0])
    return a, b


@fail_after(10)
async def test_identity_addrs_and_authenticated_round_trip(start_node: Starter) -> None:
    seed = os.urandom(32)
    key = SigningKey(seed)
    a, info_a = await start_node(seed=seed)
    assert a.peer_id == peer_id_from_public_key(key.public_key) == key.peer_id
    assert info_a.peer_id == a.peer_id
    assert all(addr.endswith(f"/p2p/{a.peer_id}") for addr in info_a.addrs)
    assert "/tcp/0/" not in info_a.addrs[0]
    b, info_b = await start_node()
    seen_by_b: list[str] = []

    async def handler(stream: P2PStream) -> None:
        seen_by_b.append(stream.remote_peer)
        assert stream.protocol == ECHO
        await echo_upper(stream)

    b.set_stream_handler(ECHO, handler)
    # No connect() first: open_stream dials the given addresses itself.
    stream = await a.open_stream(b.peer_id, ECHO, addrs=info_b.addrs, timeout=5)
    try:
        assert stream.remote_peer == b.peer_id
        await stream.send_all(b"hello", timeout=5)
        await stream.close()
        assert await stream.receive_some(timeout=5) == b"HELLO"
        assert await stream.receive_some(timeout=5) == b""
    finally:
        await stream.close()
    assert seen_by_b == [a.peer_id]
    assert a.connected_peers() == [b.peer_id]
    assert b.statistics().streams_accepted == 1
    assert a.statistics().streams_opened == 1


@fail_after(10)
async def test_bootstrap_connects_and_survives_a_dead_address(start_node: Starter) -> None:
    a, info_a = await start_node()
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/{SigningKey(os.urandom(32)).peer_id}"
    c, _ = await start_node(P2PConfig(bootstrap=[dead, info_a.addrs[0]]))
    assert c.connected_peers() == [a.peer_id]


async def test_trap_h_libp2p_logs_reach_the_application() -> None:
    assert logging.getLogger("libp2p").propagate is True
    assert logging.getLogger("libp2p.network.auto_connector").level == logging.NOTSET
    if not os.environ.get("LIBP2P_DEBUG"):  # libp2p's own level, though its __init__ did not run (trap V)
        assert logging.getLogger("libp2p").level == logging.WARNING


@fail_after(10)
async def test_trap_a_one_connection_per_peer(start_node: Starter) -> None:
    a, _ = await start_node()
    assert a._host.get_network().connection_config.max_connections_per_peer == 1


@fail_after(10)
async def test_trap_b_handler_exception_resets_stream_and_node_lives(
    start_node: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await connected_pair(start_node)

    async def handler(stream: P2PStream) -> None:
        data = await stream.receive_some(timeout=5)
        if data == b"boom":
            raise ValueError("handler bug")
        await stream.send_all(data.upper(), timeout=5)

    b.set_stream_handler(ECHO, handler)
    with caplog.at_level(logging.ERROR, logger="loomnet.p2p"):
        assert await request(a, b.peer_id, b"boom") == b""
    assert await request(a, b.peer_id, b"fine") == b"FINE"
    assert b.statistics().handler_errors == 1
    assert any(r.name == "loomnet.p2p" and r.exc_info for r in caplog.records)


@fail_after(20)
async def test_trap_c_300_sequential_streams_to_one_peer(start_node: Starter) -> None:
    a, b = await connected_pair(start_node)

    async def handler(stream: P2PStream) -> None:
        # Never closes: the adapter's finally must, or the caller waits for EOF.
        await stream.send_all(await stream.receive_some(timeout=5), timeout=5)

    b.set_stream_handler(ECHO, handler)
    for i in range(300):
        assert await request(a, b.peer_id, b"%d" % i) == b"%d" % i
    assert b.statistics().streams_accepted == 300


@fail_after(15)
async def test_trap_d_gossip_bursts_senders_and_limits(start_node: Starter) -> None:
    a, b = await connected_pair(start_node, GOSSIP)
    await a.wait_for_topic_peers(TOPIC, timeout=5)
    await b.wait_for_topic_peers(TOPIC, timeout=5)
    sent = {b"msg %d" % i for i in range(40)}
    for data in sorted(sent):  # back to back: over the 10/s spam limit and 32-slot queues
        await a.publish(TOPIC, data)
    received = [await b.gossip_messages().receive() for _ in sent]
    assert {m.data for m in received} == sent
    assert {(m.topic, m.sender) for m in received} == {(TOPIC, a.peer_id)}
    # Republishing the same bytes is idempotent (content-hash message ids).
    await a.publish(TOPIC, b"msg 0")
    # Exactly the payload limit still travels; one byte more is refused loudly.
    await a.publish(TOPIC, b"x" * 1_000_000)
    assert (await b.gossip_messages().receive()).data == b"x" * 1_000_000
    with pytest.raises(FrameError) as info:
        await a.publish(TOPIC, b"x" * 1_000_001)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    # Our own publishes never come back to us.
    with pytest.raises(trio.WouldBlock):
        a.gossip_messages().receive_nowait()
    assert a.statistics().gossip_received == 0
    assert b.statistics() == msgspec.structs.replace(
        b.statistics(), gossip_received=41, gossip_dropped=0
    )


@fail_after(15)
async def test_trap_d_validators_drop_without_crashing(start_node: Starter) -> None:
    a, b = await connected_pair(start_node, GOSSIP)
    senders: list[str] = []

    def validator(sender: str, data: bytes) -> bool:
        senders.append(sender)
        if data == b"raise":
            raise RuntimeError("validator bug")
        return data != b"reject"

    b.set_topic_validator(TOPIC, validator)
    await a.wait_for_topic_peers(TOPIC, timeout=5)
    # One stream carries a's gossip to b in order: had a dropped message been
    # delivered, it would arrive before the next accepted one.
    for data in (b"reject", b"first", b"raise", b"second"):
        await a.publish(TOPIC, data)
    assert (await b.gossip_messages().receive()).data == b"first"
    assert (await b.gossip_messages().receive()).data == b"second"
    assert set(senders) == {a.peer_id}  # the original publisher, signature-checked
    b.set_stream_handler(ECHO, echo_upper)  # and b, whose validator raised, still serves
    assert await request(a, b.peer_id, b"alive") == b"ALIVE"


@fail_after(10)
async def test_trap_d_gossipsub_settings(start_node: Starter) -> None:
    # 0.8.1 grafts subscribers at once, so a slow heartbeat only shows after churn,
    # minutes in: check the settings themselves, as for trap A.
    a, _ = await start_node(msgspec.structs.replace(GOSSIP, gossip_heartbeat=0.5))
    assert a._pubsub is not None
    router = a._pubsub.router
    assert router.heartbeat_interval == 0.5  # libp2p: 120 s
    assert router.spam_protection_enabled is False  # libp2p: 10 msg/s, own included
    assert router.adaptive_gossip_enabled is False  # it resets the heartbeat to >= 30 s
    assert (router.degree, router.degree_low, router.degree_high) == (6, 4, 12)


@fail_after(10)
async def test_gossip_overflow_is_dropped_and_counted(start_node: Starter) -> None:
    a, b = await connected_pair(start_node, msgspec.structs.replace(GOSSIP, gossip_queue=2))
    await a.wait_for_topic_peers(TOPIC, timeout=5)
    for i in range(5):
        await a.publish(TOPIC, b"%d" % i)
    while (s := b.statistics()).gossip_received + s.gossip_dropped < 5:
        await trio.sleep(0.01)
    assert (s.gossip_received, s.gossip_dropped) == (2, 3)
    assert [(await b.gossip_messages().receive()).data for _ in range(2)] == [b"0", b"1"]


@fail_after(10)
async def test_trap_e_silent_handler_times_out_the_read(start_node: Starter) -> None:
    a, b = await connected_pair(start_node)
    release = trio.Event()

    async def silent(stream: P2PStream) -> None:
        await release.wait()

    b.set_stream_handler(ECHO, silent)
    stream = await a.open_stream(b.peer_id, ECHO, timeout=5)
    try:
        with pytest.raises(NetworkTimeout) as info:
            await stream.receive_some(timeout=0.3)
        assert info.value.code == ErrorCode.NETWORK_TIMEOUT
    finally:
        await stream.reset()
        release.set()


@fail_after(10)
async def test_trap_e_black_hole_peer_times_out_dial(start_node: Starter) -> None:
    a, _ = await start_node()
    accepted = 0

    async def black_hole(conn: trio.SocketStream) -> None:  # accepts, never speaks
        nonlocal accepted
        accepted += 1
        await trio.sleep_forever()  # serve_tcp closes conn when cancelled

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), black_hole, 0
        )
        port = listeners[0].socket.getsockname()[1]
        ghost = SigningKey(os.urandom(32)).peer_id
        addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{ghost}"
        with trio.fail_after(2):
            with pytest.raises(NetworkTimeout):
                await a.open_stream(ghost, ECHO, addrs=[addr], timeout=0.5)
            with pytest.raises(NetworkTimeout):
                await a.connect(addr, timeout=0.5)
        nursery.cancel_scope.cancel()
    assert accepted >= 1


async def run_pair_and_shut_down(shutdown: str) -> None:
    """Two gossiping nodes with a stream between them; returns when both ended."""
    with trio.fail_after(10):
        a = P2PNode(os.urandom(32), GOSSIP)
        b = P2PNode(os.urandom(32), GOSSIP)
        b.set_stream_handler(ECHO, echo_upper)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            info_b = await nursery.start(b.run)
            await a.connect(info_b.addrs[0])  # a dialed socket: the kind that leaked
            assert await request(a, b.peer_id, b"x") == b"X"
            await a.publish(TOPIC, b"bye")
            stopped_at = trio.current_time()
            if "stop" in shutdown:
                a.stop()
                b.stop()
            if "cancel" in shutdown:  # the fixture's way: stop, then cancel at once
                nursery.cancel_scope.cancel()
        assert trio.current_time() - stopped_at < 3  # both run()s returned promptly
        messages = b.gossip_messages()
        with pytest.raises(trio.EndOfChannel):  # consumers see the end ("bye" first, if it came in time)
            while True:
                assert (await messages.receive()).data == b"bye"
        with pytest.raises(OSError):  # the listener is really closed
            await trio.open_tcp_stream("127.0.0.1", int(info_b.addrs[0].split("/")[4]))


def sweeper_threads() -> list[threading.Thread]:
    """Pubsub's seen-cache sweepers (``Thread-N (_background_cleanup)``)."""
    return [t for t in threading.enumerate() if "_background_cleanup" in t.name]


def run_pair_in_fresh_trio(shutdown: str) -> tuple[list[str], int]:
    """Run ``run_pair_and_shut_down`` in its own ``trio.run``, then collect garbage.

    libp2p parks its listeners in trio's system nursery, so leaked objects stay
    referenced until the whole ``trio.run`` ends; only then can a ResourceWarning
    show. Returns the warnings and the count of sweeper threads still alive.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trio.run(run_pair_and_shut_down, shutdown)
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    return leaks, len(sweeper_threads())


@pytest.mark.parametrize("shutdown", ["stop", "cancel", "stop+cancel"])
@fail_after(15)
async def test_trap_f_shutdown_is_prompt_and_leaks_nothing(shutdown: str) -> None:
    gc.collect()  # earlier tests' garbage is not ours to judge
    sweepers_before = len(sweeper_threads())
    # The inner run bounds itself (fail_after), so the thread always comes back.
    leaks, sweepers_after = await trio.to_thread.run_sync(run_pair_in_fresh_trio, shutdown)
    assert leaks == []
    assert sweepers_after == sweepers_before


@fail_after(10)
async def test_listen_failure_is_a_config_error() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        node = P2PNode(os.urandom(32), P2PConfig(listen=[f"/ip4/127.0.0.1/tcp/{port}"]))
        try:
            with pytest.raises(ConfigError):  # libp2p itself only logs it
                await nursery.start(node.run)
        finally:
            await listeners[0].aclose()
    with pytest.raises(ConfigError):
        P2PNode(os.urandom(32), P2PConfig(listen=["/ip4/nonsense"]))
    with pytest.raises(ConfigError):
        P2PNode(b"short", P2PConfig())


@fail_after(10)
async def test_connect_failures_are_loomnet_errors(start_node: Starter) -> None:
    a, b = await connected_pair(start_node)
    with pytest.raises(NetworkError) as info:
        await a.open_stream(b.peer_id, "/loomnet/test/unknown/1.0.0", timeout=5)
    assert type(info.value) is NetworkError and info.value.code == ErrorCode.CONNECT_FAILED
    for bad in ("not a multiaddr", "/ip4/127.0.0.1/tcp/4001", "/ip4/999.0.0.1/tcp/1/p2p/x"):
        with pytest.raises(NetworkError) as info:
            await a.connect(bad, timeout=2)
        assert type(info.value) is NetworkError and info.value.code == ErrorCode.CONNECT_FAILED
    with pytest.raises(NetworkError) as info:
        await a.open_stream("not-a-peer-id", ECHO, timeout=2)
    assert info.value.code == ErrorCode.CONNECT_FAILED
    stranger = SigningKey(os.urandom(32)).peer_id  # no address known for it
    with pytest.raises(NetworkError) as info:
        await a.open_stream(stranger, ECHO, timeout=2)
    assert type(info.value) is NetworkError and info.value.code == ErrorCode.CONNECT_FAILED
