"""``POST /v1/messages`` read by the official ``anthropic`` SDK, unmodified: the bytes
``AnthropicAPI`` renders are served through the SDK's own httpx transport seam (an
in-memory ``MockTransport``), and the SDK's parsers, stream accumulator and exception
classes read them.

The fake gateway here does what the real one does around the API module: it parses the
SDK's request with ``AnthropicAPI.parse``, asks a scripted model (a function of the
parsed call, so an answer depends on what the SDK sent), checks the request as the
client library would, has the executor sign an honest receipt for the answer, checks
that receipt as the client does, and renders the answer whole or streamed.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import anthropic
import msgspec
import pytest
from anthropic import _base_client

from loomnet.client import (
    ChatResult,
    ReasoningDelta,
    TextDelta,
    ToolCallsDelta,
    check_receipt,
)
from loomnet.client._request_check import check_request
from loomnet.client.gateway._anthropic import AnthropicAPI
from loomnet.client.gateway._api import Answer, receipt_id_of
from loomnet.client.gateway._call import ChatCall
from loomnet.client.gateway._errors import GatewayError
from loomnet.protocol import (
    ErrorCode,
    InferenceRequest,
    Receipt,
    SignedKind,
    SigningKey,
    ToolCall,
    apportion,
    cost_of,
    digest,
    encode_tool_calls,
    generation_fields,
    output_caps,
    seal,
)

#: the httpx the SDK is built on (``httpx2`` from anthropic 2.x, ``httpx`` before)
sdk_httpx = getattr(_base_client, "httpx2", None) or _base_client.httpx

EXECUTOR, CLIENT = SigningKey(b"e" * 32), SigningKey(b"c" * 32)
SERVED = "smollm2-135m"
PRICES = dict(price_in=1_500_000, price_out=3_000_000)
API = AnthropicAPI()


class Script(msgspec.Struct, kw_only=True):
    """What the scripted model answers."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = []
    finish: str = "stop"

    def deltas(self) -> list[TextDelta | ReasoningDelta | ToolCallsDelta]:
        """As the client library yields it: reasoning and text in pieces, tool calls whole."""
        out: list = [ReasoningDelta(self.reasoning[i : i + 5]) for i in range(0, len(self.reasoning), 5)]
        out += [TextDelta(self.text[i : i + 4]) for i in range(0, len(self.text), 4)]
        if self.tool_calls:
            out.append(ToolCallsDelta(list(self.tool_calls)))
        return out


