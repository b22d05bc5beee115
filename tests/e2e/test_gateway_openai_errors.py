"""Every failure reaches the official ``openai`` SDK as its own exception class, with the
status OpenAI's API would send and a body in OpenAI's error shape (``error.type``,
``error.code``, ``error.param``) plus loomnet's stable ``loomnet_code``
(``client/gateway/_errors.py`` has the table)."""

from __future__ import annotations


import openai
import pytest
import trio

from loomnet.client import BudgetConfig
from loomnet.client.gateway import GatewayKey
from loomnet.protocol import ErrorCode

from ..node.fake_openai import Failure, FakeOpenAI, openai_error
from .gateway_kit import (
    FAKE_MODEL, HELLO, USER_KEY, Gate, embedded_gateway, in_thread, receipts, sdk, settled, start_client,
    start_fake_executor, start_gateway,
)  # fmt: skip

pytestmark = pytest.mark.integration


@pytest.fixture
async def gateway(nursery, tmp_path, executor):
    return await embedded_gateway(nursery, tmp_path, executor)


def error_of(exc: openai.APIStatusError) -> dict:
    """The ``error`` object of an error response (the SDK unwraps ``{"error": ...}``)."""
    body = exc.body
    assert isinstance(body, dict) and set(body) >= {"message", "type", "param", "code", "loomnet_code"}, body
    assert exc.response.headers["content-type"] == "application/json"
    return body


async def create(server, **request):
    request = {"model": "smol", "messages": HELLO, "max_tokens": 4, **request}
    return await in_thread(sdk(server).chat.completions.create, **request)


# ------------------------------------------------------------------ 400


@pytest.mark.model
@pytest.mark.parametrize(("request_fields", "param"), [
    ({"temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"seed": -5}, "seed"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 300}}]}, "tools[0].function.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x" * 300, "schema": {}}}},
     "response_format.json_schema.name"),
    ({"n": 2}, "n"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"messages": []}, "messages"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"extra_body": {"loomnet": {"pin": "not-a-list"}}}, "loomnet.pin"),
    ({"extra_body": {"loomnet": {"max_price": 1}}}, "loomnet.max_price"),
    ({"extra_headers": {"X-Loomnet-Max-Price-Out": "cheap"}}, "x-loomnet-max-price-out"),
    ({"extra_headers": {"X-Loomnet-On-Premise-Only": "perhaps"}}, "x-loomnet-on-premise-only"),
])  # fmt: skip
async def test_a_bad_request_is_a_bad_request_error_naming_the_field(gateway, request_fields, param):
    loom = gateway.gateway.client
    with pytest.raises(openai.BadRequestError) as info:
        await create(gateway, **request_fields)
    error = error_of(info.value)
    assert info.value.status_code == 400
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    assert error["loomnet_code"] == ErrorCode.BAD_REQUEST
    assert not await receipts(loom.ledger)  # nothing was sent


@pytest.mark.model
async def test_a_body_that_is_not_json_is_a_bad_request(gateway):
    with pytest.raises(openai.BadRequestError) as info:
        await in_thread(sdk(gateway).post, "/chat/completions", cast_to=object, content=b'{"model": "smol", "mess',
                        options={"headers": {"content-type": "application/json"}})  # fmt: skip
    assert error_of(info.value)["type"] == "invalid_request_error"


async def test_a_prompt_the_runtime_refuses_is_a_bad_request(nursery, tmp_path):
    fake = FakeOpenAI(refusal=["I can't ", "help with that."])
    executor = await start_fake_executor(nursery, tmp_path, fake)
    server = await start_gateway(nursery, await start_client(nursery, tmp_path, executor))
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await create(server, model=FAKE_MODEL, stream=stream)
        error = error_of(info.value)
        assert error["loomnet_code"] == ErrorCode.CONTENT_FILTERED and "help with that" not in error["message"]


# ------------------------------------------------------------------ 401


@pytest.fixture
async def keyed(nursery, tmp_path, executor):
    return await embedded_gateway(nursery, tmp_path, executor, keys=[GatewayKey(name="alice", key=USER_KEY)])


