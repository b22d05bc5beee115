"""The operator's endpoint of a real executor (two OpenAI-compatible backends in a chain,
the faithful fake runtime behind each; a real client over py-libp2p): ``/status``,
``/metrics``, ``/healthz``, ``/readyz`` say what happened, a benched backend shows, and a
canary API key appears nowhere in what the endpoint answers."""

from __future__ import annotations

import contextlib

import httpx
import msgspec
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from loomnet.client import BudgetConfig, ClientConfig, LoomClient, local_executors
from loomnet.node import Executor, ExecutorConfig, ModelTerms
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.node.config import OperatorConfig, PoolBackend
from loomnet.protocol import ChatMessage, ErrorCode, LoomError

from ..node.asgi_server import serve_app
from ..node.fake_openai import Failure, FakeOpenAI, openai_error

pytestmark = pytest.mark.integration

CANARY = "sk-canary-OPERATOR-7f3c9a1e5b2d4c6e8a0f"


async def start(nursery, tmp_path, monkeypatch, cache=None, **settings):
    monkeypatch.setenv("LOOMNET_STATE_DIR", str(tmp_path / "state"))
    fakes = {"desk": FakeOpenAI(flavour="vllm", pieces=["from desk"]),
             "hosted": FakeOpenAI(flavour="openai", pieces=["from hosted"])}  # fmt: skip
    backends = []
    for name, fake in fakes.items():
        url = await serve_app(nursery, fake)
        hosted = name == "hosted"
        backends.append(OpenAICompatBackend(BackendConfig(
            provider="openai" if hosted else "vllm", name=name, endpoint=url + "/v1", models=["m1"],
            api_key=CANARY if hosted else None, provider_price_out=1000.0 if hosted else 0.0,
            spend_budget=BudgetConfig(amount=10**12) if hosted else None, max_retries=0,
        )))  # fmt: skip
    config = ExecutorConfig(
        data_dir=str(tmp_path / "executor"), listen=["/ip4/127.0.0.1/tcp/0"], health_interval=600.0,
        breaker_failures=1, breaker_cooldown=600.0, operator=OperatorConfig(port=0),
        backends=[BackendConfig(provider="vllm", name="desk"), BackendConfig(provider="vllm", name="hosted")],
        models=[ModelTerms(name="chat-m", aliases=["cm"], categories=["fast"], price_out=2.0, cache=cache,
                           backends=[PoolBackend(backend="desk", model="m1"), PoolBackend(backend="hosted", model="m1")])],
        **settings,
    )  # fmt: skip
    executor = Executor(config, backends=backends)
    await nursery.start(executor.run)
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]],
                                     discover_local=False, offer_timeout=10.0))  # fmt: skip
    await nursery.start(client.run)
    return executor, client, fakes


