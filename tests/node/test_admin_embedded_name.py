"""An embedded backend carries its operator-given name (``[[backends]] name = "local"``)
everywhere, as every other backend does: ``/status``, the admin's list and actions, the
metrics' labels, and the overlay a removal writes (so the removal holds across a restart).
The real embedded model, a real executor, its operator endpoint on loopback."""

from __future__ import annotations

import httpx
import trio

from loomnet.node import Executor
from loomnet.node._admin import load_overlay, overlay_path_for
from loomnet.node._catalog_listing import label_of
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends._registry import make_backend
from loomnet.node.config import load_config

from .asgi_server import serve_app
from .fake_openai import FakeOpenAI

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def test_an_embedded_backend_is_labelled_by_its_name():
    assert label_of(make_backend(BackendConfig(provider="embedded", name="local"))) == "local"
    assert label_of(make_backend(BackendConfig(provider="embedded"))) == "embedded"


async def start(nursery, tmp_path, desk_url: str) -> Executor:
    path = tmp_path / "executor.toml"
    path.write_text(f'''data-dir = "{tmp_path / 'data'}"
listen = ["/ip4/127.0.0.1/tcp/0"]
announce-local = false
health-interval = 600.0

[operator]
port = 0
admin-token = "{TOKEN}"

[[backends]]
name = "local"
provider = "embedded"

[[backends]]
name = "desk"
provider = "vllm"
endpoint = "{desk_url}/v1"
models = ["m1"]
''')
    overlay = overlay_path_for(path, tmp_path / "data" / "executor")
    executor = Executor(load_config(path, environ={}, overlay=load_overlay(overlay)), overlay_path=overlay)
    await nursery.start(executor.run)
    return executor


async def test_the_embedded_backends_name_is_used_everywhere(nursery, tmp_path):
    desk_url = await serve_app(nursery, FakeOpenAI(flavour="vllm"))
    async with trio.open_nursery() as first:
        executor = await start(first, tmp_path, desk_url)
        assert executor.catalog.names == ["local", "desk"]
        async with httpx.AsyncClient(base_url=executor.info.operator_url, timeout=30) as http:
            status = (await http.get("/status")).json()
            assert [(b["name"], b["kind"]) for b in status["backends"]] == [("local", "embedded"), ("desk", "vllm")]
            assert 'loomnet_backend_up{backend="local"}' in (await http.get("/metrics")).text
            listed = (await http.get("/admin/backends", headers=AUTH)).json()["backends"]
            assert [b["name"] for b in listed] == ["local", "desk"]
            assert (await http.post("/admin/backends/local/disable", headers=AUTH)).status_code == 200
            assert (await http.delete("/admin/backends/local", headers=AUTH)).status_code == 200
        first.cancel_scope.cancel()
    assert load_overlay(tmp_path / "executor.admin.json").removed == ["local"]
    async with trio.open_nursery() as second:  # the removal holds across a restart
        executor = await start(second, tmp_path, desk_url)
        assert executor.catalog.names == ["desk"]
        second.cancel_scope.cancel()
