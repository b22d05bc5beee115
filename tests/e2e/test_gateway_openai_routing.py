"""Routing from the request through the official ``openai`` SDK: ``model`` names a model, a
category or a strategy; ``extra_body={"loomnet": {...}}`` and ``X-Loomnet-*`` headers pin
and exclude executors. Two executors: the embedded model (category ``fast``) and a
cheaper hosted model (the OpenAI fake); the response headers say who served."""

from __future__ import annotations

import openai
import pytest

from loomnet.node import ModelTerms

from ..node.fake_openai import FakeOpenAI
from .gateway_kit import FAKE_MODEL, HELLO, in_thread, sdk, start_client, start_fake_executor, start_gateway

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture
async def network(nursery, tmp_path, executor):
    """(embedded executor, hosted executor, gateway); the hosted model is the cheaper one."""
    terms = [ModelTerms(name=f"openai:{FAKE_MODEL}", aliases=["hosted"], price_in=0.5, price_out=1.0)]
    hosted = await start_fake_executor(nursery, tmp_path, FakeOpenAI(), models=terms)
    client = await start_client(nursery, tmp_path, executor, hosted)
    return executor, hosted, await start_gateway(nursery, client, executors=2)


async def served(server, **request) -> tuple[str, str]:
    """(executor peer id, model) that answered ``request``, from the response headers."""
    request = {"messages": HELLO, "max_tokens": 2, "temperature": 0, "seed": 1, **request}
    raw = await in_thread(sdk(server).chat.completions.with_raw_response.create, **request)
    completion = raw.parse()
    assert completion.model == raw.headers["x-loomnet-model"]
    assert completion.model_extra["loomnet"]["executor"] == raw.headers["x-loomnet-executor"]
    return raw.headers["x-loomnet-executor"], completion.model


async def test_model_names_a_model_an_alias_a_category_or_a_strategy(network):
    embedded, hosted, gateway = network
    assert await served(gateway, model="smol") == (embedded.peer_id, "smollm2-135m")
    assert await served(gateway, model="hosted") == (hosted.peer_id, FAKE_MODEL)
    assert await served(gateway, model="fast") == (embedded.peer_id, "smollm2-135m")
    assert await served(gateway, model="category:fast") == (embedded.peer_id, "smollm2-135m")
    assert await served(gateway, model="cheapest") == (hosted.peer_id, FAKE_MODEL)
    assert (await served(gateway, model="fastest"))[0] in (embedded.peer_id, hosted.peer_id)


async def test_pin_and_exclude_through_extra_body_and_headers(network):
    embedded, hosted, gateway = network
    pin = {"extra_body": {"loomnet": {"pin": [embedded.peer_id]}}}
    assert await served(gateway, model="cheapest", **pin) == (embedded.peer_id, "smollm2-135m")
    exclude = {"extra_headers": {"X-Loomnet-Exclude": hosted.peer_id}}
    assert await served(gateway, model="cheapest", **exclude) == (embedded.peer_id, "smollm2-135m")
    pin = {"extra_headers": {"X-Loomnet-Pin": f"{hosted.peer_id}, {embedded.peer_id}"}}
    assert await served(gateway, model="cheapest", **pin) == (hosted.peer_id, FAKE_MODEL)


@pytest.mark.parametrize("how", ["extra_body", "header"])
async def test_excluding_the_only_executor_of_a_model_is_503(network, how):
    embedded, _, gateway = network
    exclude = ({"extra_body": {"loomnet": {"exclude": [embedded.peer_id]}}} if how == "extra_body"
               else {"extra_headers": {"X-Loomnet-Exclude": embedded.peer_id}})  # fmt: skip
    with pytest.raises(openai.InternalServerError) as info:
        await served(gateway, model="smol", **exclude)
    assert info.value.status_code == 503
    assert (info.value.body["type"], info.value.body["code"]) == ("server_error", "no_offer")


async def test_the_body_wins_over_a_header(network):
    embedded, hosted, gateway = network
    both = {"extra_body": {"loomnet": {"pin": [hosted.peer_id]}}, "extra_headers": {"X-Loomnet-Pin": embedded.peer_id}}
    assert await served(gateway, model="cheapest", **both) == (hosted.peer_id, FAKE_MODEL)
