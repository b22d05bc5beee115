"""Every backend behind one executor, end to end over libp2p: counts, tools, failures.

The runtimes that cannot run here are faithful fakes on real loopback HTTP
(``tests/node/fake_*.py``); the receipt a client verifies must carry exactly the
usage the backend reported.
"""

import time

import msgspec
import pytest
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.node import Executor, ExecutorConfig, ModelTerms
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.ollama import OllamaBackend
from loomnet.protocol import ChatMessage, ErrorCode, NoOfferError, RemoteError, ToolSpec

from ..node.asgi_server import serve_app
from ..node.fake_ollama import FakeOllama

pytestmark = pytest.mark.integration

HELLO = [ChatMessage("user", "Say hello.")]


async def start_pair(nursery, tmp_path, backends, models=(), **settings):
    config = ExecutorConfig(
        **settings,
        data_dir=str(tmp_path / "executor"),
        listen=["/ip4/127.0.0.1/tcp/0"],
        models=list(models),
        announce_local=False,
        request_read_timeout=5.0,
        ack_timeout=5.0,
    )
    executor = Executor(config, backends=backends)
    await nursery.start(executor.run)
    client = LoomClient(ClientConfig(
        data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]], discover_local=False, offer_timeout=2.0
    ))
    await nursery.start(client.run)
    return executor, client


async def booked_on_both_sides(executor, client, result):
    from loomnet.protocol import digest

    key = digest(result.receipt_envelope.payload)
    mine = await client.ledger.get(key)
    with trio.fail_after(10):
        while (theirs := await executor.server.ledger.get(key)) is None:
            await trio.sleep(0.02)
    assert mine.receipt_payload == theirs.receipt_payload


async def test_ollama_receipt_carries_the_reported_usage(nursery, tmp_path):
    fake = FakeOllama()
    fake.pieces = ["Hel", "lo ", "there", "!"]
    fake.prompt_eval_count, fake.eval_count = 31, 4
    url = await serve_app(nursery, fake)
    backend = OllamaBackend(BackendConfig(provider="ollama", endpoint=url, models=["llama3.2"]))
    executor, client = await start_pair(
        nursery, tmp_path, [backend], [ModelTerms(name="ollama:llama3.2", aliases=["llama"], price_in=1.0, price_out=2.0)]
    )
    with trio.fail_after(30):
        result = await client.chat(HELLO, model="llama")
    assert result.text == "Hello there!"
    r = result.receipt
    assert (r.input_tokens, r.output_tokens, r.count_source) == (31, 4, "backend")
    assert (r.price_in, r.price_out) == (1_000_000, 2_000_000)
    offer = client.offers()[0].model
    assert offer.name == "llama3.2" and offer.on_premise and "tools" in offer.capabilities
    await booked_on_both_sides(executor, client, result)


