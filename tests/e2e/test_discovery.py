"""Discovery with real components: an executor on the embedded model, libp2p on loopback.

- A bootstrap peer that goes away and comes back: the executor keeps serving its
  client meanwhile, redials with backoff, and is back in the network once the peer is.
- mDNS: a client with no bootstrap address finds the executor announced on the LAN
  (real multicast; skipped, saying why, where the machine has none).
"""

from __future__ import annotations

import os
import socket
import time

import msgspec
import pytest
import trio

from loomnet.client import ClientConfig, LoomClient, Member, P2PConfig
from loomnet.client._redial import Backoff
from loomnet.node import Executor
from loomnet.protocol import ChatMessage, SigningKey

from ..limits import fail_after

pytestmark = [pytest.mark.integration, pytest.mark.model]

HI = [ChatMessage("user", "Say hi.")]


async def wait_until(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def start_member(nursery: trio.Nursery, key: SigningKey, listen: str) -> tuple[Member, str]:
    member = Member(key, P2PConfig(listen=[listen]))
    info = await nursery.start(member.run)
    return member, info.addrs[0]


@fail_after(120)
async def test_executor_redials_a_bootstrap_peer_that_went_away_and_keeps_serving(nursery, tmp_path, executor_config):
    key = SigningKey(os.urandom(32))
    async with trio.open_nursery() as first_life:
        boot, boot_addr = await start_member(first_life, key, "/ip4/127.0.0.1/tcp/0")
        config = msgspec.structs.replace(executor_config, bootstrap=[boot_addr], advert_interval=1.0)
        executor = Executor(config)
        await nursery.start(executor.run)
        member = executor.member
        member.redialer.backoff = Backoff(0.2, 1.0)  # the defaults (1 s doubling to 60 s), scaled down
        assert member.redialer.linked() and member.peers()[0].found == "bootstrap"
        client = LoomClient(ClientConfig(
            data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]], discover_local=False,
            first_byte_timeout=20.0,
        ))
        await nursery.start(client.run)
        await client.wait_for_offers(timeout=10)
        boot.stop()
        first_life.cancel_scope.cancel()
    # The bootstrap peer is gone; the client's connection does not count as the network.
    await wait_until(lambda: member.redialer.statistics().cut_off)
    result = await client.chat(HI, max_tokens=6)  # the executor serves meanwhile
    assert result.receipt.output_tokens >= 1
    await wait_until(lambda: member.redialer.statistics().rounds >= 3)
    assert member.redialer.statistics().reconnects == 0

    # It comes back, same identity, same address: the executor is back in the network.
    async with trio.open_nursery() as second_life:
        boot, again = await start_member(second_life, key, boot_addr.split("/p2p/")[0])
        assert again == boot_addr
        await wait_until(lambda: member.redialer.linked())
        await wait_until(lambda: not member.redialer.statistics().cut_off)
        stats = member.redialer.statistics()
        assert stats.reconnects == 1
        # the bootstrap peer hears the executor's adverts again (gossip, every second here)
        with trio.fail_after(20):
            while boot.table.advert_of(executor.peer_id, now=time.time()) is None:
                await boot.table_changed.wait()
        await trio.sleep(1.5)  # over a redial round: none happens while connected
        assert member.redialer.statistics().rounds == stats.rounds
        boot.stop()
        second_life.cancel_scope.cancel()
    client.member.stop()


def multicast_works(timeout: float = 8.0) -> str | None:
    """None if zeroconf sees its own announcement through this machine's network, else why not."""
    import zeroconf

    seen: list[str] = []

    class Listener:
        def add_service(self, zc, type_, name):
            seen.append(name)

        update_service = remove_service = add_service

    try:
        a, b = zeroconf.Zeroconf(), zeroconf.Zeroconf()
    except Exception as exc:  # noqa: BLE001
        return f"zeroconf cannot start: {exc!r}"
    name = f"probe{os.getpid()}._p2p._udp.local."
    try:
        browser = zeroconf.ServiceBrowser(b, "_p2p._udp.local.", listener=Listener())
        a.register_service(zeroconf.ServiceInfo(
            "_p2p._udp.local.", name, port=9, properties={}, server="probe.local.",
            addresses=[socket.inet_aton("127.0.0.1")],
        ))
        deadline = time.monotonic() + timeout
        while name not in seen and time.monotonic() < deadline:
            time.sleep(0.1)
        browser.cancel()
        return None if name in seen else f"no mDNS announcement came back within {timeout} s (no multicast route?)"
    finally:
        a.close()
        b.close()


@fail_after(90)
async def test_a_client_finds_an_executor_on_the_lan_by_mdns(nursery, tmp_path, executor_config):
    executor = Executor(msgspec.structs.replace(executor_config, mdns=True))
    await nursery.start(executor.run)
    assert executor.member.config.mdns and executor.member.config.mdns_announce
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), discover_local=False, mdns=True))
    assert client.member.config.mdns and not client.member.config.mdns_announce  # a client only browses
    await nursery.start(client.run)
    found = False
    with trio.move_on_after(30):
        await client.wait_for_offers(timeout=30)
        found = True
    if not found:
        why = await trio.to_thread.run_sync(multicast_works)
        if why is not None:
            pytest.skip(f"multicast DNS does not work on this machine: {why}")
    assert found, "mDNS works here, yet the client never found the executor"
    await wait_until(lambda: executor.member.mdns.statistics().announced, timeout=10)  # probing: ~1.7 s
    record = next(r for r in client.member.peers() if r.peer_id == executor.peer_id)
    assert (record.found, record.connection) == ("mdns", "outbound") and record.adverts >= 1
    result = await client.chat(HI, max_tokens=6)
    assert result.receipt.output_tokens >= 1
    client.member.stop()


async def test_a_client_finds_an_executor_started_on_this_machine_after_it(nursery, tmp_path, executor_config):
    """The state files of this machine's executors are read again every few seconds, not
    once at start: an executor started (or restarted on a new port) later is joined."""
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), discover_local=True))
    await nursery.start(client.run)
    assert client.offers() == []
    node = Executor(msgspec.structs.replace(executor_config, announce_local=True))
    await nursery.start(node.run)
    await wait_until(lambda: bool(client.offers()), timeout=30)
    assert client.offers()[0].executor == node.info.peer_id
    assert any(p.peer_id == node.info.peer_id and p.found == "local-file" for p in client.member.peers())
