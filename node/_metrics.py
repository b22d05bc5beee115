"""The executor's Prometheus metrics (``GET /metrics``; names in ``docs/metrics.md``).

Two kinds, in one registry per executor (never the process-wide default: tests run many
executors in one process):

* counted as requests end (:meth:`ExecutorMetrics.request_done`, :meth:`refused`):
  requests by model and outcome, tokens, time to first token and duration histograms;
* read at scrape time from the executor's own ``statistics()`` snapshots by a collector
  (:class:`_SnapshotCollector`): queue, slots, backend health, breakers, provider spend,
  peers, adverts, ledger writes.

Label values are bounded: a ``model`` is one of the catalog's advertised names (a name a
peer asked for that is not served counts as ``other``), an ``outcome`` is ``ok`` or an
:class:`ErrorCode` name, a ``backend`` an operator-configured name. Never a peer id, a
prompt or anything else a peer chooses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loomnet.protocol import ErrorCode

__all__ = ["CONTENT_TYPE", "ExecutorMetrics", "OTHER_MODEL"]

#: what ``GET /metrics`` answers with (Prometheus text format 0.0.4)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: the ``model`` label of a request for a model this executor does not serve
OTHER_MODEL = "other"

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ExecutorMetrics:
    """See the module doc. ``snapshot()`` returns what the scrape-time gauges read (an
    ``ExecutorStatus``, ``_status``); ``models()`` the advertised names now."""

    def __init__(self, *, models: Callable[[], Iterable[str]] = tuple) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = models
        self.requests = Counter("loomnet_requests", "Inference requests that ended, by model and outcome "
                                "(ok, or the error code's name)", ["model", "outcome"], registry=self.registry)  # fmt: skip
        self.tokens = Counter("loomnet_tokens", "Tokens billed on receipts, by model and direction (input, output)",
                              ["model", "direction"], registry=self.registry)  # fmt: skip
        self.ttft = Histogram("loomnet_ttft_seconds", "Time from a request's admission to its first content sent",
                              ["model"], buckets=_SECONDS, registry=self.registry)  # fmt: skip
        self.duration = Histogram("loomnet_request_duration_seconds", "Time from a request's admission to its "
                                  "receipt", ["model"], buckets=_SECONDS, registry=self.registry)  # fmt: skip
        self.rejected = Counter("loomnet_requests_refused", "Requests refused before generating, by error code "
                                "(bad signature, replay, limits...)", ["code"], registry=self.registry)  # fmt: skip

    def model_label(self, model: str) -> str:
        """``model`` if this executor offers it, else :data:`OTHER_MODEL`."""
        folded = model.casefold()
        return next((m for m in self._models() if m.casefold() == folded), OTHER_MODEL)

    def request_done(self, model: str, outcome: ErrorCode | None, *, ttft: float | None = None,
                     duration: float | None = None, input_tokens: int = 0, output_tokens: int = 0) -> None:  # fmt: skip
        """One request ended: ``outcome`` None when it got its receipt."""
        label = self.model_label(model)
        self.requests.labels(label, "ok" if outcome is None else outcome.name).inc()
        if input_tokens:
            self.tokens.labels(label, "input").inc(input_tokens)
        if output_tokens:
            self.tokens.labels(label, "output").inc(output_tokens)
        if ttft is not None:
            self.ttft.labels(label).observe(max(0.0, ttft))
        if duration is not None:
            self.duration.labels(label).observe(max(0.0, duration))

    def refused(self, code: ErrorCode) -> None:
        self.rejected.labels(code.name).inc()

    def watch(self, snapshot: Callable[[], object]) -> None:
        """Add the scrape-time gauges, read from ``snapshot()`` (an ``ExecutorStatus``)."""
        self.registry.register(_SnapshotCollector(snapshot))

    def render(self) -> bytes:
        """The Prometheus text of every metric."""
        return generate_latest(self.registry)


class _SnapshotCollector(Collector):
    """Gauges (and totals kept elsewhere) read from one status snapshot per scrape."""

    def __init__(self, snapshot: Callable[[], object]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on the snapshot

    def collect(self) -> Iterable[Metric]:
        status = self._snapshot()
        s = status.slots  # type: ignore[attr-defined]
        yield _gauge("loomnet_capacity", "Generations that may run at once, all models together", s.capacity)
        yield _gauge("loomnet_generations_running", "Generations running now", s.running)
        yield _gauge("loomnet_queue_depth", "Requests waiting for a generation slot now", s.queued)
        yield _gauge("loomnet_peers_connected", "Peers with an open libp2p connection", status.peers_connected)  # type: ignore[attr-defined]
        yield _gauge("loomnet_uptime_seconds", "Seconds since the executor started", status.uptime)  # type: ignore[attr-defined]
        offered = GaugeMetricFamily("loomnet_model_offered", "1 when the model is in the advert (a backend of it "
                                    "is available), else 0", labels=["model"])  # fmt: skip
        for model in status.models:  # type: ignore[attr-defined]
            offered.add_metric([model.name], 1.0 if model.offered else 0.0)
        yield offered
        up = GaugeMetricFamily("loomnet_backend_up", "1 when the backend passed its last health probe", labels=["backend"])
        in_flight = GaugeMetricFamily("loomnet_backend_in_flight", "Requests a backend is answering now",
                                      labels=["backend"])  # fmt: skip
        spent = GaugeMetricFamily("loomnet_backend_spend_micro", "What the backend's provider charged this "
                                  "period, micro-credits", labels=["backend"])  # fmt: skip
        budget = GaugeMetricFamily("loomnet_backend_spend_budget_micro", "The backend's spend budget per period, "
                                   "micro-credits (absent: none)", labels=["backend"])  # fmt: skip
        warning = GaugeMetricFamily("loomnet_backend_spend_warning", "The highest spend threshold a backend "
                                    "reached this period: 0, a warn-at fraction (0.75, 0.9), or 1 (spent: out of "
                                    "rotation)", labels=["backend"])  # fmt: skip
        for backend in status.backends:  # type: ignore[attr-defined]
            if backend.spend is not None and backend.spend.amount is not None:
                level = 1.0 if backend.spend.exhausted else max(backend.spend.warned, default=0.0)
                warning.add_metric([backend.name], level)
        yield warning
        for backend in status.backends:  # type: ignore[attr-defined]
            up.add_metric([backend.name], 1.0 if backend.healthy else 0.0)
            in_flight.add_metric([backend.name], backend.in_flight)
            if backend.spend is not None:
                spent.add_metric([backend.name], backend.spend.spent)
                if backend.spend.amount is not None:
                    budget.add_metric([backend.name], backend.spend.amount)
        yield from (up, in_flight, spent, budget)
        breaker = GaugeMetricFamily("loomnet_backend_breaker_open", "1 while a model's backend is benched by its "
                                    "circuit breaker (open), else 0", labels=["model", "backend"])  # fmt: skip
        for model in status.models:  # type: ignore[attr-defined]
            for member in model.backends:
                breaker.add_metric([model.name, member.name], 1.0 if member.breaker == "open" else 0.0)
        yield breaker
        hits = CounterMetricFamily("loomnet_cache_hits", "Requests answered from a model's response cache",
                                   labels=["model"])  # fmt: skip
        misses = CounterMetricFamily("loomnet_cache_misses", "Cacheable requests the response cache could not "
                                     "answer", labels=["model"])  # fmt: skip
        cached = GaugeMetricFamily("loomnet_cache_bytes", "Bytes of answers a model's response cache holds",
                                   labels=["model"])  # fmt: skip
        for model in status.models:  # type: ignore[attr-defined]
            if model.cache is not None:
                hits.add_metric([model.name], model.cache.hits)
                misses.add_metric([model.name], model.cache.misses)
                cached.add_metric([model.name], model.cache.bytes)
        yield from (hits, misses, cached)
        p2p = status.p2p  # type: ignore[attr-defined]
        yield _counter("loomnet_adverts_published", "Adverts this executor signed and published",
                       status.adverts_published)  # type: ignore[attr-defined]  # fmt: skip
        yield _counter("loomnet_adverts_received", "Adverts received on gossip", p2p.gossip_received)
        yield _counter("loomnet_adverts_rejected", "Adverts refused (forged, oversized, stale...), not relayed",
                       status.adverts_rejected)  # type: ignore[attr-defined]  # fmt: skip
        ledger = status.ledger  # type: ignore[attr-defined]
        yield _counter("loomnet_ledger_writes", "Ledger writes asked for (receipts, acks)", ledger.writes)
        yield _counter("loomnet_ledger_commits", "Ledger transactions committed (group commit)", ledger.commits)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
