"""Finding peers on the LAN with multicast DNS, without any bootstrap address.

The wire format is libp2p's mDNS discovery spec (service ``_p2p._udp.local.``, a
random service name, one TXT string ``dnsaddr=<multiaddr>/p2p/<peer id>`` per
address), so loomnet nodes see other libp2p nodes' announcements and the reverse.

Why not py-libp2p 0.8.1's own ``MDNSDiscovery`` (``new_host(enable_mDNS=True)``):

- it registers the service on the trio thread, and zeroconf's registration blocks
  while it probes the name: 1.66 s measured here, during which the node serves nothing;
- it hands discoveries to a process-wide singleton (``peerDiscovery``) from
  zeroconf's browser thread: every node in the process gets every other node's
  discoveries, on a thread that is not trio's;
- it announces the host's listen addresses as they are, so a node listening on
  ``0.0.0.0`` announces ``/ip4/0.0.0.0/...`` (the reference saw the failed dial);
- it only fills the peerstore; nothing dials the peers it finds.

So this module uses zeroconf (which libp2p already depends on) directly: zeroconf's
blocking calls run in worker threads, discoveries cross to trio through the trio token
into a bounded channel, a node announces the addresses peers can dial (``NodeInfo``),
LAN addresses before loopback ones, and ``Member`` dials what is found.

What a LAN peer can make us do is bounded: TXT records are parsed under limits (16
addresses of at most 256 characters, one peer id) and discoveries wait in a channel of
``queue`` entries (more are dropped and counted). ``Member`` dials at most a few at once.

Announcing is the operator's choice (``mdns`` in the executor config): it puts this
node's peer id and addresses on every machine of the LAN, which some networks forbid.
Clients only browse: a client serves nothing, so it has nothing to announce.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import trio

__all__ = ["SERVICE_TYPE", "MdnsPeer", "MdnsService", "MdnsStatistics", "dial_order", "parse_txt", "txt_properties"]

log = logging.getLogger("loomnet.mdns")

SERVICE_TYPE = "_p2p._udp.local."
MAX_ADDRS = 16  # addresses taken from one announcement (an advert carries as many)
MAX_ADDR_LENGTH = 256  # characters; a TXT string holds at most 255 bytes anyway
_CLOSE_TIMEOUT = 3.0  # s; unregistering and closing zeroconf, at shutdown
_INFO_TIMEOUT_MS = 3000  # how long zeroconf's browser thread asks for a found service's records
_ADDR = re.compile(r"^/(ip4|ip6|dns|dns4|dns6)/[^/\s]+/tcp/\d{1,5}(/[\w.-]+/[^/\s]+)*/p2p/(\w+)$")


class MdnsPeer(msgspec.Struct, frozen=True):
    """A peer announced on the LAN, with the addresses to dial, best first."""

    peer_id: str
    addrs: list[str]


class MdnsStatistics(msgspec.Struct, frozen=True, kw_only=True):
    #: False when zeroconf could not start (no multicast interface, port 5353 refused)
    running: bool
    #: whether this node's service is registered on the LAN
    announced: bool
    #: announcements of other peers parsed, and dropped (unparsable or the queue full)
    discovered: int
    dropped: int


def _is_loopback(addr: str) -> bool:
    parts = addr.split("/")
    try:
        return len(parts) > 2 and parts[1] in ("ip4", "ip6") and ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        return False


def dial_order(addrs: Sequence[str]) -> list[str]:
    """``addrs`` with loopback addresses last: on another machine they name that
    machine itself, so they are only worth a try when nothing else answers."""
    return [a for a in addrs if not _is_loopback(a)] + [a for a in addrs if _is_loopback(a)]


def txt_properties(addrs: Sequence[str]) -> dict[bytes, bytes]:
    """The TXT record announcing ``addrs`` (each ending in ``/p2p/<peer id>``), per the
    libp2p spec: ``dnsaddr``, ``dnsaddr2``, ... (zeroconf's TXT is a dict of keys)."""
    ordered = [a for a in dial_order(addrs) if "/ip4/0.0.0.0/" not in a and "/ip6/::/" not in a][:MAX_ADDRS]
    return {(b"dnsaddr" if i == 0 else b"dnsaddr%d" % (i + 1)): a.encode() for i, a in enumerate(ordered)}


def parse_txt(properties: Mapping[bytes, bytes | None]) -> MdnsPeer | None:
    """The peer a TXT record announces, or None if it announces none we can dial.

    Takes ``dnsaddr*`` values that are TCP multiaddrs ending in the same
    ``/p2p/<peer id>``, at most ``MAX_ADDRS`` of them; anything else is ignored.
    """
    peer = ""
    addrs: list[str] = []
    for key, value in sorted(properties.items()):
        if not key.startswith(b"dnsaddr") or value is None or len(value) > MAX_ADDR_LENGTH:
            continue
        try:
            addr = value.decode("ascii")
        except UnicodeDecodeError:
            continue
        match = _ADDR.match(addr)
        if match is None or "/p2p-circuit" in addr or addr in addrs:
            continue
        if peer and match.group(3) != peer:
            continue  # one announcement, one peer
        peer = match.group(3)
        addrs.append(addr)
        if len(addrs) == MAX_ADDRS:
            break
    return MdnsPeer(peer, dial_order(addrs)) if addrs else None


def _service_info(zeroconf_mod: Any, addrs: Sequence[str]) -> Any:
    """zeroconf's ``ServiceInfo`` for our announcement (a random name, as the spec asks)."""
    name = secrets.token_hex(16)
    properties = txt_properties(addrs)
    first = properties[b"dnsaddr"].decode()
    port = int(first.split("/tcp/")[1].split("/")[0])
    ips = [first.split("/")[2]] if first.startswith("/ip4/") else ["127.0.0.1"]
    return zeroconf_mod.ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=port,
        properties=properties,
        server=f"{name}.local.",
        addresses=[socket.inet_aton(ip) for ip in ips],
    )