def served(call: ChatCall, script: Script) -> tuple[ChatResult, Answer]:
    """``script`` as the answer to ``call``: checked as the client library checks a
    request, signed by the executor, its receipt checked as the client checks one."""
    request = InferenceRequest(audience=EXECUTOR.peer_id, nonce=b"n" * 16, created_at=1.0, model=SERVED,
                               messages=call.messages, **generation_fields(call.options))  # fmt: skip
    payload = check_request(request)
    chunks = max(1, len(script.deltas()))
    text, reasoning, calls = script.text, script.reasoning, script.tool_calls
    counted = dict(counted_text=len(text) // 4, counted_reasoning=len(reasoning) // 4,
                   counted_tool_calls=sum(len(c.arguments) // 4 + 3 for c in calls))  # fmt: skip
    split = apportion(max(1, sum(counted.values())), caps=output_caps(text, reasoning, calls), **counted)
    input_tokens = sum(len(m.content) for m in call.messages) // 4 + 7
    receipt = Receipt(
        request_digest=digest(payload), client=CLIENT.peer_id, model=SERVED, input_tokens=input_tokens,
        output_tokens=split.total, count_source="tokenizer", **PRICES,
        cost=cost_of(input_tokens, split.total, PRICES["price_in"], PRICES["price_out"]),
        output_digest=digest(text.encode()), chunks=chunks, finish_reason=script.finish, issued_at=1.0,
        tool_calls_digest=digest(encode_tool_calls(calls)) if calls else b"",
        reasoning_digest=digest(reasoning.encode()) if reasoning else b"", reasoning_tokens=split.reasoning,
        hidden_reasoning_tokens=split.hidden_reasoning, tool_call_tokens=split.tool_calls,
    )  # fmt: skip
    envelope = seal(SignedKind.RECEIPT, receipt, EXECUTOR)
    checked = check_receipt(envelope, executor=EXECUTOR.peer_id, client=CLIENT.peer_id, request_payload=payload,
                            text=text, chunks=chunks, reasoning=reasoning, tool_calls=calls,
                            price_in_limit=PRICES["price_in"], price_out_limit=PRICES["price_out"])  # fmt: skip
    result = ChatResult(text=text, executor=EXECUTOR.peer_id, tool_calls=list(calls), receipt=checked,
                        receipt_envelope=envelope, client_output_tokens=split.total, reasoning=reasoning)  # fmt: skip
    answer = Answer(response_id=f"msg_{digest(payload).hex()[:24]}", created=1, receipt_id=receipt_id_of(result),
                    executor=EXECUTOR.peer_id, cost=checked.cost)  # fmt: skip
    return result, answer


class Gateway:
    """The gateway's part around ``AnthropicAPI``, as an httpx handler. ``model`` answers
    each parsed call; ``fail`` (when set) is raised after the first ``fail_after``
    deltas of a streamed answer; ``pings``: a ``ping`` event after each delta."""

    def __init__(
        self, model: Callable[[ChatCall], Script], *, fail: GatewayError | None = None, fail_after: int = 1, pings=False
    ):
        self.model = model
        self.pings = pings
        self.fail, self.fail_after = fail, fail_after
        self.calls: list[ChatCall] = []
        self.results: list[tuple[ChatResult, Answer]] = []

    def handle(self, request):
        assert request.method == "POST" and request.url.path == "/v1/messages"
        try:
            call = API.parse(request.content, request.headers)
        except GatewayError as error:
            return sdk_httpx.Response(
                error.status, content=API.error_body(error), headers={"content-type": "application/json"}
            )
        self.calls.append(call)
        script = self.model(call)
        result, answer = served(call, script)
        self.results.append((result, answer))
        if not call.stream:
            return sdk_httpx.Response(
                200, content=API.whole(call, result, answer), headers={"content-type": "application/json"}
            )
        writer = API.writer(call, model=SERVED, response_id=answer.response_id, created=answer.created)
        body = writer.start()
        for i, delta in enumerate(script.deltas()):
            if self.fail is not None and i == self.fail_after:
                return self._sse(body + writer.error(self.fail))
            body += writer.event(delta) + (writer.ping() if self.pings else b"")
        return self._sse(body + writer.finish(result, answer))

    @staticmethod
    def _sse(body: bytes):
        return sdk_httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    def client(self) -> anthropic.Anthropic:
        transport = sdk_httpx.MockTransport(self.handle)
        return anthropic.Anthropic(api_key="x", base_url="http://gateway", max_retries=0,
                                   http_client=sdk_httpx.Client(transport=transport))  # fmt: skip


def echo(call: ChatCall) -> Script:
    """Answers with the system prompt and the last turn, shouted."""
    system = "".join(m.content for m in call.messages if m.role == "system")
    return Script(text=f"{system} / {call.messages[-1].content}".upper())


WEATHER = {"name": "weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip


def weather_agent(call: ChatCall) -> Script:
    """Calls ``weather`` for the city the user names; once it has the result, says it."""
    last = call.messages[-1]
    if last.role == "tool":
        return Script(text=f"It is {last.content}.")
    city = last.content.split()[-1].strip("?")
    arguments = json.dumps({"city": city})
    return Script(reasoning=f"The user asks about {city}; I should call the tool.", text="Let me look.",
                  tool_calls=[ToolCall(id=f"toolu_{city.lower()}", name="weather", arguments=arguments)],
                  finish="tool_calls")  # fmt: skip


def facts(gateway: Gateway) -> dict:
    """The ``loomnet`` object the last answer must carry."""
    result, answer = gateway.results[-1]
    return {"executor": EXECUTOR.peer_id, "cost": result.receipt.cost / 1e6,
            "receipt_id": digest(result.receipt_envelope.payload).hex(), "count_source": "tokenizer"}  # fmt: skip


# ------------------------------------------------------------------------ whole


def test_a_whole_answer_reads_as_the_sdks_message():
    gateway = Gateway(echo)
    message = gateway.client().messages.create(
        model="fast", max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "Name a colour"}]
    )
    result, answer = gateway.results[-1]
    assert isinstance(message, anthropic.types.Message)
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "BE BRIEF. / NAME A COLOUR"
    assert (message.id, message.type, message.role) == (answer.response_id, "message", "assistant")
    assert message.id.startswith("msg_")
    assert message.model == SERVED  # the served model, not the requested alias
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        result.receipt.input_tokens,
        result.receipt.output_tokens,
    )
    assert (message.usage.cache_creation_input_tokens, message.usage.cache_read_input_tokens) == (0, 0)
    assert message.model_extra["loomnet"] == facts(gateway)
    assert gateway.calls[-1].options.max_tokens == 64 and not gateway.calls[-1].stream


