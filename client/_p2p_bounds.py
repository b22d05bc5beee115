"""Bounds on what libp2p takes from a peer outside loomnet's limits (traps O, S, T); libp2p-free.

py-libp2p 0.8.1 reads and stores what a peer says with no bound on its size, and
keeps some of it with no end (``docs/network.md``, traps O, S and T):

- O: multistream-select reads a protocol line of whatever length its varint announces;
- S: identify answers (and identify/push, which loomnet no longer serves): listen
  addresses and protocols of any number and size, stored in the peerstore, and a cache
  of parsed addresses keyed by the bytes a peer sent;
- T: the signed peer record pubsub carries in every RPC, stored; and a peerstore that
  keeps every peer it ever met (nothing starts its cleanup task).

``_p2p`` installs these in libp2p's place and hands in the libp2p objects they need,
so this module stays free of libp2p imports.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

__all__ = [
    "MAX_ADDRS",
    "MAX_ADDR_BYTES",
    "MAX_MULTISELECT_MESSAGE",
    "MAX_PROTOCOLS",
    "MAX_PROTOCOL_CHARS",
    "PeerstoreJanitor",
    "bounded_multiaddr_parser",
    "ignore_signed_record",
    "trim_identify",
    "trimming_identify",
]

logger = logging.getLogger("loomnet.p2p")

#: Longest multistream-select message read (go-multistream's limit, 1 KiB): protocol
#: ids are short; this bounds what negotiation reads before any other limit applies.
MAX_MULTISELECT_MESSAGE = 1024

#: Longest listen or observed address taken from a peer, in bytes of its binary form
#: (a multiaddr is a few dozen bytes; ``/dns/<253 chars>/tcp/…/p2p/<id>`` under 300; an
#: advert's addresses are at most 256 characters).
MAX_ADDR_BYTES = 256
#: Addresses kept from one identify answer (an advert carries at most as many).
MAX_ADDRS = 16
#: Protocols kept from one identify answer, and the longest id kept (multistream-select
#: negotiates nothing over 1 KiB anyway, trap O).
MAX_PROTOCOLS = 64
MAX_PROTOCOL_CHARS = 256


def bounded_multiselect_read(
    read_limited: Callable[[Any, int], Awaitable[bytes]],
    *,
    errors: tuple[type[Exception], ...],
    failure: type[Exception],
) -> Callable[[Any], Awaitable[str]]:
    """Trap O: a ``MultiselectCommunicator.read`` that reads at most ``MAX_MULTISELECT_MESSAGE``.

    multistream-select (used to negotiate every stream's protocol and, on a raw TCP
    connection, its security and muxer) reads a line of whatever length its varint
    announces. Those bytes leave yamux's buffer, so no unread-bytes bound counts them,
    and they are no request frame either: 60 streams of one connection announcing
    16 MiB each took an executor from 268 MB to 481 MB. The same read with
    go-multistream's 1 KiB limit; a longer line fails the negotiation, which resets the
    stream (or closes the raw connection).

    Args:
        read_limited: libp2p's ``read_varint_prefixed_bytes_limited(reader, max)``.
        errors: what it raises for a bad or over-long line (``MessageTooLarge`` is an
            ``IOException``).
        failure: what the communicator raises instead (``MultiselectCommunicatorError``).
    """

    async def read(self: Any) -> str:
        try:
            data = await read_limited(self.read_writer, MAX_MULTISELECT_MESSAGE)
        except errors as error:
            raise failure("fail to read from multiselect communicator") from error
        if data[-1:] != b"\n":
            raise failure("a multiselect message is not delimited by a newline")
        return data[:-1].decode("utf-8", "replace")  # an odd id simply matches no protocol

    return read


def bounded_multiaddr_parser(multiaddr: type) -> Callable[[bytes], Any | None]:
    """Replaces ``libp2p.identity.update._safe_parse_multiaddr_cached``: a parse of at
    most ``MAX_ADDR_BYTES``, cached nowhere.

    libp2p's keeps the last 1,000 parses in an ``lru_cache`` keyed by the raw bytes,
    the unparseable ones included, for the life of the process: ~1 MiB "addresses" in
    identify answers stayed after their peer left (up to ~1 GiB). Parsing at most 16
    short addresses per identify costs microseconds; there is nothing worth caching.

    Args:
        multiaddr: the ``Multiaddr`` class (built from bytes; raises on junk).
    """

    def parse(raw: bytes) -> Any | None:
        if len(raw) > MAX_ADDR_BYTES:
            return None
        try:
            return multiaddr(raw)
        except Exception:  # noqa: BLE001 - junk from a peer is no address
            return None

    return parse


def trim_identify(message: Any) -> None:
    """Cut an identify message (libp2p's ``Identify`` protobuf), in place, to what loomnet keeps.

    At most ``MAX_ADDRS`` listen addresses of at most ``MAX_ADDR_BYTES``, at most
    ``MAX_PROTOCOLS`` protocol ids of at most ``MAX_PROTOCOL_CHARS``; no signed peer
    record (loomnet never reads the certified address book, and a record may hold
    thousands of addresses); no observed address over ``MAX_ADDR_BYTES``. What is cut
    is dropped silently, as libp2p drops an address it cannot parse.
    """
    addrs = [a for a in message.listen_addrs if len(a) <= MAX_ADDR_BYTES][:MAX_ADDRS]
    protocols = [p for p in message.protocols if len(p) <= MAX_PROTOCOL_CHARS][:MAX_PROTOCOLS]
    del message.listen_addrs[:]
    message.listen_addrs.extend(addrs)
    del message.protocols[:]
    message.protocols.extend(protocols)
    message.ClearField("signedPeerRecord")
    if len(message.observed_addr) > MAX_ADDR_BYTES:
        message.ClearField("observed_addr")


def trimming_identify(update: Callable[[Any, Any, Any], Awaitable[None]]) -> Callable[[Any, Any, Any], Awaitable[None]]:
    """``update`` (libp2p's ``update_peerstore_from_identify(peerstore, peer_id, message)``),
    run on the message cut by ``trim_identify``. The message is cut in place, so what
    libp2p reads from it afterwards (the observed address) is cut too."""

    async def update_trimmed(peerstore: Any, peer_id: Any, message: Any) -> None:
        trim_identify(message)
        await update(peerstore, peer_id, message)

    return update_trimmed


def ignore_signed_record(rpc: Any, host: Any, peer_id: Any) -> bool:
    """Replaces pubsub's ``maybe_consume_signed_record``: the sender's signed peer record
    in a pubsub RPC is not stored, and the RPC is handled as if it had none.

    libp2p parses and stores the record of every RPC (its addresses with a 2-hour TTL,
    in a peerstore nothing cleans), adding each address with a scan of those it has:
    one peer's 240 KB record of 20,000 addresses took 55 s of CPU on the event loop
    and left 2.4 MiB held after the peer had gone (a record fits ~90,000 in an RPC).
    loomnet dials the addresses it is given, never the certified address book, and
    does no gossipsub peer exchange.
    """
    return True


class PeerstoreJanitor:
    """A network notifee that forgets a peer's peerstore data once its last connection closes (trap T).

    py-libp2p 0.8.1's peerstore keeps every peer ever met (public key, addresses,
    protocols, signed record): no expiry runs, and its 1,000-peer cap evicts only when
    addresses are added. Measured: ~20 KiB per departed peer, and whatever a hostile
    peer's identify answer held. loomnet dials the addresses it is handed
    (``P2PNode._dial``) and reads nothing else there, so a departed peer's entry is
    kept only for a peer in ``keep`` (our own id, bootstrap peers) or being dialed.

    Args:
        swarm: libp2p's ``Swarm`` (``get_connections``).
        peerstore: libp2p's ``PeerStore`` (``has_peer``, ``clear_peerdata``).
        keep: libp2p peer ids whose entries stay; the caller may add to it.
    """

    def __init__(self, swarm: Any, peerstore: Any, *, keep: set[Any]) -> None:
        self._swarm = swarm
        self._peerstore = peerstore
        self.keep = keep
        self._dialing: dict[Any, int] = {}  # peer id -> dials in progress
        self.forgotten = 0

    @contextlib.contextmanager
    def dialing(self, peer_id: Any) -> Iterator[None]:
        """Keep ``peer_id``'s entry while the block runs: a dial reads the addresses it put there."""
        self._dialing[peer_id] = self._dialing.get(peer_id, 0) + 1
        try:
            yield
        finally:
            if (left := self._dialing.pop(peer_id) - 1) > 0:
                self._dialing[peer_id] = left

    def forget_if_gone(self, peer_id: Any) -> None:
        """Drop ``peer_id``'s peerstore entry unless it is kept, being dialed or still connected."""
        if peer_id in self.keep or peer_id in self._dialing:
            return
        if any(not conn.is_closed for conn in self._swarm.get_connections(peer_id)):
            return
        if self._peerstore.has_peer(peer_id):
            self._peerstore.clear_peerdata(peer_id)
            self.forgotten += 1

    async def disconnected(self, network: Any, conn: Any) -> None:
        peer_id = getattr(conn.muxed_conn, "peer_id", None)
        if peer_id is not None:
            self.forget_if_gone(peer_id)

    async def connected(self, network: Any, conn: Any) -> None:
        pass

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass
