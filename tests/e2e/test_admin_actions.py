"""The operator's admin actions at runtime, end to end: a real executor loaded from a
TOML (two fake OpenAI-compatible runtimes on loopback), a real client over py-libp2p.
Refused without the token; a backend added (its key a ${VAR}), a model switched to it and
repriced, a backend disabled: each seen by the client in the next advert and the next
answer; persisted as an overlay that a restart applies; audit-logged; no secret on disk."""

from __future__ import annotations

import json

import httpx
import msgspec
import pytest
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.node import Executor
from loomnet.node._admin import load_overlay, overlay_path_for
from loomnet.node.config import load_config
from loomnet.node._config_terms import BACKEND_NAME_RULE
from loomnet.protocol import ChatMessage, ErrorCode

from ..node.asgi_server import serve_app
from ..node.fake_openai import FakeOpenAI

pytestmark = pytest.mark.integration

TOKEN = "admin-token-0123456789abcdef"
CANARY = "sk-canary-ADMIN-0123456789abcdef"
HI = [ChatMessage("user", "hi")]


async def run_executor(nursery, tmp_path, desk_url: str, env: dict[str, str]) -> Executor:
    path = tmp_path / "executor.toml"
    path.write_text(f'''data-dir = "{tmp_path / 'data'}"
listen = ["/ip4/127.0.0.1/tcp/0"]
announce-local = false
health-interval = 600.0

[operator]
port = 0
admin-token = "${{ADMIN_TOKEN}}"
admin-variables = ["HOSTED_KEY"]

[[backends]]
name = "desk"
provider = "vllm"
endpoint = "{desk_url}/v1"
models = ["m1"]

[[models]]
name = "chat-m"
price-out = 1.0
backends = [{{ backend = "desk", model = "m1" }}]
''')
    overlay = overlay_path_for(path, tmp_path / "data" / "executor")
    config = load_config(path, environ=env, overlay=load_overlay(overlay))
    executor = Executor(config, overlay_path=overlay)
    await nursery.start(executor.run)
    return executor


async def offer_of(client: LoomClient, name: str, *, price_out: int | None = None, gone: bool = False):
    """Wait for the client's table to show ``name`` (at ``price_out``), or no ``name``."""
    with trio.fail_after(30):
        while True:
            changed = client.member.table_changed
            offers = [o for o in client.offers() if o.model.name == name]
            if gone and not offers:
                return None
            if not gone and offers and (price_out is None or offers[0].model.price_out == price_out):
                return offers[0]
            await changed.wait()


