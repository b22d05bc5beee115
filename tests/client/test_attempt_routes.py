"""From ``stream_chat``'s keywords to what the router is asked: the route (model, route
string or ``Route``, filters) and what the request itself needs (capabilities, context,
max tokens), through a real client whose transport is in memory.
"""

import pytest
import trio

from loomnet.client import Route
from loomnet.client._routing import describe_route, route_of
from loomnet.client._shape import PER_MESSAGE, acount_prompt_tokens, needed_capabilities
from loomnet.client._tokens import TokenCounter
from loomnet.protocol import (
    ChatMessage,
    ErrorCode,
    GenerationOptions,
    ImagePart,
    InvalidRequest,
    NoOfferError,
    ResponseFormat,
    ToolCall,
    ToolSpec,
)

from ..limits import fail_after
from .fake_executor import HELLO, FakeNetwork, ListRouter, RecordingHealth, make_client

WEATHER = ToolSpec(name="get_weather", description="Weather now", parameters='{"type": "object"}')
PICTURE = ImagePart(media_type="image/png", data=b"\x89PNG...")


# ------------------------------------------------------------------ the route


def test_model_and_filters_make_one_route():
    route = route_of(
        "smol", None, max_price_in=5, max_price_out=None, on_premise_only=True, pin=["A"], exclude=["B", "C"]
    )
    assert route == Route(model="smol", max_price_in=5, on_premise_only=True, pinned=frozenset({"A"}),
                          excluded=frozenset({"B", "C"}))  # fmt: skip


def test_keywords_tighten_a_route_object():
    given = Route(category="fast", max_price_in=10, max_price_out=3, pinned=frozenset({"A"}), no_retention_only=True)
    route = route_of(None, given, max_price_in=4, max_price_out=9, pin=["B"])
    assert (route.category, route.max_price_in, route.max_price_out) == ("fast", 4, 3)  # each cap the lower
    assert route.pinned == {"A", "B"} and route.no_retention_only  # sets add up, flags stay on


def test_a_model_with_a_bare_strategy_is_the_strategy_among_that_models_executors():
    assert route_of("smol", Route(strategy="fastest")) == Route(model="smol", strategy="fastest")


@pytest.mark.parametrize("given", [Route(model="other"), Route(category="fast")])
def test_a_model_and_a_route_that_names_what_to_serve_are_refused(given):
    with pytest.raises(InvalidRequest) as info:
        route_of("smol", given)
    assert info.value.code == ErrorCode.BAD_REQUEST and info.value.field == "model"


def test_a_route_of_another_type_is_a_type_error():
    with pytest.raises(TypeError, match="route must be"):
        route_of(None, 42)


def test_a_route_string_is_parsed_by_the_router():
    route = route_of(None, "cheapest", max_price_out=7)
    assert route.strategy == "cheapest" and route.max_price_out == 7 and route.model is None


def test_a_route_in_words():
    route = Route(model="smol", max_price_in=1, capabilities=frozenset({"tools", "json"}), min_context=900,
                  on_premise_only=True)  # fmt: skip
    assert describe_route(route) == (
        "model 'smol' within the price cap with json, tools with a context of at least 900 tokens on premise"
    )
    assert describe_route(Route()) == "any model"


# ------------------------------------------------------------------ what the request needs


@pytest.mark.parametrize(
    ("messages", "options", "needed"),
    [
        (HELLO, GenerationOptions(), set()),
        (HELLO, GenerationOptions(tools=[WEATHER]), {"tools"}),
        ([ChatMessage("assistant", tool_calls=[ToolCall(id="1", name="f")]), ChatMessage("tool", "17", tool_call_id="1")],
         GenerationOptions(), {"tools"}),
        ([ChatMessage("user", "What is this?", images=[PICTURE])], GenerationOptions(), {"vision"}),
        (HELLO, GenerationOptions(response_format=ResponseFormat(type="json_object")), {"json"}),
        (HELLO, GenerationOptions(response_format=ResponseFormat(type="text")), set()),
    ],
)  # fmt: skip
def test_capabilities_come_from_the_request(messages, options, needed):
    assert needed_capabilities(messages, options) == needed


