"""Parsing ``POST /v1/messages`` bodies (``AnthropicAPI.parse``): every block kind and
option, and every refusal with the field it names (answers: ``test_anthropic_sdk.py``).
"""

from __future__ import annotations

import base64
import json

import pytest

from loomnet.client._request_check import check_request
from loomnet.client.gateway._anthropic import AnthropicAPI
from loomnet.client.gateway._call import ChatCall, Steering
from loomnet.client.gateway._errors import GatewayError
from loomnet.protocol import (
    MAX_FRAME_SIZE,
    ChatMessage,
    ErrorCode,
    ImagePart,
    InferenceRequest,
    ResponseFormat,
    ToolCall,
    ToolSpec,
    generation_fields,
)

API = AnthropicAPI()
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
WEATHER = {"name": "weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip


def body(**fields) -> bytes:
    request = {"model": "fast", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
    request.update(fields)
    return json.dumps(request).encode()


def parse(headers: dict[str, str] | None = None, **fields) -> ChatCall:
    return API.parse(body(**fields), headers or {})


def image(data: bytes = PNG, media_type: str = "image/png") -> dict:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": media_type, "data": base64.b64encode(data).decode()},
    }


def use(id: str = "toolu_1", city: str = "Paris") -> dict:
    return {"type": "tool_use", "id": id, "name": "weather", "input": {"city": city}}


def network_check(call: ChatCall) -> None:
    """The call is a request the network accepts (the client library's own check)."""
    check_request(InferenceRequest(audience="p", nonce=b"n" * 16, created_at=1.0, model="m", messages=call.messages,
                                   **generation_fields(call.options)))  # fmt: skip


# --------------------------------------------------------------------- accepted


def test_a_minimal_request():
    call = parse()
    assert call.model == "fast" and call.messages == [ChatMessage("user", "hi")]
    assert call.options.max_tokens == 32 and not call.stream and call.steering == Steering()


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        ("Be brief.", [ChatMessage("system", "Be brief.")]),
        ([{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
         [ChatMessage("system", "Be brief.\n\nBe kind.")]),
        ("", []),
        ([], []),
    ],
)  # fmt: skip
def test_the_system_prompt_leads(system, expected):
    assert parse(system=system).messages == [*expected, ChatMessage("user", "hi")]


def test_text_and_image_blocks_of_a_user_turn():
    content = [
        {"type": "text", "text": "What is"},
        image(),
        {"type": "text", "text": "this?"},
        image(b"GIF89a", "IMAGE/GIF"),
    ]
    call = parse(messages=[{"role": "user", "content": content}])
    assert call.messages == [
        ChatMessage("user", "What is\n\nthis?", images=[ImagePart(media_type="image/png", data=PNG),
                                                        ImagePart(media_type="image/gif", data=b"GIF89a")])
    ]  # fmt: skip
    network_check(call)


def test_tool_use_and_tool_result_turns():
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two calls.", "signature": "c2ln"},
            {"type": "redacted_thinking", "data": "b3BhcXVl"},
            {"type": "text", "text": "Looking."}, use("toolu_1", "Paris"), use("toolu_2", "Rome")]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "rain"}, {"type": "text", "text": "12 °C"}]},
            {"type": "text", "text": "And tomorrow?"}]},
        {"role": "assistant", "content": [use("toolu_3", "Oslo")]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_3"}]},
    ]  # fmt: skip
    call = parse(messages=messages, tools=[WEATHER])
    # tool inputs travel as the caller wrote them (raw JSON text: never rebuilt in Python)
    assert call.messages == [
        ChatMessage("user", "Weather in Paris and Rome?"),
        ChatMessage("assistant", "Looking.", tool_calls=[ToolCall(id="toolu_1", name="weather", arguments='{"city": "Paris"}'),
                                                         ToolCall(id="toolu_2", name="weather", arguments='{"city": "Rome"}')]),
        ChatMessage("tool", "sunny", tool_call_id="toolu_1"),
        ChatMessage("tool", "rain\n\n12 °C", tool_call_id="toolu_2"),
        ChatMessage("user", "And tomorrow?"),
        ChatMessage("assistant", "", tool_calls=[ToolCall(id="toolu_3", name="weather", arguments='{"city": "Oslo"}')]),
        ChatMessage("tool", "", tool_call_id="toolu_3"),  # only results: no empty user turn after them
    ]  # fmt: skip
    network_check(call)


