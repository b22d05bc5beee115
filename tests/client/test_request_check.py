"""Obviously invalid requests are refused locally, before any traffic, naming the field.

Every constraint of the ``InferenceRequest`` schema has a case here; the check is the
protocol's own decoder, so a new constraint there applies here without a change.
"""

import msgspec
import pytest

from loomnet.client._chat_stream import RequestOptions
from loomnet.client._request_check import check_request
from loomnet.protocol import (
    MAX_FRAME_SIZE,
    ChatMessage,
    Envelope,
    ErrorCode,
    ImagePart,
    InferenceRequest,
    InvalidRequest,
    RequestFrame,
    ResponseFormat,
    ToolCall,
    ToolSpec,
    encode_frame_body,
)

from ..limits import fail_after
from .fake_executor import FakeExecutor, chat_stream, make_client

HI = [ChatMessage("user", "Hi")]
BIG = "x" * (512 * 1024)

#: (messages, options, model, the field named); None messages = ``HI``
CASES = [
    (None, dict(temperature=float("nan")), None, "temperature"),
    (None, dict(temperature=-1.0), None, "temperature"),
    (None, dict(temperature=2.5), None, "temperature"),
    (None, dict(temperature=float("inf")), None, "temperature"),
    (None, dict(temperature="hot"), None, "temperature"),
    (None, dict(max_tokens=0), None, "max_tokens"),
    (None, dict(max_tokens=-3), None, "max_tokens"),
    (None, dict(max_tokens=(1 << 20) + 1), None, "max_tokens"),
    ([], {}, None, "messages"),
    ([ChatMessage("user", "x")] * 1025, {}, None, "messages"),
    ([ChatMessage("wizard", "Hi")], {}, None, "messages[0].role"),
    ([ChatMessage("user", "ok"), ChatMessage("robot", "Hi")], {}, None, "messages[1].role"),
    ([ChatMessage("user", BIG + "x")], {}, None, "messages[0].content"),
    ([ChatMessage("user", "look", images=[ImagePart(media_type="text/plain", data=b"x")])], {}, None,
     "messages[0].images[0].media_type"),
    ([ChatMessage("user", "look", images=[ImagePart(media_type="image/png", data=b"")])], {}, None,
     "messages[0].images[0].data"),
    ([ChatMessage("user", "look", images=[ImagePart(media_type="image/png", data=b"x")] * 17)], {}, None,
     "messages[0].images"),
    ([ChatMessage("assistant", "", tool_calls=[ToolCall(id="c", name="")])], {}, None, "messages[0].tool_calls[0].name"),
    ([ChatMessage("tool", "42", tool_call_id="c" * 129)], {}, None, "messages[0].tool_call_id"),
    (None, dict(seed=-1), None, "seed"),
    (None, dict(seed=1 << 31), None, "seed"),
    (None, dict(max_price_in=-1), None, "max_price_in"),
    (None, dict(max_price_out=(1 << 62) + 1), None, "max_price_out"),
    (None, dict(tools=[ToolSpec(name="")]), None, "tools[0].name"),
    (None, dict(tools=[ToolSpec(name="f", description="d" * 8193)]), None, "tools[0].description"),
    (None, dict(tools=[ToolSpec(name=f"f{i}") for i in range(129)]), None, "tools"),
    (None, dict(tool_choice="t" * 129), None, "tool_choice"),
    (None, dict(response_format=ResponseFormat(type="xml")), None, "response_format.type"),
    (None, dict(top_p=1.5), None, "top_p"),
    (None, dict(top_p=float("nan")), None, "top_p"),
    (None, dict(presence_penalty=-2.5), None, "presence_penalty"),
    (None, dict(frequency_penalty=2.01), None, "frequency_penalty"),
    (None, dict(stop=["a", "b", "c", "d", "e"]), None, "stop"),
    (None, dict(stop=[""]), None, "stop[0]"),
    (None, dict(stop=["x" * 257]), None, "stop[0]"),
    (None, dict(user=""), None, "user"),
    (None, dict(user="u" * 257), None, "user"),
    (None, dict(max_cost=-1), None, "max_cost"),
    (None, {}, "", "model"),
    (None, {}, "m" * 129, "model"),
    # the whole request must fit one frame (1 MiB), which no single field says
    ([ChatMessage("user", BIG), ChatMessage("user", BIG)], {}, None, "messages"),
    # what no schema says but every backend needs
    (None, dict(tool_choice="get_weather"), None, "tool_choice"),  # no tools at all
    (None, dict(tools=[ToolSpec(name="f")], tool_choice="g"), None, "tool_choice"),
    (None, dict(tools=[ToolSpec(name="f")], tool_choice="AUTO"), None, "tool_choice"),
    (None, dict(tool_choice="required"), None, "tool_choice"),
    (None, dict(tools=[ToolSpec(name="f", parameters="{not json")]), None, "tools[0].parameters"),
    (None, dict(tools=[ToolSpec(name="f"), ToolSpec(name="g", parameters="[1, 2]")]), None, "tools[1].parameters"),
    (None, dict(tools=[ToolSpec(name="f", parameters='"object"')]), None, "tools[0].parameters"),
    (None, dict(tools=[ToolSpec(name="f", parameters="[" * 100_000 + "]" * 100_000)]), None, "tools[0].parameters"),
    (None, dict(response_format=ResponseFormat(type="json_schema", schema="{'type': 'object'}")), None,
     "response_format.schema"),
    (None, dict(response_format=ResponseFormat(type="json_schema", schema="null")), None, "response_format.schema"),
    ([ChatMessage("user", "weather?"), ChatMessage("assistant", "", tool_calls=[ToolCall(id="c", name="w", arguments="{city: Oslo}")])],
     {}, None, "messages[1].tool_calls[0].arguments"),
    ([ChatMessage("assistant", "", tool_calls=[ToolCall(id="a", name="w"), ToolCall(id="b", name="w", arguments="42")])],
     {}, None, "messages[0].tool_calls[1].arguments"),
    # a tool turn answers a call an earlier assistant turn made
    ([ChatMessage("user", "weather?"), ChatMessage("tool", '{"temp": 21}')], {}, None, "messages[1].tool_call_id"),
    ([ChatMessage("user", "weather?"), ChatMessage("tool", "21", tool_call_id="")], {}, None,
     "messages[1].tool_call_id"),
    ([ChatMessage("user", "weather?"), ChatMessage("assistant", "", tool_calls=[ToolCall(id="c1", name="w")]),
      ChatMessage("tool", "21", tool_call_id="c2")], {}, None, "messages[2].tool_call_id"),
    ([ChatMessage("tool", "21", tool_call_id="c1"), ChatMessage("assistant", "", tool_calls=[ToolCall(id="c1", name="w")])],
     {}, None, "messages[0].tool_call_id"),
]
IDS = [f"{field}-{i}" for i, (*_, field) in enumerate(CASES)]