async def get(url: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return await http.get(path)


async def test_status_metrics_and_health_say_what_happened(nursery, tmp_path, monkeypatch):
    executor, client, fakes = await start(nursery, tmp_path, monkeypatch)
    url = executor.info.operator_url
    assert url.startswith("http://127.0.0.1:")
    # loomnet status finds it the way chat finds a local executor: the state file
    assert [e.operator for e in local_executors() if e.peer_id == executor.peer_id] == [url]
    hi = [ChatMessage("user", "hi")]
    assert (await client.chat(hi, model="chat-m")).text == "from desk"
    fakes["desk"].failures = [Failure(503, openai_error("overloaded", "server_error"))]
    assert (await client.chat(hi, model="chat-m")).text == "from hosted"  # desk benched (breaker-failures 1)

    status = (await get(url, "/status")).json()
    assert status["peer_id"] == executor.peer_id and status["listen"] == executor.info.addrs
    assert status["peers_connected"] >= 1 and status["uptime"] > 0 and status["served"] == 2
    (model,) = status["models"]
    assert (model["name"], model["aliases"], model["categories"], model["price_out"]) == ("chat-m", ["cm"], ["fast"], 2.0)
    assert model["offered"] and model["served"] == 2 and model["output_tokens"] > 0 and model["ttft"] is not None
    assert model["strategy"] == "priority"
    assert (model["running"], model["queued"]) == (0, 0)  # nothing in flight now
    members = {m["name"]: m for m in model["backends"]}
    assert members["desk"]["breaker"] == "open" and members["desk"]["last_error"] == "OVER_CAPACITY"  # a 503 "overloaded"
    assert (members["desk"]["served"], members["hosted"]["served"]) == (1, 1)
    backends = {b["name"]: b for b in status["backends"]}
    assert backends["hosted"]["kind"] == "openai" and not backends["hosted"]["on_premise"]
    assert backends["hosted"]["spend"]["spent"] > 0 and backends["desk"]["spend"] is None
    day, month = status["earnings"]
    assert (day["period"], month["period"]) == ("day", "month") and day["receipts"] == 2
    assert day["earned"] > 0 and day["paid"] == backends["hosted"]["spend"]["spent"] / 1e6
    assert day["margin"] == pytest.approx(day["earned"] - day["paid"])
    lines = {(line["model"], line["backend"]): line for line in day["lines"]}
    assert set(lines) == {("chat-m", "desk"), ("chat-m", "hosted")}
    assert lines[("chat-m", "desk")]["paid"] == 0 and lines[("chat-m", "hosted")]["paid"] == day["paid"]

    metrics = (await get(url, "/metrics"))
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    requests = {(s.labels["model"], s.labels["outcome"]): s.value for s in families["loomnet_requests"].samples
                if s.name == "loomnet_requests_total"}  # fmt: skip
    assert requests == {("chat-m", "ok"): 2.0}
    assert {s.labels["backend"]: s.value for s in families["loomnet_backend_up"].samples} == {"desk": 1.0, "hosted": 1.0}
    breakers = {s.labels["backend"]: s.value for s in families["loomnet_backend_breaker_open"].samples}
    assert breakers == {"desk": 1.0, "hosted": 0.0}
    assert families["loomnet_ttft_seconds"].samples and families["loomnet_model_offered"].samples[0].value == 1.0
    for name in ("loomnet_queue_depth", "loomnet_peers_connected", "loomnet_adverts_published",
                 "loomnet_adverts_received", "loomnet_adverts_rejected", "loomnet_ledger_writes"):  # fmt: skip
        assert name in families, name
    # no unbounded label: never a peer id
    assert executor.peer_id not in metrics.text and client.peer_id not in metrics.text

    assert (await get(url, "/healthz")).status_code == 200
    assert (await get(url, "/readyz")).json() == {"status": "ready"}
    missing = await get(url, "/nope")
    assert missing.status_code == 404 and "/status" in missing.json()["error"]
    # the canary key appears in nothing the endpoint answers
    for page in ("/status", "/metrics", "/readyz", "/nope"):
        assert CANARY not in (await get(url, page)).text


async def test_a_refused_request_is_counted_by_its_code_and_an_unknown_model_is_other(nursery, tmp_path, monkeypatch):
    executor, client, _ = await start(nursery, tmp_path, monkeypatch, peer_requests_per_minute=1)
    hi = [ChatMessage("user", "hi")]
    await client.chat(hi, model="chat-m")
    with pytest.raises(LoomError) as refused:
        await client.chat(hi, model="chat-m")  # the executor's rate limit: one a minute
    assert refused.value.code == ErrorCode.RATE_LIMITED
    metrics = (await get(executor.info.operator_url, "/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    codes = {s.labels["code"]: s.value for s in families["loomnet_requests_refused"].samples
             if s.name == "loomnet_requests_refused_total"}  # fmt: skip
    assert codes == {"RATE_LIMITED": 1.0}
    assert executor.metrics.model_label("no-such-model") == "other"  # a peer's word is never a label
    assert executor.metrics.model_label("CHAT-M") == "chat-m"


async def test_not_ready_when_no_model_can_be_served(nursery, tmp_path, monkeypatch):
    executor, client, fakes = await start(nursery, tmp_path, monkeypatch)
    for member in executor.catalog.lookup("chat-m").pool.members:
        member.breaker.failure()  # breaker-failures 1: both benched for the cool-down
    answer = await get(executor.info.operator_url, "/readyz")
    assert answer.status_code == 503 and "no model is offered" in answer.json()["reason"]
    status = (await get(executor.info.operator_url, "/status")).json()
    assert status["models"][0]["offered"] is False


@pytest.mark.parametrize("holder_state", ["listening", "bound, not yet listening"])
async def test_the_default_port_falls_back_to_a_free_one_when_taken(nursery, tmp_path, monkeypatch, holder_state):
    """"bound, not yet listening": another executor starting at the same moment (both
    bind with SO_REUSEADDR, the second to listen() gets EADDRINUSE); it crashed the
    executor at start with ``OSError: [Errno 98]`` (seen when the benches started two)."""
    import socket

    from loomnet.node._operator import DEFAULT_OPERATOR_PORT

    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", DEFAULT_OPERATOR_PORT))
        if holder_state == "listening":
            holder.listen()
        else:  # the other process listens between our bind and our listen
            from hypercorn.config import Config

            create_sockets = Config.create_sockets

            def bound_then_beaten(self):
                sockets = create_sockets(self)
                with contextlib.suppress(OSError):
                    holder.listen()
                return sockets

            monkeypatch.setattr(Config, "create_sockets", bound_then_beaten)
    except OSError:
        pass  # another process holds it already: the same case
    try:
        config = ExecutorConfig(data_dir=str(tmp_path / "e"), listen=["/ip4/127.0.0.1/tcp/0"], announce_local=False,
                                health_interval=600.0)  # fmt: skip
        from tests.node.test_pool import Runtime

        executor = Executor(config, backends=[Runtime("ollama")])
        await nursery.start(executor.run)
        url = executor.info.operator_url
        assert url is not None and not url.endswith(f":{DEFAULT_OPERATOR_PORT}")
        assert (await get(url, "/healthz")).status_code == 200
        await trio.sleep(0)
    finally:
        holder.close()


async def test_loomnet_status_prints_what_the_endpoint_says(nursery, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from loomnet.node.cli import main

    executor, client, _ = await start(nursery, tmp_path, monkeypatch)
    await client.chat([ChatMessage("user", "hi")], model="chat-m")

    def run(*args):
        return CliRunner().invoke(main, ["status", *args])

    shown = await trio.to_thread.run_sync(run)  # finds it through the state file
    assert shown.exit_code == 0, shown.output
    assert executor.peer_id in shown.output and "chat-m" in shown.output and "offered" in shown.output
    assert "desk" in shown.output and "hosted" in shown.output and CANARY not in shown.output
    assert "chat-m via desk" in shown.output  # the margin per model and backend
    as_json = await trio.to_thread.run_sync(run, "--json", "--url", executor.info.operator_url)
    assert as_json.exit_code == 0 and '"peer_id"' in as_json.output
    nothing = await trio.to_thread.run_sync(run, "--url", "http://127.0.0.1:1")
    assert nothing.exit_code == 1 and "no status" in nothing.output
    # an endpoint that is not an operator's: the HTTP status, not httpx's pointer to a web page
    wrong = await trio.to_thread.run_sync(run, "--url", executor.info.operator_url.rstrip("/") + "/nowhere")
    assert wrong.exit_code == 1 and "no status (HTTP 404" in wrong.output and "http" not in wrong.output.split("(", 1)[1]


async def test_cache_hits_are_counted_and_the_cache_is_shown(nursery, tmp_path, monkeypatch):
    from loomnet.node._response_cache import CacheTerms

    executor, client, fakes = await start(nursery, tmp_path, monkeypatch, cache=CacheTerms(billing="free"))
    hi = [ChatMessage("user", "hi")]
    results = [await client.chat(hi, model="chat-m", temperature=0.0, seed=5) for _ in range(3)]
    assert [r.receipt.cached for r in results] == [False, True, True]
    assert fakes["desk"].count("/v1/chat/completions") == 1
    status = (await get(executor.info.operator_url, "/status")).json()
    (model,) = status["models"]
    assert model["served"] == 3 and model["cache"]["hits"] == 2 and model["cache"]["misses"] == 1
    families = {f.name: f for f in text_string_to_metric_families((await get(executor.info.operator_url,
                                                                              "/metrics")).text)}  # fmt: skip
    requests = {s.labels["outcome"]: s.value for s in families["loomnet_requests"].samples
                if s.name == "loomnet_requests_total"}  # fmt: skip
    assert requests == {"ok": 3.0}
    assert [s.value for s in families["loomnet_cache_hits"].samples if s.name == "loomnet_cache_hits_total"] == [2.0]
    warning = {s.labels["backend"]: s.value for s in families["loomnet_backend_spend_warning"].samples}
    assert warning == {"hosted": 0.0}


ADMIN = "admin-token-0123456789abcdef"


async def test_the_admin_raises_a_spend_budget_at_runtime_and_nobody_else_can(nursery, tmp_path, monkeypatch):
    executor, client, fakes = await start(nursery, tmp_path, monkeypatch)
    url = executor.info.operator_url
    spend = executor.catalog.spends["hosted"]
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        refused = await http.post("/admin/backends/hosted/spend-budget", json={"amount": 5})
        assert refused.status_code == 401 and "no admin token" in refused.json()["error"]
    config = msgspec.structs.replace(executor.config, operator=OperatorConfig(port=0, admin_token=ADMIN))
    executor.config = config
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        wrong = await http.post("/admin/backends/hosted/spend-budget", json={"amount": 5},
                                headers={"authorization": "Bearer not-the-token-at-all"})  # fmt: skip
        assert wrong.status_code == 401 and "not-the-token" not in wrong.text
        auth = {"authorization": f"Bearer {ADMIN}"}
        spent = await http.post("/admin/backends/hosted/spend-budget", json={"amount": 0}, headers=auth)
        assert spent.status_code == 200 and spent.json()["exhausted"] is True
        assert (await client.chat([ChatMessage("user", "hi")], model="chat-m")).text == "from desk"
        fakes["desk"].failures = [Failure(503, openai_error("overloaded", "server_error"))]
        with pytest.raises(LoomError):  # desk fails, hosted is out of rotation: no failover left
            await client.chat([ChatMessage("user", "hi")], model="chat-m")
        raised = await http.post("/admin/backends/hosted/spend-budget", json={"amount": 10**9}, headers=auth)
        assert raised.status_code == 200 and raised.json()["exhausted"] is False and spend.budget is not None
        assert (await http.post("/admin/backends/nope/spend-budget", json={"amount": 1}, headers=auth)).status_code == 404
        assert (await http.post("/admin/backends/hosted/spend-budget", json={"amount": -1},
                                headers=auth)).status_code == 400  # fmt: skip
        assert (await http.post("/admin/backends/desk/spend-budget", json={"amount": 1},
                                headers=auth)).status_code == 400  # desk has no budget  # fmt: skip
    assert ADMIN not in repr(config)