def test_tool_input_travels_as_json_text_of_the_same_object():
    nested = {"city": "Zürich", "days": [1, 2.5, None], "flags": {"metric": True}, "note": 'quote " and \\'}
    call = parse(
        messages=[{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": nested}]}]
    )
    assert json.loads(call.messages[0].tool_calls[0].arguments) == nested


def test_options():
    call = parse(
        temperature=0.3, top_p=0.9, top_k=40, stop_sequences=["\n\nHuman:", "END"], metadata={"user_id": "u-42"},
        tools=[WEATHER, {**WEATHER, "name": "time", "type": "custom", "description": ""}],
        output_config={"effort": "low", "format": {"type": "json_schema", "schema": {"type": "object"}}},
        thinking={"type": "enabled", "budget_tokens": 1024}, service_tier="auto", a_field_from_next_year={"x": 1},
        stream=True,
    )  # fmt: skip
    options = call.options
    assert (options.max_tokens, options.temperature, options.top_p) == (32, 0.3, 0.9)
    assert options.stop == ["\n\nHuman:", "END"] and options.user == "u-42"
    schema = json.dumps(WEATHER["input_schema"])  # as the caller wrote it (the test body is json.dumps)
    assert options.tools == [
        ToolSpec(name="weather", description="The weather in a city.", parameters=schema),
        ToolSpec(name="time", description="", parameters=schema),
    ]
    assert options.response_format == ResponseFormat(type="json_schema", schema='{"type": "object"}')
    assert options.tool_choice is None and options.seed is None
    assert call.stream
    network_check(call)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "tool", "name": "weather"}, "weather"),
        ({"type": "none"}, "none"),
    ],
)
def test_tool_choice(choice, expected):
    call = parse(tools=[WEATHER], tool_choice=choice)
    assert call.options.tool_choice == expected
    network_check(call)


def test_steering_from_the_body_wins_over_headers():
    headers = {"X-Loomnet-Max-Cost": "0.5", "x-loomnet-pin": "peerA,peerB", "X-Loomnet-On-Premise-Only": "true"}
    call = parse(headers, loomnet={"max_cost": 0.25, "exclude": ["peerC"]})
    assert call.steering == Steering(max_cost=0.25, on_premise_only=True, pin=["peerA", "peerB"], exclude=["peerC"])
    assert parse(headers).steering.max_cost == 0.5


# --------------------------------------------------------------------- refused


TOO_BIG = b"x" * (MAX_FRAME_SIZE + 1)


