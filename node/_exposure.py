"""Is a local backend reachable from other hosts? Checked once, at start-up.

Why: an Ollama, LM Studio, llama.cpp server or vLLM port has no authentication. Open to
the network, anyone who reaches the machine uses the operator's hardware for free,
around loomnet's signatures, prices and limits (a known way to get robbed: scanners
look for port 11434). loomnet cannot close the port; it says so, in the log and in
``/status`` (``warnings``), and ``docs/security.md`` says how to close it.

Theory of operation: a backend counts as *local* when it is one of the runtimes an
executor reaches over HTTP (Ollama, or an OpenAI-compatible server) and its URL's host
is this machine: ``localhost``, a loopback address, a wildcard (``0.0.0.0``, ``::``) or
one of this machine's own interface addresses. Then:

* a URL naming a wildcard or a non-loopback address of this machine says it outright:
  the runtime listens where other hosts can reach it;
* a URL naming loopback says nothing about the other addresses the runtime may also
  listen on (``OLLAMA_HOST=0.0.0.0`` listens on all of them), so the executor tries to
  connect to the backend's port on each non-loopback address of this machine. A
  connection accepted there is a port open to the network (unless a firewall outside
  this process drops it, which loomnet cannot see).

Bounds: at most :data:`MAX_ADDRESSES` addresses, all probes at once, each under
:data:`PROBE_TIMEOUT` seconds, so the whole check costs at most that long. Nothing is
sent: a probe opens a TCP connection and closes it. Only this machine's own addresses
are ever dialled (traffic to them never leaves the host); a backend on another host,
or named by a hostname other than ``localhost``, is not checked (no DNS lookup).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable

import httpx
import ifaddr
import msgspec
import trio

from .backends._base import Backend
from .backends._registry import PROVIDERS

__all__ = ["EXPOSED", "MAX_ADDRESSES", "PROBE_TIMEOUT", "StatusWarning", "check_exposure", "listening_on",
           "local_target", "own_addresses"]

log = logging.getLogger("loomnet.executor")

#: seconds one connection attempt may take; the whole check takes at most this long
PROBE_TIMEOUT = 0.5
#: interface addresses probed at most (a host with hundreds of addresses is probed on the first ones)
MAX_ADDRESSES = 32
#: the warning's code: a local backend's port is reachable from other hosts
EXPOSED = "backend_exposed"
#: adapter modules that speak to a runtime over HTTP without authentication of its own
_LOCAL_RUNTIME_MODULES = frozenset({"ollama", "openai_compat"})


class StatusWarning(msgspec.Struct, frozen=True, kw_only=True):
    """Something the operator should fix, in ``/status`` (``warnings``).

    Never holds a secret or an endpoint (``/status`` names backends by their operator
    names and kinds only); the log line next to it names the address and port."""

    #: stable, machine-readable: ``backend_exposed``
    code: str
    #: the backend's name in the config, or None when it concerns the executor
    backend: str | None = None
    message: str


def own_addresses() -> list[str]:
    """This machine's non-loopback interface addresses, IPv4 first (reads the
    interfaces; no traffic). IPv6 link-local addresses are left out (they need a
    scope and reach only the link)."""
    try:
        adapters = ifaddr.get_adapters()
    except Exception:  # noqa: BLE001 - no interface list is no reason to fail start-up
        return []
    v4, v6 = [], []
    for adapter in adapters:
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                address = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                continue
            if address.is_loopback or address.is_link_local or address.is_unspecified:
                continue
            (v4 if address.version == 4 else v6).append(str(address))
    return list(dict.fromkeys(v4 + v6))


def local_target(backend: Backend, own: Iterable[str] = ()) -> tuple[str, int] | None:
    """``(host, port)`` of ``backend`` when it is a local runtime on this machine
    (module docstring), else None. ``own``: this machine's non-loopback addresses."""
    module = PROVIDERS.get(getattr(backend, "kind", ""), ("", ""))[0]
    endpoint = getattr(backend, "endpoint", None)
    if module not in _LOCAL_RUNTIME_MODULES or not isinstance(endpoint, str):
        return None
    try:
        url = httpx.URL(endpoint)
    except Exception:  # noqa: BLE001 - not a URL: the backend reports that itself
        return None
    host = url.host.strip("[]").lower()
    port = url.port or (443 if url.scheme == "https" else 80)
    if host == "localhost" or host.endswith(".localhost"):
        return host, port
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a hostname: resolving it is a lookup we do not make
    if address.is_loopback or address.is_unspecified or str(address) in set(own):
        return str(address), port
    return None


async def listening_on(port: int, addresses: Iterable[str], *, timeout: float = PROBE_TIMEOUT) -> list[str]:
    """The ``addresses`` (of this machine) on which something accepts TCP connections
    on ``port``; every attempt at once, each under ``timeout`` seconds. A refused,
    unreachable or slow address is simply not listed."""
    found: list[str] = []

    async def probe(address: str) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            with trio.move_on_after(timeout):
                await sock.connect((address, port))
                found.append(address)
        except OSError:
            pass
        finally:
            sock.close()

    async with trio.open_nursery() as nursery:
        for address in list(addresses)[:MAX_ADDRESSES]:
            nursery.start_soon(probe, address)
    return found


async def check_exposure(
    backends: Iterable[tuple[str, Backend]], *, own: list[str] | None = None, timeout: float = PROBE_TIMEOUT
) -> list[StatusWarning]:
    """One :class:`StatusWarning` per local backend reachable from other hosts, each
    also logged at WARNING. ``backends``: (operator name, backend) pairs; ``own``: this
    machine's non-loopback addresses (default: :func:`own_addresses`).

    Bounded: all backends and addresses are probed at once, each under ``timeout``
    seconds. Never raises for a probe (a failed probe is "not reachable").
    """
    own = own_addresses() if own is None else own
    found: dict[str, list[str]] = {}
    targets = [(name, backend, local_target(backend, own)) for name, backend in backends]
    targets = [(name, backend, target) for name, backend, target in targets if target is not None]

    async def check(name: str, host: str, port: int) -> None:
        if not _is_loopback(host):
            found[name] = [host]  # the URL itself names a wildcard or an address other hosts reach
        elif reachable := await listening_on(port, own, timeout=timeout):
            found[name] = reachable

    async with trio.open_nursery() as nursery:
        for name, _, (host, port) in targets:
            nursery.start_soon(check, name, host, port)
    warnings = []
    for name, backend, (host, port) in targets:
        if name not in found:
            continue
        named = found[name] == [host] and not _is_loopback(host)
        log.warning(
            "backend %s (%s): port %d is reachable from other hosts (%s): anyone who can reach this machine can "
            "use it without loomnet; bind it to 127.0.0.1 or firewall the port (docs/security.md)",
            name, backend.kind, port,
            f"its URL names {host}" if named else "it accepts connections on " + ", ".join(found[name]),
        )  # fmt: skip
        where = "every address of this machine" if named and ipaddress.ip_address(host).is_unspecified else (
            "a non-loopback address of this machine")
        warnings.append(StatusWarning(
            code=EXPOSED, backend=name,
            message=(f"backend {name} ({backend.kind}) listens on {where}: other hosts can use it without "
                     "loomnet. Bind it to 127.0.0.1 (Ollama: OLLAMA_HOST=127.0.0.1) or firewall its port."),
        ))  # fmt: skip
    return warnings


def _is_loopback(host: str) -> bool:
    """``host`` (from :func:`local_target`) names only this machine's loopback."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    return ipaddress.ip_address(host).is_loopback