#: the SDK sends no key at all (a header left out per request: the SDK insists on one otherwise)
NO_KEY = {"extra_headers": {"Authorization": openai.Omit()}}
@pytest.mark.model
@pytest.mark.parametrize(("api_key", "headers"), [("unused", NO_KEY), ("lg-wrong-key-00000000000000000", {})],
                         ids=["none", "wrong"])  # fmt: skip
async def test_a_missing_or_wrong_key_is_an_authentication_error(keyed, api_key, headers):
    client = sdk(keyed, api_key=api_key)
    calls = [lambda: client.chat.completions.create(model="smol", messages=HELLO, **headers),
             lambda: client.models.list(**headers), lambda: client.models.retrieve("smol", **headers)]  # fmt: skip
    for call in calls:
        with pytest.raises(openai.AuthenticationError) as info:
            await in_thread(call)
        error = error_of(info.value)
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
        assert error["loomnet_code"] == ErrorCode.GATEWAY_UNAUTHORIZED
    assert not await receipts(keyed.gateway.client.ledger)


@pytest.mark.model
async def test_the_right_key_lists_models_as_a_bearer_token_and_as_x_api_key(keyed):
    as_bearer = sdk(keyed, api_key=USER_KEY)
    as_header = sdk(keyed, api_key="unused", default_headers={"x-api-key": USER_KEY})
    assert [m.id for m in (await in_thread(as_bearer.models.list)).data]
    assert [m.id for m in (await in_thread(as_header.models.list, **NO_KEY)).data]


@pytest.mark.model
async def test_the_right_key_is_answered_as_a_bearer_token_and_as_x_api_key(keyed):
    as_bearer = sdk(keyed, api_key=USER_KEY)
    as_header = sdk(keyed, api_key="unused", default_headers={"x-api-key": USER_KEY})
    for client, headers in ((as_bearer, {}), (as_header, NO_KEY)):
        completion = await in_thread(client.chat.completions.create, model="smol", messages=HELLO, max_tokens=2,
                                     **headers)  # fmt: skip
        assert completion.usage.completion_tokens > 0


# ------------------------------------------------------------------ 402


@pytest.mark.model
async def test_an_exhausted_budget_is_402(nursery, tmp_path, executor):
    poor = await start_client(nursery, tmp_path, executor, budget=BudgetConfig(amount=1))
    server = await start_gateway(nursery, poor)
    with pytest.raises(openai.APIStatusError) as info:
        await create(server)
    assert info.value.status_code == 402
    error = error_of(info.value)
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert error["loomnet_code"] == ErrorCode.BUDGET_EXCEEDED


# ------------------------------------------------------------------ 404


@pytest.mark.model
@pytest.mark.parametrize("stream", [False, True])
async def test_an_unknown_model_is_not_found(gateway, stream):
    with pytest.raises(openai.NotFoundError) as info:
        await create(gateway, model="no-such-model", stream=stream)
    error = error_of(info.value)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_found", "model")


# ------------------------------------------------------------------ 429


async def test_a_rate_limited_client_gets_a_rate_limit_error_with_retry_after(nursery, tmp_path):
    executor = await start_fake_executor(nursery, tmp_path, FakeOpenAI(), peer_requests_per_minute=1)
    server = await start_gateway(nursery, await start_client(nursery, tmp_path, executor))
    await create(server, model=FAKE_MODEL)
    with pytest.raises(openai.RateLimitError) as info:
        await create(server, model=FAKE_MODEL)
    error = error_of(info.value)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert error["loomnet_code"] == ErrorCode.RATE_LIMITED
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert int(info.value.response.headers["retry-after-ms"]) >= 1


async def test_a_busy_executor_gets_a_rate_limit_error_with_retry_after(nursery, tmp_path):
    fake = FakeOpenAI(pieces=["Hel", "lo"])
    gate = Gate(fake, piece="Hel")
    executor = await start_fake_executor(nursery, tmp_path, gate, capacity=1, max_queue=0)
    server = await start_gateway(nursery, await start_client(nursery, tmp_path, executor))
    async with trio.open_nursery() as inner:
        first = trio.Event()

        async def hold_the_slot():
            await create(server, model=FAKE_MODEL)
            first.set()

        inner.start_soon(hold_the_slot)
        await gate.arrived.wait()
        with pytest.raises(openai.RateLimitError) as info:
            await create(server, model=FAKE_MODEL)
        gate.release.set()
    error = error_of(info.value)
    assert (error["type"], error["code"]) == ("rate_limit_error", "over_capacity")
    assert error["loomnet_code"] == ErrorCode.OVER_CAPACITY
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert first.is_set()


