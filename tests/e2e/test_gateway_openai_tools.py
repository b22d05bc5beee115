"""Tool calls, response formats, images and generation fields through the gateway with the
official ``openai`` SDK, to an executor whose backend is the faithful OpenAI fake (``tests/node/fake_openai.py``
on loopback HTTP): what the SDK sends reaches the runtime, and what the runtime answers
comes back in OpenAI's shape, whole and streamed."""

from __future__ import annotations

import base64
import json

import openai
import pytest

from ..node.fake_openai import FakeOpenAI
from .gateway_kit import FAKE_MODEL, in_thread, sdk, start_client, start_fake_executor, start_gateway, stream_all

pytestmark = pytest.mark.integration

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALLS = [
    {"id": "call_oslo", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
    {"id": "call_rome", "name": "get_weather", "arguments": '{"city": "Rome"}'},
]
ASK = [{"role": "user", "content": "Weather in Oslo and Rome?"}]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(32))


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI(flavour="openai")


@pytest.fixture
async def gateway(nursery, tmp_path, fake):
    executor = await start_fake_executor(nursery, tmp_path, fake)
    client = await start_client(nursery, tmp_path, executor)
    return await start_gateway(nursery, client)


def chats(fake: FakeOpenAI) -> list[dict]:
    """The bodies of the chat requests the runtime received."""
    return [r.body for r in fake.requests if r.path == "/v1/chat/completions"]


async def test_whole_answer_with_tool_calls(gateway, fake):
    fake.pieces, fake.tool_calls, fake.finish_reason = [], CALLS, "tool_calls"
    completion = await in_thread(sdk(gateway).chat.completions.create, model=FAKE_MODEL, messages=ASK,
                                 tools=[WEATHER], tool_choice="auto")  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.id, c.type, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("call_oslo", "function", "get_weather", {"city": "Oslo"}),
        ("call_rome", "function", "get_weather", {"city": "Rome"}),
    ]
    sent = chats(fake)[-1]
    assert sent["tools"] == [WEATHER] and sent["tool_choice"] == "auto"
    named = {"type": "function", "function": {"name": "get_weather"}}
    await in_thread(sdk(gateway).chat.completions.create, model=FAKE_MODEL, messages=ASK, tools=[WEATHER],
                    tool_choice=named)  # fmt: skip
    assert chats(fake)[-1]["tool_choice"] == named


async def test_streamed_tool_calls_through_the_sdk_stream_helper(gateway, fake):
    fake.pieces, fake.tool_calls, fake.finish_reason = [], CALLS, "tool_calls"

    def run():
        with sdk(gateway).chat.completions.stream(model=FAKE_MODEL, messages=ASK, tools=[WEATHER]) as stream:
            events = [event.type for event in stream]
            return events, stream.get_final_completion()

    events, final = await in_thread(run)
    assert events.count("tool_calls.function.arguments.done") == 2
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        (c["id"], c["name"], c["arguments"]) for c in CALLS
    ]


async def test_streamed_tool_calls_accumulate_by_index(gateway, fake):
    fake.pieces, fake.tool_calls, fake.finish_reason = [], CALLS, "tool_calls"
    chunks = await in_thread(stream_all, sdk(gateway), model=FAKE_MODEL, messages=ASK, tools=[WEATHER])
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert [calls[i] for i in sorted(calls)] == [{k: c[k] for k in ("id", "name", "arguments")} for c in CALLS]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_the_tool_result_turn_reaches_the_backend(gateway, fake):
    call = {"id": "call_oslo", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_oslo", "content": '{"celsius": 4}'},
    ]  # fmt: skip
    completion = await in_thread(sdk(gateway).chat.completions.create, model=FAKE_MODEL, messages=history,
                                 tools=[WEATHER])  # fmt: skip
    assert completion.choices[0].message.content == fake.text
    sent = chats(fake)[-1]["messages"]
    assert sent[1]["role"] == "assistant"
    [back] = sent[1]["tool_calls"]
    assert (back["id"], back["function"]["name"], json.loads(back["function"]["arguments"])) == (
        "call_oslo", "get_weather", {"city": "Oslo"})  # fmt: skip
    assert sent[2] == {"role": "tool", "tool_call_id": "call_oslo", "content": '{"celsius": 4}'}


