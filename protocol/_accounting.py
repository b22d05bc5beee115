"""What a receipt's output tokens were spent on, and the bounds a client checks them against.

Both sides use this module: the executor to split the output tokens it bills into
parts (:func:`apportion`), the client to check a receipt's parts against what it
was actually streamed (:func:`breakdown_problems`). It is pure: text in, numbers out.

Why the bounds are sound (for any tokenizer, any script)
--------------------------------------------------------
Every tokenizer a runtime uses today is byte-level BPE (GPT-2/Llama-3/Qwen/SmolLM
style) or SentencePiece with byte fallback (Llama-2, Gemma, Gemini). In both, every
ordinary token decodes to at least one byte of UTF-8 and the decoded tokens
concatenate to the text, so **a text of B UTF-8 bytes was produced by at most B
ordinary tokens**, whatever the script: Korean takes 3 bytes a syllable and at most 3
tokens, an emoji 4 bytes and at most 4 tokens. The only tokens without bytes are
control tokens (end of turn, role markers, ``<think>`` tags), of which an answer
carries a handful: ``PART_SLACK`` covers them. Counting the other way round is not
sound: one tokenizer's count says little about another's (SmolLM2 uses twice
tiktoken's tokens on Korean), which is why the client no longer compares counts.

Tool calls are re-serialized by the runtime: the model wrote a JSON wrapper around
the name and arguments (``{"name": …, "arguments": …}`` inside tool-call tags, with
its own spacing), which the runtime parsed away. So a call may cost up to twice the
bytes of its name and arguments plus ``TOOL_CALL_SLACK`` tokens of wrapper.

Reasoning a backend counted but never returned (Gemini's thoughts, OpenAI's
``reasoning_tokens`` without text, Anthropic's redacted or summarized thinking, whose
size it does not even report) has no bytes to check against: a client accepts it
only up to a limit it sets itself.

What this catches: an executor that bills more tokens for the visible text, the
streamed reasoning or the tool calls than their bytes allow, or parts that do not add
up. What it cannot catch: over-billing within the byte bound (an honest tokenizer
averages ~4 bytes a token on English), and hidden reasoning within the client's limit.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ._messages import Receipt, ToolCall

__all__ = [
    "PART_SLACK",
    "TOOL_CALL_SLACK",
    "OutputBreakdown",
    "OutputCaps",
    "apportion",
    "breakdown_problems",
    "output_caps",
]

#: Control tokens (end of turn, role markers, think tags) a part may carry without bytes.
PART_SLACK = 8
#: Wrapper tokens per tool call (tags, the JSON around name and arguments).
TOOL_CALL_SLACK = 64


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


class OutputCaps(msgspec.Struct, frozen=True):
    """The most output tokens each streamed part can honestly cost."""

    text: int
    reasoning: int
    tool_calls: int


class OutputBreakdown(msgspec.Struct, frozen=True, kw_only=True):
    """Output tokens by what they were spent on; they sum to the billed output tokens."""

    text: int = 0
    reasoning: int = 0
    hidden_reasoning: int = 0
    tool_calls: int = 0

    @property
    def total(self) -> int:
        return self.text + self.reasoning + self.hidden_reasoning + self.tool_calls


def output_caps(text: str, reasoning: str = "", tool_calls: Sequence[ToolCall] = ()) -> OutputCaps:
    """The bound of each part, from the bytes that were streamed (see the module doc)."""
    calls = sum(2 * (_utf8_len(c.name) + _utf8_len(c.arguments)) + TOOL_CALL_SLACK for c in tool_calls)
    return OutputCaps(
        text=_utf8_len(text) + PART_SLACK,
        reasoning=_utf8_len(reasoning) + PART_SLACK if reasoning else 0,
        tool_calls=calls,
    )


def apportion(
    total: int,
    *,
    caps: OutputCaps,
    counted_text: int,
    counted_reasoning: int = 0,
    counted_tool_calls: int = 0,
    reported_reasoning: int | None = None,
    undisclosed_reasoning: bool = False,
) -> OutputBreakdown:
    """Split ``total`` billed output tokens into parts, within each part's cap if possible.

    Args:
        total: the output tokens billed (backend usage, or the executor's own count).
        caps: :func:`output_caps` of what was streamed.
        counted_text, counted_reasoning, counted_tool_calls: the executor's own counts of
            each streamed part (any tokenizer); they seed the split.
        reported_reasoning: reasoning tokens the backend reported inside ``total``, or
            None. What of it the streamed reasoning cannot hold is hidden reasoning.
        undisclosed_reasoning: the model reasoned and ``total`` bills all of it, but
            the backend returned it only in part (a summary) or not at all, and did not
            say how much it was (Anthropic extended thinking). Without
            ``reported_reasoning``, the tokens left once each streamed part has its
            own count (and the tool calls their wrappers) are that reasoning: hidden.

    What the counters missed (template tokens, tool-call wrappers, a tokenizer that
    differs from the model's) goes to the parts that still have room, tool calls first.
    Only a total beyond every cap is put on the text, where a client will see it
    (unless ``undisclosed_reasoning`` says where it went).
    """
    left = max(total, 0)
    if reported_reasoning is not None:
        said = min(max(reported_reasoning, 0), left)
        reasoning = min(said, caps.reasoning)
        hidden = said - reasoning
    else:
        reasoning, hidden = min(counted_reasoning, caps.reasoning, left), 0
    left -= reasoning + hidden
    text = min(counted_text, caps.text, left)
    left -= text
    tools = min(counted_tool_calls, caps.tool_calls, left)
    left -= tools
    room = min(left, caps.tool_calls - tools)
    tools, left = tools + room, left - room
    if reported_reasoning is None and undisclosed_reasoning:
        hidden, left = left, 0
    if reported_reasoning is None:
        room = min(left, caps.reasoning - reasoning)
        reasoning, left = reasoning + room, left - room
    text += left
    return OutputBreakdown(text=text, reasoning=reasoning, hidden_reasoning=hidden, tool_calls=tools)


def breakdown_problems(receipt: Receipt, caps: OutputCaps, *, max_hidden_reasoning: int) -> list[str]:
    """Why a receipt's output parts cannot be honest for what was streamed; [] if they can."""
    problems = []
    if receipt.text_tokens < 0:
        problems.append(
            f"its output parts ({receipt.reasoning_tokens} reasoning, {receipt.hidden_reasoning_tokens} hidden "
            f"reasoning, {receipt.tool_call_tokens} tool calls) add up to more than its {receipt.output_tokens} "
            "output tokens"
        )
        return problems
    for part, billed, cap in (
        ("visible text", receipt.text_tokens, caps.text),
        ("streamed reasoning", receipt.reasoning_tokens, caps.reasoning),
        ("tool calls", receipt.tool_call_tokens, caps.tool_calls),
    ):
        if billed > cap:
            problems.append(f"it bills {billed} tokens for the {part}, more than the at most {cap} its bytes allow")
    if receipt.hidden_reasoning_tokens > max_hidden_reasoning:
        problems.append(
            f"it bills {receipt.hidden_reasoning_tokens} tokens of hidden reasoning, over this client's "
            f"limit of {max_hidden_reasoning}"
        )
    return problems
