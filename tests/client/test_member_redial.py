"""Redialing the bootstrap peers, on trio's autojump clock: the schedule to the second.

The dial and the view of connections are fakes here; the same with real libp2p hosts,
a bootstrap peer that goes away and comes back, is in ``tests/e2e/test_discovery.py``.
"""

from __future__ import annotations

import random

import pytest
import trio

from loomnet.client._redial import Backoff, Redialer, peer_of_addr
from loomnet.protocol import NetworkError

A = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWAAAA"
B = "/ip4/127.0.0.1/tcp/4002/p2p/12D3KooWBBBB"


def test_backoff_doubles_up_to_its_maximum_with_jitter_below() -> None:
    plain = Backoff(1.0, 8.0, jitter=0.0)
    assert [plain.delay(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert plain.delay(10_000) == 8.0  # no overflow however long a peer stays away
    jittered = Backoff(1.0, 8.0, jitter=0.5, rng=random.Random(1))
    for n in range(200):
        base = min(8.0, 2.0 ** n)
        assert base / 2 <= jittered.delay(n) <= base
    spread = {round(Backoff(1.0, 8.0, rng=random.Random(seed)).delay(3), 6) for seed in range(20)}
    assert len(spread) == 20  # nodes that lost the same peer do not redial it in step


@pytest.mark.parametrize("bad", [(0.0, 1.0, 0.5), (2.0, 1.0, 0.5), (1.0, 2.0, 1.0), (1.0, 2.0, -0.1)])
def test_backoff_refuses_nonsense(bad: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(bad[0], bad[1], jitter=bad[2])


def test_peer_of_addr() -> None:
    assert peer_of_addr(A) == "12D3KooWAAAA"
    assert peer_of_addr("/ip4/1.2.3.4/tcp/1") == ""
    assert peer_of_addr("/p2p/12D3KooWAAAA") == ""  # no address to dial


class FakeNet:
    """Peers that answer a dial only from ``up_at`` on, and connections that can be cut."""

    def __init__(self) -> None:
        self.connected: set[str] = set()
        self.up_at: dict[str, float] = {}
        self.dials: list[tuple[float, str]] = []

    async def dial(self, addr: str) -> str:
        now = trio.current_time()
        self.dials.append((now, addr))
        await trio.sleep(0.5)  # a dial takes time; a refused one too
        peer = peer_of_addr(addr)
        if now < self.up_at.get(peer, float("inf")):
            raise NetworkError(f"connect to {addr}: refused")
        self.connected.add(peer)
        return peer


def redialer(net: FakeNet, *addrs: str, seed: int = 7) -> Redialer:
    return Redialer(
        list(addrs),
        connected=lambda: set(net.connected),
        dial=net.dial,
        backoff=Backoff(1.0, 8.0, rng=random.Random(seed)),
        check_interval=1.0,
    )


async def test_redials_with_backoff_until_the_peer_is_back_then_stops(autojump_clock, nursery) -> None:
    net = FakeNet()
    net.connected.add(peer_of_addr(A))
    r = redialer(net, A)
    nursery.start_soon(r.run)
    await trio.sleep(10.2)
    assert net.dials == []  # connected: nothing to do
    start = trio.current_time()
    net.connected.clear()  # the bootstrap peer went away
    net.up_at[peer_of_addr(A)] = start + 40.0  # and comes back 40 s later
    with trio.fail_after(120):
        while not net.connected:
            await trio.sleep(0.1)
    # The schedule: a first round at the next look (within check_interval), then after
    # each failed round (0.5 s each) a wait of delay(n) with the same seeded jitter.
    expected = Backoff(1.0, 8.0, rng=random.Random(7))
    times = [t for t, _ in net.dials]
    first = times[0]
    assert start < first <= start + 1.0
    want = [first]
    while len(want) < len(times):
        want.append(want[-1] + 0.5 + expected.delay(len(want) - 1))
    assert times == pytest.approx(want, abs=1e-6)
    assert max(b - a for a, b in zip(times, times[1:])) <= 8.0 + 0.5  # capped
    assert times[-1] >= start + 40.0 > times[-2]  # the first round after it came back
    await trio.sleep(30)  # connected again: no more dials
    assert len(net.dials) == len(times)
    stats = r.statistics()
    assert (stats.rounds, stats.dials, stats.reconnects, stats.cut_off) == (len(times), len(times), 1, False)


async def test_lost_again_starts_over_from_the_first_wait(autojump_clock, nursery) -> None:
    net = FakeNet()
    r = redialer(net, A)
    net.up_at[peer_of_addr(A)] = 0.0  # reachable from the start
    nursery.start_soon(r.run)
    with trio.fail_after(10):
        while not net.connected:
            await trio.sleep(0.1)
    for _ in range(2):
        net.connected.clear()
        cut = trio.current_time()
        net.up_at[peer_of_addr(A)] = cut + 20.0
        with trio.fail_after(60):
            while not net.connected:
                await trio.sleep(0.1)
        gaps = [b - a for (a, _), (b, _) in zip(net.dials, net.dials[1:]) if a >= cut]
        assert gaps[0] <= 0.5 + 1.0  # the first wait is the shortest again
    assert r.statistics().reconnects == 3


async def test_one_bootstrap_peer_is_enough_and_other_peers_do_not_count(autojump_clock, nursery) -> None:
    net = FakeNet()
    net.connected.add("12D3KooWSomeClient")  # an executor's client does not join it to the network
    r = redialer(net, A, B)
    net.up_at[peer_of_addr(B)] = 5.0  # B answers from 5 s on; A never
    nursery.start_soon(r.run)
    with trio.fail_after(60):
        while peer_of_addr(B) not in net.connected:
            await trio.sleep(0.1)
    dials = len(net.dials)
    assert {a for _, a in net.dials} == {A, B}  # each round dials every bootstrap peer at once
    await trio.sleep(60)
    assert len(net.dials) == dials  # B is connected: A is not redialed for ever


async def test_without_bootstrap_peers_there_is_nothing_to_do(autojump_clock) -> None:
    net = FakeNet()
    with trio.fail_after(1):
        await redialer(net).run()
    assert net.dials == []
