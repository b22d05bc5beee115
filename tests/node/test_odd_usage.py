"""Review of issue 7 §4/§5: usage fields that are present but are not counts.

§4: "any failure of a counting step falls back down the chain (model tokenizer →
tiktoken → estimate) and the receipt is issued, naming the source". §5: "Any count a
backend leaves out is counted another way". A count that is there but is not a
count (negative, a string, a float) is a count the backend did not give: the
OpenAI-compatible and Gemini adapters drop it and count another way; Ollama ends an
answer that streamed whole with a retryable BACKEND_ERROR, and Anthropic bills a
negative count into a receipt that cannot be booked (INTERNAL, no receipt).
"""

from __future__ import annotations

import pytest

from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.anthropic import AnthropicBackend
from loomnet.node.backends.ollama import OllamaBackend

from .asgi_server import serve_app
from .fake_anthropic import KEY, MODEL, FakeAnthropic
from .fake_ollama import FakeOllama
from .server_harness import Harness, warm_tokens


@pytest.fixture(autouse=True, scope="module")
def _warm():
    warm_tokens()


async def _ask(tmp_path, backend, model):
    harness = await Harness.start(tmp_path, [backend], ledger=":memory:")
    try:
        return await harness.ask(model)
    finally:
        await harness.aclose()
        await backend.aclose()


@pytest.mark.parametrize("bad", [-1, "12", 3.5], ids=["negative", "string", "float"])
async def test_ollama_done_line_with_a_non_count_still_gets_a_receipt(tmp_path, nursery, bad):
    """§4/§5 (module doc): Ollama's ``eval_count`` that is not a count, after the whole
    answer streamed, must fall back to another count, not end the answer with an error."""
    fake = FakeOllama()
    fake.url = await serve_app(nursery, fake)
    fake.eval_count = bad
    backend = OllamaBackend(BackendConfig(provider="ollama", endpoint=fake.url, max_retries=0))
    answer = await _ask(tmp_path, backend, "llama3.2:latest")
    assert answer.text == "Hello, world!"
    assert answer.error is None, answer.error
    assert answer.receipt is not None and answer.receipt.count_source != "backend"


@pytest.mark.parametrize("field", ["input_tokens", "output_tokens"])
async def test_anthropic_negative_count_still_gets_a_receipt(tmp_path, nursery, field):
    """§4/§5 (module doc): an Anthropic usage count below 0 is not a count; the answer
    must still get a receipt (counted another way), not INTERNAL without one."""
    fake = FakeAnthropic()
    fake.url = await serve_app(nursery, fake)
    setattr(fake, field, -50)
    backend = AnthropicBackend(BackendConfig(provider="anthropic", endpoint=fake.url, api_key=KEY, timeout=5.0,
                                             max_retries=0, models=[MODEL]))
    answer = await _ask(tmp_path, backend, MODEL)
    assert answer.error is None, answer.error
    assert answer.receipt is not None
    assert answer.receipt.input_tokens >= 0 and answer.receipt.output_tokens >= 1
