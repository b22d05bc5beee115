"""Route strings and filters: every form, every bad input with its field."""

import pytest

from loomnet.client._route import Route
from loomnet.protocol import ErrorCode, InvalidRequest


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        (None, {}),
        ("cheapest", {"strategy": "cheapest"}),
        (" FASTEST ", {"strategy": "fastest"}),
        ("fast", {"category": "fast"}),
        ("Quality", {"category": "quality"}),
        ("balanced", {"category": "balanced"}),
        ("category:coding", {"category": "coding"}),
        ("CATEGORY: Long Context ", {"category": "Long Context"}),
        ("llama-3-8b", {"model": "llama-3-8b"}),
        ("openai:gpt-4o-mini", {"model": "openai:gpt-4o-mini"}),  # resolved by the router
        ("ollama:llama3:8b", {"model": "ollama:llama3:8b"}),
    ],
)
def test_route_strings(text, fields):
    assert Route.parse(text) == Route(**fields)


def test_filters_become_fields():
    route = Route.parse(
        "llama", strategy="fastest", max_price_in=5, max_price_out=None, capabilities=["Tools", "json"],
        min_context=8192, on_premise_only=True, no_retention_only=True, pinned=("a",), excluded={"b"},
    )  # fmt: skip
    assert route == Route(
        model="llama", strategy="fastest", max_price_in=5, capabilities=frozenset({"tools", "json"}),
        min_context=8192, on_premise_only=True, no_retention_only=True, pinned=frozenset({"a"}),
        excluded=frozenset({"b"}),
    )  # fmt: skip
    assert Route.parse("cheapest", model="llama") == Route(model="llama", strategy="cheapest")
    assert Route.parse("fast", strategy="fastest") == Route(category="fast", strategy="fastest")


@pytest.mark.parametrize(
    ("text", "filters", "field"),
    [
        ("", {}, "route"),
        ("   ", {}, "route"),
        ("category:", {}, "route"),
        ("category:  ", {}, "route"),
        (b"llama", {}, "route"),
        ("llama", {"category": "fast"}, "category"),
        ("fast", {"model": "llama"}, "category"),
        ("cheapest", {"strategy": "fastest"}, "strategy"),
        ("fast", {"category": "quality"}, "category"),
        (None, {"strategy": "slowest"}, "strategy"),
        (None, {"max_price_in": -1}, "max_price_in"),
        (None, {"max_price_out": 1.5}, "max_price_out"),
        (None, {"min_context": True}, "min_context"),
        (None, {"capabilities": "tools"}, "capabilities"),
        (None, {"capabilities": ["tools", ""]}, "capabilities"),
        (None, {"pinned": 3}, "pinned"),
        (None, {"excluded": [None]}, "excluded"),
        (None, {"on_premise_only": "yes"}, "on_premise_only"),
        (None, {"model": ""}, "model"),
        (None, {"category": 7}, "category"),
    ],
)
def test_bad_routes_are_invalid_requests_naming_the_field(text, filters, field):
    with pytest.raises(InvalidRequest) as caught:
        Route.parse(text, **filters)
    assert caught.value.field == field and caught.value.code is ErrorCode.BAD_REQUEST


def test_an_unknown_filter_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="max_price"):
        Route.parse("llama", max_price=3)
