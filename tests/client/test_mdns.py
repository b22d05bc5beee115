"""mDNS discovery: the TXT records (pure), the hop from zeroconf's thread to trio, and what
a member does with a peer found on the LAN (real libp2p hosts on 127.0.0.1).

Real multicast between an executor and a client is in ``tests/e2e/test_discovery.py``.
"""

from __future__ import annotations

import os
import time

import pytest
import trio

from loomnet.client import Member, P2PConfig
from loomnet.client._mdns import MAX_ADDRS, MdnsPeer, MdnsService, dial_order, parse_txt, txt_properties
from loomnet.protocol import Advert, ModelOffer, SignedKind, SigningKey, seal

from ..limits import fail_after

PEER = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
OTHER = "12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE"
LAN = f"/ip4/192.168.1.20/tcp/4001/p2p/{PEER}"
LOOP = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"


def test_txt_round_trip_lan_first_wildcards_left_out() -> None:
    props = txt_properties([LOOP, f"/ip4/0.0.0.0/tcp/4001/p2p/{PEER}", LAN])
    assert props == {b"dnsaddr": LAN.encode(), b"dnsaddr2": LOOP.encode()}  # the spec's keys
    assert parse_txt(props) == MdnsPeer(PEER, [LAN, LOOP])


def test_dial_order_puts_loopback_last() -> None:
    v6 = f"/ip6/::1/tcp/4001/p2p/{PEER}"
    dns = f"/dns4/box.local/tcp/4001/p2p/{PEER}"
    assert dial_order([LOOP, v6, dns, LAN]) == [dns, LAN, LOOP, v6]


@pytest.mark.parametrize(
    "props",
    [
        {},
        {b"id": PEER.encode()},  # not a dnsaddr
        {b"dnsaddr": None},
        {b"dnsaddr": b"/ip4/192.168.1.20/tcp/4001"},  # no peer id
        {b"dnsaddr": b"/ip4/192.168.1.20/udp/4001/quic/p2p/" + PEER.encode()},  # not TCP
        {b"dnsaddr": f"/ip4/1.2.3.4/tcp/1/p2p/{OTHER}/p2p-circuit/p2p/{PEER}".encode()},  # relayed
        {b"dnsaddr": "/ip4/1.2.3.4/tcp/1/p2p/12D3KooWé".encode()},  # not ASCII
        {b"dnsaddr": b"/ip4/1.2.3.4/tcp/1/" + b"x/y/" * 80 + b"p2p/" + PEER.encode()},  # too long
    ],
)
def test_nothing_dialable_is_no_peer(props: dict[bytes, bytes | None]) -> None:
    assert parse_txt(props) is None


def test_one_announcement_one_peer_and_few_addresses() -> None:
    props = {b"dnsaddr": LAN.encode(), b"dnsaddr2": f"/ip4/10.0.0.1/tcp/1/p2p/{OTHER}".encode()}
    assert parse_txt(props) == MdnsPeer(PEER, [LAN])  # the other peer's address is ignored
    many = {b"dnsaddr%d" % i: f"/ip4/10.0.0.{i}/tcp/4001/p2p/{PEER}".encode() for i in range(100)}
    assert len(parse_txt(many).addrs) == MAX_ADDRS


async def test_peers_cross_from_zeroconfs_thread_into_a_bounded_channel() -> None:
    service = MdnsService(PEER, queue=2)
    service._token = trio.lowlevel.current_trio_token()  # what run() sets
    for peer in [MdnsPeer(PEER, [LAN]), None, *(MdnsPeer(OTHER, [f"/ip4/10.0.0.{i}/tcp/1/p2p/{OTHER}"]) for i in range(3))]:
        await trio.to_thread.run_sync(service.found_from_thread, peer)
    await trio.testing.wait_all_tasks_blocked()
    got = [service.discovered().receive_nowait() for _ in range(2)]
    assert [p.peer_id for p in got] == [OTHER, OTHER]  # our own announcement never comes back
    stats = service.statistics()
    assert (stats.discovered, stats.dropped, stats.running) == (2, 2, False)  # 1 unparsable + 1 over the queue


@pytest.mark.integration
@fail_after(60)
async def test_a_peer_found_on_the_lan_is_dialed_and_asked_for_its_adverts(nursery) -> None:
    key = SigningKey(os.urandom(32))
    own = seal(SignedKind.ADVERT, Advert(seq=1, issued_at=time.time(), ttl=600.0, models=[ModelOffer(name="lan-model")]), key)
    executor = Member(key, P2PConfig(), own_advert=lambda: own)
    info = await nursery.start(executor.run)
    client = Member(SigningKey(os.urandom(32)), P2PConfig())
    await nursery.start(client.run)
    assert client.mdns is None  # off unless configured
    with trio.socket.socket() as sock:  # a loopback port nobody listens on: tried, refused, skipped
        await sock.bind(("127.0.0.1", 0))
        dead = f"/ip4/127.0.0.1/tcp/{sock.getsockname()[1]}/p2p/{executor.peer_id}"
    assert await client.join_discovered(MdnsPeer(executor.peer_id, [dead, info.addrs[0]]))
    assert client.table.advert_of(executor.peer_id, now=time.time()) is not None
    [record] = client.peers()
    assert (record.peer_id, record.found, record.connection, record.adverts) == (executor.peer_id, "mdns", "outbound", 1)
    [seen_by_executor] = executor.peers()
    assert (seen_by_executor.peer_id, seen_by_executor.found) == (client.peer_id, "inbound")
    nobody = SigningKey(os.urandom(32)).peer_id
    assert not await client.join_discovered(MdnsPeer(nobody, [dead.replace(executor.peer_id, nobody)]))  # False, no raise
    client.stop()
    executor.stop()


def test_mdns_is_off_unless_configured(tmp_path) -> None:
    from loomnet.client import ClientConfig
    from loomnet.node.config import load_config
    from loomnet.protocol import ConfigError

    assert load_config(environ={}).mdns is False and ClientConfig().mdns is False
    on = tmp_path / "on.toml"
    on.write_text("mdns = true\n")
    assert load_config(on, environ={}).mdns is True
    assert load_config(on, environ={"LOOMNET_MDNS": "false"}).mdns is False  # the environment wins
    assert load_config(environ={"LOOMNET_MDNS": "true"}).mdns is True
    bad = tmp_path / "bad.toml"
    bad.write_text('mdns = "sometimes"\n')
    with pytest.raises(ConfigError, match="mdns"):
        load_config(bad, environ={})
