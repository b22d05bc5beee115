"""The gateway against what an executor or a caller may do to it, end to end over real
libp2p and loopback HTTP (the runtime is the faithful fake ``tests/node/fake_openai.py``):
a model name no header may hold, tool arguments nested past Python's stack, a caller that
stops reading its answer, a request too large for the network's frame."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from ..node.fake_openai import FakeOpenAI
from .gateway_kit import start_client, start_fake_executor, start_gateway, wait_until

pytestmark = pytest.mark.integration

ANTHROPIC = {"anthropic-version": "2023-06-01"}


async def post(url: str, path: str, body: dict, **headers) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return await http.post(path, json=body, headers=headers)


async def test_a_model_name_no_header_may_hold_is_escaped_in_the_header(nursery, tmp_path, monkeypatch):
    """A hostile executor names its model with CR/LF and non-ASCII (loomnet's own never
    offers a name with control characters: that check is switched off here, as a modified
    executor would): the answer still comes, the name is %-escaped in ``x-loomnet-model``
    (no header is injected) and intact in the body."""
    from loomnet.node import _catalog, _config_terms

    monkeypatch.setattr(_catalog, "_printable", lambda name: True)
    monkeypatch.setattr(_config_terms, "bad_character", lambda name: None)  # its config check too
    hostile = "evil\r\nset-cookie: stolen=1 \u00fc"
    fake = FakeOpenAI(flavour="vllm")
    executor = await start_fake_executor(nursery, tmp_path, fake, provider="vllm", backend_model=hostile)
    server = await start_gateway(nursery, await start_client(nursery, tmp_path, executor))
    model = f"vllm:{hostile}"
    for stream in (False, True):
        answer = await post(server.url, "/v1/chat/completions",
                            {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert answer.status_code == 200, answer.text[:300]
        assert "set-cookie" not in answer.headers
        if not stream:
            served = answer.json()["model"]
            assert answer.json()["choices"][0]["message"]["content"]
        else:
            assert answer.text.rstrip().endswith("data: [DONE]")
            served = json.loads(answer.text.split("data: ", 1)[1].split("\n", 1)[0])["model"]
        assert hostile in served  # the body (JSON) carries the name as it is
        assert answer.headers["x-loomnet-model"] == served.replace(hostile, "evil%0D%0Aset-cookie: stolen=1 %C3%BC")


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_arguments_nested_past_the_stack_reach_an_anthropic_caller(nursery, tmp_path, stream):
    """A backend's tool call whose arguments nest 100 000 deep: the Anthropic side cannot
    check that they are an object, so it passes them on as unparsed text (its documented
    wrapper), in a 200, whole and streamed; never a 500 or a cut stream."""
    fake = FakeOpenAI(flavour="vllm", pieces=[], finish_reason="tool_calls", fragment_size=1 << 20)
    fake.tool_calls = [{"id": "call_1", "name": "f", "arguments": "[" * 100_000 + "]" * 100_000}]
    executor = await start_fake_executor(nursery, tmp_path, fake, provider="vllm")
    server = await start_gateway(nursery, await start_client(nursery, tmp_path, executor))
    body = {"model": "vllm:m1", "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "f?"}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}]}  # fmt: skip
    answer = await post(server.url, "/v1/messages", body, **ANTHROPIC)
    assert answer.status_code == 200, answer.text[:300]
    if stream:
        events = [line.removeprefix("event: ") for line in answer.text.splitlines() if line.startswith("event: ")]
        assert events[-1] == "message_stop" and "error" not in events, events
    else:
        (block,) = [b for b in answer.json()["content"] if b["type"] == "tool_use"]
        assert block["name"] == "f" and len(json.dumps(block["input"])) > 200_000


async def test_a_caller_that_stops_reading_is_cut_off_and_frees_the_executor(nursery, tmp_path):
    """A caller reads nothing of a large streamed answer. After ``send-timeout`` without
    progress its connection is closed and its request cancelled (the executor hangs up on
    its runtime), so it holds no executor stream; the next caller is answered."""
    fake = FakeOpenAI(flavour="vllm", pieces=["x" * 50_000] * 200)  # 10 MB: past every buffer on the way
    executor = await start_fake_executor(nursery, tmp_path, fake, provider="vllm")
    client = await start_client(nursery, tmp_path, executor, max_streams_per_executor=1)
    server = await start_gateway(nursery, client, send_timeout=1.0)
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "vllm:m1", "stream": True, "messages": [{"role": "user", "content": "long"}]}).encode()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((host, int(port)))
    try:
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        await wait_until(lambda: fake.in_flight == 1, timeout=30)
        await wait_until(lambda: server.gateway.statistics().hung_up >= 1, timeout=60)
        await wait_until(lambda: server.gateway.statistics().in_flight == 0 and fake.in_flight == 0, timeout=30)
        # the one executor stream this client may hold is free again: the next caller is answered
        fake.pieces = ["Hello", "!"]
        answer = await post(server.url, "/v1/chat/completions",
                            {"model": "vllm:m1", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "Hello!"
    finally:
        stalled.close()


async def test_a_request_too_large_for_the_network_is_a_400_naming_the_limit(nursery, tmp_path):
    """Under ``max-body-bytes`` but over the 1 MiB signed frame once decoded: refused at
    once (400, as OpenAI refuses a prompt over a model's context), naming the limit, and
    nothing is sent to an executor."""
    fake = FakeOpenAI(flavour="vllm")
    executor = await start_fake_executor(nursery, tmp_path, fake, provider="vllm")
    server = await start_gateway(nursery, await start_client(nursery, tmp_path, executor))
    big = [{"role": "user", "content": "y" * 400_000}, {"role": "assistant", "content": "ok"}] * 3
    answer = await post(server.url, "/v1/chat/completions", {"model": "vllm:m1", "messages": big + [
        {"role": "user", "content": "hi"}]})  # fmt: skip
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert error["param"] == "messages" and "over the protocol's maximum of 1048576" in error["message"], error
    assert fake.count("/v1/chat/completions") == 0
