"""The executor daemon: one object owning one nursery with every long-lived task.

Start order: identity, ledger, backends (the embedded model loads here), the model
catalog, the network member (listening), the advertiser (first advert out), the
local state file. ``task_status.started(ExecutorInfo)`` fires only once all of that
is up, so a test or the CLI can print "ready" truthfully. Stop order is the reverse,
each step in a ``finally``, with the ledger and backends closed under a shield so a
cancelled shutdown still releases them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from loomnet.client import (
    Ledger,
    Member,
    P2PConfig,
    TokenCounter,
    default_data_dir,
    load_or_create_identity,
    remove_local_executor,
    write_local_executor,
)
from loomnet.protocol import INFER_PROTOCOL, INFER_SESSION_PROTOCOL, ModelOffer, SigningKey

from ._admin import Admin
from ._advertiser import Advertiser
from ._catalog import Catalog
from ._exposure import StatusWarning, check_exposure
from ._metrics import ExecutorMetrics
from ._operator import serve_operator
from ._redact import Redactor, install_log_redaction
from ._server import InferenceServer
from ._status import ExecutorStatus, backend_statuses, earnings, model_statuses
from .backends._base import Backend
from .backends._registry import make_backend
from .config import ExecutorConfig

__all__ = ["Executor", "ExecutorInfo"]

log = logging.getLogger("loomnet.executor")


async def _warm_tokens(tokens: TokenCounter, models: list[str]) -> None:
    """Load tiktoken's encodings for ``models`` (and cl100k_base, what any other model
    counts with) in a worker thread at start-up, once each (~0.2-0.5 s, ~40 MiB for
    good), so the first receipts do not load them while serving: under a flood, many
    receipts at once each waited for that load in a thread of their own (found by
    ``bench/slow_peers.py``). Abandoned on cancellation: a short-lived executor does
    not wait for it at shutdown.
    """
    for name in sorted({"cl100k_base", *map(tokens.encoding_name_for, models)}):
        await trio.to_thread.run_sync(tokens.load, name, abandon_on_cancel=True)

#: seconds each resource (a backend, the ledger) gets to close at shutdown
_CLOSE_TIMEOUT = 3.0
#: seconds answers cut short by a drain's end get to send their receipts
_ABORT_TIMEOUT = 2.0


class ExecutorInfo(msgspec.Struct, frozen=True, kw_only=True):
    peer_id: str
    addrs: list[str]
    models: list[ModelOffer]
    #: the operator's endpoint (``/status``, ``/metrics``...); None when it is off
    operator_url: str | None = None


class Executor:
    """An executor. ``await nursery.start(executor.run)``; cancel the nursery to stop.

    Args:
        config: the executor configuration.
        key: identity to use instead of ``<data_dir>/executor/identity.key``.
        backends: backends to serve instead of the configured ones (tests).
    """

    def __init__(
        self, config: ExecutorConfig, *, key: SigningKey | None = None, backends: list[Backend] | None = None,
        overlay_path: Path | None = None,
    ) -> None:
        self.config = config
        self.home = (Path(config.data_dir).expanduser() if config.data_dir else default_data_dir()) / "executor"
        #: the admin's changes (``_admin``): next to the TOML (the CLI says where), else here
        self.overlay_path = overlay_path or self.home / "admin.json"
        self.admin: Admin | None = None
        self._nursery: trio.Nursery | None = None
        self._redactor: Redactor | None = None
        self._addrs: list[str] = []
        self.key = key or load_or_create_identity(self.home / "identity.key")
        self._backends = backends
        self.server: InferenceServer | None = None
        self.advertiser: Advertiser | None = None
        self.member: Member | None = None
        self.info: ExecutorInfo | None = None
        self.catalog: Catalog | None = None
        self.ledger: Ledger | None = None
        self.metrics = ExecutorMetrics(models=self.model_names)
        self.metrics.watch(self.status_snapshot)
        self._started_at = time.time()
        self.draining = False
        #: start-up findings for the operator (``/status`` ``warnings``, ``_exposure``)
        self.warnings: list[StatusWarning] = []

    # ---------------------------------------------------------------- what the parts ask of it
    # The executor owns the state its parts share (catalog, server counters, the advert,
    # the listen addresses); they ask it through these methods, not through captured locals.

    def model_names(self) -> list[str]:
        return self.catalog.by_name() if self.catalog else []

    def own_advert(self):
        """The last advert this executor signed (its gossip member hands it out)."""
        return self.advertiser.current if self.advertiser else None

    def offers_changed(self) -> None:
        """Load or offers changed: re-advertise soon."""
        if self.advertiser is not None:
            self.advertiser.poke()

    def load(self) -> int:
        return self.server.load if self.server is not None else 0

    def listen_addrs(self) -> list[str]:
        return list(self._addrs)

    # ---------------------------------------------------------------- the operator's view

    def status_snapshot(self) -> ExecutorStatus:
        """The executor's state now (``_status``), without the ledger's earnings."""
        server, catalog, member = self.server, self.catalog, self.member
        assert server is not None and catalog is not None and member is not None and self.ledger is not None
        p2p = member.node.statistics()
        return ExecutorStatus(
            peer_id=self.key.peer_id, listen=list(self.info.addrs) if self.info else [],
            peers_connected=p2p.connected_peers, uptime=round(time.time() - self._started_at, 3),
            served=server.served, refused=server.refused, slots=server.slots.statistics(),
            models=model_statuses(catalog, server.counts, server.ttft, server.caches.statistics(),
                                  load=server.slots.load_of, withdrawn=self.draining),
            backends=backend_statuses(catalog),
            p2p=p2p, adverts_published=self.advertiser.published if self.advertiser else 0,
            adverts_rejected=member.table.statistics().refused, ledger=self.ledger.statistics(),
            state="draining" if self.draining else "serving", warnings=list(self.warnings),
            advert_problem=self.advertiser.problem if self.advertiser else None,
        )  # fmt: skip

    async def status(self) -> ExecutorStatus:
        """:meth:`status_snapshot` with today's and this month's earnings from the ledger."""
        snapshot = self.status_snapshot()
        assert self.ledger is not None
        return msgspec.structs.replace(snapshot, earnings=await earnings(self.ledger, now=time.time()))

    async def drain(self, grace: float | None = None) -> bool:
        """Stop taking requests and let those admitted finish: new ones are refused
        with ``SHUTTING_DOWN`` (retryable: clients go elsewhere), the advert is
        re-published offering nothing, and this returns once none is left or after
        ``grace`` seconds (``drain-timeout``, 5 s), whichever comes first. Returns True
        when every admitted request finished. Cancel ``run`` afterwards to stop."""
        grace = self.config.drain_timeout if grace is None else grace
        self.draining = True
        if self.server is not None:
            self.server.draining = True
        log.warning("executor %s: draining (up to %g s for requests in flight)", self.key.peer_id, grace)
        if self.advertiser is not None:
            self.advertiser.withdrawn = True
            with trio.move_on_after(min(grace, 2.0)):
                await self.advertiser.publish_now()
        with trio.move_on_after(grace):
            while self.server is not None and self.server.active:
                await trio.sleep(0.05)
            return True
        log.warning("executor %s: %d request(s) still running after %g s; ending them with SHUTTING_DOWN",
                    self.key.peer_id, self.server.active if self.server else 0, grace)  # fmt: skip
        if self.server is not None:  # each answer ends at a frame boundary, with a receipt for what was sent
            self.server.abort.set()
            with trio.move_on_after(_ABORT_TIMEOUT):
                while self.server.active:
                    await trio.sleep(0.05)
        return False

    def add_redaction(self, redactor: Redactor) -> None:
        """Keep a backend added at runtime's secrets out of every log line too."""
        if self._redactor is not None:
            self._redactor.extend(redactor)

    def close_later(self, backend: Backend, done: Callable[[], bool], *, within: float = 30.0) -> None:
        """Close a removed ``backend`` once ``done()`` (its requests ended), or after
        ``within`` seconds, in the executor's own nursery."""

        async def close() -> None:
            with trio.move_on_after(within):
                while not done():
                    await trio.sleep(0.1)
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await backend.aclose()

        if self._nursery is not None:
            self._nursery.start_soon(close)

    def start_drain(self) -> None:
        """:meth:`drain` in the background (the admin's drain): the executor then
        refuses new requests until it is restarted."""
        if self._nursery is not None:
            self._nursery.start_soon(self.drain)

    def ready(self) -> str | None:
        """None when the executor can serve; else why not (``/readyz``)."""
        if self.info is None or self.catalog is None:
            return "starting"
        if self.draining:
            return "draining: shutting down"
        if not any(self.catalog.is_up(b) for b in self.catalog.backends):
            return "no backend is healthy"
        if not self.catalog.offers:
            return "no model is offered (every backend is down, benched or over its budget)"
        return None

    @property
    def peer_id(self) -> str:
        return self.key.peer_id

    def _make_backends(self) -> list[Backend]:
        if self._backends is not None:
            return self._backends
        return [make_backend(b, embedded=self.config.embedded) for b in self.config.effective_backends]

    async def _watch_backends(self, catalog: Catalog) -> None:
        """Probe the backends every ``health-interval``; re-advertise when offers change."""
        while True:
            await trio.sleep(self.config.health_interval)
            if await catalog.check_health(timeout=self.config.health_interval) and self.advertiser:
                self.advertiser.poke()

    async def _check_exposure(self, catalog: Catalog, done: trio.Event) -> None:
        """Warn (log, ``/status``) about local backends reachable from other hosts."""
        try:
            self.warnings += await check_exposure(zip(catalog.names, catalog.backends))
        except Exception:  # noqa: BLE001 - a check that fails is no reason not to serve
            log.exception("could not check whether local backends are reachable from other hosts")
        finally:
            done.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled.

        Resource handling: the ledger, backends, libp2p host and the local state
        file are released on the way out, in a bounded time.
        """
        cfg = self.config
        ledger = await Ledger.open(self.home / "ledger.sqlite")
        backends = self._make_backends()
        # every configured secret, in every form, leaves every log record (tracebacks too)
        redactor = self._redactor = Redactor()
        for source in (*backends, *cfg.backends):
            redactor.extend(source.redactor())
        stop_redacting = install_log_redaction(redactor)
        announced = False
        try:
            catalog = self.catalog = await Catalog.build(backends, cfg)
            self.ledger = ledger
            await catalog.load_spending(ledger)  # what each budgeted backend cost this period
            member = self.member = Member(
                self.key,
                P2PConfig(
                    listen=cfg.listen,
                    bootstrap=cfg.bootstrap,
                    max_connections=cfg.max_connections,
                    max_connections_per_peer=cfg.max_connections_per_peer,
                    max_streams_per_connection=cfg.max_streams_per_connection,
                    max_unread_bytes_per_connection=cfg.max_unread_bytes_per_connection,
                    max_unread_bytes=cfg.max_unread_bytes,
                    mdns=cfg.mdns,
                    mdns_announce=cfg.mdns,
                ),
                own_advert=self.own_advert,
            )
            server = self.server = InferenceServer(
                self.key, cfg, catalog, ledger, on_load_change=self.offers_changed,
                metrics=self.metrics,
            )
            for protocol in (INFER_SESSION_PROTOCOL, INFER_PROTOCOL):  # sessions, and one-request streams
                member.node.set_stream_handler(
                    protocol,
                    server.handle,
                    max_streams_per_peer=cfg.max_streams_per_peer,
                    refuse=server.intake.refuse_stream,  # PEER_LIMIT
                )
            self.admin = Admin(self, overlay_path=self.overlay_path, audit_path=self.home / "audit.log")
            for name in self.admin.overlay.disabled:  # switched off by the admin before a restart
                if name in catalog.names:
                    catalog.set_enabled(name, False)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                exposure_checked = trio.Event()  # probes run while libp2p starts (<= 0.5 s)
                nursery.start_soon(self._check_exposure, catalog, exposure_checked)
                nursery.start_soon(_warm_tokens, server.tokens, [offer.name for offer in catalog.offers])
                node_info = await nursery.start(member.run)
                self._addrs = list(node_info.addrs)
                self.advertiser = Advertiser(
                    self.key, member, catalog, cfg, load=self.load, addrs=self.listen_addrs
                )
                catalog.on_change = self.advertiser.poke  # a breaker opened or closed: re-advertise
                await nursery.start(self.advertiser.run)
                nursery.start_soon(self._watch_backends, catalog)
                self.info = ExecutorInfo(peer_id=self.key.peer_id, addrs=list(node_info.addrs), models=catalog.offers)
                if cfg.operator.enabled:
                    url = await nursery.start(serve_operator, self, cfg.operator)
                    self.info = msgspec.structs.replace(self.info, operator_url=url)
                    log.info("executor %s: operator endpoint %s (/status, /metrics)", self.key.peer_id, url)
                if cfg.announce_local:
                    write_local_executor(self.key.peer_id, list(node_info.addrs), operator=self.info.operator_url)
                    announced = True
                log.info("executor %s serving %s", self.key.peer_id, [o.name for o in catalog.offers])
                await exposure_checked.wait()  # so "ready" comes with /status's warnings
                task_status.started(self.info)
        finally:
            try:
                if announced:
                    remove_local_executor(self.key.peer_id)
                # the backends (those added at runtime too) close together within one bound,
                # then the ledger within its own: a slow backend never skips the ledger's close
                open_backends = list(self.catalog.backends) if self.catalog is not None else list(backends)
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                    async with trio.open_nursery() as closing:
                        for backend in dict.fromkeys(open_backends + list(backends)):
                            closing.start_soon(_close_quietly, backend)
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                    await ledger.aclose()
            finally:
                stop_redacting()


async def _close_quietly(backend: Backend) -> None:
    try:
        await backend.aclose()
    except Exception:  # noqa: BLE001 - one backend's failure to close never stops the others'
        log.exception("backend %s failed to close", getattr(backend, "kind", "?"))
