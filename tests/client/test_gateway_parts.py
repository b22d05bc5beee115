"""The gateway's sans-IO parts: error kinds, steering, keys, the model list."""

import math

import pytest

from loomnet.client import Offer
from loomnet.client.gateway import GatewayError, GatewayKey, Steering
from loomnet.client.gateway._call import merge_steering, steering_from_headers
from loomnet.client.gateway._errors import STATUS, failure_of, retry_after_header
from loomnet.client.gateway._keys import KeyTable
from loomnet.client.gateway._models import model_entries, model_list
from loomnet.protocol import (
    Advert,
    BackendError,
    ErrorCode,
    InvalidRequest,
    LoomError,
    ModelOffer,
    NetworkTimeout,
    NoOfferError,
    RemoteError,
)

# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_every_code_has_a_kind_and_a_status(code):
    error = failure_of(LoomError("x", code=code))
    assert error.kind in STATUS and error.status == STATUS[error.kind] and error.code == code


@pytest.mark.parametrize(
    "exc, status",
    [
        (InvalidRequest("temperature above 2", field="temperature"), 400),
        (RemoteError("busy", code=ErrorCode.OVER_CAPACITY), 429),
        (RemoteError("slow down", code=ErrorCode.RATE_LIMITED), 429),
        (RemoteError("too many streams", code=ErrorCode.PEER_LIMIT), 429),
        (NoOfferError("none"), 503),
        (BackendError("boom"), 502),
        (NetworkTimeout("late"), 502),
        (RemoteError("tools?", code=ErrorCode.UNSUPPORTED_FEATURE), 400),
        (LoomError("ledger", code=ErrorCode.LEDGER_FAILED), 500),
        (RuntimeError("a bug"), 500),
    ],
)
def test_statuses_clients_expect(exc, status):
    assert failure_of(exc).status == status


def test_no_offer_for_a_name_nothing_offers_is_not_found():
    assert failure_of(NoOfferError("none"), model_known=False).status == 404
    assert failure_of(NoOfferError("none"), model_known=True).status == 503


def test_field_becomes_param_and_internal_text_is_hidden():
    assert failure_of(InvalidRequest("bad", field="messages[0].role")).param == "messages[0].role"
    hidden = failure_of(RuntimeError("secret path /etc/x"))
    assert "secret" not in hidden.message and hidden.code == ErrorCode.INTERNAL


def test_retry_after_from_the_executor_or_a_default():
    busy = RemoteError("busy", code=ErrorCode.OVER_CAPACITY)
    busy.retry_after = 2.5
    assert failure_of(busy).retry_after == 2.5
    assert failure_of(RemoteError("busy", code=ErrorCode.OVER_CAPACITY)).retry_after == 1.0
    assert retry_after_header(2.5) == {"retry-after": "3", "retry-after-ms": "2500"}
    assert retry_after_header(math.nan) == {} and retry_after_header(None) == {}


def test_unknown_kind_is_a_bug():
    with pytest.raises(ValueError):
        GatewayError("teapot", "no")


# ------------------------------------------------------------------ steering


def test_headers_steer():
    s = steering_from_headers({"X-Loomnet-Max-Price-Out": "0.5", "x-loomnet-on-premise-only": "true",
                               "X-Loomnet-Pin": "a, b,", "X-Other": "1"})  # fmt: skip
    assert s == Steering(max_price_out=0.5, on_premise_only=True, pin=["a", "b"])
    keywords = s.stream_chat_keywords()
    assert keywords["max_price_out"] == 500_000 and keywords["pin"] == ["a", "b"] and keywords["max_price_in"] is None


@pytest.mark.parametrize(
    "headers, param",
    [
        ({"X-Loomnet-Max-Price-In": "cheap"}, "X-Loomnet-Max-Price-In"),
        ({"X-Loomnet-Max-Cost": "nan"}, "X-Loomnet-Max-Cost"),
        ({"X-Loomnet-Max-Cost": "inf"}, "X-Loomnet-Max-Cost"),
        ({"X-Loomnet-On-Premise-Only": "maybe"}, "X-Loomnet-On-Premise-Only"),
    ],
)
def test_bad_headers_are_400_naming_them(headers, param):
    with pytest.raises(GatewayError) as info:
        steering_from_headers(headers)
    assert info.value.status == 400 and info.value.param == param


def test_negative_price_header_is_400():
    with pytest.raises(GatewayError) as info:
        steering_from_headers({"X-Loomnet-Max-Price-In": "-1"})
    assert info.value.status == 400


def test_body_wins_over_headers_field_by_field():
    body = Steering(max_price_in=1.0)
    headers = Steering(max_price_in=5.0, max_price_out=2.0, exclude=["x"])
    assert merge_steering(body, headers) == Steering(max_price_in=1.0, max_price_out=2.0, exclude=["x"])
    assert merge_steering(None, headers) == headers


# ------------------------------------------------------------------ keys


KEYS = [GatewayKey(name="alice", key="alice-secret-0123456789"), GatewayKey(name="bob", key="bob-secret-0123456789")]


def test_no_keys_means_open():
    assert KeyTable([]).check({}) is None


