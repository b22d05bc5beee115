"""The official ``anthropic`` SDK, unmodified, against ``loomnet gateway``'s
``/v1/messages`` on loopback: a real executor on the embedded model, and one on a
faithful OpenAI-compatible fake that calls tools, both behind a real libp2p client."""

from __future__ import annotations

import functools
import json

import anthropic
import pytest
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.client.gateway import GatewayConfig, GatewayKey, serve_gateway
from loomnet.node import Executor, ExecutorConfig, ModelTerms
from loomnet.node.backends._config import BackendConfig

from ..node.asgi_server import serve_app
from ..node.fake_openai import FakeOpenAI

pytestmark = pytest.mark.integration

KEY = "claude-user-key-0123456789"


def sdk(server, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=60)


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


@pytest.fixture
async def gateway(nursery, client):
    return await nursery.start(serve_gateway, client, GatewayConfig(port=0))


async def test_whole_message_with_system_prompt_and_usage(gateway, client):
    message = await in_thread(
        sdk(gateway).messages.create, model="smol", max_tokens=8, extra_body={"temperature": 0},
        system="You answer in one word.", messages=[{"role": "user", "content": "Name a colour."}],
    )  # fmt: skip
    assert message.type == "message" and message.role == "assistant" and message.model == "smollm2-135m"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert (await client.ledger.totals(status="accepted")).receipts == 1


async def test_streamed_message_matches_the_whole_one(gateway):
    ask = dict(model="smollm2-135m", max_tokens=10, extra_body={"temperature": 0}, messages=[{"role": "user", "content": "Count to three."}])
    whole = await in_thread(sdk(gateway).messages.create, **ask)

    def stream():
        with sdk(gateway).messages.stream(**ask) as s:
            events = [e.type for e in s]
            return events, s.get_final_message()

    events, final = await trio.to_thread.run_sync(stream)
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events
    assert final.content[0].text == whole.content[0].text
    assert final.usage.output_tokens == whole.usage.output_tokens and final.usage.input_tokens == whole.usage.input_tokens


async def test_models_list_and_unknown_model(gateway):
    page = await in_thread(sdk(gateway).models.list)
    assert "smollm2-135m" in [m.id for m in page.data]
    with pytest.raises(anthropic.NotFoundError):
        await in_thread(sdk(gateway).messages.create, model="claude-does-not-exist", max_tokens=4,
                        messages=[{"role": "user", "content": "hi"}])  # fmt: skip


async def test_keys_with_x_api_key(nursery, client):
    server = await nursery.start(serve_gateway, client, GatewayConfig(port=0, keys=[GatewayKey(name="c", key=KEY)]))
    ask = dict(model="smol", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.AuthenticationError):
        await in_thread(sdk(server, "wrong-key-0123456789").messages.create, **ask)
    assert (await in_thread(sdk(server, KEY).messages.create, **ask)).content


async def test_tool_use_round_trip_through_a_backend_that_calls_tools(nursery, tmp_path):
    fake = FakeOpenAI(flavour="vllm", pieces=[], finish_reason="tool_calls",
                      tool_calls=[{"id": "call_7", "name": "get_weather", "arguments": '{"city": "Paris"}'}])  # fmt: skip
    url = await serve_app(nursery, fake)
    model = fake.models[0]["id"]
    executor = Executor(ExecutorConfig(
        data_dir=str(tmp_path / "executor"), listen=["/ip4/127.0.0.1/tcp/0"], announce_local=False,
        models=[ModelTerms(name=model, aliases=["qwen"])], request_read_timeout=5.0, ack_timeout=5.0,
        backends=[BackendConfig(provider="vllm", endpoint=url + "/v1", models=[model])],
    ))  # fmt: skip
    await nursery.start(executor.run)
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]],
                                     discover_local=False, offer_timeout=5.0))  # fmt: skip
    await nursery.start(client.run)
    server = await nursery.start(serve_gateway, client, GatewayConfig(port=0))
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]  # fmt: skip
    history = [{"role": "user", "content": "Weather in Paris?"}]

    def streamed():
        with sdk(server).messages.stream(model="qwen", max_tokens=64, tools=tools, messages=history) as s:
            return s.get_final_message()

    message = await trio.to_thread.run_sync(streamed)
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.id == "call_7" and use.name == "get_weather" and use.input == {"city": "Paris"}
    sent = fake.requests[-1].body
    assert sent["tools"][0]["function"]["name"] == "get_weather"

    # the tool's result goes back, and reaches the backend as a tool message
    fake.tool_calls, fake.pieces, fake.finish_reason = [], ["Sunny."], "stop"
    history += [{"role": "assistant", "content": [{"type": "tool_use", "id": "call_7", "name": "get_weather",
                                                   "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_7", "content": "21 C"}]}]  # fmt: skip
    answer = await in_thread(sdk(server).messages.create, model="qwen", max_tokens=64, tools=tools, messages=history)
    assert answer.content[0].text == "Sunny." and answer.stop_reason == "end_turn"
    sent = fake.requests[-1].body["messages"]
    assert sent[-1]["role"] == "tool" and sent[-1]["tool_call_id"] == "call_7" and sent[-1]["content"] == "21 C"
    assert json.loads(sent[-2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