def probe(messages, options, model) -> InferenceRequest:
    return InferenceRequest(
        audience="12D3KooWexecutor",
        nonce=bytes(16),
        created_at=1.0,
        model="any" if model is None else model,
        messages=HI if messages is None else messages,
        **options,
    )


@pytest.mark.parametrize(("messages", "options", "model", "field"), CASES, ids=IDS)
def test_every_schema_constraint_is_refused_with_the_field_named(messages, options, model, field):
    with pytest.raises(InvalidRequest) as info:
        check_request(probe(messages, options, model))
    error = info.value
    assert error.field == field
    assert error.code == ErrorCode.BAD_REQUEST and isinstance(error, ValueError)
    assert field in error.message


def test_what_backends_accept_passes():
    tools = [ToolSpec(name="get_weather", parameters='{"type": "object", "properties": {"city": {"type": "string"}}}'),
             ToolSpec(name="noop", parameters=""), ToolSpec(name="defaults")]
    history = [
        ChatMessage("user", "weather in Oslo?"),
        ChatMessage("assistant", "", tool_calls=[ToolCall(id="c1", name="get_weather", arguments='{"city": "Oslo"}'),
                                                 ToolCall(id="c2", name="noop", arguments="")]),
        ChatMessage("tool", "12 C", tool_call_id="c1"),
    ]
    for choice in (None, "auto", "none", "required", "get_weather", "noop"):
        check_request(probe(history, dict(tools=tools, tool_choice=choice), None))
    for choice in ("auto", "none"):  # mean the same with no tools
        check_request(probe(None, dict(tool_choice=choice), None))
    for fmt in (ResponseFormat(type="json_schema", schema='{"type": "object"}'), ResponseFormat(type="json_schema"),
                ResponseFormat(type="json_object"), ResponseFormat(type="text")):
        check_request(probe(None, dict(response_format=fmt), None))