async def test_tool_calls_pass_through_and_are_signed_for(nursery, tmp_path):
    fake = FakeOllama()
    fake.pieces = []
    fake.tool_calls = [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    url = await serve_app(nursery, fake)
    backend = OllamaBackend(BackendConfig(provider="ollama", endpoint=url, models=["llama3.2"]))
    executor, client = await start_pair(nursery, tmp_path, [backend])
    tool = ToolSpec(name="get_weather", description="Weather now", parameters='{"type":"object","properties":{"city":{"type":"string"}}}')
    with trio.fail_after(30):
        result = await client.chat(HELLO, model="llama3.2", tools=[tool])
    [call] = result.tool_calls
    assert call.name == "get_weather" and '"Oslo"' in call.arguments
    assert result.receipt.finish_reason == "tool_calls" and result.receipt.tool_calls_digest
    sent = fake.last_request
    assert sent["tools"][0]["function"]["name"] == "get_weather"


async def test_unsupported_feature_is_refused_before_the_backend_is_called(nursery, tmp_path):
    from loomnet.protocol import ImagePart

    fake = FakeOllama()  # the default fake model has no vision capability
    url = await serve_app(nursery, fake)
    backend = OllamaBackend(BackendConfig(provider="ollama", endpoint=url, models=["llama3.2"]))
    executor, client = await start_pair(nursery, tmp_path, [backend])
    picture = [ChatMessage("user", "What is this?", images=[ImagePart(media_type="image/png", data=b"\x89PNG...")])]
    before = len(fake.chat_requests)
    # the client routes only to offers with the capabilities a request needs: nothing is sent
    with trio.fail_after(30), pytest.raises(NoOfferError, match="with vision"):
        await client.chat(picture, model="llama3.2")
    # a request that reaches the executor anyway (a stale advert, another client) is refused there
    from loomnet.client import ChatStream
    from loomnet.client._chat_stream import RequestOptions

    stream = ChatStream(client.stream_kit(), client.offers()[0], picture, RequestOptions())
    with trio.fail_after(30), pytest.raises(RemoteError) as info:
        try:
            await stream.open()
            await stream.start()
        finally:
            await stream.aclose()
    assert info.value.code == ErrorCode.UNSUPPORTED_FEATURE
    assert len(fake.chat_requests) == before


async def test_backend_dying_mid_stream_bills_exactly_what_was_sent(nursery, tmp_path):
    fake = FakeOllama()
    fake.pieces = ["one ", "two ", "three ", "four"]
    fake.error_after = 2  # two content lines, then an {"error"} line with HTTP 200
    url = await serve_app(nursery, fake)
    backend = OllamaBackend(BackendConfig(provider="ollama", endpoint=url, models=["llama3.2"], max_retries=0))
    executor, client = await start_pair(nursery, tmp_path, [backend])
    received = []
    with trio.fail_after(30), pytest.raises(RemoteError) as info:
        async with client.stream_chat(HELLO, model="llama3.2") as stream:
            async for text in stream:
                received.append(text)
    error = info.value
    assert error.code == ErrorCode.BACKEND_ERROR and error.retryable
    assert "".join(received) == "one two "
    partial = error.result
    assert partial.receipt.finish_reason == "error" and partial.text == "one two "
    assert partial.receipt.count_source in ("tiktoken", "estimate")  # the runtime's usage never came
    assert partial.receipt.output_tokens > 0
    await booked_on_both_sides(executor, client, partial)


async def test_hosted_backends_report_usage_and_are_advertised_as_hosted(nursery, tmp_path):
    from loomnet.node.backends.anthropic import AnthropicBackend
    from loomnet.node.backends.gemini import GeminiBackend

    from ..node import fake_anthropic, fake_gemini

    anthropic = fake_anthropic.FakeAnthropic()
    anthropic.text = ["Bonjour", "!"]
    gemini = fake_gemini.FakeGemini()
    gemini.text = ["Hallo", "!"]
    a_url = await serve_app(nursery, anthropic)
    g_url = await serve_app(nursery, gemini)
    backends = [
        AnthropicBackend(BackendConfig(provider="anthropic", endpoint=a_url, api_key=fake_anthropic.KEY, models=[fake_anthropic.MODEL])),
        GeminiBackend(BackendConfig(provider="gemini", endpoint=g_url + fake_gemini.PREFIX, api_key=fake_gemini.KEY, models=[fake_gemini.MODEL])),
    ]
    executor, client = await start_pair(nursery, tmp_path, backends)
    with trio.fail_after(30):
        a = await client.chat(HELLO, model=fake_anthropic.MODEL, max_tokens=50)
        g = await client.chat(HELLO, model=fake_gemini.MODEL, max_tokens=50)
    assert a.text == "Bonjour!" and g.text == "Hallo!"
    # Anthropic bills input + cache writes + cache reads; output is the cumulative count, once
    ra = a.receipt
    assert (ra.input_tokens, ra.output_tokens, ra.count_source) == (12 + 3 + 5, 7, "backend")
    rg = g.receipt
    assert (rg.input_tokens, rg.output_tokens, rg.count_source) == (11 + 2, 6 + 4, "backend")
    advert = client.member.table.advert_of(executor.peer_id, now=time.time())
    assert not advert.on_premise and not any(m.on_premise for m in advert.models)
    wire = msgspec.json.encode(advert).decode()
    assert fake_anthropic.KEY not in wire and "anthropic" not in wire.lower() and "127.0.0.1:" + a_url.rsplit(":", 1)[1] not in wire


@pytest.mark.parametrize("provider", ["openai", "groq", "openrouter", "lmstudio", "llamacpp", "vllm"])
async def test_openai_compatible_receipts_carry_the_reported_usage(nursery, tmp_path, provider):
    from loomnet.node.backends.openai_compat import OpenAICompatBackend

    from ..node.fake_openai import USAGE, FakeOpenAI

    fake = FakeOpenAI(flavour=provider)
    url = await serve_app(nursery, fake)
    hosted = provider in ("openai", "groq", "openrouter")
    backend = OpenAICompatBackend(
        BackendConfig(provider=provider, endpoint=url + "/v1", api_key="sk-test-SECRET123" if hosted else None, models=["m1"])
    )
    executor, client = await start_pair(nursery, tmp_path, [backend])
    with trio.fail_after(30):
        result = await client.chat(HELLO, model="m1")
    assert result.text == "Hello, world!"
    r = result.receipt
    assert (r.input_tokens, r.output_tokens, r.count_source) == (USAGE["prompt_tokens"], USAGE["completion_tokens"], "backend")
    assert client.offers()[0].model.on_premise is not hosted
    await booked_on_both_sides(executor, client, result)


async def test_a_pending_ack_does_not_hold_the_generation_slot(nursery, tmp_path):
    # capacity 1 limits generations, not receipt settlement: while the executor still
    # waits for the counter-signature of one answer, the next request is served
    import os

    from loomnet.protocol import (
        END, INFER_PROTOCOL, NEED_DATA, FrameDecoder, InferenceRequest, ReceiptFrame, RequestFrame,
        SignedKind, decode_frame, encode_frame, encode_frame_body, seal,
    )

    url = await serve_app(nursery, FakeOllama())
    backend = OllamaBackend(BackendConfig(provider="ollama", endpoint=url, models=["llama3.2"]))
    executor, client = await start_pair(nursery, tmp_path, [backend])
    request = InferenceRequest(
        audience=executor.peer_id, nonce=os.urandom(16), created_at=time.time(), model="llama3.2", messages=HELLO
    )
    frame = encode_frame(encode_frame_body(RequestFrame(seal(SignedKind.REQUEST, request, client.key))))
    with trio.fail_after(30):
        stream = await client.member.node.open_stream(executor.peer_id, INFER_PROTOCOL, addrs=executor.info.addrs, timeout=5)
        await stream.send_all(frame, timeout=5)
        decoder, got_receipt = FrameDecoder(), False
        while not got_receipt:  # read up to the receipt, and never acknowledge it
            decoder.receive_data(await stream.receive_some(timeout=10))
            while (body := decoder.next_frame()) not in (NEED_DATA, END):
                got_receipt |= isinstance(decode_frame(body), ReceiptFrame)
        assert executor.server.load == 0
        for _ in range(3):
            assert (await client.chat(HELLO, model="llama3.2")).text == "Hello, world!"
        await stream.reset()
    assert executor.server.refused == 0


async def test_a_backend_that_goes_down_leaves_the_advert_and_comes_back(nursery, tmp_path):
    fake = FakeOllama()
    url = await serve_app(nursery, fake)
    backend = OllamaBackend(BackendConfig(provider="ollama", endpoint=url, models=["llama3.2"], max_retries=0))
    executor, client = await start_pair(nursery, tmp_path, [backend], health_interval=0.1)

    def offered() -> list[str]:
        advert = client.member.table.advert_of(executor.peer_id, now=time.time())
        return [m.name for m in advert.models] if advert else []

    async def wait_for(names):
        with trio.fail_after(10):
            while offered() != names:
                await client.member.table_changed.wait()

    await wait_for(["llama3.2"])
    fake.root_status = 500  # Ollama stops answering its liveness probe
    await wait_for([])
    with pytest.raises(NoOfferError):
        await client.chat(HELLO, model="llama3.2", max_tokens=4)
    fake.root_status = 200
    await wait_for(["llama3.2"])
    with trio.fail_after(10):
        assert (await client.chat(HELLO, model="llama3.2")).text == "Hello, world!"
