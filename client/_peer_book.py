"""What a node knows of its peers, for ``loomnet peers``: how each was found, and what
adverts it sent that were kept or refused (counts by reason).

How a peer was found, first way wins:

- ``bootstrap``: its address is in the bootstrap list (config or ``--bootstrap``);
- ``local-file``: a bootstrap address that an executor on this machine announced in its
  state file (``_local``);
- ``mdns``: it announced itself on the LAN and we dialed it (``_mdns``);
- ``dialed``: the application asked (``Member.connect``);
- ``inbound``: it dialed us, and we knew it no other way;
- ``gossip``: we know it only from adverts: it published one (perhaps relayed by
  others), or we dialed an address its advert gave (to send it a request).

Memory is bounded whoever sends: at most ``max_peers`` peers (least recently active
dropped first, except the bootstrap peers, which the config bounds), each with one
counter per :class:`~loomnet.client._validator.Rejection` reason.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import msgspec

from ._validator import Rejection

__all__ = ["Found", "PeerBook", "PeerRecord"]


class Found(enum.Enum):
    """How we came to know a peer; the value is what ``loomnet peers`` prints."""

    BOOTSTRAP = "bootstrap"
    LOCAL_FILE = "local-file"
    MDNS = "mdns"
    DIALED = "dialed"
    INBOUND = "inbound"
    GOSSIP = "gossip"


class PeerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One peer, as ``loomnet peers`` shows it."""

    peer_id: str
    #: a ``Found`` value
    found: str
    #: "inbound" or "outbound" while connected, else None
    connection: str | None
    #: adverts it handed over or published that passed every check (new or already held)
    adverts: int
    #: adverts it sent that were refused, by reason (a ``Rejection`` value)
    rejected: dict[str, int]


class _Entry(msgspec.Struct):
    found: Found | None = None
    adverts: int = 0
    rejected: dict[str, int] = {}


class PeerBook:
    """Per-peer discovery and advert counters. Not thread-safe; owned by one trio task tree.

    Args:
        max_peers: peers remembered (bootstrap peers come on top).
    """

    def __init__(self, *, max_peers: int = 1024) -> None:
        self.max_peers = max_peers
        self._bootstrap: dict[str, Found] = {}
        self._entries: dict[str, _Entry] = {}  # least recently active first

    def bootstrap(self, peers: Iterable[tuple[str, Found]]) -> None:
        """Note the bootstrap peers (``BOOTSTRAP`` or ``LOCAL_FILE``) before any dial."""
        for peer, how in peers:
            self._bootstrap.setdefault(peer, how)

    def found(self, peer: str, how: Found) -> None:
        """``peer`` became known ``how``; the first way is kept."""
        entry = self._touch(peer)
        if entry.found is None:
            entry.found = how

    def received(self, peer: str) -> None:
        """``peer`` sent an advert that passed every check."""
        self._touch(peer).adverts += 1

    def rejected(self, peer: str, reason: Rejection) -> None:
        """``peer`` sent an advert refused for ``reason``."""
        entry = self._touch(peer)
        entry.rejected[reason.value] = entry.rejected.get(reason.value, 0) + 1

    def how(self, peer: str, connection: str | None = None) -> Found:
        """How ``peer`` was found; a peer nobody labelled was found ``INBOUND`` if it
        dialed us, else through ``GOSSIP``."""
        if (how := self._bootstrap.get(peer)) is not None:
            return how
        entry = self._entries.get(peer)
        if entry is not None and entry.found is not None:
            return entry.found
        return Found.INBOUND if connection == "inbound" else Found.GOSSIP

    def records(self, connections: Mapping[str, str]) -> list[PeerRecord]:
        """Every connected peer (``connections``: peer id → "inbound"/"outbound"), then
        every other peer that sent adverts, each group by peer id."""
        connected = sorted(connections)
        others = sorted(p for p, e in self._entries.items() if p not in connections and (e.adverts or e.rejected))
        return [self._record(p, connections.get(p)) for p in [*connected, *others]]

    def _record(self, peer: str, connection: str | None) -> PeerRecord:
        entry = self._entries.get(peer) or _Entry()
        return PeerRecord(
            peer_id=peer,
            found=self.how(peer, connection).value,
            connection=connection,
            adverts=entry.adverts,
            rejected=dict(entry.rejected),
        )

    def _touch(self, peer: str) -> _Entry:
        entry = self._entries.pop(peer, None)
        if entry is None:
            entry = _Entry(rejected={})
        self._entries[peer] = entry  # the most recently active last
        while len(self._entries) > self.max_peers:
            del self._entries[next(iter(self._entries))]
        return entry