async def test_generation_fields_and_roles_reach_the_backend(gateway, fake):
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello."}]},
    ]
    await in_thread(sdk(gateway).chat.completions.create, model=FAKE_MODEL, messages=messages, max_completion_tokens=7,
                    temperature=0.3, top_p=0.8, seed=42, stop=["\n\n", "END"], presence_penalty=0.5,
                    frequency_penalty=0.25, user="user-1234")  # fmt: skip
    sent = chats(fake)[-1]
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert sent["messages"][1]["content"] == "Say hello."
    assert {k: sent[k] for k in ("max_completion_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty",
                                 "frequency_penalty", "user")} == {
        "max_completion_tokens": 7, "temperature": 0.3, "top_p": 0.8, "seed": 42, "stop": ["\n\n", "END"],
        "presence_penalty": 0.5, "frequency_penalty": 0.25, "user": "user-1234"}  # fmt: skip


async def test_response_formats_reach_the_backend(gateway, fake):
    client = sdk(gateway)
    fake.pieces = ['{"ok": ', "true}"]
    whole = await in_thread(client.chat.completions.create, model=FAKE_MODEL, messages=ASK,
                            response_format={"type": "json_object"})  # fmt: skip
    assert json.loads(whole.choices[0].message.content) == {"ok": True}
    assert chats(fake)[-1]["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    await in_thread(stream_all, client, model=FAKE_MODEL, messages=ASK,
                    response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}})
    assert chats(fake)[-1]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}


async def test_text_beyond_ascii_streams_intact(gateway, fake):
    fake.pieces = ["Grüß ", "dich ", "👋", "\n日本語", " \"quoted\" \\ done"]
    chunks = await in_thread(stream_all, sdk(gateway), model=FAKE_MODEL, messages=ASK)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == fake.text
    whole = await in_thread(sdk(gateway).chat.completions.create, model=FAKE_MODEL, messages=ASK)
    assert whole.choices[0].message.content == fake.text


async def test_the_sdk_parse_helper_gets_its_structured_answer(gateway, fake):
    import pydantic

    class Verdict(pydantic.BaseModel):
        ok: bool
        reason: str

    fake.pieces = ['{"ok": true, ', '"reason": "fine"}']
    completion = await in_thread(sdk(gateway).chat.completions.parse, model=FAKE_MODEL, messages=ASK,
                                 response_format=Verdict)  # fmt: skip
    assert completion.choices[0].message.parsed == Verdict(ok=True, reason="fine")
    sent = chats(fake)[-1]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Verdict"
    assert sent["json_schema"]["schema"]["required"] == ["ok", "reason"]
    assert sent["json_schema"]["strict"] is True  # the SDK asks for Structured Outputs; it reaches the runtime


async def test_an_inline_image_reaches_the_backend(gateway, fake):
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    await in_thread(sdk(gateway).chat.completions.create, model=FAKE_MODEL,
                    messages=[{"role": "user", "content": content}])  # fmt: skip
    [message] = chats(fake)[-1]["messages"]
    parts = message["content"]
    assert {"type": "text", "text": "What is this?"} in parts
    [image] = [p for p in parts if p["type"] == "image_url"]
    assert image["image_url"]["url"] == url


async def test_a_remote_image_url_is_refused_and_nothing_is_sent(gateway, fake):
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    before = len(chats(fake))
    with pytest.raises(openai.BadRequestError) as info:
        await in_thread(sdk(gateway).chat.completions.create, model=FAKE_MODEL,
                        messages=[{"role": "user", "content": content}])  # fmt: skip
    assert info.value.status_code == 400
    body = info.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == "messages[0].content[1].image_url.url"
    assert "data:" in body["message"] and isinstance(body["loomnet_code"], int)
    assert len(chats(fake)) == before
