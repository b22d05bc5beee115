"""The official ``openai`` SDK, unmodified, against ``loomnet gateway`` on loopback, with a
real executor on the embedded model behind a real libp2p client: whole and streamed
completions, usage, and the generation fields the SDK sends."""

from __future__ import annotations

import json

import pytest

from loomnet.client.gateway import GatewayStatistics
from loomnet.protocol import digest

from .gateway_kit import embedded_gateway, in_thread, sdk, settled, stream_all

pytestmark = [pytest.mark.integration, pytest.mark.model]

COUNT = [{"role": "user", "content": "Count from one to ten."}]
GREEDY = {"temperature": 0, "seed": 1}


@pytest.fixture
async def gateway(nursery, tmp_path, executor):
    return await embedded_gateway(nursery, tmp_path, executor)


async def test_whole_completion_has_usage_and_receipt_headers(gateway):
    loom = gateway.gateway.client
    raw = await in_thread(
        sdk(gateway).chat.completions.with_raw_response.create,
        model="smol", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, **GREEDY,
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.role == "assistant" and completion.choices[0].message.content
    usage = completion.usage
    assert usage.completion_tokens > 0 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.model == "smollm2-135m"
    assert raw.headers["x-loomnet-executor"] == loom.offers()[0].executor
    assert raw.headers["x-request-id"] == completion.id
    # the receipt named in the headers is the one the client's ledger booked, at that cost
    entry = await loom.ledger.get(bytes.fromhex(raw.headers["x-loomnet-receipt"]))
    assert entry is not None and entry.status == "accepted"
    assert entry.output_tokens == usage.completion_tokens and entry.input_tokens == usage.prompt_tokens
    assert float(raw.headers["x-loomnet-cost"]) == pytest.approx(entry.cost / 1e6)
    assert completion.model_extra["loomnet"]["receipt_id"] == digest(entry.receipt_payload).hex()
    # an answer that ended is no hang-up, though the connection's end reaches the app after it
    assert await settled(gateway) == GatewayStatistics(requests={"ok": 1}, hung_up=0, in_flight=0)


async def test_streamed_completion_with_usage_ends_with_a_usage_chunk(gateway):
    loom = gateway.gateway.client
    chunks = await in_thread(stream_all, sdk(gateway), model="smollm2-135m", messages=COUNT, max_tokens=12,
                             stream_options={"include_usage": True}, **GREEDY)  # fmt: skip
    *answer, last = chunks
    assert last.choices == [] and last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    # every chunk before it says "usage": null (present, None), as OpenAI's API does
    assert all("usage" in c.model_fields_set and c.usage is None for c in answer)
    assert answer[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in answer][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in answer[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in answer)
    entry = await loom.ledger.get(bytes.fromhex(last.model_extra["loomnet"]["receipt_id"]))
    assert entry is not None and entry.output_tokens == last.usage.completion_tokens
    assert await settled(gateway) == GatewayStatistics(requests={"ok": 1}, hung_up=0, in_flight=0)


async def test_streamed_completion_without_usage_has_no_usage_field(gateway):
    loom = gateway.gateway.client
    def run():
        raw = sdk(gateway).chat.completions.with_raw_response.create(model="smol", messages=COUNT, max_tokens=6,
                                                                     stream=True, **GREEDY)  # fmt: skip
        return raw.headers, list(raw.parse())

    headers, chunks = await in_thread(run)
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-loomnet-executor"] == loom.offers()[0].executor and headers["x-loomnet-model"] == "smollm2-135m"
    assert all("usage" not in c.model_fields_set for c in chunks)
    assert all(c.choices for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


async def test_the_raw_stream_is_sse_data_lines_ending_with_done(gateway):
    def run() -> list[str]:
        with sdk(gateway).chat.completions.with_streaming_response.create(
            model="smol", messages=COUNT, max_tokens=4, stream=True, stream_options={"include_usage": True}, **GREEDY
        ) as response:
            return [line for line in response.iter_lines() if line]

    lines = await in_thread(run)
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    assert json.loads(lines[-2].removeprefix("data: "))["choices"] == []


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_and_max_completion_tokens_bound_the_answer(gateway, field):
    completion = await in_thread(sdk(gateway).chat.completions.create, model="smol", messages=COUNT,
                                 **{field: 3}, **GREEDY)  # fmt: skip
    assert completion.usage.completion_tokens == 3 and completion.choices[0].finish_reason == "length"


async def test_max_completion_tokens_wins_over_max_tokens(gateway):
    completion = await in_thread(sdk(gateway).chat.completions.create, model="smol", messages=COUNT,
                                 max_tokens=9, max_completion_tokens=2, **GREEDY)  # fmt: skip
    assert completion.usage.completion_tokens == 2


async def test_greedy_answers_repeat_whole_and_streamed_and_stop_cuts_them(gateway):
    client = sdk(gateway)
    ask = {"model": "smol", "messages": COUNT, "max_tokens": 16, "top_p": 0.9, **GREEDY}
    first = await in_thread(client.chat.completions.create, **ask)
    second = await in_thread(client.chat.completions.create, **ask)
    chunks = await in_thread(stream_all, client, **ask)
    text = first.choices[0].message.content
    assert len(text.split()) >= 3
    assert second.choices[0].message.content == text
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    # a stop sequence from the middle of that answer ends it there, the sequence left out
    stop = text.split()[2]
    cut = await in_thread(client.chat.completions.create, **ask, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.usage.completion_tokens < first.usage.completion_tokens
