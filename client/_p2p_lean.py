"""Trap V: import only the libp2p that loomnet runs. libp2p-free (``_p2p`` imports libp2p
inside :func:`lean_imports`).

``import libp2p`` took ~1.0 s on this machine, and any ``import libp2p.<module>`` runs
the package's ``__init__`` first: it imports every transport and feature py-libp2p
0.8.1 has (QUIC with aioquic, the ACME/autotls client with requests and httpx, DNS
resolvers, WebSocket, circuit relay, RSA keys through pycryptodome, Prometheus) to
offer ``new_host``. loomnet runs TCP, Noise, yamux, identify, ping and gossipsub, and
builds its host itself (``_p2p._new_host``). While ``_p2p`` imports libp2p's modules,
:func:`lean_imports` keeps the rest out:

- ``LAZY_PACKAGES``: the package module is made from its spec without running its
  ``__init__``; submodules import as usual. The ``__init__`` runs at the first access
  to a name it defines (``from libp2p import new_host`` still works, at the old cost).
- ``ABSENT``: an optional dependency that libp2p imports inside ``try/except
  ImportError`` (``quic/stream.py``: aioquic) looks missing while libp2p's core
  loads, so that module takes its fallback.
- ``DEFERRED``: modules that libp2p's core imports names from only to call them for
  a feature loomnet never turns on (autotls and its X.509 certificates, UPnP,
  libp2p's mDNS, DNS names, RSA and secp256k1 peers, private networks, Prometheus
  metrics). A stand-in module gives each name as a :class:`_Deferred`, which imports
  the real module at its first call; ``DNSResolver()``, which the swarm builds at
  start, gives an object that builds the real resolver at its first use.
- ``PRELOAD``: multiaddr imports a codec at the first address that needs it; its
  ``/p2p/`` codec imports py-cid (~40 ms), used only for CIDv1 peer ids, and its
  ``/ip4/`` codec netaddr (~40 ms) for what the standard library's ``ipaddress`` does
  (``ip4_codec``: the same bytes and strings, the same refusals). Imported in the
  block, so both are deferred (netaddr still serves ``/ip6/``).
- ``REPLACED``: ``importlib.metadata`` (~25 ms) imported to read libp2p's version
  once: the same version, read from its ``.dist-info`` folder name.

Stand-ins and absences hold only while libp2p's modules load: afterwards the real
modules import normally for anyone who wants them. A module already imported when
``lean_imports`` starts is used as it is (nothing left to save). Measurements and the
trap for whoever upgrades libp2p: ``docs/network.md``, trap V. Tests:
``tests/client/test_p2p_startup.py`` (in a subprocess: what is and is not imported
after ``import loomnet.client`` and after nodes ran; libp2p's own ``new_host`` still
works; what libp2p holds instead resolves to the real objects).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

__all__ = ["ABSENT", "DEFERRED", "LAZY_PACKAGES", "PRELOAD", "REPLACED", "ip4_codec", "lean_imports"]

#: packages whose ``__init__`` runs only when one of its own names is asked for
LAZY_PACKAGES = ("libp2p", "libp2p.transport", "libp2p.security")

#: optional imports that look missing while libp2p's core loads
ABSENT = ("aioquic",)

#: module -> the names libp2p's core imports from it, each deferred to its first call
DEFERRED: dict[str, tuple[str, ...]] = {
    "multiaddr.resolvers": ("DNSResolver",),  # DNS addresses: resolved when dialed
    "libp2p.security.tls.autotls.acme": ("ACMEClient", "compute_b36_peer_id"),
    "libp2p.security.tls.autotls.broker": ("BrokerClient",),
    "libp2p.relay.circuit_v2.nat": ("is_private_ip",),  # autotls only
    "libp2p.discovery.mdns.mdns": ("MDNSDiscovery", "create_mdns_discovery"),  # ours: client/_mdns.py
    "libp2p.discovery.upnp.upnp": ("UpnpManager",),
    "libp2p.crypto.rsa": ("RSAPrivateKey", "RSAPublicKey"),  # a peer with an RSA key
    "libp2p.crypto.secp256k1": ("Secp256k1PrivateKey", "Secp256k1PublicKey"),
    "libp2p.security.pnet.protector": ("new_protected_conn",),  # private networks (a PSK)
    "prometheus_client": ("Counter", "Gauge", "Histogram"),  # libp2p's metrics, off
    "cryptography.x509": (),  # basic_host's autotls certificates; x509.* resolves when used
    "cryptography.x509.oid": ("ExtensionOID",),
    "cid": (),  # py-cid (~40 ms): only for CIDv1 peer ids in /p2p/ addresses; see PRELOAD
    "netaddr": (),  # ~40 ms: multiaddr's /ip4/ codec, which _p2p gives ip4_codec's functions
}

#: modules imported inside the block (multiaddr loads a codec at its first address),
#: so that what they import is deferred too
PRELOAD = ("multiaddr.codecs.cid", "multiaddr.codecs.ip4")


def _agent_version() -> str:
    """``libp2p.utils.version.get_agent_version`` without ``importlib.metadata`` (~25 ms
    to import, for one string at identify's import): the version from libp2p's
    ``.dist-info`` folder name, as ``importlib.metadata.version`` finds it."""
    spec = importlib.util.find_spec("libp2p")
    if spec is not None and spec.origin:
        site = os.path.dirname(os.path.dirname(spec.origin))
        for entry in os.listdir(site):
            if entry.startswith("libp2p-") and entry.endswith(".dist-info"):
                return f"py-libp2p/{entry[len('libp2p-'):-len('.dist-info')]}"
    return "py-libp2p/unknown"  # as libp2p's own, when the version cannot be found


#: modules stood in for by real, small replacements of the names libp2p imports
REPLACED: dict[str, dict[str, Any]] = {
    "libp2p.utils.version": {"get_agent_version": _agent_version},
}

#: deferred names whose instances libp2p builds eagerly (the swarm's DNS resolver)
_LAZY_INSTANCES = frozenset({("multiaddr.resolvers", "DNSResolver")})

_loading = False  # True while lean_imports' block runs


class _Deferred:
    """Stands in for ``module.path`` (a class, function or class attribute): the module
    is imported at the first call. An attribute of it is a deferred too while libp2p's
    modules load (``RSAPublicKey.from_bytes`` in a module-level table), and the real
    attribute afterwards (``ExtensionOID.SUBJECT_ALTERNATIVE_NAME`` in a call)."""

    __slots__ = ("_module", "_path")

    def __init__(self, module: str, path: str) -> None:
        self._module = module
        self._path = path

    def resolve(self) -> Any:
        obj: Any = importlib.import_module(self._module)
        for part in self._path.split("."):
            obj = getattr(obj, part)
        return obj

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # protocols (copy, pickle, class bases) see no such thing
            raise AttributeError(attr)
        if _loading:
            return _Deferred(self._module, f"{self._path}.{attr}")
        return getattr(self.resolve(), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if (self._module, self._path) in _LAZY_INSTANCES:
            return _LazyInstance(self, args, kwargs)
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<deferred {self._module}.{self._path}>"


class _LazyInstance:
    """An instance of a deferred class, built at the first attribute access."""

    __slots__ = ("_deferred", "_args", "_kwargs", "_real")

    def __init__(self, deferred: _Deferred, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._deferred, self._args, self._kwargs = deferred, args, kwargs
        self._real: Any = None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if self._real is None:
            self._real = self._deferred.resolve()(*self._args, **self._kwargs)
        return getattr(self._real, attr)


def ip4_codec(binary_parse_error: type[Exception]) -> tuple[Any, Any]:
    """``to_bytes`` and ``to_string`` for multiaddr's ``/ip4/`` codec with ``ipaddress``.

    multiaddr's use netaddr (``IPAddress(value, version=4)``); both accept exactly the
    dotted quads (measured on 127.0.0.1, 127.1, 0x7f.0.0.1, 01.2.3.4, 256.1.1.1, a
    trailing space, ::1: the same verdicts), and a refusal is a ``StringParseError``
    either way (multiaddr wraps whatever the codec raises).
    """
    import ipaddress

    def to_bytes(self: Any, proto: Any, string: str) -> bytes:
        return ipaddress.IPv4Address(string).packed

    def to_string(self: Any, proto: Any, buf: bytes) -> str:
        try:
            return str(ipaddress.IPv4Address(int.from_bytes(buf, byteorder="big")))
        except ValueError:
            raise binary_parse_error("Invalid IPv4 address bytes", buf, "ip4") from None

    return to_bytes, to_string


def _standin(name: str, names: tuple[str, ...]) -> types.ModuleType:
    """A module whose ``names`` are deferreds, and whose other attributes are deferreds
    too (``x509.DNSName`` used in a call: resolved then)."""
    module = types.ModuleType(name, f"loomnet's stand-in for {name} while libp2p loads (trap V)")
    for attr in names:
        setattr(module, attr, _Deferred(name, attr))

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        deferred = _Deferred(name, attr)
        return deferred if _loading else deferred.resolve()

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def _lazy_package(name: str) -> None:
    """Put ``name`` in ``sys.modules`` as its package, ``__init__`` not run yet."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not a package here: nothing to defer
    module = importlib.util.module_from_spec(spec)
    initialized = False

    def __getattr__(attr: str) -> Any:  # PEP 562: only names the module lacks
        nonlocal initialized
        if attr.startswith("__") or initialized:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        if importlib.util.find_spec(f"{name}.{attr}") is not None:
            return importlib.import_module(f"{name}.{attr}")
        initialized = True
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        logging.getLogger("libp2p").propagate = True  # trap H: its __init__ cut the logger off
        return getattr(module, attr)

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


@contextlib.contextmanager
def lean_imports() -> Iterator[None]:
    """While the block imports libp2p's modules, keep out what loomnet never runs.

    Not thread-safe: another thread importing aioquic or a deferred module while the
    block runs would find it missing or stood in for (the block runs once, at
    ``import loomnet.client``).
    """
    if "libp2p.network.swarm" in sys.modules:  # libp2p's core is loaded already
        yield
        return
    for name in LAZY_PACKAGES:
        if name not in sys.modules:
            _lazy_package(name)
    placed: dict[str, types.ModuleType | None] = {}
    for name in ABSENT:
        if name not in sys.modules:
            placed[name] = sys.modules[name] = None  # type: ignore[assignment]
    for name, names in DEFERRED.items():
        if name not in sys.modules:
            placed[name] = sys.modules[name] = _standin(name, names)
    for name, replacements in REPLACED.items():
        if name not in sys.modules:
            module = types.ModuleType(name, f"loomnet's stand-in for {name} while libp2p loads (trap V)")
            module.__dict__.update(replacements)
            placed[name] = sys.modules[name] = module
    global _loading
    _loading = True
    try:
        yield
        for name in PRELOAD:
            importlib.import_module(name)
    finally:
        _loading = False
        for name, module in placed.items():
            if name in sys.modules and sys.modules[name] is module:
                del sys.modules[name]