@pytest.mark.parametrize(
    ("raw", "param", "words"),
    [
        (b"not json", None, "not valid JSON"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"[]", None, "Expected `object`"),
        (json.dumps({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode(), "model", "required"),
        (
            json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            "max_tokens",
            "required",
        ),
        (json.dumps({"model": "m", "max_tokens": 5}).encode(), "messages", "required"),
    ],
)
def test_a_body_that_is_no_request(raw, param, words):
    with pytest.raises(GatewayError) as raised:
        API.parse(raw, {})
    assert (raised.value.kind, raised.value.status, raised.value.param) == ("invalid_request", 400, param)
    assert words in raised.value.message and raised.value.code == ErrorCode.BAD_REQUEST


def _user(*blocks) -> list[dict]:
    return [{"role": "user", "content": list(blocks)}]


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        (dict(model=7), "model", "Expected `str`"),
        (dict(model=""), "model", "length >= 1"),
        (dict(max_tokens=0), "max_tokens", ">= 1"),
        (dict(max_tokens="32"), "max_tokens", "Expected `int`"),
        (dict(messages=[]), "messages", "length >= 1"),
        (dict(messages=[{"role": "system", "content": "x"}]), "messages[0].role", "system prompt is the system field"),
        (dict(messages=[{"role": "user"}]), "messages[0].content", "required"),
        (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content", "Expected `str | array`"),
        (dict(messages=_user({"type": "document", "source": {}})), "messages[0].content[0].type", "content blocks may be"),
        (dict(messages=_user({"text": "no type"})), "messages[0].content[0].type", "required"),
        (dict(messages=_user({"type": "text"})), "messages[0].content[0].text", "required"),
        (dict(messages=_user({"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}})),
         "messages[0].content[0].source", "never fetches a URL"),
        (dict(messages=_user({"type": "image", "source": {"type": "file", "file_id": "file_1"}})),
         "messages[0].content[0].source", "never fetches a file"),
        (dict(messages=_user({"type": "image", "source": {"type": "s3"}})), "messages[0].content[0].source.type", "inline"),
        (dict(messages=_user({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "@@@"}})),
         "messages[0].content[0].source.data", "not valid base64"),
        (dict(messages=_user({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}})),
         "messages[0].content[0].source.data", "1 to"),
        (dict(messages=_user(image(TOO_BIG))), "messages[0].content[0].source.data", "1 to"),
        (dict(messages=_user(image(media_type="text/html"))), "messages[0].content[0].source.media_type",
         "an image type such as image/png"),
        (dict(messages=_user(*[image()] * 17)), "messages[0].content[16]", "at most 16 images"),
        (dict(messages=_user(use())), "messages[0].content[0].type", "user turns cannot carry tool_use blocks"),
        (dict(messages=_user({"type": "thinking", "thinking": "x"})), "messages[0].content[0].type",
         "cannot carry thinking blocks"),
        (dict(messages=[{"role": "assistant", "content": [image()]}]), "messages[0].content[0].type",
         "assistant turns cannot carry image blocks"),
        (dict(messages=[{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]),
         "messages[0].content[0].type", "cannot carry tool_result blocks"),
        (dict(messages=[{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": [1]}]}]),
         "messages[0].content[0].input", "expected a JSON object"),
        (dict(messages=[{"role": "assistant", "content": [{"type": "tool_use", "id": "", "name": "f"}]}]),
         "messages[0].content[0].id", "length >= 1"),
        (dict(messages=_user({"type": "tool_result", "tool_use_id": "toolu_never"})),
         "messages[0].content[0].tool_use_id", "no earlier assistant turn"),
        (dict(messages=[{"role": "assistant", "content": [use()]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [image()]}]}]),
         "messages[1].content[0].content[0]", "text only"),
        (dict(messages=_user({"type": "tool_result", "tool_use_id": "t", "content": [{"type": "document"}]})),
         "messages[0].content[0].content[0].type", "Invalid value 'document'"),
        (dict(system=[{"type": "image"}]), "system[0].type", "Invalid value 'image'"),
        (dict(system=5), "system", "Expected `str | array | null`"),
        (dict(temperature=2.5), "temperature", "<= 2.0"),
        (dict(top_p=-0.1), "top_p", ">= 0.0"),
        (dict(stop_sequences=["a", "b", "c", "d", "e"]), "stop_sequences", "length <= 4"),
        (dict(stop_sequences=[""]), "stop_sequences[0]", "length >= 1"),
        (dict(metadata={"user_id": 12}), "metadata.user_id", "Expected `str | null`"),
        (dict(tools=[{"name": "weather"}]), "tools[0].input_schema", "needs its input_schema"),
        (dict(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools[0].type", "server tools"),
        (dict(tools=[{"name": "", "input_schema": {}}]), "tools[0].name", "length >= 1"),
        (dict(tools=[{"name": "f", "input_schema": "{}"}]), "tools[0].input_schema", "expected a JSON object"),
        (dict(tool_choice={"type": "any"}), "tool_choice", "needs tools"),
        (dict(tool_choice={"type": "tool", "name": "weather"}), "tool_choice", "needs tools"),
        (dict(tools=[WEATHER], tool_choice={"type": "tool", "name": "time"}), "tool_choice.name", "no tool is named 'time'"),
        (dict(tools=[WEATHER], tool_choice={"type": "tool"}), "tool_choice.name", "required"),
        (dict(tools=[WEATHER], tool_choice={"type": "sometimes"}), "tool_choice.type", "Invalid value 'sometimes'"),
        (dict(output_config={"format": {"type": "json_schema"}}), "output_config.format.schema", "required"),
        (dict(stream="yes"), "stream", "Expected `bool | null`"),
        (dict(loomnet={"max_cost": -1}), "loomnet.max_cost", ">= 0.0"),
        (dict(loomnet={"max_prise": 1}), "loomnet.max_prise", "is not a known field"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(fields, param, words):
    with pytest.raises(GatewayError) as raised:
        parse(**fields)
    error = raised.value
    assert (error.kind, error.status, error.code, error.param) == ("invalid_request", 400, ErrorCode.BAD_REQUEST, param)
    assert words in error.message, error.message
    assert error.message.startswith(param), error.message  # the field leads the words too


def test_a_bad_steering_header_is_refused_naming_it():
    with pytest.raises(GatewayError) as raised:
        parse({"X-Loomnet-Max-Cost": "lots"})
    assert raised.value.param == "X-Loomnet-Max-Cost" and raised.value.status == 400
