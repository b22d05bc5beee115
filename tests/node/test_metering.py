"""The executor's counting chain and output split (``node/_counting.py``, ``node/_metering.py``).

The server-level tests (``test_server_receipts.py``) run the issue's inputs end to end;
these pin the rules one at a time: the fallback order, the source a receipt names, and
how a count the runtime left out is filled in.
"""

from __future__ import annotations

import os

import msgspec
import pytest
import trio
from hypothesis import given, strategies as st

from loomnet.client import Ledger, TokenCounter
from loomnet.node._catalog import CatalogEntry
from loomnet.node._counting import CountingChain, prompt_text, weakest
from loomnet.node._metering import Meter, Output
from loomnet.node.backends._base import ChatParams, Usage
from loomnet.protocol import (
    ChatMessage, ChunkFrame, ModelOffer, OutputBreakdown, Receipt, SigningKey, ToolCall, ToolSpec, apportion, output_caps,
)  # fmt: skip

from .server_harness import ScriptedBackend, events, warm_tokens

PARAMS = ChatParams(model="m1", messages=[ChatMessage("user", "Say hello, please.")])
TOKENS = TokenCounter()


@pytest.fixture(autouse=True, scope="module")
def _warm():
    warm_tokens()
    TOKENS.load("cl100k_base")


class BrokenTokenCounter(TokenCounter):
    def count(self, text, model=None):
        raise RuntimeError("tiktoken's extension failed to load")


def entry(backend) -> CatalogEntry:
    return CatalogEntry(ModelOffer(name="m1"), backend, "m1")


def output(text: str = "", reasoning: str = "", calls: list[ToolCall] = ()) -> Output:
    out = Output()
    out.record(ChunkFrame(seq=0, text=text, reasoning=reasoning, tool_calls=list(calls)))
    return out


def meter(tokens: TokenCounter = TOKENS) -> Meter:
    return Meter(SigningKey(os.urandom(32)), ledger=None, tokens=tokens)  # type: ignore[arg-type]


def test_the_receipt_names_the_weakest_source_used():
    assert weakest("backend", "tokenizer") == "tokenizer"
    assert weakest("backend", None, "estimate", "tiktoken") == "estimate"
    assert weakest(None, None) is None


async def test_when_tiktoken_fails_the_estimate_counts():
    backend = ScriptedBackend(events())
    tally = await meter(BrokenTokenCounter()).count(entry(backend), PARAMS, output("Hello there!"), None)
    assert (tally.output_tokens, tally.source) == (3, "estimate")  # 12 bytes / 4
    assert tally.input_tokens == 5  # "Say hello, please." is 18 bytes


@pytest.mark.parametrize("answer", [-1, "12", True, 2.5])
async def test_a_tokenizer_answering_nonsense_is_not_trusted(answer):
    backend = ScriptedBackend(events(), counter=lambda text: answer)  # type: ignore[arg-type, return-value]
    chain = CountingChain(backend, "m1", TOKENS, budget=5)
    count = await chain.text("Hello there!")
    assert count.source == "tiktoken" and count.tokens == TOKENS.count("Hello there!")[0]


async def test_the_tokenizer_budget_is_shared_by_every_count_of_a_receipt(autojump_clock):
    backend = ScriptedBackend(events(), counter=len, count_delay=2)  # each count takes 2 s
    chain = CountingChain(backend, "m1", TOKENS, budget=5)
    started = trio.current_time()
    counts = [await chain.text(t) for t in ("one", "two", "three", "four")]
    assert [c.source for c in counts] == ["tokenizer", "tokenizer", "tiktoken", "tiktoken"]
    assert trio.current_time() - started == 5  # two answers, then the budget ran out mid-third


async def test_a_question_the_runtime_cannot_answer_does_not_stop_the_others():
    class TextOnly(ScriptedBackend):
        async def count_prompt_tokens(self, params):
            return None  # e.g. vLLM: no formatted-prompt count, but a /tokenize

    backend = TextOnly(events(), counter=lambda text: len(text.split()))
    tally = await meter().count(entry(backend), PARAMS, output("one two three"), None)
    assert (tally.output_tokens, tally.source) == (3, "tiktoken")  # the prompt fell to tiktoken


async def test_reasoning_reported_without_an_output_count_is_billed_as_hidden():
    usage = Usage(input_tokens=5, output_tokens=None, source="backend", reasoning_tokens=300)
    backend = ScriptedBackend(events(), counter=lambda text: len(text.split()))
    tally = await meter().count(entry(backend), PARAMS, output("one two three", reasoning="hmm"), usage)
    parts = tally.breakdown
    # what the 3 bytes of streamed reasoning can hold is streamed reasoning; the rest was hidden
    assert (parts.text, parts.reasoning, parts.hidden_reasoning) == (3, len("hmm") + 8, 300 - len("hmm") - 8)
    assert tally.output_tokens == 303
    assert tally.source == "tokenizer"


