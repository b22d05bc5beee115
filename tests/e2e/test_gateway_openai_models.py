"""``GET /v1/models`` and ``GET /v1/models/{id}`` through the official ``openai`` SDK: every
id ``model`` accepts is listed, and nothing says who serves it."""

from __future__ import annotations

import json

import openai
import pytest

from loomnet.node import ModelTerms

from ..node.fake_openai import FakeOpenAI
from .gateway_kit import (
    BACKEND_KEY, FAKE_MODEL, embedded_gateway, in_thread, sdk, start_client, start_fake_executor, start_gateway,
)  # fmt: skip

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture
async def two_executors(nursery, tmp_path, executor):
    """The embedded model, and a hosted OpenAI model (the fake) on another executor."""
    terms = ModelTerms(name=f"openai:{FAKE_MODEL}", aliases=["hosted", "acme/hosted-v1"],
                       categories=["quality", "coding"], price_out=2.0)  # fmt: skip
    hosted = await start_fake_executor(nursery, tmp_path, FakeOpenAI(), models=[terms])
    client = await start_client(nursery, tmp_path, executor, hosted)
    return executor, hosted, await start_gateway(nursery, client, executors=2)


async def test_models_list_names_models_aliases_categories_and_strategies(two_executors):
    _, _, gateway = two_executors
    models = await in_thread(sdk(gateway).models.list)
    kinds = {m.id: m.model_extra["loomnet"]["kind"] for m in models.data}
    assert kinds == {
        "smollm2-135m": "model", FAKE_MODEL: "model",
        "smol": "alias", "hosted": "alias", "acme/hosted-v1": "alias",
        "fast": "category", "quality": "category", "category:coding": "category",
        "cheapest": "strategy", "fastest": "strategy",
    }  # fmt: skip
    assert all(m.object == "model" and m.created > 0 for m in models.data)
    smol = next(m for m in models.data if m.id == "smol").model_extra["loomnet"]
    assert smol["models"] == ["smollm2-135m"] and smol["executors"] == 1


async def test_owned_by_never_names_an_executor_or_a_provider(two_executors):
    embedded, hosted, gateway = two_executors
    raw = await in_thread(sdk(gateway).models.with_raw_response.list)
    assert {m.owned_by for m in raw.parse().data} == {"loomnet"}
    seen = raw.http_response.text + json.dumps(dict(raw.headers))
    for secret in (embedded.peer_id, hosted.peer_id, "openai", "embedded", BACKEND_KEY, "127.0.0.1"):
        assert secret not in seen


@pytest.mark.parametrize(("model_id", "kind", "served_by"), [
    ("smollm2-135m", "model", ["smollm2-135m"]),
    ("SMOL", "alias", ["smollm2-135m"]),
    ("fast", "category", ["smollm2-135m"]),
    ("category:coding", "category", [FAKE_MODEL]),
    ("acme/hosted-v1", "alias", [FAKE_MODEL]),  # ids may hold a slash (vLLM, OpenRouter names)
    ("cheapest", "strategy", []),
])  # fmt: skip
async def test_models_retrieve_a_model_an_alias_a_category(two_executors, model_id, kind, served_by):
    _, _, gateway = two_executors
    model = await in_thread(sdk(gateway).models.retrieve, model_id)
    assert model.id.casefold() == model_id.casefold() and model.owned_by == "loomnet"
    assert model.model_extra["loomnet"]["kind"] == kind
    assert model.model_extra["loomnet"]["models"] == served_by


async def test_models_retrieve_an_unknown_id_is_not_found(nursery, tmp_path, executor):
    gateway = await embedded_gateway(nursery, tmp_path, executor)
    with pytest.raises(openai.NotFoundError) as info:
        await in_thread(sdk(gateway).models.retrieve, "no-such-model")
    error = info.value.body
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_found", "model")
    assert isinstance(error["loomnet_code"], int)