@pytest.mark.parametrize(
    "headers, name",
    [
        ({"authorization": "Bearer alice-secret-0123456789"}, "alice"),
        ({"authorization": "bearer   bob-secret-0123456789 "}, "bob"),
        ({"x-api-key": "bob-secret-0123456789"}, "bob"),
    ],
)
def test_keys_are_found_by_either_header(headers, name):
    assert KeyTable(KEYS).check(headers).name == name


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer "}, {"authorization": "Basic alice-secret-0123456789"},
     {"authorization": "Bearer alice-secret-012345678"}, {"x-api-key": "alice-secret-0123456789x"},
     {"authorization": "Bearer \udcff"}],
)  # fmt: skip
def test_missing_or_wrong_keys_are_401_and_never_echoed(headers):
    with pytest.raises(GatewayError) as info:
        KeyTable(KEYS).check(headers)
    assert info.value.status == 401 and info.value.code == ErrorCode.GATEWAY_UNAUTHORIZED
    assert "secret" not in info.value.message


# ------------------------------------------------------------------ models


def offer(executor: str, name: str, *, aliases=(), categories=(), price_in=1_000_000, issued_at=1_700_000_000.0) -> Offer:
    model = ModelOffer(name=name, aliases=list(aliases), categories=list(categories), price_in=price_in,
                       price_out=2 * price_in, context_length=4096, capabilities=["tools"])  # fmt: skip
    advert = Advert(seq=1, issued_at=issued_at, ttl=60.0, models=[model])
    return Offer(executor=executor, model=model, advert=advert, expires_at=math.inf)


def test_model_list_has_models_aliases_categories_and_strategies():
    offers = [
        offer("peer-a", "llama", aliases=["l3"], categories=["fast", "coding"], price_in=3_000_000),
        offer("peer-b", "llama", aliases=["l3"], categories=["fast"], price_in=1_000_000),
        offer("peer-b", "qwen", categories=["quality"]),
    ]
    listing = model_list(offers)
    ids = [e.id for e in listing.data]
    assert ids == ["llama", "qwen", "l3", "category:coding", "fast", "quality", "cheapest", "fastest"]
    assert listing.first_id == "llama" and listing.last_id == "fastest" and listing.has_more is False
    entries = model_entries(offers)
    assert entries["llama"].loomnet.executors == 2 and entries["llama"].loomnet.min_price_in == 1.0
    assert entries["l3"].loomnet.kind == "alias" and entries["l3"].loomnet.models == ["llama"]
    assert entries["fast"].loomnet.models == ["llama"]
    assert {e.owned_by for e in listing.data} == {"loomnet"}
    assert all("peer-" not in repr(e.owned_by) + e.display_name for e in listing.data)


def test_no_offers_lists_nothing():
    listing = model_list([])
    assert listing.data == [] and listing.first_id is None


# ------------------------------------------------------------------ images (both APIs share the reader)


@pytest.mark.parametrize(
    "url, words",
    [
        ("data:image/png;base64," + "A" * (1_400_000 + 8), "1 to 1048576 bytes"),
        ("data:image/png;base64,***", "not valid base64"),
        ("data:image/png;base64,", "1 to 1048576 bytes"),
        ("https://example.com/cat.png", "never fetches"),
        ("file:///etc/passwd", "never fetches"),
    ],
)
def test_openai_images_are_bounded_and_never_fetched(url, words):
    import msgspec

    from loomnet.client.gateway._openai import OpenAIAPI

    body = msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]}]})  # fmt: skip
    with pytest.raises(GatewayError) as info:
        OpenAIAPI().parse(body, {})
    assert info.value.status == 400 and words in info.value.message
    assert info.value.param == "messages[0].content[1].image_url.url"


def test_network_failures_are_told_in_loomnets_words_never_libp2ps():
    from loomnet.client import Attempt

    leak = "open /loomnet/infer/2 to 12D3KooWabc: SwarmDialAllFailedError: unable to connect to /ip4/10.1.2.3/tcp/4001"
    single = NetworkTimeout(leak, code=ErrorCode.CONNECT_FAILED)
    single.attempts = [Attempt(executor="12D3KooWexecutorAAAAAAAA", model="m", outcome="CONNECT_FAILED", detail=leak)]
    error = failure_of(single)
    assert error.status == 502 and "10.1.2.3" not in error.message and "Swarm" not in error.message
    assert error.message == "could not reach the executor (AAAAAAAA)"

    busy = RemoteError("the model's runtime is over capacity", code=ErrorCode.OVER_CAPACITY)
    busy.attempts = [*single.attempts, Attempt(executor="12D3KooWexecutorBBBBBBBB", model="m", outcome="OVER_CAPACITY",
                                               detail="the model's runtime is over capacity")]  # fmt: skip
    error = failure_of(busy)
    assert error.status == 429 and "10.1.2.3" not in error.message and "Swarm" not in error.message
    assert "AAAAAAAA: CONNECT_FAILED (could not reach the executor)" in error.message
    assert "BBBBBBBB: OVER_CAPACITY (the model's runtime is over capacity)" in error.message


@pytest.mark.parametrize("field", ["max_cost"])
def test_a_max_cost_below_one_micro_credit_is_refused_not_rounded_to_zero(field):
    import msgspec

    with pytest.raises(msgspec.ValidationError, match="at least 0.000001 credits"):
        msgspec.convert({field: 0.0000001}, Steering)
    assert getattr(msgspec.convert({field: 0.000001}, Steering), field) == 0.000001
    with pytest.raises(GatewayError, match="at least 0.000001 credits"):
        steering_from_headers({f"X-Loomnet-{field.replace('_', '-').title()}": "0.0000001"})
