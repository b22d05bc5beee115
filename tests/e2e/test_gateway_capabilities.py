"""What a model cannot do is a 400 at once, naming what is missing: not a wait for an
offer that never comes and then a 503 the SDKs retry. Official openai SDK, a real
executor on the embedded model (chat only: no tools, JSON mode or vision advertised)."""

from __future__ import annotations

import functools

import openai
import pytest
import trio

from loomnet.client.gateway import GatewayConfig, serve_gateway

TINY_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture
async def gateway(nursery, client):
    server = await nursery.start(serve_gateway, client, GatewayConfig(port=0))
    with trio.fail_after(20):
        while not client.offers():
            await trio.sleep(0.05)
    return server


def create(server, **fields):
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    ask = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    return trio.to_thread.run_sync(functools.partial(sdk.chat.completions.create, **ask))


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"response_format": {"type": "json_object"}}, "response_format", "JSON output"),
        ({"tools": [TOOL]}, "tools", "tools (function calling)"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"},
                                                     {"type": "image_url", "image_url": {"url": TINY_PNG}}]}]},
         "messages", "images"),
    ],
)  # fmt: skip
async def test_a_capability_the_model_lacks_is_400_at_once(gateway, fields, param, words):
    began = trio.current_time()
    with pytest.raises(openai.BadRequestError) as info:
        await create(gateway, **fields)
    body = info.value.body
    assert body["loomnet_code"] == 303 and body["param"] == param and words in body["message"]
    assert "smollm2-135m" in body["message"]
    assert trio.current_time() - began < 5  # not after the offer timeout


async def test_tools_with_tool_choice_none_are_dropped_so_any_model_answers(gateway):
    answer = await create(gateway, tools=[TOOL], tool_choice="none")
    assert answer.choices[0].message.content is not None and not answer.choices[0].message.tool_calls


async def test_a_max_cost_below_the_worst_case_is_400(gateway):
    with pytest.raises(openai.BadRequestError) as info:
        await create(gateway, max_tokens=100, extra_body={"loomnet": {"max_cost": 0.000001}})
    assert info.value.body["loomnet_code"] == 206
