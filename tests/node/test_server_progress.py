"""Long silences (issue 7 §3, executor side): progress chunks, and a client that leaves.

The real ``InferenceServer`` over in-memory streams, under a mock clock that jumps when
everything waits, so 65 s of a silent model take a moment and every time is exact. The
clock only jumps after 0.25 s of real idleness, so a worker thread (SQLite, tiktoken)
does not count as idle; the ledger lives in memory for the same reason.
"""

from __future__ import annotations

import msgspec
import pytest
import trio
import trio.testing

from loomnet.protocol import ErrorCode, Receipt, StreamState

from ..limits import fail_after
from .server_harness import (
    Finished,
    Harness,
    ReasoningDelta,
    ScriptedBackend,
    TextDelta,
    Usage,
    events,
    warm_tokens,
)

PROGRESS = 3.0


@pytest.fixture
def clock():
    warm_tokens()
    return trio.testing.MockClock(autojump_threshold=0.25)


async def start(tmp_path, backend, **settings):
    settings.setdefault("progress_interval", PROGRESS)
    return await Harness.start(tmp_path, [backend], ledger=":memory:", **settings)


def silent(seconds: float, *then):
    return events(seconds, *then)


@fail_after(600)
async def test_a_silent_backend_gets_a_progress_chunk_every_interval(tmp_path, clock):
    # a model that thinks for 65 s without returning its thoughts, then answers
    backend = ScriptedBackend(silent(65, TextDelta("Hello!"), Finished(finish_reason="stop")))
    harness = await start(tmp_path, backend)
    start_time = trio.current_time()
    answer = await harness.ask("m1")
    assert answer.error is None and answer.text == "Hello!"
    progress_times = [t - start_time for c, t in zip(answer.chunks, answer.times) if c.is_progress]
    assert progress_times == [PROGRESS * n for n in range(1, 22)]  # 3, 6, ..., 63 s
    assert answer.chunks[-1].text == "Hello!" and answer.times[-1] - start_time == 65
    assert answer.receipt is not None and answer.check(answer.receipt) == []
    assert answer.receipt.chunks == 22  # progress chunks are chunks like any other
    assert harness.server.load == 0 and backend.exited == 1


@fail_after(600)
async def test_the_idle_gap_a_client_sees_never_exceeds_the_interval(tmp_path, clock):
    # slow drips and silences mixed: whatever the backend does, the client hears at
    # least every progress-interval seconds
    backend = ScriptedBackend(
        events(1, TextDelta("a"), 7.5, TextDelta("b"), 0.1, TextDelta("c"), 20, Finished(finish_reason="stop"))
    )
    harness = await start(tmp_path, backend)
    t0 = trio.current_time()
    answer = await harness.ask("m1")
    times = [t0, *answer.times]
    assert max(b - a for a, b in zip(times, times[1:])) <= PROGRESS + 1e-9
    assert answer.text == "abc" and answer.receipt is not None


@fail_after(600)
async def test_an_ollama_model_thinking_for_65_s_then_hello(tmp_path, clock):
    # the case: only `thinking` for 65 s, then "Hello!", eval_count 183; the
    # reasoning streams as it comes, so the client never waits long, and the receipt
    # puts the tokens where the bytes are
    thoughts = [f"Step {n}: the user greets me, so I consider a greeting. " for n in range(1, 31)]
    script = []
    for thought in thoughts:
        script += [65 / len(thoughts), ReasoningDelta(thought)]
    usage = Usage(input_tokens=26, output_tokens=183, source="backend")
    backend = ScriptedBackend(events(*script, TextDelta("Hello!"), Finished(finish_reason="stop", usage=usage)))
    harness = await start(tmp_path, backend)
    t0 = trio.current_time()
    answer = await harness.ask("m1")
    times = [t0, *answer.times]
    assert max(b - a for a, b in zip(times, times[1:])) <= PROGRESS + 1e-9
    assert answer.reasoning == "".join(thoughts) and answer.text == "Hello!"
    receipt = answer.receipt
    assert receipt is not None and answer.check(receipt) == []
    assert (receipt.output_tokens, receipt.count_source, receipt.hidden_reasoning_tokens) == (183, "backend", 0)
    assert receipt.text_tokens <= len("Hello!") + 8 and receipt.reasoning_tokens >= 183 - 14


@pytest.mark.parametrize("leave", ["reset", "close"])
@fail_after(600)
async def test_a_client_that_leaves_mid_silence_stops_the_backend_at_once(tmp_path, clock, leave):
    # the client reads a progress chunk, then leaves while the model is still silent:
    # the executor notices at once, leaves the backend's stream and frees the slot
    backend = ScriptedBackend(silent(65, TextDelta("Hello!"), Finished(finish_reason="stop")))
    harness = await start(tmp_path, backend)
    async with trio.open_nursery() as nursery:
        end = await harness.open(nursery, "m1")
        await end.read_answer(until=lambda a: len(a.chunks) == 1)
        assert end.answer.chunks[0].is_progress and harness.server.load == 1
        await trio.sleep(1)
        left_at = trio.current_time()
        await getattr(end.stream, leave)()
        with trio.fail_after(1):
            while harness.server.load or not backend.exited:
                await trio.sleep(0.01)
        assert trio.current_time() - left_at < 1
    assert backend.exited == 1
    # progress alone is no content: nothing to bill, no receipt
    assert await harness.server.ledger.entries() == []


