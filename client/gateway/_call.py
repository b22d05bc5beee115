"""One chat request as the gateway routes it, whichever API it came in.

``_openai`` and ``_anthropic`` parse their API's body into a :class:`ChatCall`; the
gateway (``_gateway``) turns a call into one ``LoomClient.stream_chat``. The routing
choices beyond ``model`` (:class:`Steering`) come from an extension object in the body,
``"loomnet": {...}`` (the SDKs send it with ``extra_body``), and from ``X-Loomnet-*``
headers (``extra_headers``, or a proxy in front); a field given in both places takes the
body's value.

| body field (``loomnet.``) | header | meaning |
| --- | --- | --- |
| ``max_price_in`` / ``max_price_out`` | ``X-Loomnet-Max-Price-In`` / ``-Out`` | caps, credits per million tokens |
| ``max_cost`` | ``X-Loomnet-Max-Cost`` | the most this request may cost, credits |
| ``on_premise_only`` | ``X-Loomnet-On-Premise-Only: true`` | only executors whose models all run on premise |
| ``no_retention_only`` | ``X-Loomnet-No-Retention-Only: true`` | only executors that keep no prompts |
| ``pin`` | ``X-Loomnet-Pin: <peer id>,<peer id>`` | only these executors |
| ``exclude`` | ``X-Loomnet-Exclude: <peer id>,...`` | never these executors |
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated

import msgspec
from msgspec import Meta

from loomnet.protocol import ChatMessage, ErrorCode, GenerationOptions, credits_to_micro

from ._errors import GatewayError

__all__ = ["ChatCall", "Steering", "steering_from_headers", "merge_steering"]

_PeerId = Annotated[str, Meta(min_length=1, max_length=128)]
_Credits = Annotated[float, Meta(ge=0.0, le=1e12)]


class Steering(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Routing choices beyond ``model`` (see the module doc). Prices in credits."""

    max_price_in: _Credits | None = None
    max_price_out: _Credits | None = None
    max_cost: _Credits | None = None
    on_premise_only: bool | None = None
    no_retention_only: bool | None = None
    pin: Annotated[list[_PeerId], Meta(max_length=64)] = []
    exclude: Annotated[list[_PeerId], Meta(max_length=256)] = []

    def __post_init__(self) -> None:
        # a max_cost under one micro-credit would become 0 (a request that may cost
        # nothing); price caps under it become 0 too, which means "free models only"
        if self.max_cost is not None and self.max_cost > 0 and credits_to_micro(self.max_cost) < 1:
            raise ValueError(f"max_cost must be 0 or at least 0.000001 credits (one micro-credit), "
                             f"not {self.max_cost:g}")  # fmt: skip

    def stream_chat_keywords(self) -> dict[str, object]:
        """The ``LoomClient.stream_chat`` keywords this steering asks for."""

        def micro(credits: float | None) -> int | None:
            return None if credits is None else credits_to_micro(credits)

        return {
            "max_price_in": micro(self.max_price_in),
            "max_price_out": micro(self.max_price_out),
            "max_cost": micro(self.max_cost),
            "on_premise_only": bool(self.on_premise_only),
            "no_retention_only": bool(self.no_retention_only),
            "pin": list(self.pin),
            "exclude": list(self.exclude),
        }


class ChatCall(msgspec.Struct, kw_only=True):
    """A parsed chat request: what to ask and where to send it."""

    #: the request's ``model``: a model name or alias, a category (``fast``,
    #: ``category:fast``), ``cheapest`` or ``fastest`` (``Route.parse``)
    model: str
    messages: list[ChatMessage]
    options: GenerationOptions = GenerationOptions()
    stream: bool = False
    #: OpenAI ``stream_options.include_usage``: a last chunk with the usage
    include_usage: bool = False
    steering: Steering = Steering()


_HEADERS = {
    "x-loomnet-max-price-in": "max_price_in",
    "x-loomnet-max-price-out": "max_price_out",
    "x-loomnet-max-cost": "max_cost",
    "x-loomnet-on-premise-only": "on_premise_only",
    "x-loomnet-no-retention-only": "no_retention_only",
    "x-loomnet-pin": "pin",
    "x-loomnet-exclude": "exclude",
}
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def steering_from_headers(headers: Mapping[str, str]) -> Steering:
    """The :class:`Steering` that ``X-Loomnet-*`` headers ask for (names are matched
    case-insensitively; ``headers`` may be a starlette ``Headers``).

    Raises:
        GatewayError: ``invalid_request`` naming the header whose value is unusable.
    """
    fields: dict[str, object] = {}
    for name, value in headers.items():
        field = _HEADERS.get(name.lower())
        if field is None:
            continue
        value = value.strip()
        if field in ("pin", "exclude"):
            fields[field] = [v.strip() for v in value.split(",") if v.strip()]
        elif field in ("on_premise_only", "no_retention_only"):
            if value.lower() not in _TRUE + _FALSE:
                raise GatewayError("invalid_request", f"header {name} must be true or false, not {value[:40]!r}", param=name)
            fields[field] = value.lower() in _TRUE
        else:
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise GatewayError("invalid_request", f"header {name} must be a number of credits, not {value[:40]!r}",
                                   param=name)  # fmt: skip
            fields[field] = number
    try:
        return msgspec.convert(fields, Steering)
    except msgspec.ValidationError as exc:
        raise GatewayError("invalid_request", f"X-Loomnet header: {exc}", code=ErrorCode.BAD_REQUEST) from None


def merge_steering(body: Steering | None, headers: Steering) -> Steering:
    """``body``'s fields where it sets them, else ``headers``' (lists: the body's when
    non-empty)."""
    if body is None:
        return headers
    changes = {}
    for field in body.__struct_fields__:
        value = getattr(body, field)
        if value is None or value == []:
            changes[field] = getattr(headers, field)
        else:
            changes[field] = value
    return Steering(**changes)