class MdnsService:
    """Browse the LAN for libp2p peers and, if ``announce`` is given, announce ours.

    ``await nursery.start(service.run)``; found peers arrive on :meth:`discovered`.

    Args:
        peer_id: ours; our own announcement is never reported.
        announce: our dialable addresses (``NodeInfo.addrs``), or None to browse only.
        queue: discoveries buffered for the consumer; more are dropped.
    """

    def __init__(self, peer_id: str, *, announce: Sequence[str] | None = None, queue: int = 64) -> None:
        self.peer_id = peer_id
        self._announce = [a for a in announce or () if "/p2p/" in a]
        self._send, self._recv = trio.open_memory_channel[MdnsPeer](queue)
        self._token: trio.lowlevel.TrioToken | None = None
        self._counts = {"discovered": 0, "dropped": 0}
        self._running = self._announced = False

    def discovered(self) -> trio.MemoryReceiveChannel[MdnsPeer]:
        """Peers announced on the LAN (each announcement once, ours never); closed when
        ``run()`` ends."""
        return self._recv

    def statistics(self) -> MdnsStatistics:
        return MdnsStatistics(running=self._running, announced=self._announced, **self._counts)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Browse (and announce) until cancelled.

        Calls ``task_status.started()`` once browsing, before the announcement is
        registered (zeroconf probes the name for ~1.7 s first, in a worker thread).

        Error handling: a LAN where zeroconf cannot start (no multicast, port 5353 not
        ours) is logged as a warning and leaves the node without mDNS, never stops it.

        Resource handling: on the way out, the announcement is withdrawn and zeroconf
        closed in a worker thread, bounded by ``_CLOSE_TIMEOUT`` even when cancelled.
        """
        import zeroconf  # here: a node without mDNS never loads it

        self._token = trio.lowlevel.current_trio_token()
        listener = _Listener(self, zeroconf)
        try:
            zc, browser = await trio.to_thread.run_sync(_open, zeroconf, listener, abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 - OSError and zeroconf's own errors
            log.warning("mDNS is off: zeroconf could not start on this network: %s", exc)
            self._send.close()
            task_status.started()
            return
        self._running = True
        info = None
        try:
            task_status.started()
            if self._announce:
                info = _service_info(zeroconf, self._announce)
                await trio.to_thread.run_sync(zc.register_service, info, abandon_on_cancel=True)
                self._announced = True
                log.info("announced on the LAN (mDNS) as %s", self.peer_id)
            await trio.sleep_forever()
        except Exception as exc:  # noqa: BLE001 - registration failed: keep browsing
            log.warning("mDNS announcement failed: %s", exc)
            await trio.sleep_forever()
        finally:
            self._running = False
            self._send.close()
            with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await trio.to_thread.run_sync(_close, zc, browser, info, abandon_on_cancel=True)

    def _found(self, peer: MdnsPeer | None) -> None:
        """On the trio thread: queue a peer another thread found (None: an
        announcement with nothing we can dial)."""
        if peer is None:
            self._counts["dropped"] += 1
            return
        if peer.peer_id == self.peer_id:
            return
        try:
            self._send.send_nowait(peer)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._counts["dropped"] += 1
        else:
            self._counts["discovered"] += 1

    def found_from_thread(self, peer: MdnsPeer | None) -> None:
        """From any thread (zeroconf's browser): hand ``peer`` to the trio thread."""
        if self._token is None:
            return
        try:
            self._token.run_sync_soon(self._found, peer)
        except trio.RunFinishedError:
            pass


def _open(zeroconf: Any, listener: Any) -> tuple[Any, Any]:
    """In a worker thread: bind zeroconf (port 5353, every interface) and start browsing."""
    zc = zeroconf.Zeroconf()
    try:
        return zc, zeroconf.ServiceBrowser(zc, SERVICE_TYPE, listener=listener)
    except BaseException:
        zc.close()
        raise


def _close(zc: Any, browser: Any, info: Any) -> None:
    """In a worker thread: withdraw our announcement, stop browsing, close; never raises."""
    for step in ((lambda: zc.unregister_service(info)) if info is not None else None, browser.cancel, zc.close):
        if step is None:
            continue
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.debug("mDNS shutdown step failed: %r", exc)


class _Listener:
    """zeroconf's service listener; its methods run on zeroconf's browser thread."""

    def __init__(self, service: MdnsService, zeroconf: Any) -> None:
        self._service = service
        self._zeroconf = zeroconf

    def add_service(self, zc: Any, type_: str, name: str) -> None:
        try:
            # the browser thread may block: zeroconf asks the LAN for the records
            info = zc.get_service_info(type_, name, timeout=_INFO_TIMEOUT_MS)
            peer = parse_txt(info.properties) if info is not None else None
        except Exception as exc:  # noqa: BLE001 - a LAN peer's bad records are its problem
            log.debug("mDNS service %s unreadable: %r", name, exc)
            peer = None
        self._service.found_from_thread(peer)

    update_service = add_service  # new addresses: worth a dial if we are not connected

    def remove_service(self, zc: Any, type_: str, name: str) -> None:
        pass  # a peer that leaves closes its connections; nothing to undo