def test_a_tool_use_round_trip_whole():
    gateway = Gateway(weather_agent)
    client = gateway.client()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.messages.create(model="m", max_tokens=100, messages=ask, tools=[WEATHER])
    assert [b.type for b in first.content] == ["thinking", "text", "tool_use"]
    thinking, text, use = first.content
    assert thinking.thinking == "The user asks about Paris; I should call the tool." and thinking.signature == ""
    assert text.text == "Let me look."
    assert (use.id, use.name, use.input) == ("toolu_paris", "weather", {"city": "Paris"})
    assert first.stop_reason == "tool_use"
    assert gateway.calls[-1].options.tools[0].name == "weather"

    # the SDK's own message goes back as the assistant turn (thinking block included), then the result
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 °C"}
    history = [*ask, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}]
    second = client.messages.create(model="m", max_tokens=100, messages=history, tools=[WEATHER])
    assert second.content[0].text == "It is sunny, 21 °C." and second.stop_reason == "end_turn"
    roles = [m.role for m in gateway.calls[-1].messages]
    assert roles == ["user", "assistant", "tool"]
    assert gateway.calls[-1].messages[1].tool_calls == [
        ToolCall(id="toolu_paris", name="weather", arguments='{"city":"Paris"}')
    ]


# ----------------------------------------------------------------------- stream


@pytest.mark.parametrize("pings", [False, True])
def test_a_streamed_answer_accumulates_to_the_whole_one(pings):
    gateway = Gateway(weather_agent, pings=pings)
    client = gateway.client()
    ask = dict(model="m", max_tokens=100, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER])
    whole = client.messages.create(**ask)
    with client.messages.stream(**ask) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    result, answer = gateway.results[-1]
    assert gateway.calls[-1].stream
    assert pieces == ["Let ", "me l", "ook."]
    assert final.content[2].input == {"city": "Oslo"}
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        result.receipt.input_tokens,
        result.receipt.output_tokens,
    )
    assert final.id == answer.response_id and final.model == SERVED
    # the same answer whole and streamed reads the same (ids and usage aside, nothing differs)
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]


def test_the_stream_is_anthropics_named_events_in_order():
    gateway = Gateway(weather_agent)
    events = list(gateway.client().messages.create(
        model="m", max_tokens=100, messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER], stream=True
    ))  # fmt: skip
    result, _ = gateway.results[-1]
    kinds = [(e.type, getattr(e, "index", None)) for e in events]
    assert kinds == [
        ("message_start", None),
        ("content_block_start", 0), *[("content_block_delta", 0)] * 10, ("content_block_stop", 0),
        ("content_block_start", 1), *[("content_block_delta", 1)] * 3, ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None),
    ]  # fmt: skip
    start = events[0].message
    assert (start.content, start.stop_reason, start.usage.input_tokens, start.usage.output_tokens) == ([], None, 0, 0)
    assert [events[i].content_block.type for i in (1, 13, 18)] == ["thinking", "text", "tool_use"]
    assert events[18].content_block.input == {}  # then the whole arguments in one input_json_delta
    assert json.loads(events[19].delta.partial_json) == {"city": "Rome"}
    assert "".join(e.delta.thinking for e in events[2:12]) == result.reasoning
    delta = events[-2]
    assert (delta.delta.stop_reason, delta.delta.stop_sequence) == ("tool_use", None)
    assert (delta.usage.input_tokens, delta.usage.output_tokens) == (
        result.receipt.input_tokens,
        result.receipt.output_tokens,
    )
    assert delta.model_extra["loomnet"] == facts(gateway)


