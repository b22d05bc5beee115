"""What a hostile or careless caller can send the gateway, over real loopback TCP, with no
executor behind it: each is refused with a 4xx in the API's own shape (never a 500, a
redirect or a hang), and nothing it sends makes the gateway build without bound."""

from __future__ import annotations

import threading

import httpx
import msgspec
import pytest
import trio

from loomnet.client.gateway._app import header_value
from loomnet.client.gateway._models import ModelCatalog, ModelEntry, ModelFacts, page_of

from .test_gateway_http import host_port, start


ANTHROPIC = {"anthropic-version": "2023-06-01"}
DEEP = 200_000  # far past Python's recursion limit


def nested(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def user(text: str = "hi") -> dict:
    return {"role": "user", "content": text}


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("method, path", [("POST", "/v1/chat/completions/"), ("POST", "/v1/messages/"),
                                          ("GET", "/healthz/"), ("GET", "//evil.example/v1/models/")])  # fmt: skip
async def test_a_trailing_slash_is_a_404_never_a_redirect(nursery, lone_client, method, path):
    server = await start(nursery, lone_client)
    async with httpx.AsyncClient(base_url=server.url, follow_redirects=False) as http:
        answer = await http.request(method, path, headers={"host": "evil.example"}, content=b"{}")
    assert answer.status_code == 404, (answer.status_code, answer.headers)
    assert "location" not in answer.headers
    assert answer.json()["error"]["code"] in ("unknown_url", "model_not_found")


# ---------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", '{"model": "m", "messages": ' + nested() + "}"),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": '
         + nested() + "}"),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": '
         '[{"type": "function", "function": {"name": "f", "parameters": {"a": ' + nested() + "}}}]}"),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
         '"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"a": '
         + nested() + "}}}}"),
        ("/v1/messages", '{"model": "m", "max_tokens": 4, "messages": ' + nested() + "}"),
        ("/v1/messages", '{"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], '
         '"tools": [{"name": "f", "input_schema": {"a": ' + nested() + "}}]}"),
        ("/v1/messages", '{"model": "m", "max_tokens": 4, "messages": [{"role": "assistant", "content": '
         '[{"type": "tool_use", "id": "t", "name": "f", "input": {"a": ' + nested() + "}}]}]}"),
    ],
    ids=["messages", "unknown-field", "tool-parameters", "schema", "anthropic-messages", "input-schema",
         "tool-use-input"],
)  # fmt: skip
async def test_json_nested_past_the_stack_is_a_400_never_a_500(nursery, lone_client, path, body):
    server = await start(nursery, lone_client)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        answer = await http.post(path, content=body.encode(), headers={"content-type": "application/json", **ANTHROPIC})
    # 400 when the nesting is refused; 404/503 when it is read fine and the model is then
    # looked for (nothing is offered here): what never comes is a 500
    assert answer.status_code in (400, 404, 503), (answer.status_code, answer.text[:300])
    assert answer.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": [user()] * 1025}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 1025}]}, "messages[0].content"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": f"c{i}", "type": "function", "function":
          {"name": "f", "arguments": "{}"}} for i in range(65)]}]}, "messages[0].tool_calls"),
    ],
    ids=["messages", "content-parts", "stop", "tools", "tool-calls"],
)  # fmt: skip
async def test_openai_lists_are_bounded_as_the_network_bounds_them(nursery, lone_client, fields, param):
    server = await start(nursery, lone_client)
    body = {"model": "m", "messages": [user()], **fields}
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert error["param"] == param and "length" in error["message"], error


