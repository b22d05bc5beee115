"""The catalog: names, aliases, provider-specific terms, and backends coming and going."""

from contextlib import asynccontextmanager

import pytest

from loomnet.node._catalog import Catalog
from loomnet.node.backends._base import Backend, ModelInfo
from loomnet.node.config import ExecutorConfig, ModelTerms
from loomnet.protocol import BackendError, ErrorCode


class Runtime(Backend):
    """A stand-in runtime whose availability a test switches (no I/O to fake here)."""

    def __init__(self, kind: str, models: list[str], *, up: bool = True) -> None:
        self.kind, self.models, self.up = kind, models, up

    @asynccontextmanager
    async def stream_chat(self, params):  # pragma: no cover - not used here
        yield iter(())

    async def list_models(self):
        if not self.up:
            raise BackendError(f"{self.kind} is down", code=ErrorCode.BACKEND_UNAVAILABLE)
        return [ModelInfo(name=m, context_length=4096, capabilities=["chat"]) for m in self.models]

    async def health(self):
        return self.up


CONFIG = ExecutorConfig(models=[
    ModelTerms(name="ollama:llama3.2", aliases=["llama"], price_in=1.0),
    ModelTerms(name="llama3.2", price_in=9.0),
])


async def test_names_aliases_and_provider_specific_terms():
    catalog = await Catalog.build([Runtime("ollama", ["llama3.2"]), Runtime("vllm", ["llama3.2", "qwen"])], CONFIG)
    entry = catalog.lookup("LLAMA")
    assert entry.backend.kind == "ollama" and entry.offer.price_in == 1_000_000  # provider:model terms
    assert [o.name for o in catalog.offers] == ["llama3.2", "qwen"]  # the first backend wins a name
    assert catalog.lookup("nope") is None


async def test_nothing_to_serve_is_a_clear_error():
    with pytest.raises(BackendError, match="no model to serve .*ollama is down"):
        await Catalog.build([Runtime("ollama", ["m"], up=False)], CONFIG)


async def test_backends_going_down_and_coming_back():
    ollama, vllm = Runtime("ollama", ["llama3.2"]), Runtime("vllm", ["qwen"], up=False)
    catalog = await Catalog.build([ollama, vllm], CONFIG)  # vllm is down at start
    assert [o.name for o in catalog.offers] == ["llama3.2"]
    assert not await catalog.check_health(timeout=1)
    vllm.up = True  # it came up: its models are listed now
    assert await catalog.check_health(timeout=1)
    assert [o.name for o in catalog.offers] == ["llama3.2", "qwen"]
    ollama.up = False
    assert await catalog.check_health(timeout=1)
    assert [o.name for o in catalog.offers] == ["qwen"] and not catalog.is_up(catalog.lookup("llama").backend)
    ollama.up = True
    assert await catalog.check_health(timeout=1) and len(catalog.offers) == 2
