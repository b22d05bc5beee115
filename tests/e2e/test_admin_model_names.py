"""The admin changes the model the operator names as clients see it, whatever the TOML's
spelling (``name = "vllm:gpt-4o-mini"`` is advertised, listed and shown as
``gpt-4o-mini``): a price set by that name changes exactly that entry, now and after a
restart; a switch of backend keeps its prices, aliases and categories; a change naming no
model is refused (404, ``ADMIN_NO_SUCH_MODEL``) and leaves nothing on disk; stored terms
matching no model at start are logged, not silently dropped."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
import trio

from loomnet.node import Executor
from loomnet.node._admin import load_overlay, overlay_path_for
from loomnet.node.config import load_config
from loomnet.protocol import ErrorCode

from ..node.asgi_server import serve_app
from ..node.fake_openai import FakeOpenAI

pytestmark = pytest.mark.integration

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}


async def run_executor(nursery, tmp_path, desk_url: str, spare_url: str) -> Executor:
    path = tmp_path / "executor.toml"
    path.write_text(f'''data-dir = "{tmp_path / 'data'}"
listen = ["/ip4/127.0.0.1/tcp/0"]
announce-local = false
health-interval = 600.0

[operator]
port = 0
admin-token = "{TOKEN}"

[[backends]]
name = "desk"
provider = "vllm"
endpoint = "{desk_url}/v1"
models = ["gpt-4o-mini"]

[[backends]]
name = "spare"
provider = "vllm"
endpoint = "{spare_url}/v1"
models = ["gpt-4o-mini"]

[[models]]
name = "vllm:gpt-4o-mini"
aliases = ["mini"]
categories = ["cheap"]
price-in = 0.5
price-out = 2.0
''')
    overlay = overlay_path_for(path, tmp_path / "data" / "executor")
    config = load_config(path, environ={}, overlay=load_overlay(overlay))
    executor = Executor(config, overlay_path=overlay)
    await nursery.start(executor.run)
    return executor


def entry_of(executor: Executor, name: str):
    (entry,) = [e for e in executor.catalog.entries if e.offer.name == name]
    return entry


async def test_a_provider_prefixed_model_is_changed_by_its_advertised_name(nursery, tmp_path, caplog):
    desk, spare = FakeOpenAI(flavour="vllm"), FakeOpenAI(flavour="vllm")
    desk_url, spare_url = await serve_app(nursery, desk), await serve_app(nursery, spare)
    async with trio.open_nursery() as first:
        executor = await run_executor(first, tmp_path, desk_url, spare_url)
        before = entry_of(executor, "gpt-4o-mini")
        assert (before.offer.price_in, before.offer.price_out) == (500_000, 2_000_000)
        async with httpx.AsyncClient(base_url=executor.info.operator_url, timeout=30) as http:
            priced = await http.patch("/admin/models/gpt-4o-mini", json={"price-in": 0.6}, headers=AUTH)
            assert priced.status_code == 200 and priced.json()["model"] == "gpt-4o-mini", priced.text
            entry = entry_of(executor, "gpt-4o-mini")
            assert (entry.offer.price_in, entry.offer.price_out) == (600_000, 2_000_000)
            assert [m.name for m in executor.config.models] == ["vllm:gpt-4o-mini"]  # the same entry, no new one
            # by an alias too; then a switch: the model keeps its name, prices, aliases and categories
            switched = await http.patch("/admin/models/MINI", json={"backends": ["spare"]}, headers=AUTH)
            assert switched.status_code == 200, switched.text
            entry = entry_of(executor, "gpt-4o-mini")
            assert [m.name for m in entry.pool.members] == ["spare"]
            assert (entry.offer.price_in, entry.offer.price_out) == (600_000, 2_000_000)
            assert (entry.offer.aliases, entry.offer.categories) == (["mini"], ["cheap"])
            assert [m.name for m in executor.config.models] == ["gpt-4o-mini"]  # a pool's entry: its advertised name
            # a model nobody serves or configures: refused, and nothing is kept or logged as applied
            on_disk = (tmp_path / "executor.admin.json").read_bytes()
            for path in ("/admin/models/gpt-4o", "/admin/models/vllm:nope"):
                unknown = await http.patch(path, json={"price-in": 0.1, "backends": ["desk"]}, headers=AUTH)
                assert unknown.status_code == 404 and unknown.json()["code"] == ErrorCode.ADMIN_NO_SUCH_MODEL
            assert (tmp_path / "executor.admin.json").read_bytes() == on_disk
            assert [m.name for m in executor.config.models] == ["gpt-4o-mini"]
        first.cancel_scope.cancel()
    audit = [json.loads(line) for line in (tmp_path / "data" / "executor" / "audit.log").read_text().splitlines()]
    assert [(a["action"], a["target"]) for a in audit] == [("set model", "gpt-4o-mini")] * 2
    # a stored change for a model the TOML no longer has: logged at start, never silently dropped
    overlay_file = tmp_path / "executor.admin.json"
    stored = json.loads(overlay_file.read_text())
    stored["models"]["retired-model"] = {"price-in": 9.0}
    overlay_file.write_text(json.dumps(stored))
    caplog.set_level(logging.WARNING, logger="loomnet.admin")
    async with trio.open_nursery() as second:  # the restart applies the change to the same entry
        executor = await run_executor(second, tmp_path, desk_url, spare_url)
        entry = entry_of(executor, "gpt-4o-mini")
        assert (entry.offer.price_in, entry.offer.price_out) == (600_000, 2_000_000)
        assert [m.name for m in entry.pool.members] == ["spare"] and entry.offer.aliases == ["mini"]
        second.cancel_scope.cancel()
    assert any("retired-model" in r.getMessage() and "matches no model" in r.getMessage() for r in caplog.records)


def _advert_bounds():
    import msgspec

    from loomnet.protocol import ModelOffer

    fields = {f.name: f.type for f in msgspec.inspect.type_info(ModelOffer).fields}
    return fields["aliases"], fields["categories"]


async def test_terms_an_advert_could_not_carry_are_refused_and_a_bad_advert_is_reported(nursery, tmp_path, caplog):
    import msgspec

    desk, spare = FakeOpenAI(flavour="vllm"), FakeOpenAI(flavour="vllm")
    executor = await run_executor(nursery, tmp_path, await serve_app(nursery, desk), await serve_app(nursery, spare))
    aliases, categories = _advert_bounds()
    async with httpx.AsyncClient(base_url=executor.info.operator_url, timeout=30) as http:
        for change in ({"aliases": [f"a{i}" for i in range(aliases.max_length + 1)]},
                       {"aliases": ["x" * (aliases.item_type.max_length + 1)]}, {"aliases": ["zero\u200bwidth"]},
                       {"aliases": [""]}, {"categories": [""]}, {"categories": ["c\u2028d"]},
                       {"categories": [f"c{i}" for i in range(categories.max_length + 1)]},
                       {"categories": ["y" * (categories.item_type.max_length + 1)]}):  # fmt: skip
            refused = await http.patch("/admin/models/gpt-4o-mini", json=change, headers=AUTH)
            assert refused.status_code == 400, (change, refused.text)
        assert not (tmp_path / "executor.admin.json").exists()
        entry = entry_of(executor, "gpt-4o-mini")
        assert (entry.offer.aliases, entry.offer.categories) == (["mini"], ["cheap"])
        assert (await http.get("/status")).json()["advert_problem"] is None
        # defence in depth: an advert that fails its own schema anyway is logged and shown, not silently refused
        caplog.set_level(logging.ERROR, logger="loomnet.advertiser")
        bad = msgspec.structs.replace(entry.offer, categories=["c"] * (categories.max_length + 1))
        executor.catalog.entries[0] = msgspec.structs.replace(entry, offer=bad)
        executor.advertiser.poke()
        with trio.fail_after(30):
            while (problem := (await http.get("/status")).json()["advert_problem"]) is None:
                await trio.sleep(0.05)
        assert "categories" in problem
        assert any("own advert fails" in r.getMessage() for r in caplog.records)