async def test_the_prompt_count_errs_high():
    tokens = TokenCounter()
    plain = await acount_prompt_tokens(tokens, HELLO, GenerationOptions())
    counted, _ = tokens.count(HELLO[0].content)
    assert plain >= counted * 5 / 4 + PER_MESSAGE
    with_tools = await acount_prompt_tokens(tokens, HELLO, GenerationOptions(tools=[WEATHER]))
    with_image = await acount_prompt_tokens(
        tokens, [ChatMessage("user", HELLO[0].content, images=[PICTURE])], GenerationOptions()
    )
    assert with_tools > plain and with_image >= plain + 2048


async def test_a_short_prompt_is_counted_without_a_thread_hop(monkeypatch):
    # a worker-thread hop (~0.5 ms on a busy machine) cost every request's time to first
    # token more than counting a short prompt on the spot (issue 9)
    tokens = TokenCounter()
    tokens.count("warm")  # the client loads its encoding at start (open_client)
    hops = []

    async def no_hop(fn, *args, limiter=None, abandon_on_cancel=False, thread_name=None):  # trio's own keywords
        hops.append(fn)
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", no_hop)
    await acount_prompt_tokens(tokens, HELLO, GenerationOptions())
    assert hops == []
    await acount_prompt_tokens(tokens, [ChatMessage("user", "long " * 2000)], GenerationOptions())
    assert len(hops) == 1  # a long prompt still goes to a worker thread


# ------------------------------------------------------------------ through the client


@pytest.fixture
async def setup(tmp_path, nursery):
    router, health = ListRouter([]), RecordingHealth()
    net = FakeNetwork(nursery)
    client = await make_client(tmp_path, router=router, health=health, opener=net, offer_timeout=0.5,
                               assumed_max_tokens=700)  # fmt: skip
    try:
        yield client, router, net
    finally:
        await client.ledger.aclose()


@fail_after(30)
async def test_the_router_is_asked_for_the_route_with_what_the_request_needs(setup):
    client, router, _ = setup
    with pytest.raises(NoOfferError) as info:
        async with client.stream_chat(HELLO, model="smol", tools=[WEATHER], on_premise_only=True, max_tokens=300):
            pass
    route, shape = router.asked[-1]
    assert (route.model, route.capabilities, route.on_premise_only) == ("smol", {"tools"}, True)
    assert shape.max_tokens == 300 and shape.prompt_tokens > 0
    assert route.min_context == shape.prompt_tokens + 300
    assert info.value.code == ErrorCode.NO_OFFER
    assert "no live offer for model 'smol' with tools with a context of at least" in info.value.message
    assert "on premise" in info.value.message


@fail_after(30)
async def test_a_request_without_max_tokens_is_routed_with_the_assumed_count(setup):
    client, router, _ = setup
    with pytest.raises(NoOfferError):
        await client.chat(HELLO)
    route, shape = router.asked[-1]
    assert shape.max_tokens == 700 and route.model is None and route.capabilities == frozenset()


@fail_after(30)
async def test_the_caller_learns_which_executor_served(setup):
    from loomnet.protocol import SigningKey

    from .fake_executor import UNREACHABLE

    client, router, net = setup
    dead, alive = SigningKey(b"d" * 32), SigningKey(b"a" * 32)

    async def answers(ex):
        await ex.read_request()
        await ex.chunk(text="Served.")
        await ex.finish()
        await ex.read_rest()

    router.offers = [net.add(dead, UNREACHABLE), net.add(alive, answers)]
    result = await client.chat(HELLO, model="tiny", max_tokens=20)
    assert result.executor == alive.peer_id and result.text == "Served."
    assert [(a.executor, a.outcome) for a in result.attempts] == [(dead.peer_id, "CONNECT_FAILED")]
    [request] = net.requests(alive.peer_id)
    assert (request.model, request.max_tokens, request.max_cost) == ("tiny", 20, None)  # no budget: no max_cost


@fail_after(30)
async def test_model_and_a_route_naming_a_model_are_refused_before_any_traffic(setup):
    client, router, _ = setup
    with pytest.raises(InvalidRequest):
        await client.chat(HELLO, model="smol", route=Route(model="other"))
    assert router.asked == []