@fail_after(600)
async def test_a_client_that_leaves_after_some_text_gets_a_client_gone_receipt(tmp_path, clock):
    usage = Usage(input_tokens=10, output_tokens=99, source="backend")  # never seen: cut short
    backend = ScriptedBackend(events(TextDelta("Hello, "), 40, TextDelta("world"), Finished(finish_reason="stop", usage=usage)))
    harness = await start(tmp_path, backend)
    async with trio.open_nursery() as nursery:
        end = await harness.open(nursery, "m1")
        await end.read_answer(until=lambda a: len(a.chunks) == 2)  # the text, then a progress chunk
        await end.stream.reset()
    assert backend.exited == 1 and harness.server.load == 0
    [entry] = await harness.server.ledger.entries()
    receipt = msgspec.msgpack.decode(entry.receipt_payload, type=Receipt)
    assert receipt.finish_reason == "client_gone" and receipt.chunks == 2
    # the runtime's usage covers text never sent: the receipt counts what went out
    assert (receipt.output_tokens, receipt.count_source) == (harness.server.tokens.count("Hello, ")[0], "tiktoken")
    assert end.answer.check(receipt) == []


@fail_after(600)
async def test_a_client_that_sends_data_before_its_answer_ended_is_refused(tmp_path, clock):
    backend = ScriptedBackend(events(TextDelta("Hi"), 30, TextDelta("!"), Finished(finish_reason="stop")))
    harness = await start(tmp_path, backend)
    async with trio.open_nursery() as nursery:
        end = await harness.open(nursery, "m1")
        await end.read_answer(until=lambda a: len(a.chunks) == 1)
        await end.stream.send_all(b"\x00\x00\x00\x03abc", timeout=5)  # a protocol violation
        answer = await end.read_answer()
    assert answer.error is not None and answer.error.code == ErrorCode.UNEXPECTED_FRAME
    assert backend.exited == 1 and harness.server.load == 0
    assert answer.error_receipt is not None and answer.error_receipt.finish_reason == "error"
    assert answer.check(answer.error_receipt) == []


@fail_after(600)
async def test_text_and_reasoning_are_batched_not_sent_per_token(tmp_path, clock):
    # 400 tokens in bursts of 40 every 20 ms (each pause costs this test real time)
    script: list = []
    for n in range(400):
        script += [0.02] if n % 40 == 0 else []
        script += [ReasoningDelta(f"r{n} ") if n < 200 else TextDelta(f"t{n} ")]
    backend = ScriptedBackend(events(*script, Finished(finish_reason="stop")))
    harness = await start(tmp_path, backend, chunk_interval=0.05)
    answer = await harness.ask("m1")
    assert answer.reasoning == "".join(f"r{n} " for n in range(200))
    assert answer.text == "".join(f"t{n} " for n in range(200, 400))
    assert len(answer.chunks) <= 400 // 10  # at most 32 tokens a frame, or 50 ms of them
    assert all(not c.is_progress for c in answer.chunks)
    assert answer.receipt is not None and answer.check(answer.receipt) == []


@fail_after(600)
async def test_a_handler_cancelled_mid_generation_leaves_the_backend(tmp_path, clock):
    # executor shutdown: the handler is cancelled; the backend's stream is left too
    backend = ScriptedBackend(silent(65, Finished(finish_reason="stop")))
    harness = await start(tmp_path, backend)
    async with trio.open_nursery() as nursery:
        end = await harness.open(nursery, "m1")
        await end.read_answer(until=lambda a: len(a.chunks) == 1)
        nursery.cancel_scope.cancel()
    assert backend.exited == 1 and harness.server.load == 0
    assert end.conn.state is StreamState.OPEN  # no terminal frame: the stream just ends


@fail_after(30)
async def test_a_client_leaving_a_silent_http_backend_closes_the_response(nursery, tmp_path):
    # real time, the real Ollama adapter over real HTTP: the model sits silent before its
    # first line; the client leaves; the executor leaves the adapter's stream, whose
    # response is closed, and the slot is free at once
    from loomnet.node.backends._config import BackendConfig
    from loomnet.node.backends.ollama import OllamaBackend

    from .asgi_server import serve_app
    from .fake_ollama import FakeOllama

    fake = FakeOllama()
    fake.first_line_delay = 3600
    url = await serve_app(nursery, fake)
    async with OllamaBackend(BackendConfig(provider="ollama", endpoint=url, models=["llama3.2"])) as backend:
        harness = await Harness.start(tmp_path, [backend], progress_interval=0.2)
        async with trio.open_nursery() as inner:
            end = await harness.open(inner, "llama3.2")
            await end.read_answer(until=lambda a: len(a.chunks) == 2)
            assert all(c.is_progress for c in end.answer.chunks) and harness.server.load == 1
            left_at = trio.current_time()
            await end.stream.reset()
            with trio.fail_after(5):
                while harness.server.load:
                    await trio.sleep(0.01)
            assert trio.current_time() - left_at < 1
        await harness.aclose()
    assert len(fake.chat_requests) == 1
