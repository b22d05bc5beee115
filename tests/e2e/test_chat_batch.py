"""A batch of prompts against two real executors (libp2p on loopback, the real server, the
OpenAI-compatible adapter over loopback HTTP to the faithful fake runtime of
``tests/node/fake_openai.py``), one killed halfway (issue 11): every item ends with a
result or a typed error, in input order; the items the dead executor had not begun to
answer fail over to the other one; the one it was answering ends with a typed error.

Then ``loomnet chat --batch`` end to end (the command's own code, ``run_batch_cli``, over
the network): JSONL in, one JSON answer per line out, in order, bad lines in their place.
"""

from __future__ import annotations

import io
import json

import msgspec
import pytest
import trio

from loomnet.client import ChatRequest, ChatResult, ClientConfig, ExecutorHealth, LoomClient
from loomnet.node import Executor, ExecutorConfig, ModelTerms
from loomnet.node._cli_batch import LineDefaults, parse_batch, run_batch_cli
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.protocol import ChatMessage, ErrorCode, LoomError

from ..limits import fail_after
from ..node.asgi_server import serve_app
from ..node.fake_openai import FakeOpenAI

pytestmark = pytest.mark.integration

MODEL = "m1"
ITEMS = 50
CONCURRENCY = 8
#: the answers the first executor gives before its runtime starts to hang
SERVED_BEFORE = 8
#: the codes an answer cut after its first content ends with (never failed over)
CUT = {ErrorCode.STREAM_TRUNCATED, ErrorCode.STREAM_FAILED, ErrorCode.NETWORK_TIMEOUT, ErrorCode.CONNECT_FAILED}


class Echo(FakeOpenAI):
    """The fake runtime, answering ``echo: <the last message>`` (so a test sees which
    prompt an answer belongs to)."""

    def _answer_pieces(self, body: dict) -> tuple[list[str], str | None]:
        return ["echo: ", body["messages"][-1]["content"]], "stop"


