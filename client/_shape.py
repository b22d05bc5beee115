"""What the router must know of a request, derived from the request itself.

* **capabilities**: tools (tool specs, or tool calls/turns in the history) → ``tools``;
  images → ``vision``; a JSON ``response_format`` → ``json`` (the same rule as the
  executor's ``ChatParams.needs``, so a candidate the router keeps is not refused for it).
* **prompt tokens**: the client's count of everything an executor counts as prompt
  (message texts, earlier tool calls, tool specs), padded to a worst case, because
  the executor counts with the model's own tokenizer and chat template, which the
  client cannot see: +25 %, plus :data:`PER_MESSAGE` tokens per message, plus
  :data:`PER_REQUEST` for the template's own framing and default system prompt, plus
  :data:`PER_IMAGE` per image. The padding errs high: a budget reserves a little too
  much, never too little.
* **max tokens**: as the request says, else the client's assumption
  (``ClientConfig.assumed_max_tokens``).
* **min context**: prompt tokens + max tokens.

The worst-case cost of a request at an offer's prices is then
``cost_of(prompt_tokens, max_tokens, price_in, price_out)`` (micro-credits, rounded up).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from loomnet.protocol import ChatMessage, GenerationOptions, cost_of

from ._offers import Offer
from ._route import RequestShape, Route
from ._tokens import TokenCounter

__all__ = ["PER_IMAGE", "PER_MESSAGE", "PER_REQUEST", "acount_prompt_tokens", "needed_capabilities", "shaped_route", "worst_case_cost"]

#: tokens a chat template adds per message, at most, in the templates we know (role
#: markers and separators); a few more than any of them
PER_MESSAGE = 8
#: tokens a chat template adds once per request, at most: its framing and the default
#: system prompt some templates insert when the request has none (SmolLM2's makes "hi"
#: 31 tokens; Llama 3.1's date preamble and Qwen's identity line are ~20-30)
PER_REQUEST = 128
#: tokens one image may cost a vision model (OpenAI's high-detail 2048×2048 is 1105;
#: Llama 3.2 Vision's tiles ~1601); a generous ceiling
PER_IMAGE = 2048


def needed_capabilities(messages: Sequence[ChatMessage], options: GenerationOptions) -> frozenset[str]:
    """The capabilities a candidate needs for this request (see the module doc)."""
    needed = set()
    if options.tools or any(m.tool_calls or m.role == "tool" for m in messages):
        needed.add("tools")
    if options.response_format is not None and options.response_format.type != "text":
        needed.add("json")
    if any(m.images for m in messages):
        needed.add("vision")
    return frozenset(needed)


def _prompt_text(messages: Sequence[ChatMessage], options: GenerationOptions) -> str:
    parts = [m.content for m in messages]
    parts += [f"{c.name}\n{c.arguments}" for m in messages for c in m.tool_calls]
    parts += [f"{t.name}\n{t.description}\n{t.parameters}" for t in options.tools]
    if options.response_format is not None and options.response_format.schema:
        parts.append(options.response_format.schema)
    return "\n".join(parts)


async def acount_prompt_tokens(
    tokens: TokenCounter, messages: Sequence[ChatMessage], options: GenerationOptions, model: str | None = None
) -> int:
    """The padded worst-case prompt tokens (see the module doc): a short prompt is counted on the
    spot (a worker-thread hop costs more than counting it, on every request's time to
    first token), a long one in a worker thread (``TokenCounter.acount``)."""
    counted, _ = await tokens.acount(_prompt_text(messages, options), model)
    return _padded(counted, messages)


def _padded(counted: int, messages: Sequence[ChatMessage]) -> int:
    images = sum(len(m.images) for m in messages)
    return -(-counted * 5 // 4) + PER_MESSAGE * len(messages) + PER_REQUEST + PER_IMAGE * images


def worst_case_cost(shape: RequestShape, offer: Offer) -> int:
    """Micro-credits this request costs at most at ``offer``'s prices."""
    return cost_of(shape.prompt_tokens, shape.max_tokens, offer.model.price_in, offer.model.price_out)


def shaped_route(route: Route, shape: RequestShape, capabilities: frozenset[str]) -> Route:
    """``route`` with what the request itself demands added: its capabilities, and a
    context of at least prompt + max tokens."""
    least = shape.prompt_tokens + shape.max_tokens
    return msgspec.structs.replace(
        route,
        capabilities=route.capabilities | capabilities,
        min_context=least if route.min_context is None else max(route.min_context, least),
    )