# ------------------------------------------------------------------ 503


@pytest.mark.model
@pytest.mark.parametrize("how", ["extra_body", "header"])
async def test_no_offer_under_the_price_cap_is_503(gateway, how):
    cap = {"extra_body": {"loomnet": {"max_price_out": 0.0000001}}} if how == "extra_body" else {
        "extra_headers": {"X-Loomnet-Max-Price-Out": "0.0000001"}}
    with pytest.raises(openai.InternalServerError) as info:
        await create(gateway, **cap)
    assert info.value.status_code == 503
    error = error_of(info.value)
    assert (error["type"], error["code"]) == ("server_error", "no_offer")
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert not await receipts(gateway.gateway.client.ledger)


# ------------------------------------------------------------------ 502


async def test_a_backend_failing_on_every_executor_is_502(nursery, tmp_path):
    fakes = [FakeOpenAI(), FakeOpenAI()]
    executors = [await start_fake_executor(nursery, tmp_path, fake, name=f"executor-{i}")
                 for i, fake in enumerate(fakes)]  # fmt: skip
    server = await start_gateway(nursery, await start_client(nursery, tmp_path, *executors), executors=2)
    for fake in fakes:
        fake.failures = [Failure(500, openai_error("The server had an error", "server_error"))] * 3
    with pytest.raises(openai.InternalServerError) as info:
        await create(server, model=FAKE_MODEL)
    assert info.value.status_code == 502
    error = error_of(info.value)
    assert (error["type"], error["code"]) == ("server_error", "executor_failed")
    assert all(len(fake.failures) == 2 for fake in fakes)  # each executor was tried, once
    assert "The server had an error" not in error["message"]  # the runtime's words stay on the executor


async def test_a_failure_after_the_stream_started_raises_while_iterating(nursery, tmp_path):
    fake = FakeOpenAI(pieces=["one ", "two ", "three ", "four"], error_event_after=2)
    executor = await start_fake_executor(nursery, tmp_path, fake)
    client = await start_client(nursery, tmp_path, executor)
    server = await start_gateway(nursery, client)
    received: list[str] = []

    def run():
        stream = sdk(server).chat.completions.create(model=FAKE_MODEL, messages=HELLO, stream=True)
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError) as info:
        await in_thread(run)
    assert "".join(received) == "one two "
    assert info.value.body["type"] == "server_error" and info.value.body["code"] == "executor_failed"
    assert info.value.body["loomnet_code"] == ErrorCode.BACKEND_ERROR
    # the partial answer's receipt was verified and booked by the client, for what streamed
    [receipt] = await receipts(client.ledger)
    assert receipt.finish_reason == "error" and receipt.output_tokens > 0
    statistics = await settled(server)
    assert statistics.requests == {"executor_failed": 1} and statistics.hung_up == 0


async def test_a_whole_answer_failing_midway_is_502_and_its_part_is_booked(nursery, tmp_path):
    fake = FakeOpenAI(pieces=["one ", "two ", "three ", "four"], error_event_after=2)
    executor = await start_fake_executor(nursery, tmp_path, fake)
    client = await start_client(nursery, tmp_path, executor)
    server = await start_gateway(nursery, client)
    with pytest.raises(openai.InternalServerError) as info:
        await create(server, model=FAKE_MODEL)
    assert info.value.status_code == 502
    assert error_of(info.value)["loomnet_code"] == ErrorCode.BACKEND_ERROR
    [receipt] = await receipts(client.ledger)
    assert receipt.finish_reason == "error"


# ------------------------------------------------------------------ endpoints


@pytest.mark.model
async def test_an_endpoint_the_gateway_does_not_serve_is_not_found_in_openai_shape(gateway):
    client = sdk(gateway)
    for call in (lambda: client.embeddings.create(model="smol", input="hi"),
                 lambda: client.get("/chat/completions", cast_to=object)):  # fmt: skip
        with pytest.raises(openai.NotFoundError) as info:
            await in_thread(call)
        error = error_of(info.value)
        assert (error["type"], error["code"]) == ("invalid_request_error", "unknown_url")
        assert error["message"].startswith("Invalid URL (")