@pytest.mark.parametrize("where", ["parameters", "schema"])
async def test_a_schema_that_is_not_an_object_is_a_400_naming_it(nursery, lone_client, where):
    server = await start(nursery, lone_client)
    if where == "parameters":
        fields = {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1, 2]}}]}
        param = "tools[0].function.parameters"
    else:
        fields = {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": "text"}}}
        param = "response_format.json_schema.schema"
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.post("/v1/chat/completions", json={"model": "m", "messages": [user()], **fields})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


# ---------------------------------------------------------------- connections


async def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(nursery, lone_client):
    """An idle connection holds a descriptor; it goes after ``idle-timeout``, not 75 s."""
    server = await start(nursery, lone_client, idle_timeout=0.5)
    host, port = server.url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        received = b""
        began = trio.current_time()
        with trio.fail_after(30):
            while data := await stream.receive_some(65536):
                received += data
        assert received.startswith(b"HTTP/1.1 200")
        assert 0.5 <= trio.current_time() - began < 30.0


# ---------------------------------------------------------------- headers and listings


@pytest.mark.parametrize(
    "text, sent",
    [
        ("smol", b"smol"),
        ("openai:gpt-4o (2024-08)", b"openai:gpt-4o (2024-08)"),
        ("evil\r\nset-cookie: a=b", b"evil%0D%0Aset-cookie: a=b"),
        ("modèle", b"mod%C3%A8le"),
        ("100%", b"100%25"),
        ("x\x00y\x7f", b"x%00y%7F"),
    ],
)
def test_header_values_are_escaped_where_a_header_may_not_hold_them(text, sent):
    assert header_value(text) == sent
    assert all(0x20 <= b < 0x7F for b in header_value(text))


def test_header_values_are_bounded():
    assert len(header_value("x" * 100_000)) == 512


def entry(name: str) -> ModelEntry:
    facts = ModelFacts(kind="model", models=[name], executors=1, min_price_in=0, min_price_out=0,
                       context_length=0, capabilities=[])  # fmt: skip
    return ModelEntry(id=name, created=0, created_at="1970-01-01T00:00:00Z", display_name=name, loomnet=facts)


def test_listings_page_as_anthropics_api_does():
    data = [entry(f"m{i:02d}") for i in range(25)]
    first = page_of(data, limit=10)
    assert [e.id for e in first.data] == [f"m{i:02d}" for i in range(10)]
    assert (first.has_more, first.first_id, first.last_id) == (True, "m00", "m09")
    last = page_of(data, limit=10, after_id="m19")
    assert [e.id for e in last.data] == [f"m{i:02d}" for i in range(20, 25)] and not last.has_more
    before = page_of(data, limit=10, before_id="m05")
    assert [e.id for e in before.data] == [f"m{i:02d}" for i in range(5)] and not before.has_more
    assert page_of(data, limit=3, before_id="m10").has_more
    assert [e.id for e in page_of(data, limit=2, after_id="gone").data] == ["m00", "m01"]


@pytest.mark.parametrize("limit", ["0", "1001", "ten", "-1"])
async def test_a_bad_listing_limit_is_a_400(nursery, lone_client, limit):
    server = await start(nursery, lone_client)
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.get("/v1/models", params={"limit": limit})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "limit"


async def test_the_catalog_is_built_once_for_concurrent_readers_and_only_when_due(autojump_clock, monkeypatch):
    """A listing is built in a worker thread, once for every reader waiting on it, and
    again only when the table changed (and ``max_age`` passed) or ``5 * max_age`` did."""
    from loomnet.client.gateway import _models

    builds = []
    real = _models.model_entries

    def counted(offers):
        builds.append(threading.current_thread() is threading.main_thread())
        return real(offers)

    monkeypatch.setattr(_models, "model_entries", counted)
    marker = [object()]
    catalog = ModelCatalog(lambda: [], lambda: marker[0], max_age=2.0)
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(catalog.listing)
    assert len(builds) == 1
    await catalog.listing()
    await trio.sleep(3.0)
    await catalog.listing()  # unchanged, 3 s old: not rebuilt
    assert len(builds) == 1
    marker[0] = object()
    await catalog.listing()  # changed and over max_age: rebuilt
    assert len(builds) == 2
    marker[0] = object()
    await catalog.listing()  # changed, but built moments ago
    assert len(builds) == 2
    await trio.sleep(10.0)
    await catalog.entry("x")  # 5 * max_age passed
    assert len(builds) == 3
    assert not any(builds)  # each built in a worker thread, never on the event loop
    assert msgspec.json.encode(page_of(await catalog.listing())) == b'{"object":"list","data":[],"has_more":false,"first_id":null,"last_id":null}'


# ---------------------------------------------------------------- floods and hogs


async def test_a_flood_of_idle_connections_is_capped_and_the_gateway_goes_on(nursery, lone_client):
    """Idle connections past ``max-connections`` wait in the kernel's queue instead of
    taking descriptors; once the idle ones are closed (``idle-timeout``), callers are
    answered again."""
    server = await start(nursery, lone_client, max_connections=4, idle_timeout=1.0)
    idle = []
    try:
        for _ in range(20):
            idle.append(await trio.open_tcp_stream(*host_port(server.url)))
        await trio.sleep(0.3)
        assert server.gateway.statistics().connections == 4  # the rest wait unaccepted
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            answer = await http.get("/healthz")  # served once idle ones are cut (1 s each round)
        assert answer.status_code == 200
        assert server.gateway.statistics().connections <= 4
    finally:
        for stream in idle:
            await stream.aclose()


KEYS = [{"name": "alice", "key": "alice-key-0123456789abcdef"}, {"name": "bob", "key": "bob-key-0123456789abcdef01"}]


async def test_one_key_cannot_hold_every_place(nursery, lone_client):
    """A key with ``max-requests-per-key`` requests in flight (their bodies still
    arriving) gets 429 for the next at once; another key is not refused for it."""
    from loomnet.client.gateway import GatewayKey

    keys = [GatewayKey(**k) for k in KEYS]
    server = await start(nursery, lone_client, keys=keys, max_requests_per_key=2, max_concurrent_requests=10,
                         body_timeout=30.0)  # fmt: skip
    held = []
    for _ in range(2):  # alice's two requests hold their places: their bodies never end
        stream = await trio.open_tcp_stream(*host_port(server.url))
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                              b"alice-key-0123456789abcdef\r\ncontent-length: 100\r\n\r\n{")  # fmt: skip
        held.append(stream)
    with trio.fail_after(10):
        while server.gateway.key_in_flight.get("alice", 0) < 2:
            await trio.sleep(0.01)
    body = {"model": "m", "messages": [user()]}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        alice = await http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEYS[0]['key']}"})
        assert alice.status_code == 429 and alice.headers["retry-after"] == "1"
        assert "this key has 2 requests in flight" in alice.json()["error"]["message"]
        bob = await http.post("/v1/chat/completions", json={**body, "model": ""},
                              headers={"authorization": f"Bearer {KEYS[1]['key']}"})  # fmt: skip
        assert bob.status_code == 400  # answered (an empty model), not refused for alice's load
    for stream in held:
        await stream.aclose()
    with trio.fail_after(10):
        while server.gateway.key_in_flight:
            await trio.sleep(0.01)


async def test_a_spent_key_is_refused_before_its_body_is_read(nursery, lone_client):
    """A key whose budget has nothing left gets 402 at once: it does not hold a place
    while it drips a body."""
    from loomnet.client import BudgetConfig
    from loomnet.client.gateway import GatewayKey

    keys = [GatewayKey(name="alice", key=KEYS[0]["key"], budget=BudgetConfig(amount=0))]
    server = await start(nursery, lone_client, keys=keys, body_timeout=30.0)
    stream = await trio.open_tcp_stream(*host_port(server.url))
    async with stream:
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                              b"alice-key-0123456789abcdef\r\ncontent-length: 100\r\n\r\n{")  # and no more
        received = b""
        with trio.fail_after(10):  # long before the 30 s body timeout
            while b"}" not in received:
                received += await stream.receive_some(65536)
    assert received.startswith(b"HTTP/1.1 402"), received[:300]
    assert b"budget of key 'alice' is spent" in received and b"insufficient_quota" in received
    assert server.gateway.key_in_flight == {}
