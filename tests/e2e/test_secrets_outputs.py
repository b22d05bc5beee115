"""Every output of a running network, grepped for three canary secrets.

One executor loaded from TOML: a hosted backend whose key comes from ``${CANARY_KEY}``
(its faithful fake answers 401 with an error body that quotes the key, as real
providers sometimes do), an admin token from ``${ADMIN_TOKEN}``, the operator's
endpoint on, the local state file written. A real client over py-libp2p, and the
OpenAI/Anthropic-compatible gateway on top of it with a user key. Requests succeed
and fail through every door: the library, the gateway (whole and streamed, both
APIs, a wrong key), the admin API (with, without and with a wrong token, a literal
key refused). The fake sees the key (it is sent where it belongs); then no form of
any canary (raw, escaped, percent-encoded, base64, ``user:key``) is in:

* an error the client got, a gateway response (bodies and headers), an admin response;
* ``/``, ``/status``, ``/metrics``, ``/healthz``, ``/readyz``, ``loomnet status --json``;
* the executor's advert;
* any log line (captured at DEBUG, tracebacks included);
* the ``repr`` of every config object and backend;
* any file either side wrote: ledgers (and their WAL), the audit log, the admin
  overlay, the identity files, the local state file. Only the operator's TOML
  names the variable (never the value).

The wire-level proof for each adapter and error path is ``test_secrets.py``; the
pieces (redactor, config loader) are in ``tests/node/test_secrets.py``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
import trio.testing
from click.testing import CliRunner

from loomnet.client import ClientConfig, LoomClient
from loomnet.client.gateway import GatewayConfig, GatewayKey, serve_gateway
from loomnet.node import Executor
from loomnet.node.cli import main
from loomnet.node.config import load_config
from loomnet.protocol import ChatMessage, RemoteError

from ..node.asgi_server import serve_app
from ..node.fake_openai import Failure, FakeOpenAI, openai_error
from ..node.test_secrets import forms

pytestmark = pytest.mark.integration

CANARY = "sk-CANARY-outputs-4b3a29f8e7d6c5b4"
ADMIN_TOKEN = "adm-CANARY-outputs-a1b2c3d4e5f60718"
GATEWAY_KEY = "lg-CANARY-outputs-99aa88bb77cc66dd"
SECRETS = (CANARY, ADMIN_TOKEN, GATEWAY_KEY)
#: what the fake provider's 401 says: the key, raw, in a URL, as a header, escaped
QUOTED = (f"Incorrect API key provided: {CANARY}. You can find your API key at https://platform.example/keys; "
          f"sent Authorization: Bearer {CANARY} to https://user:{CANARY}@api.example/v1?api-key={CANARY} {CANARY!r}")
HELLO = [ChatMessage("user", "Say hello.")]

CONFIG = """
data-dir = "{data}"
listen = ["/ip4/127.0.0.1/tcp/0"]
announce-local = true
health-interval = 600.0
breaker-failures = 1000   # it fails on purpose; never benched here

[operator]
port = 0
admin-token = "${{ADMIN_TOKEN}}"
admin-variables = ["CANARY_KEY"]