@pytest.mark.parametrize(("messages", "options", "field"), [
    ([{"role": "user", "content": "Hi"}], {}, "messages[0]"),  # OpenAI-style: the usual slip
    ([object()], {}, "messages[0]"),
    (None, dict(tools=[{"name": "f"}]), "tools[0]"),
    (None, dict(response_format={"type": "json_object"}), "response_format"),
    (None, dict(seed=2**70), "seed"),
    (None, dict(max_price_in=2**70), "max_price_in"),
    (None, dict(max_cost=-(2**70)), "max_cost"),
    ([ChatMessage("user", "\ud800")], {}, "messages[0].content"),
    ([ChatMessage("user", "ok"), ChatMessage("user", "x", images=[ImagePart(media_type="image/png", data=object())])],
     {}, "messages[1].images[0].data"),
    (None, dict(stop=["a", object()]), "stop[1]"),
], ids=["dict-message", "object-message", "dict-tool", "dict-format", "seed", "price", "max-cost", "surrogate",
        "image-data", "stop"])
def test_what_cannot_be_encoded_is_refused_naming_the_field(messages, options, field):
    with pytest.raises(InvalidRequest) as info:
        check_request(probe(messages, options, None))
    assert info.value.field == field and field in info.value.message
    assert "serialize" not in info.value.message  # our words, not msgspec's


def test_a_valid_request_passes_and_its_bytes_decode_as_the_executor_will():
    request = probe(None, dict(temperature=0.0, max_tokens=1, seed=0, tools=[ToolSpec(name="f")]), None)
    payload = check_request(request)
    assert msgspec.msgpack.decode(payload, type=InferenceRequest) == request
    limits = dict(temperature=2.0, max_tokens=1 << 20)
    half = len(BIG) - 300
    fits = probe([ChatMessage("user", "x" * half), ChatMessage("user", "x" * half)], limits, None)
    frame = len(encode_frame_body(RequestFrame(Envelope(check_request(fits), bytes(32), bytes(64)))))
    assert MAX_FRAME_SIZE - 400 < frame <= MAX_FRAME_SIZE  # up to the frame maximum, not short of it


@pytest.mark.parametrize(("messages", "options", "model", "field"), CASES, ids=IDS)
@fail_after(30)
async def test_no_stream_is_opened_for_an_invalid_request(tmp_path, messages, options, model, field):
    client = await make_client(tmp_path)
    executor = FakeExecutor()
    try:
        with pytest.raises(InvalidRequest) as info:
            client.check_request(HI if messages is None else messages, model=model, options=RequestOptions(**options))
        assert info.value.field == field
        if model is None:  # the offer fixes the model; everything else is checked again at open
            stream = chat_stream(client, executor, **options)
            stream._messages = HI if messages is None else messages
            with pytest.raises(InvalidRequest):
                await stream.open()
            await stream.aclose()
        assert executor.opened == 0
    finally:
        await client.ledger.aclose()


def test_every_generation_option_travels_in_the_signed_request():
    from loomnet.protocol import GENERATION_FIELDS, GenerationOptions, generation_options

    options = GenerationOptions(
        max_tokens=9, temperature=0.3, top_p=0.9, seed=4, stop=["\n\n", "END"], presence_penalty=0.5,
        frequency_penalty=-0.5, user="end-user-7", tools=[ToolSpec(name="f")], tool_choice="f",
        response_format=ResponseFormat(type="json_object"),
    )
    request = probe(None, {name: getattr(options, name) for name in GENERATION_FIELDS}, None)
    decoded = msgspec.msgpack.decode(check_request(request), type=InferenceRequest)
    assert generation_options(decoded) == options


def test_a_request_from_before_the_new_options_still_decodes():
    # an older client sends none of the new fields: each is the runtime's default
    old = msgspec.msgpack.encode({"audience": "p", "nonce": bytes(16), "created_at": 1.0, "model": "m",
                                  "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
    request = msgspec.msgpack.decode(old, type=InferenceRequest)
    assert (request.max_tokens, request.top_p, request.stop, request.user, request.max_cost) == (5, None, [], None, None)


def test_library_options_come_as_an_object_or_keywords_and_unknown_ones_are_named():
    from loomnet.client._client import request_options
    from loomnet.protocol import GenerationOptions

    base = GenerationOptions(temperature=0.2, top_p=0.5)
    merged = request_options(base, {"top_p": 0.9, "stop": "END", "tools": (ToolSpec(name="f"),)}, max_cost=100)
    assert (merged.temperature, merged.top_p, merged.stop, merged.max_cost) == (0.2, 0.9, ["END"], 100)
    assert merged.tools == [ToolSpec(name="f")]
    with pytest.raises(TypeError, match="top_k"):
        request_options(None, {"top_k": 40})
