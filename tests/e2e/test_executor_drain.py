"""Shutting an executor down drains it: requests in flight finish (with their receipts),
new ones are refused with SHUTTING_DOWN and the advert offers nothing, all within
``drain-timeout``; then it stops. In process, and as an operator runs it (SIGTERM to
``loomnet executor``), over real py-libp2p with the faithful fake runtime behind it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.protocol import ChatMessage, ErrorCode, LoomError

from ..node.asgi_server import serve_app
from ..node.fake_openai import FakeOpenAI
from .gateway_kit import start_client, start_fake_executor

pytestmark = pytest.mark.integration

HI = [ChatMessage("user", "hi")]


async def test_a_drain_lets_requests_in_flight_finish_and_refuses_new_ones(nursery, tmp_path):
    fake = FakeOpenAI(flavour="vllm", pieces=["slow ", "answer"], first_byte_delay=1.0)
    executor = await start_fake_executor(nursery, tmp_path, fake, provider="vllm")
    client = await start_client(nursery, tmp_path, executor)
    late = await start_client(nursery, tmp_path, executor, name="late")
    results: list = []

    async def ask() -> None:
        results.append(await client.chat(HI, model="vllm:m1"))

    async with trio.open_nursery() as inner:
        inner.start_soon(ask)
        with trio.fail_after(20):
            while fake.in_flight == 0:
                await trio.sleep(0.01)
        drained = []

        async def drain() -> None:
            drained.append(await executor.drain(grace=20))

        inner.start_soon(drain)
        with trio.fail_after(20):
            while not executor.draining:
                await trio.sleep(0.01)
        assert executor.ready() == "draining: shutting down"
        with pytest.raises(LoomError) as refused:
            await late.chat(HI, model="vllm:m1")
        # refused at the executor, or no longer offered once the empty advert arrived
        assert refused.value.code in (ErrorCode.SHUTTING_DOWN, ErrorCode.NO_OFFER), refused.value
    assert drained == [True]
    (result,) = results
    assert result.text == "slow answer" and result.receipt.output_tokens > 0
    assert executor.advertiser.current is not None  # the last advert offers nothing
    assert fake.count("/v1/chat/completions") == 1  # the late request never reached the runtime


async def test_a_drain_gives_up_after_its_grace(nursery, tmp_path):
    fake = FakeOpenAI(flavour="vllm", first_byte_delay=3600.0)
    executor = await start_fake_executor(nursery, tmp_path, fake, provider="vllm")
    client = await start_client(nursery, tmp_path, executor)
    failures = []

    async def ask() -> None:
        with pytest.raises(LoomError) as info:
            await client.chat(HI, model="vllm:m1")
        failures.append(info.value.code)

    nursery.start_soon(ask)
    with trio.fail_after(60):
        while fake.in_flight == 0:
            await trio.sleep(0.01)
    began = trio.current_time()
    assert await executor.drain(grace=0.5) is False
    assert 0.5 <= trio.current_time() - began < 10.0
    with trio.fail_after(20):
        while not failures:
            await trio.sleep(0.01)
    assert failures == [ErrorCode.SHUTTING_DOWN]  # nothing was sent: a refusal the client may retry elsewhere


LOOMNET = str(Path(sys.executable).with_name("loomnet"))


async def test_sigterm_drains_and_exits_0(nursery, tmp_path):
    """The operator's SIGTERM: the answer in flight completes, the process exits 0."""
    fake = FakeOpenAI(flavour="vllm", pieces=["still ", "answered"], first_byte_delay=1.5)
    url = await serve_app(nursery, fake)
    config = tmp_path / "executor.toml"
    config.write_text(f'listen = ["/ip4/127.0.0.1/tcp/0"]\nhealth-interval = 600.0\ndrain-timeout = 20.0\n'
                      f'[[backends]]\nprovider = "vllm"\nendpoint = "{url}/v1"\nmodels = ["m1"]\n')  # fmt: skip
    env = {**os.environ, "LOOMNET_STATE_DIR": str(tmp_path / "state"), "LOOMNET_DATA_DIR": str(tmp_path / "data"),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    proc = await trio.lowlevel.open_process([LOOMNET, "executor", "--config", str(config)], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        output = b""
        with trio.fail_after(60):
            while b"Stop with Ctrl-C" not in output:
                output += await proc.stdout.receive_some(65536)
        addr = next(line.split()[-1] for line in output.decode().splitlines() if "listen  :" in line)
        client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[addr], discover_local=False,
                                         offer_timeout=20.0))  # fmt: skip
        await nursery.start(client.run)
        results = []

        async def ask() -> None:
            results.append(await client.chat(HI, model="m1"))

        async with trio.open_nursery() as inner:
            inner.start_soon(ask)
            with trio.fail_after(30):
                while fake.in_flight == 0:
                    await trio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
        assert results[0].text == "still answered"
        with trio.fail_after(30):
            code = await proc.wait()
        rest = b""
        while chunk := await proc.stdout.receive_some(65536):
            rest += chunk
        assert code == 0, (output + rest).decode()[-2000:]
        assert b"SIGTERM: shutting down; requests in flight get 20 s" in output + rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_an_answer_still_running_when_the_drain_ends_gets_shutting_down_and_a_receipt(nursery, tmp_path):
    """Past the grace, an answer under way ends at a frame boundary: the client gets
    SHUTTING_DOWN (not a bare truncation) and a receipt for the text it received, booked
    on both sides."""
    from .gateway_kit import Gate

    gate = Gate(FakeOpenAI(flavour="vllm", pieces=["first ", "second"]), piece="first ")
    executor = await start_fake_executor(nursery, tmp_path, gate, provider="vllm")
    client = await start_client(nursery, tmp_path, executor)
    failures: list = []

    async def ask() -> None:
        with pytest.raises(LoomError) as info:
            await client.chat(HI, model="vllm:m1")
        failures.append(info.value)

    async with trio.open_nursery() as inner:
        inner.start_soon(ask)
        with trio.fail_after(20):
            await gate.arrived.wait()  # "first " went out; the rest is held
        assert await executor.drain(grace=0.5) is False
    (error,) = failures
    assert error.code == ErrorCode.SHUTTING_DOWN, error
    accepted = await client.ledger.entries(status="accepted")
    assert len(accepted) == 1 and accepted[0].output_tokens > 0  # billed for "first ", and no more
    assert executor.server.active == 0