def test_no_done_line_and_each_event_names_its_type():
    call = API.parse(b'{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}', {})
    script = Script(text="Hello there")
    result, answer = served(call, script)
    writer = API.writer(call, model=SERVED, response_id=answer.response_id, created=1)
    body = writer.start() + b"".join(writer.event(d) + writer.ping() for d in script.deltas())
    body += writer.finish(result, answer)
    assert b"[DONE]" not in body and body.count(b"event: ping\n") == len(script.deltas())
    for event in body.decode().strip().split("\n\n"):
        name_line, data_line = event.split("\n")
        assert name_line == f"event: {json.loads(data_line.removeprefix('data: '))['type']}"


@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_answer_is_one_empty_text_block(stream):
    gateway = Gateway(lambda call: Script(reasoning="Nothing to say."))
    client = gateway.client()
    ask = dict(model="m", max_tokens=10, messages=[{"role": "user", "content": "..."}])
    if stream:
        with client.messages.stream(**ask) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**ask)
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("thinking", None), ("text", "")]
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize(
    ("finish", "calls", "expected"),
    [
        ("stop", 0, "end_turn"),
        ("length", 0, "max_tokens"),
        ("content_filter", 0, "refusal"),
        ("tool_calls", 1, "tool_use"),
        ("stop", 1, "tool_use"),  # tool calls present: always tool_use
        ("tool_calls", 0, "end_turn"),  # no call to run
        ("interrupted", 0, "end_turn"),  # a word loomnet does not define
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_stop_reasons(finish, calls, expected, stream):
    def model(call: ChatCall) -> Script:
        tool_calls = [ToolCall(id="toolu_1", name="weather", arguments='{"city": "Lima"}')] * calls
        return Script(text="Partial answer", tool_calls=tool_calls, finish=finish)

    client = Gateway(model).client()
    ask = dict(model="m", max_tokens=10, messages=[{"role": "user", "content": "Lima?"}], tools=[WEATHER])
    if stream:
        with client.messages.stream(**ask) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**ask)
    assert message.stop_reason == expected


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"city": "Kyiv", "days": [1, 2]}', {"city": "Kyiv", "days": [1, 2]}),
        ("", {}),
        ("  ", {}),
        ('{"city": "Ky', {"loomnet_unparsed_arguments": '{"city": "Ky'}),
        ("[1, 2]", {"loomnet_unparsed_arguments": "[1, 2]"}),
        ('"Kyiv"', {"loomnet_unparsed_arguments": '"Kyiv"'}),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_tool_input_is_always_an_object(arguments, expected, stream):
    gateway = Gateway(lambda call: Script(tool_calls=[ToolCall(id="toolu_9", name="weather", arguments=arguments)]))
    client = gateway.client()
    ask = dict(model="m", max_tokens=10, messages=[{"role": "user", "content": "Kyiv?"}], tools=[WEATHER])
    if stream:
        with client.messages.stream(**ask) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**ask)
    assert [b.type for b in message.content] == ["tool_use"]
    assert message.content[0].input == expected


def test_the_writer_refuses_to_go_on_after_the_end():
    call = API.parse(b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}', {})
    result, answer = served(call, Script(text="ok"))
    writer = API.writer(call, model=SERVED, response_id="msg_1", created=1)
    assert writer.start().startswith(b"event: message_start\n") and writer.start() == b""
    writer.finish(result, answer)
    with pytest.raises(RuntimeError):
        writer.event(TextDelta("more"))
    with pytest.raises(RuntimeError):
        writer.error(GatewayError("internal", "late", code=ErrorCode.INTERNAL))