@pytest.mark.parametrize("summary", ["", "I should greet them."], ids=["redacted", "summarized"])
async def test_reasoning_billed_but_not_disclosed_is_what_the_streamed_parts_leave(summary):
    # Anthropic extended thinking: output_tokens 250 covers it all, no count of thinking
    usage = Usage(input_tokens=5, output_tokens=250, source="backend", reasoning_undisclosed=True)
    backend = ScriptedBackend(events(), counter=lambda text: len(text.split()))
    tally = await meter().count(entry(backend), PARAMS, output("Hello, world!", reasoning=summary), usage)
    parts, streamed = tally.breakdown, TOKENS.count(summary)[0] if summary else 0
    assert (parts.text, parts.reasoning) == (TOKENS.count("Hello, world!")[0], streamed)  # their own counts
    assert parts.hidden_reasoning == 250 - parts.text - streamed and tally.output_tokens == 250
    # a runtime that says how much it reasoned is believed instead
    said = msgspec.structs.replace(usage, reasoning_tokens=100)
    tally = await meter().count(entry(backend), PARAMS, output("Hello, world!", reasoning=summary), said)
    assert tally.breakdown.reasoning + tally.breakdown.hidden_reasoning == 100


async def test_a_cut_short_stream_bills_only_what_was_counted():
    backend = ScriptedBackend(events(), counter=lambda text: len(text.split()))
    calls = [ToolCall(id="c1", name="lookup", arguments='{"q": "a b"}')]
    tally = await meter().count(entry(backend), PARAMS, output("one two", reasoning="x y z", calls=calls), None)
    parts = tally.breakdown
    assert (parts.text, parts.reasoning, parts.tool_calls, parts.hidden_reasoning) == (2, 3, 3, 0)
    assert tally.output_tokens == 8 and tally.source == "tokenizer"


def test_a_local_prompt_count_includes_tool_specs_and_earlier_calls():
    spec = ToolSpec(name="get_weather", description="Weather now", parameters='{"type":"object"}')
    call = ToolCall(id="c1", name="lookup", arguments='{"q": 1}')
    params = ChatParams(model="m1", messages=[ChatMessage("assistant", "", tool_calls=[call])], tools=[spec])
    text = prompt_text(params)
    assert "get_weather" in text and '{"type":"object"}' in text and 'lookup{"q": 1}' in text


async def test_a_receipt_is_booked_with_its_breakdown(tmp_path):
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    m = Meter(SigningKey(os.urandom(32)), ledger, TOKENS)
    usage = Usage(input_tokens=7, output_tokens=30, source="backend", reasoning_tokens=20)
    out = output("Hi!", reasoning="Greeting the user.")
    envelope, key = await m.book(
        request_payload=b"request", client="12D3KooWclient", entry=entry(ScriptedBackend(events())), params=PARAMS,
        output=out, finish_reason="stop", usage=usage,
    )
    row = await ledger.get(key)
    await ledger.aclose()
    receipt = msgspec.msgpack.decode(envelope.payload, type=Receipt)
    assert row is not None and row.receipt_payload == envelope.payload
    assert (receipt.reasoning_tokens, receipt.hidden_reasoning_tokens, receipt.text_tokens) == (20, 0, 10)
    assert receipt.reasoning_digest and receipt.tool_calls_digest == b""


class CountingTokenCounter(TokenCounter):
    """The shared counter's counts, noting every text it is asked to count."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def count(self, text, model=None):
        self.texts.append(text)
        return TOKENS.count(text, model)


async def test_a_reported_total_over_text_alone_skips_counting_the_text():
    # the commonest receipt: the runtime reports its usage, the answer is plain text;
    # the split puts the whole total on the text whatever its seed, so no count is made
    counter = CountingTokenCounter()
    usage = Usage(input_tokens=9, output_tokens=40, source="backend")
    tally = await meter(counter).count(entry(ScriptedBackend(events())), PARAMS, output("Hello, world! " * 9), usage)
    assert counter.texts == []
    assert (tally.input_tokens, tally.output_tokens, tally.source) == (9, 40, "backend")
    assert tally.breakdown == OutputBreakdown(text=40)
    # a runtime's reported reasoning with nothing streamed to hold it is hidden, still uncounted
    said = msgspec.structs.replace(usage, reasoning_tokens=15)
    tally = await meter(counter).count(entry(ScriptedBackend(events())), PARAMS, output("Hi"), said)
    assert counter.texts == [] and tally.breakdown == OutputBreakdown(text=25, hidden_reasoning=15)
    # with reasoning streamed beside the text, the seeds decide the split: counted
    await meter(counter).count(entry(ScriptedBackend(events())), PARAMS, output("Hi", reasoning="hmm"), usage)
    assert counter.texts == ["Hi", "hmm"]


@given(
    total=st.integers(0, 5000), text_bytes=st.integers(0, 4000), seed_a=st.integers(0, 5000),
    seed_b=st.integers(0, 5000), reported=st.none() | st.integers(0, 5000),
)
def test_over_text_alone_the_split_does_not_depend_on_the_texts_count(total, text_bytes, seed_a, seed_b, reported):
    # why the count above may be skipped: apportion's answer is the same for any seed
    caps = output_caps("x" * text_bytes)
    split = [apportion(total, caps=caps, counted_text=seed, reported_reasoning=reported) for seed in (seed_a, seed_b)]
    assert split[0] == split[1]