[[backends]]
name = "hosted"
provider = "openai"
endpoint = "{url}/v1"
api-key = "${{CANARY_KEY}}"
models = ["gpt-test"]
max-retries = 0
timeout = 5.0
"""


def leaked(text: str) -> list[str]:
    return [form for secret in SECRETS for form in forms(secret) if form in text]


def fail_once(fake: FakeOpenAI) -> None:
    fake.failures.append(Failure(401, openai_error(QUOTED, type="invalid_request_error", code="invalid_api_key")))


def shown(response: httpx.Response) -> str:
    return f"{response.status_code} {response.text} {response.headers!r}"


async def start_network(nursery, tmp_path, monkeypatch):
    """The executor (from TOML, secrets from the environment), a client, the gateway."""
    env = {"CANARY_KEY": CANARY, "ADMIN_TOKEN": ADMIN_TOKEN}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOOMNET_STATE_DIR", str(tmp_path / "state"))
    fake = FakeOpenAI(flavour="openai")
    url = await serve_app(nursery, fake)
    toml = tmp_path / "executor.toml"
    toml.write_text(CONFIG.format(data=tmp_path / "executor", url=url))
    config = load_config(toml, environ=env)
    executor = Executor(config)
    await nursery.start(executor.run)
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]],
                                     discover_local=False, offer_timeout=10.0, first_byte_timeout=20.0))  # fmt: skip
    await nursery.start(client.run)
    with trio.fail_after(20):
        while not client.offers():
            await client.member.table_changed.wait()
    gateway_config = GatewayConfig(port=0, keys=[GatewayKey(name="app", key=GATEWAY_KEY)])
    gateway = await nursery.start(serve_gateway, client, gateway_config)
    return executor, client, gateway, fake, url, toml


async def test_no_canary_in_any_output(nursery, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="libp2p")
    executor, client, gateway, fake, url, toml = await start_network(nursery, tmp_path, monkeypatch)
    config, gateway_config = executor.config, gateway.gateway.config
    seen: list[str] = []
    operator = executor.info.operator_url

    with trio.fail_after(120):
        # the library: one answer, one provider 401
        assert (await client.chat(HELLO, model="gpt-test", max_tokens=16)).text == "Hello, world!"
        fail_once(fake)
        with pytest.raises(RemoteError) as info:
            await client.chat(HELLO, model="gpt-test", max_tokens=16)
        seen += [f"{info.value.code} {info.value.message} {info.value!r} {info.value}"]

        # the gateway: both APIs, whole and streamed, answered and failed, and a wrong key
        user = {"authorization": f"Bearer {GATEWAY_KEY}"}
        openai_body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
        anthropic_body = {**openai_body, "max_tokens": 16}
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            for path, body in (("/v1/chat/completions", openai_body), ("/v1/messages", anthropic_body)):
                for stream in (False, True):
                    ok = await http.post(path, json={**body, "stream": stream}, headers=user)
                    assert ok.status_code == 200 and "Hello" in ok.text, shown(ok)
                    fail_once(fake)
                    failed = await http.post(path, json={**body, "stream": stream}, headers=user)
                    assert failed.status_code == 502 and "error" in failed.text, shown(failed)
                    seen += [shown(ok), shown(failed)]
            wrong = await http.post("/v1/chat/completions", json=openai_body,
                                    headers={"authorization": f"Bearer {GATEWAY_KEY[:-4]}0000"})
            assert wrong.status_code == 401
            seen += [shown(wrong), shown(await http.get("/v1/models", headers=user))]

        # the operator's endpoint and the admin API
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(base_url=operator, timeout=30) as http:
            for page in ("/", "/status", "/metrics", "/healthz", "/readyz"):
                answer = await http.get(page)
                assert answer.status_code in (200, 503), page
                seen.append(shown(answer))
            assert (await http.get("/admin/backends")).status_code == 401
            refused = await http.get("/admin/backends", headers={"authorization": f"Bearer {ADMIN_TOKEN[:-4]}0000"})
            assert refused.status_code == 401
            literal = await http.post("/admin/backends", headers=admin, json={
                "name": "copy", "provider": "openai", "endpoint": f"{url}/v1", "models": ["gpt-test"],
                "api-key": CANARY})  # fmt: skip
            assert literal.status_code == 400
            listed = await http.get("/admin/backends", headers=admin)
            assert listed.status_code == 200 and "hosted" in listed.text
            changed = [await http.post(f"/admin/backends/hosted/{verb}", headers=admin) for verb in ("disable", "enable")]
            assert [c.status_code for c in changed] == [200, 200]
            seen += [shown(refused), shown(literal), shown(listed), *map(shown, changed)]
        cli = await trio.to_thread.run_sync(lambda: CliRunner().invoke(main, ["status", "--json", "--url", operator]))
        assert cli.exit_code == 0, cli.output
        seen.append(cli.output)

    # the key went where it belongs, and only there
    assert all(r.headers.get("authorization") == f"Bearer {CANARY}" for r in fake.requests)
    assert any("/chat/completions" in r.path for r in fake.requests)

    advert = client.member.table.advert_of(executor.peer_id, now=time.time())
    seen.append(msgspec.json.encode(advert).decode())
    seen += [repr(config), str(config), repr(executor.config), repr(config.backends), repr(config.operator),
             repr(executor.catalog.backends), repr(gateway_config), repr(gateway.gateway.config), repr(client.config)]
    seen += [logging.Formatter().format(record) for record in caplog.records]
    # the operator's log says what failed and why, the provider's words kept, the key masked
    assert "answered HTTP 401: Incorrect API key provided: ***" in caplog.text
    assert leaked(QUOTED)  # (the check itself finds what the provider quoted)

    for text in seen:
        assert leaked(text) == [], text[:2000]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != toml]
    assert any(p.name == "audit.log" for p in files) and any(p.name.startswith("ledger.sqlite") for p in files)
    assert any(Path(tmp_path / "state") in p.parents for p in files)  # the local state file
    for path in files:
        assert leaked(path.read_bytes().decode("latin-1")) == [], path
    assert "${CANARY_KEY}" in toml.read_text() and CANARY not in toml.read_text()


async def test_a_caller_naming_a_url_reaches_only_the_configured_backend(nursery, tmp_path, monkeypatch):
    """Through the gateway (the HTTP door strangers use): a URL as the model, in the
    OpenAI SDK's ``base_url``/``api_base``/``extra_body`` shapes, in headers. Only the
    configured runtime is dialled; a listener at the named address sees nothing."""
    _, _, gateway, fake, _, _ = await start_network(nursery, tmp_path, monkeypatch)
    knocks: list[object] = []
    trap = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]

    async def knocked(stream) -> None:
        knocks.append(stream.socket.getpeername())
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, knocked, [trap])
    there = f"http://127.0.0.1:{trap.socket.getsockname()[1]}"
    user = {"authorization": f"Bearer {GATEWAY_KEY}"}
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": f"see {there}"}], "max_tokens": 16}
    extras = {"base_url": there + "/v1", "api_base": there, "endpoint": there, "url": there, "provider": "ollama",
              "extra_body": {"base_url": there, "endpoint": there}, "user": there}  # fmt: skip
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            for model in (there + "/v1", f"openai:{there}", there.removeprefix("http://")):
                answer = await http.post("/v1/chat/completions", json={**body, "model": model}, headers=user)
                assert answer.status_code == 404 and "model_not_found" in answer.text, answer.text  # no such model
            before = len(fake.requests)
            for path in ("/v1/chat/completions", "/v1/messages"):
                answer = await http.post(path, json={**body, **extras}, headers={
                    **user, "x-forwarded-host": there, "forwarded": f"host={there}", "x-base-url": there})
                assert answer.status_code == 200 and "Hello, world!" in answer.text, answer.text
    assert len(fake.requests) == before + 2 and all("/chat/completions" in r.path for r in fake.requests[before:])
    assert there in json.dumps(fake.requests[-1].body)  # the runtime got the URL as text in the prompt
    await trio.testing.wait_all_tasks_blocked()
    assert knocks == []
