"""The official ``openai`` SDK, unmodified, against ``loomnet gateway`` on loopback, with a
real executor on the embedded model behind a real libp2p client."""

from __future__ import annotations

import functools

import openai
import pytest
import trio

from loomnet.client.gateway import GatewayConfig, serve_gateway


@pytest.fixture
async def gateway(nursery, client):
    server = await nursery.start(serve_gateway, client, GatewayConfig(port=0))
    await client.wait_for_offers(timeout=10) if hasattr(client, "wait_for_offers") else None
    return server


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def test_models_list_names_the_model_aliases_and_categories(gateway):
    models = await in_thread(sdk(gateway).models.list)
    ids = [m.id for m in models.data]
    assert "smollm2-135m" in ids and "smol" in ids and "fast" in ids
    assert {m.owned_by for m in models.data} == {"loomnet"}


async def test_whole_completion_has_usage_and_receipt_headers(gateway, client):
    raw = await in_thread(
        sdk(gateway).chat.completions.with_raw_response.create,
        model="smol", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0, seed=1,
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens > 0 and completion.usage.prompt_tokens > 0
    assert completion.model == "smollm2-135m"
    assert raw.headers["x-loomnet-executor"] == client.offers()[0].executor
    assert len(raw.headers["x-loomnet-receipt"]) == 64


async def test_streamed_completion_with_usage(gateway):
    def run():
        stream = sdk(gateway).chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Count to three."}], max_tokens=12,
            temperature=0, seed=1, stream=True, stream_options={"include_usage": True},
        )
        return list(stream)

    chunks = await trio.to_thread.run_sync(run)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


async def test_unknown_model_is_not_found(gateway):
    with pytest.raises(openai.NotFoundError):
        await in_thread(sdk(gateway).chat.completions.create, model="no-such-model",
                        messages=[{"role": "user", "content": "hi"}], max_tokens=4)