# ----------------------------------------------------------------------- errors


def _sdk_class(name: str) -> type:
    """The SDK's class for a status (older SDKs lack the narrower ones: their base)."""
    return getattr(anthropic, name, anthropic.APIStatusError)


@pytest.mark.parametrize(
    ("kind", "code", "sdk_class", "error_type"),
    [
        ("invalid_request", ErrorCode.BAD_REQUEST, anthropic.BadRequestError, "invalid_request_error"),
        ("unauthorized", ErrorCode.GATEWAY_UNAUTHORIZED, anthropic.AuthenticationError, "authentication_error"),
        ("budget_exhausted", ErrorCode.BUDGET_EXCEEDED, _sdk_class("PaymentRequiredError"), "billing_error"),
        ("model_not_found", ErrorCode.NO_OFFER, anthropic.NotFoundError, "not_found_error"),
        ("request_too_large", ErrorCode.REQUEST_TOO_LARGE, _sdk_class("ContentTooLargeError"), "request_too_large"),
        ("rate_limited", ErrorCode.RATE_LIMITED, anthropic.RateLimitError, "rate_limit_error"),
        ("over_capacity", ErrorCode.OVER_CAPACITY, anthropic.RateLimitError, "rate_limit_error"),
        ("internal", ErrorCode.INTERNAL, anthropic.InternalServerError, "api_error"),
        ("executor_failed", ErrorCode.STREAM_FAILED, anthropic.InternalServerError, "api_error"),
        ("no_offer", ErrorCode.NO_OFFER, anthropic.InternalServerError, "overloaded_error"),
    ],
)
def test_errors_raise_the_sdks_own_classes(kind, code, sdk_class, error_type):
    error = GatewayError(kind, f"the {kind} words", code=code)

    def refuse(request):
        return sdk_httpx.Response(
            error.status, content=API.error_body(error), headers={"content-type": "application/json"}
        )

    client = anthropic.Anthropic(api_key="x", base_url="http://gateway", max_retries=0,
                                 http_client=sdk_httpx.Client(transport=sdk_httpx.MockTransport(refuse)))  # fmt: skip
    with pytest.raises(sdk_class) as raised:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == error.status
    assert raised.value.body == {
        "type": "error",
        "error": {"type": error_type, "message": f"the {kind} words", "loomnet_code": int(code)},
        "request_id": None,
    }


def test_a_refused_request_names_the_field_in_the_error():
    client = Gateway(echo).client()
    image = {"type": "image", "source": {"type": "url", "url": "http://10.0.0.1/cat.png"}}
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model="m", max_tokens=5,
                               messages=[{"role": "user", "content": [{"type": "text", "text": "Cat?"}, image]}])  # fmt: skip
    error = raised.value.body["error"]
    assert error["type"] == "invalid_request_error" and error["loomnet_code"] == ErrorCode.BAD_REQUEST
    assert error["param"] == "messages[0].content[1].source"
    assert "never fetches" in error["message"]


@pytest.mark.parametrize(
    ("kind", "code", "error_type"),
    [
        ("executor_failed", ErrorCode.STREAM_FAILED, "api_error"),
        ("over_capacity", ErrorCode.OVER_CAPACITY, "rate_limit_error"),
    ],
)
def test_a_failure_after_the_stream_started_is_an_error_event(kind, code, error_type):
    failure = GatewayError(kind, "the executor went away", code=code)
    gateway = Gateway(echo, fail=failure, fail_after=2)
    pieces: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as raised:
        with gateway.client().messages.stream(
            model="m", max_tokens=50, messages=[{"role": "user", "content": "a long story"}]
        ) as s:
            for text in s.text_stream:
                pieces.append(text)
    assert pieces == [" / A", " LON"]  # what arrived before the failure
    assert raised.value.body == {"type": "error", "error": {"type": error_type, "message": "the executor went away",
                                                            "loomnet_code": int(code)}}  # fmt: skip
