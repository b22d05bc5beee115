"""The catalog: names, aliases, provider-specific terms, and backends coming and going."""

from contextlib import asynccontextmanager

import msgspec
import pytest
import trio

from loomnet.node._catalog import Catalog
from loomnet.node.backends._base import Backend, ModelInfo
from loomnet.node.config import ExecutorConfig, ModelTerms, load_config
from loomnet.protocol import BackendError, ErrorCode

from ..limits import fail_after


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


SECRET = "sk-CANARY-catalog-77"


class HangingRuntime(Runtime):
    """A runtime that drips its answers: its model list, or its health probe, never ends
    (an HTTP adapter's timeout applies per read, so one byte a minute keeps it going)."""

    kind = "openai"
    label = "work-openai"  # what the operator named it
    endpoint = f"http://user:{SECRET}@10.0.0.7/v1"

    def __init__(self, models: list[str], *, hang_list: bool = True, hang_health: bool = False) -> None:
        super().__init__(self.kind, models)
        self.hang_list, self.hang_health = hang_list, hang_health

    async def list_models(self):
        if self.hang_list:
            await trio.sleep_forever()
        return await super().list_models()

    async def health(self):
        if self.hang_health:
            await trio.sleep_forever()
        return self.up


SLOW = msgspec.structs.replace(CONFIG, list_models_timeout=30.0)


def test_the_start_up_deadline_is_a_config_key(tmp_path):
    path = tmp_path / "executor.toml"
    path.write_text("list-models-timeout = 30.0\n")
    assert load_config(path, environ={}).list_models_timeout == 30.0
    assert ExecutorConfig().list_models_timeout == 120.0  # loading a large local model counts


@fail_after(3600)
async def test_a_backend_whose_model_list_never_ends_cannot_stall_start_up(autojump_clock):
    start = trio.current_time()
    with pytest.raises(BackendError) as info:
        await Catalog.build([HangingRuntime(["gpt-4o"])], SLOW)
    assert trio.current_time() - start == pytest.approx(30.0)
    message = info.value.message
    assert "work-openai" in message and "within 30 s" in message  # named by its label
    assert SECRET not in message and "10.0.0.7" not in message and "http" not in message


@fail_after(3600)
async def test_a_hanging_backend_starts_down_and_the_others_serve(autojump_clock):
    hanging = HangingRuntime(["gpt-4o"])
    start = trio.current_time()
    catalog = await Catalog.build([hanging, Runtime("ollama", ["llama3.2"])], SLOW)
    assert trio.current_time() - start == pytest.approx(30.0)  # asked at once, not one after the other
    assert [o.name for o in catalog.offers] == ["llama3.2"] and not catalog.is_up(hanging)
    hanging.hang_list = False  # it answers now: the health probe lists its models
    assert await catalog.check_health(timeout=5)
    assert [o.name for o in catalog.offers] == ["gpt-4o", "llama3.2"]  # in the order of the backends


@pytest.mark.parametrize("hang", ["health", "list"])
@fail_after(3600)
async def test_a_backend_dripping_its_probe_is_down_this_round(autojump_clock, hang):
    runtimes = [HangingRuntime([f"m{i}"], hang_list=False) for i in range(3)]
    catalog = await Catalog.build([*runtimes, Runtime("ollama", ["llama3.2"])], CONFIG)
    if hang == "list":  # down at start, then its listing hangs when the probe asks again
        catalog._down.add(catalog.names[0])
        catalog._listed.pop(catalog.names[0])
    for runtime in runtimes:
        runtime.hang_health, runtime.hang_list = hang == "health", hang == "list"
    start = trio.current_time()
    changed = await catalog.check_health(timeout=5)
    assert trio.current_time() - start == pytest.approx(5.0)  # one deadline, all backends at once
    expected_down = runtimes if hang == "health" else runtimes[:1]
    assert [catalog.is_up(r) for r in runtimes] == [r not in expected_down for r in runtimes]
    assert changed == (hang == "health")
    assert "llama3.2" in [o.name for o in catalog.offers]