class Watch:
    """Something changed (wakes :meth:`wait_for`); no polling."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def poke(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate) -> None:
        while not predicate():
            await self._changed.wait()
            self._changed = trio.Event()


class Falters:
    """An ASGI wrapper: the first ``serve`` chat requests are answered; the next one is
    held right after its first content piece (``mid``: its prompt); every later one is
    held before its first byte (``held``: their prompts). ``watch`` is poked on each."""

    def __init__(self, app, *, serve: int, watch: Watch) -> None:
        self.app, self.serve, self.watch = app, serve, watch
        self.count = 0
        self.mid: str | None = None
        self.held: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        self.count += 1
        if self.count <= self.serve:
            return await self.app(scope, receive, send)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        prompt = json.loads(body)["messages"][-1]["content"]
        if self.count > self.serve + 1:
            self.held.append(prompt)
            self.watch.poke()
            await trio.sleep_forever()
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def held_send(message) -> None:
            await send(message)
            if b'"content": "echo: "' in message.get("body", b""):
                self.mid = prompt
                self.watch.poke()
                await trio.sleep_forever()

        await self.app(scope, replay, held_send)


class Observed(ExecutorHealth):
    """The client's health table, counting first frames per executor (a frame reached
    the client: from then on its request is never failed over)."""

    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self.watch = watch
        self.first_frames: dict[str, int] = {}

    def first_token(self, executor, model, *, ttft, now) -> None:
        super().first_token(executor, model, ttft=ttft, now=now)
        self.first_frames[executor] = self.first_frames.get(executor, 0) + 1
        self.watch.poke()


class Running:
    """An executor in its own cancel scope, so the test can kill it (its host closes:
    its connections drop, and a dial to it is refused)."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    @property
    def peer_id(self) -> str:
        return self.executor.peer_id

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                await self.executor.run(task_status=task_status)
        finally:
            self.stopped.set()

    async def kill(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


async def start_executor(nursery, tmp_path, name: str, app) -> Running:
    """An executor serving ``m1`` through the OpenAI-compatible adapter talking to ``app``."""
    url = await serve_app(nursery, app)
    backend = OpenAICompatBackend(BackendConfig(provider="lmstudio", endpoint=url + "/v1", models=[MODEL],
                                                max_retries=0))  # fmt: skip
    config = ExecutorConfig(
        data_dir=str(tmp_path / name), listen=["/ip4/127.0.0.1/tcp/0"], announce_local=False,
        models=[ModelTerms(name=MODEL, price_out=2.0)], capacity=CONCURRENCY, request_read_timeout=10.0,
        ack_timeout=10.0, health_interval=600.0, progress_interval=3600.0,  # a held request sends no frame at all
    )  # fmt: skip
    running = Running(Executor(config, backends=[backend]))
    await nursery.start(running.run)
    return running


async def joined(client: LoomClient, executors: int) -> None:
    with trio.fail_after(20):
        while len({o.executor for o in client.offers()}) < executors:
            await client.member.table_changed.wait()


def prompt(i: int) -> str:
    return f"prompt number {i}"


@fail_after(60)
async def test_fifty_prompts_over_two_executors_one_killed_halfway(nursery, tmp_path):
    watch = Watch()
    falters = Falters(Echo(flavour="lmstudio"), serve=SERVED_BEFORE, watch=watch)
    doomed = await start_executor(nursery, tmp_path, "doomed", falters)
    steady = await start_executor(nursery, tmp_path, "steady", Echo(flavour="lmstudio"))
    health = Observed(watch)
    client = LoomClient(ClientConfig(
        data_dir=str(tmp_path / "client"), bootstrap=[doomed.executor.info.addrs[0], steady.executor.info.addrs[0]],
        discover_local=False, first_byte_timeout=20.0, offer_timeout=10.0,
    ), health=health)  # fmt: skip
    await nursery.start(client.run)
    await joined(client, 2)

    done = 0

    def on_progress(p) -> None:
        nonlocal done
        done = p.done
        watch.poke()

    def halfway() -> bool:
        """The doomed one has answered its share, is in the middle of one answer (whose
        first frame the client has), and holds at least one request it has not begun
        answering; and half the batch is done, or every request is parked on it."""
        parked = len(falters.held) + (falters.mid is not None)
        return (
            falters.mid is not None
            and health.first_frames.get(doomed.peer_id, 0) == SERVED_BEFORE + 1
            and len(falters.held) >= 1
            and (done >= ITEMS // 2 or parked == CONCURRENCY)
        )

    killed_at: dict[str, object] = {}

    async def kill_halfway() -> None:
        await watch.wait_for(halfway)
        killed_at.update(done=done, held=list(falters.held), mid=falters.mid)
        await doomed.kill()

    requests = [ChatRequest([ChatMessage("user", prompt(i))], model=MODEL) for i in range(ITEMS)]
    async with trio.open_nursery() as inner:
        inner.start_soon(kill_halfway)
        outcomes = await client.chat_many(requests, concurrency=CONCURRENCY, on_progress=on_progress)
        inner.cancel_scope.cancel()  # a batch that ended before the kill fails the next line, not the clock

    assert killed_at and killed_at["done"] < ITEMS, "the executor was not killed while the batch ran"
    assert len(outcomes) == ITEMS
    assert all(isinstance(o, (ChatResult, LoomError)) for o in outcomes)
    index = {prompt(i): i for i in range(ITEMS)}

    # the answer the dead executor was giving: a typed error, never continued elsewhere
    mid = outcomes[index[killed_at["mid"]]]
    assert isinstance(mid, LoomError) and mid.code in CUT, mid
    # every other item got its own answer, in input order
    for i, outcome in enumerate(outcomes):
        if i != index[killed_at["mid"]]:
            assert isinstance(outcome, ChatResult), (i, outcome)
            assert outcome.text == f"echo: {prompt(i)}"
    # the requests it held before their first byte failed over to the other executor
    assert killed_at["held"]
    for held in killed_at["held"]:
        outcome = outcomes[index[held]]
        assert outcome.executor == steady.peer_id
        assert outcome.attempts[0].executor == doomed.peer_id
    served = [o.executor for o in outcomes if isinstance(o, ChatResult)]
    assert served.count(doomed.peer_id) == SERVED_BEFORE and served.count(steady.peer_id) == ITEMS - SERVED_BEFORE - 1
    booked = await client.ledger.entries(status="accepted", limit=1000)
    assert len(booked) >= ITEMS - 1  # every answer's receipt (and maybe the cut one's partial receipt)


@fail_after(60)
async def test_loomnet_chat_batch_writes_one_answer_per_line_in_order(nursery, tmp_path, capsys):
    steady = await start_executor(nursery, tmp_path, "steady", Echo(flavour="lmstudio"))
    lines = [
        json.dumps({"id": "a", "prompt": "first"}),
        "",  # blank: skipped
        json.dumps({"id": 2, "messages": [{"role": "user", "content": "second"}], "max_tokens": 8}),
        '{"prompt": "third", "temprature": 0.5}',  # a typo: refused, the others run
        json.dumps({"prompt": "fourth", "model": "no-such-model"}),
        json.dumps({"prompt": "fifth", "seed": 3, "temperature": 0}),
    ]
    parsed = parse_batch("\n".join(lines).encode(), LineDefaults(model=MODEL, max_tokens=64))
    config = ClientConfig(data_dir=str(tmp_path / "cli"), bootstrap=[steady.executor.info.addrs[0]],
                          discover_local=False, offer_timeout=2.0)  # fmt: skip
    out = io.StringIO()

    failed = await run_batch_cli(config, parsed, out, concurrency=3)

    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert failed == 2
    assert [(a["line"], a.get("id"), a["ok"]) for a in answers] == [
        (1, "a", True), (3, 2, True), (4, None, False), (5, None, False), (6, None, True),
    ]  # fmt: skip
    assert [a.get("text") for a in answers] == ["echo: first", "echo: second", None, None, "echo: fifth"]
    first = answers[0]
    assert first["executor"] == steady.peer_id and first["model"] == MODEL
    assert first["cost"] > 0 and first["input_tokens"] > 0 and first["output_tokens"] > 0
    assert first["finish_reason"] == "stop" and "error" not in first
    assert answers[2]["error"]["code"] == 209 and answers[2]["error"]["name"] == "BAD_REQUEST"
    assert "line 4" in answers[2]["error"]["message"] and "temprature" in answers[2]["error"]["message"]
    assert answers[3]["error"] == {"code": 400, "name": "NO_OFFER", "message": answers[3]["error"]["message"]}
    err = capsys.readouterr().err
    assert "line 4: error [209 BAD_REQUEST]" in err and "line 5: error [400 NO_OFFER]" in err
    assert "[batch] 5 line(s): 3 answered, 2 failed (line 4, 5)" in err
    assert msgspec.json.decode(out.getvalue().splitlines()[0])  # each line is one JSON object
