"""Review of issue 7 (§2 ledgers agree, §4 accounting never loses a receipt): counts a
backend or its tokenizer reports that are out of the protocol's range.

The receipt schema bounds every token count (``Tokens``: 0 .. 2**31). A runtime that
reports more (a bug, a proxy, a hostile runtime) makes the executor sign and book a
receipt that no client can decode: the client raises and books nothing, the
executor's ledger holds a receipt the client's does not.
"""

from __future__ import annotations

import pytest
import trio

from loomnet.protocol import SignedKind, open_envelope

from .server_harness import Finished, Harness, ScriptedBackend, TextDelta, Usage, events, warm_tokens


@pytest.fixture(autouse=True, scope="module")
def _warm():
    warm_tokens()


async def _ask_and_open(tmp_path, backend):
    harness = await Harness.start(tmp_path, [backend], ledger=":memory:")
    try:
        async with trio.open_nursery() as nursery:
            end = await harness.open(nursery, "m1")
            # read frames without decoding the receipt (that is what we check)
            from loomnet.protocol import ErrorFrame, ReceiptFrame

            while True:
                frame = await end.next_frame()
                if isinstance(frame, (ReceiptFrame, ErrorFrame)):
                    break
            await end.stream.close()
        rows = await harness.server.ledger.entries(limit=10)
        return frame, rows
    finally:
        await harness.aclose()


@pytest.mark.parametrize("usage", [
    Usage(input_tokens=5, output_tokens=(1 << 31) + 1, source="backend"),
    Usage(input_tokens=(1 << 40), output_tokens=3, source="backend"),
], ids=["output", "input"])
async def test_backend_count_over_schema_never_makes_an_undecodable_receipt(tmp_path, usage):
    """Issue 7 §2: "Both ledgers always hold the same set of receipt digests"; §4:
    "any failure of a counting step falls back down the chain ... and the receipt is
    issued". A runtime reporting a count over the receipt schema's maximum (2**31) must
    not make the executor sign and book a receipt every client refuses to decode."""
    backend = ScriptedBackend(events(TextDelta("Hello there."), Finished(finish_reason="stop", usage=usage)))
    frame, rows = await _ask_and_open(tmp_path, backend)
    from loomnet.protocol import ReceiptFrame

    assert isinstance(frame, ReceiptFrame)
    receipt, _ = open_envelope(SignedKind.RECEIPT, frame.envelope)  # a client's decode: must not raise


async def test_tokenizer_count_over_schema_falls_back(tmp_path):
    """Issue 7 §4: "any failure of a counting step falls back down the chain (model
    tokenizer → tiktoken → estimate) and the receipt is issued". A model tokenizer
    answering nonsense (2**40 tokens for a short prompt) is such a failure; the
    executor must not bill it in a receipt no client can decode."""
    backend = ScriptedBackend(events(TextDelta("Hello there."), Finished(finish_reason="stop", usage=None)),
                              counter=lambda text: 1 << 40)
    frame, rows = await _ask_and_open(tmp_path, backend)
    from loomnet.protocol import ReceiptFrame

    assert isinstance(frame, ReceiptFrame)
    receipt, _ = open_envelope(SignedKind.RECEIPT, frame.envelope)
    assert receipt.input_tokens < (1 << 31)


async def test_vllm_usage_over_schema_through_the_real_adapter(tmp_path, nursery):
    """Issue 7 §4 ("the receipt is issued, naming the source"), through the real
    OpenAI-compatible adapter: a vLLM usage chunk whose ``completion_tokens`` is over
    2**31 ends the answer with INTERNAL and no receipt on either side, after the whole
    text streamed."""
    from loomnet.node.backends._config import BackendConfig
    from loomnet.node.backends.openai_compat import OpenAICompatBackend

    from .asgi_server import serve_app
    from .fake_openai import FakeOpenAI

    fake = FakeOpenAI(flavour="vllm", usage={"prompt_tokens": 11, "completion_tokens": (1 << 31) + 7,
                                             "total_tokens": (1 << 31) + 18})
    url = await serve_app(nursery, fake)
    backend = OpenAICompatBackend(BackendConfig(provider="vllm", endpoint=f"{url}/v1", timeout=5.0))
    try:
        model = (await backend.list_models())[0].name
        harness = await Harness.start(tmp_path, [backend], ledger=":memory:")
        try:
            answer = await harness.ask(model)
        finally:
            await harness.aclose()
    finally:
        await backend.aclose()
    assert answer.error is None, answer.error
    assert answer.receipt is not None