async def test_admin_actions_change_what_clients_see_and_survive_a_restart(nursery, tmp_path, monkeypatch):
    env = {"ADMIN_TOKEN": TOKEN, "HOSTED_KEY": CANARY}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    desk, hosted = FakeOpenAI(flavour="vllm", pieces=["from desk"]), FakeOpenAI(flavour="vllm", pieces=["from hosted"])
    desk_url, hosted_url = await serve_app(nursery, desk), await serve_app(nursery, hosted)
    async with trio.open_nursery() as first:
        executor = await run_executor(first, tmp_path, desk_url, env)
        client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]],
                                         discover_local=False, offer_timeout=10.0))  # fmt: skip
        await first.start(client.run)
        assert (await client.chat(HI, model="chat-m")).text == "from desk"
        auth = {"authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=executor.info.operator_url, timeout=30) as http:
            assert (await http.get("/admin/backends")).status_code == 401
            assert (await http.post("/admin/drain", headers={"authorization": "Bearer wrong-token-000000"})).status_code == 401
            table = {"name": "hosted", "provider": "vllm", "endpoint": f"{hosted_url}/v1", "models": ["m1"],
                     "api-key": "${HOSTED_KEY}"}  # fmt: skip
            literal = await http.post("/admin/backends", json={**table, "api-key": CANARY}, headers=auth)
            assert literal.status_code == 400 and "${VAR}" in literal.json()["error"] and CANARY not in literal.text
            added = await http.post("/admin/backends", json=table, headers=auth)
            assert added.status_code == 200 and added.json()["down"] is None, added.text
            # switch chat-m to the new backend and reprice it: the next advert shows the price
            switched = await http.patch("/admin/models/chat-m", json={"backends": [{"backend": "hosted", "model": "m1"}], "price-out": 3.0},
                                        headers=auth)  # fmt: skip
            assert switched.status_code == 200, switched.text
            await offer_of(client, "chat-m", price_out=3_000_000)
            assert (await client.chat(HI, model="chat-m")).text == "from hosted"
            listed = (await http.get("/admin/backends", headers=auth)).json()["backends"]
            assert {b["name"]: b["models"] for b in listed} == {"desk": ["m1"], "hosted": ["chat-m"]}
            # disable hosted: chat-m has no backend left and leaves the advert
            assert (await http.post("/admin/backends/hosted/disable", headers=auth)).status_code == 200
            await offer_of(client, "chat-m", gone=True)
            assert (await http.post("/admin/backends/nope/disable", headers=auth)).status_code == 404
            status = await http.get("/status")
            assert CANARY not in status.text
        first.cancel_scope.cancel()
    overlay_file = tmp_path / "executor.admin.json"
    audit = (tmp_path / "data" / "executor" / "audit.log").read_text()
    assert CANARY not in overlay_file.read_text() and CANARY not in audit
    assert [json.loads(line)["action"] for line in audit.splitlines()] == ["add backend", "set model",
                                                                          "disable backend"]  # fmt: skip
    # a restart applies the overlay: hosted is there, disabled; chat-m is hosted's at 3.0
    async with trio.open_nursery() as second:
        executor = await run_executor(second, tmp_path, desk_url, env)
        assert executor.catalog.names == ["desk", "hosted"]
        assert not executor.catalog.loads["hosted"].enabled
        assert [o.name for o in executor.catalog.offers] == ["m1"]  # chat-m: its only backend is off
        async with httpx.AsyncClient(base_url=executor.info.operator_url, timeout=30) as http:
            auth = {"authorization": f"Bearer {TOKEN}"}
            assert (await http.post("/admin/backends/hosted/enable", headers=auth)).status_code == 200
            assert [e.offer.price_out for e in executor.catalog.entries if e.offer.name == "chat-m"] == [3_000_000]
            assert (await http.delete("/admin/backends/hosted", headers=auth)).status_code == 200
            assert executor.catalog.names == ["desk"] and "chat-m" not in [o.name for o in executor.catalog.offers]
            drained = await http.post("/admin/drain", headers=auth)
            assert drained.status_code == 200
            with trio.fail_after(10):
                while executor.ready() != "draining: shutting down":
                    await trio.sleep(0.01)
        second.cancel_scope.cancel()
    overlay = load_overlay(overlay_file)
    assert overlay.removed == ["hosted"] and overlay.backends == [] and overlay.disabled == []


async def test_loomnet_admin_drives_the_same_api(nursery, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from loomnet.node.cli import main

    env = {"ADMIN_TOKEN": TOKEN, "HOSTED_KEY": CANARY}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    desk, hosted = FakeOpenAI(flavour="vllm"), FakeOpenAI(flavour="vllm")
    desk_url, hosted_url = await serve_app(nursery, desk), await serve_app(nursery, hosted)
    executor = await run_executor(nursery, tmp_path, desk_url, env)
    url = executor.info.operator_url
    table = tmp_path / "hosted.toml"
    table.write_text(f'name = "hosted"\nprovider = "vllm"\nendpoint = "{hosted_url}/v1"\nmodels = ["m1"]\n'
                     'api-key = "${HOSTED_KEY}"\n')  # fmt: skip

    def run(*args, token: str | None = TOKEN):
        environ = {"LOOMNET_ADMIN_TOKEN": token} if token else {"LOOMNET_ADMIN_TOKEN": ""}
        return CliRunner().invoke(main, ["admin", *args, "--url", url], env=environ)

    async def admin(*args, **kw):
        return await trio.to_thread.run_sync(lambda: run(*args, **kw))

    no_token = await admin("backends", "list", token=None)
    assert no_token.exit_code == 2 and "LOOMNET_ADMIN_TOKEN" in no_token.output
    wrong = await admin("backends", "list", token="wrong-token-00000000")
    assert wrong.exit_code == 1 and "error 401" in wrong.output
    added = await admin("backends", "add", str(table))
    assert added.exit_code == 0 and "added hosted" in added.output, added.output
    listed = await admin("backends", "list")
    assert "desk" in listed.output and "hosted" in listed.output and CANARY not in listed.output
    assert (await admin("backends", "disable", "hosted")).exit_code == 0
    assert "DISABLED" in (await admin("backends", "list")).output
    priced = await admin("model", "chat-m", "--price-out", "7", "--backend", "desk=m1")
    assert priced.exit_code == 0, priced.output
    assert [e.offer.price_out for e in executor.catalog.entries if e.offer.name == "chat-m"] == [7_000_000]
    budget = await admin("spend-budget", "desk", "5")
    assert budget.exit_code == 1 and "no spend budget" in budget.output
    assert (await admin("backends", "remove", "hosted")).exit_code == 0
    assert (await admin("drain")).exit_code == 0 and executor.draining
    # guessing the token: the 10th refusal (the wrong token above was the first) locks this address out,
    # the right token included
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        codes = [(await http.get("/admin/backends", headers={"authorization": f"Bearer guess-{i:016d}"})).status_code
                 for i in range(9)]  # fmt: skip
    assert codes == [401] * 8 + [429]
    locked = await admin("backends", "list")
    assert locked.exit_code == 1 and "error 429 [701 ADMIN_LOCKED_OUT]" in locked.output
    assert "(retry after 60 s)" in locked.output or "(retry after 59 s)" in locked.output


def test_the_overlay_goes_to_the_data_folder_when_the_tomls_folder_is_read_only(tmp_path, monkeypatch):
    import os

    toml = tmp_path / "etc" / "executor.toml"
    toml.parent.mkdir()
    toml.write_text("")
    home = tmp_path / "data" / "executor"
    assert overlay_path_for(toml, home) == tmp_path / "etc" / "executor.admin.json"
    assert overlay_path_for(None, home) == home / "admin.json"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # /etc read-only (ProtectSystem=strict)
    assert overlay_path_for(toml, home) == home / "admin.json"
    (tmp_path / "etc" / "executor.admin.json").write_text("{}")  # one already there is used
    assert overlay_path_for(toml, home) == tmp_path / "etc" / "executor.admin.json"


async def test_hostile_or_careless_admin_requests_change_nothing(nursery, tmp_path, monkeypatch):
    env = {"ADMIN_TOKEN": TOKEN, "HOSTED_KEY": CANARY, "OTHER_SECRET": "sk-other-0123456789"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    desk, hosted = FakeOpenAI(flavour="vllm"), FakeOpenAI(flavour="vllm")
    desk_url, hosted_url = await serve_app(nursery, desk), await serve_app(nursery, hosted)
    auth = {"authorization": f"Bearer {TOKEN}"}
    table = {"name": "hosted", "provider": "vllm", "endpoint": f"{hosted_url}/v1", "models": ["m1"]}
    async with trio.open_nursery() as first:
        executor = await run_executor(first, tmp_path, desk_url, env)
        async with httpx.AsyncClient(base_url=executor.info.operator_url, timeout=30) as http:
            async def post(path, body, status):
                answer = await http.post(path, json=body, headers=auth)
                assert answer.status_code == status, (path, body, answer.text)
                return answer

            # refused, each with its reason, and nothing changes
            await post("/admin/backends", {**table, "api-key": "${OTHER_SECRET}"}, 400)  # not an allowed variable
            await post("/admin/backends", {**table, "endpoint": f"http://u:pw@{hosted_url[7:]}/v1"}, 400)
            # a literal secret in the endpoint's query string: refused, never stored or echoed
            for query in (f"?api-key={CANARY}", f"?x=1&token={CANARY}", f"?KEY={CANARY}", f"?api%2Dkey={CANARY}"):
                leaked = await post("/admin/backends", {**table, "endpoint": f"{hosted_url}/v1{query}"}, 400)
                assert CANARY not in leaked.text and "${VAR}" in leaked.json()["error"]
            # not a web endpoint: refused
            for endpoint in ("file:///etc/passwd", "ftp://127.0.0.1/v1", "http:///v1", "gopher://x"):
                await post("/admin/backends", {**table, "endpoint": endpoint}, 400)
            slash = await post("/admin/backends", {**table, "name": "a/b"}, 400)
            assert BACKEND_NAME_RULE in slash.json()["error"]  # the config's one rule
            await post("/admin/backends", {**table, "name": "x" * 100}, 400)
            await post("/admin/backends", {**table, "name": "desk", "provider": "nope"}, 400)  # a failed replace
            assert executor.catalog.names == ["desk"]  # desk is still there
            nested = await http.post("/admin/backends", content=b"{\"a\": " + b"[" * 30_000 + b"]" * 30_000 + b"}",
                                     headers=auth)  # fmt: skip
            assert nested.status_code == 400
            huge = await http.post("/admin/backends", content=b"x" * 200_000, headers=auth)
            assert huge.status_code == 413
            assert (await http.post("/admin/backends/desk/explode", headers=auth)).status_code == 404
            bad_model = await http.patch("/admin/models/evil%1B%5B31m", json={"price-out": 1.0}, headers=auth)
            assert bad_model.status_code == 400
            empty = await http.patch("/admin/models/chat-m", json={"backends": []}, headers=auth)
            assert empty.status_code == 400
            # a model chain naming a backend, then that backend removed: the restart still works
            await post("/admin/backends", {**table, "api-key": "${HOSTED_KEY}"}, 200)
            # an alias that is already a name: another model's (m1: hosted lists it), an alias, a category,
            # a route keyword; 409 NAME_TAKEN, and nothing changes
            assert (await http.patch("/admin/models/m1", json={"aliases": ["o"]}, headers=auth)).status_code == 200
            for aliases in (["M1"], ["o"], ["fast"], ["cheapest"], ["fastest"], ["category:x"]):
                taken = await http.patch("/admin/models/chat-m", json={"aliases": aliases}, headers=auth)
                assert taken.status_code == 409 and taken.json()["code"] == ErrorCode.NAME_TAKEN, (aliases, taken.text)
            assert (await http.patch("/admin/models/chat-m", json={"categories": ["o"]}, headers=auth)).status_code == 409
            assert "aliases" not in msgspec.to_builtins(executor.admin.overlay.models["chat-m"] if "chat-m" in
                                                        executor.admin.overlay.models else {})  # fmt: skip
            assert [m.aliases for m in executor.config.models if m.name == "chat-m"] == [[]]
            chain = [{"backend": "desk", "model": "m1"}, {"backend": "hosted", "model": "m1"}]
            assert (await http.patch("/admin/models/chat-m", json={"backends": chain}, headers=auth)).status_code == 200
            assert (await http.post("/admin/backends/hosted/disable", headers=auth)).status_code == 200
            await post("/admin/backends", table, 200)  # replaced: a new backend starts enabled, on disk too
            assert executor.admin.overlay.disabled == []
            assert (await http.delete("/admin/backends/hosted", headers=auth)).status_code == 200
            await http.post("/admin/drain", headers=auth)
            with trio.fail_after(10):
                while not executor.draining:
                    await trio.sleep(0.01)
            status = (await http.get("/status")).json()
            assert not any(m["offered"] for m in status["models"])  # the advert offers nothing while draining
        first.cancel_scope.cancel()
    audit_file, overlay_file = tmp_path / "data" / "executor" / "audit.log", tmp_path / "executor.admin.json"
    lines = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert all(line["from"] == "127.0.0.1" for line in lines)
    for written in (audit_file, overlay_file):  # the operator's alone, and never a secret
        assert written.stat().st_mode & 0o777 == 0o600 and CANARY not in written.read_text()
    async with trio.open_nursery() as second:  # the overlay's chain lost hosted: the restart applies it
        executor = await run_executor(second, tmp_path, desk_url, env)
        (entry,) = [e for e in executor.catalog.entries if e.offer.name == "chat-m"]
        assert [m.name for m in entry.pool.members] == ["desk"]
        second.cancel_scope.cancel()
