"""A reasoning model's thinking through the gateway with the official ``openai`` SDK:
``reasoning_content`` deltas before the answer when streamed, and ``reasoning_content``
on the whole message, apart from the text, whichever field the runtime used."""

from __future__ import annotations

import pytest

from ..node.fake_openai import FakeOpenAI
from .gateway_kit import FAKE_MODEL, in_thread, sdk, start_client, start_fake_executor, start_gateway, stream_all

pytestmark = pytest.mark.integration

THOUGHTS = ["The user ", "wants a ", "greeting."]


@pytest.fixture(params=[("vllm", "reasoning_content"), ("groq", "reasoning")], ids=["reasoning_content", "reasoning"])
async def reasoning(request, nursery, tmp_path):
    """A runtime streaming its reasoning in the flavour's field, behind the gateway."""
    provider, field = request.param
    usage = {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20}  # 5 of the 9 reasoning
    fake = FakeOpenAI(flavour=provider, reasoning=THOUGHTS, usage=usage, reasoning_tokens=5)
    assert fake.reasoning_field == field
    executor = await start_fake_executor(nursery, tmp_path, fake, provider=provider)
    client = await start_client(nursery, tmp_path, executor)
    return fake, await start_gateway(nursery, client)


async def test_streamed_reasoning_arrives_as_reasoning_content_deltas_before_the_text(reasoning):
    fake, gateway = reasoning
    chunks = await in_thread(stream_all, sdk(gateway), model=FAKE_MODEL, messages=[{"role": "user", "content": "Hi"}],
                             stream_options={"include_usage": True})  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    kinds = ["reasoning" if (d.model_extra or {}).get("reasoning_content") else "text" if d.content else None
             for d in deltas]  # fmt: skip
    kinds = [k for k in kinds if k]
    assert kinds == sorted(kinds) and kinds[0] == "reasoning" and kinds[-1] == "text"  # all reasoning first
    assert "".join(d.model_extra.get("reasoning_content", "") for d in deltas if d.model_extra) == "".join(THOUGHTS)
    assert "".join(d.content or "" for d in deltas) == fake.text
    usage = chunks[-1].usage
    assert (usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens) == (9, 5)


async def test_whole_message_carries_reasoning_content_apart_from_the_text(reasoning):
    fake, gateway = reasoning
    completion = await in_thread(sdk(gateway).chat.completions.create, model=FAKE_MODEL,
                                 messages=[{"role": "user", "content": "Hi"}])  # fmt: skip
    message = completion.choices[0].message
    assert message.content == fake.text
    assert message.model_extra["reasoning_content"] == "".join(THOUGHTS)
    usage = completion.usage
    assert (usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens) == (9, 5)
