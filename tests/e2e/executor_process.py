"""A real ``loomnet executor`` process for fault tests: started, killed, restarted.

The executor runs as an operator runs it (``loomnet executor --config``), its one backend
the OpenAI-compatible adapter over loopback HTTP to a fake runtime served in the test
process (``Paced``: the faithful :class:`~tests.node.fake_openai.FakeOpenAI`, each content
piece a little apart, and answers held mid-stream on demand). It listens on a fixed
loopback port so a restart comes back at the same address, with the same identity and
ledger (its data folder).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import trio

from ..node.asgi_server import serve_app
from ..node.fake_openai import FakeOpenAI

__all__ = ["ExecutorProcess", "Paced", "free_port", "integrity", "serve_paced"]

#: an SSE body chunk carrying a content piece (not the role chunk's empty content)
_CONTENT = re.compile(rb'"content": "[^"]')

LOOMNET = str(Path(sys.executable).with_name("loomnet"))


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the executor binds it with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` of the SQLite file at ``path`` ("ok" when sound)."""
    conn = sqlite3.connect(path)
    try:
        return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


class Paced:
    """An ASGI wrapper around a :class:`FakeOpenAI`: every streamed content chunk is sent
    ``pace`` seconds after the one before, and while ``holding`` is set every
    ``hold_every``-th new answer is held right after its first content chunk until its
    caller hangs up (the executor dies or cancels). ``held``: answers held now;
    ``answers``: streamed answers begun; ``finished``: answers sent to their end."""

    def __init__(
        self, app: FakeOpenAI, *, pace: float = 0.01, hold_every: int = 2
    ) -> None:
        self.app = app
        self.pace = pace
        self.hold_every = hold_every
        self.holding = False
        self.held = 0
        self.answers = 0
        self.finished = 0
        self._eligible = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        self.answers += 1
        hold = False
        if self.holding:
            self._eligible += 1
            hold = self._eligible % self.hold_every == 1 % self.hold_every
        sent_content = False

        async def paced_send(message) -> None:
            nonlocal sent_content
            body = (
                message.get("body", b"")
                if message["type"] == "http.response.body"
                else b""
            )
            content = _CONTENT.search(body) is not None
            if content:
                await trio.sleep(self.pace)
            await send(message)
            if hold and not sent_content and content:
                sent_content = True
                self.held += 1
                try:  # until the executor hangs up (the request body is read by now)
                    while (await receive())["type"] != "http.disconnect":
                        pass
                finally:
                    self.held -= 1
                raise _HungUp

        try:
            await self.app(scope, receive, paced_send)
            self.finished += 1
        except _HungUp:
            pass


class _HungUp(Exception):
    """The executor hung up on a held answer."""


class ExecutorProcess:
    """``loomnet executor`` in a subprocess on ``port``, data under ``home``.

    ``start`` waits for its "ready" lines; ``kill`` is SIGKILL, ``terminate`` SIGTERM,
    each then waits for the exit and returns its code. ``output`` is what it printed.
    """

    def __init__(self, home: Path, backend_url: str, *, port: int, drain_timeout: float | None = None,
                 settings: str = "") -> None:  # fmt: skip
        self.home = home
        self.port = port
        self.config = home / "executor.toml"
        home.mkdir(parents=True, exist_ok=True)
        drain = "" if drain_timeout is None else f"drain-timeout = {drain_timeout}\n"
        self.config.write_text(
            f'listen = ["/ip4/127.0.0.1/tcp/{port}"]\nhealth-interval = 600.0\nannounce-local = false\n'
            f"capacity = 8\nmax-queue = 64\npeer-requests-per-minute = 0\nack-timeout = 10.0\n{drain}{settings}"
            f'[[backends]]\nprovider = "vllm"\nendpoint = {json.dumps(backend_url + "/v1")}\nmodels = ["m1"]\n'
            "max-retries = 0\n"
        )
        self.env = {**os.environ, "LOOMNET_STATE_DIR": str(home / "state"), "LOOMNET_DATA_DIR": str(home / "data"),
                    "PYTHONUNBUFFERED": "1"}  # fmt: skip
        self.proc: trio.Process | None = None
        self.output = b""
        self.addr = ""
        self.peer_id = ""

    @property
    def ledger_path(self) -> Path:
        return self.home / "data" / "executor" / "ledger.sqlite"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, *, timeout: float = 90.0) -> str:
        """Start it and wait until it serves; returns its loopback multiaddr."""
        self.output = b""
        self.proc = await trio.lowlevel.open_process(
            [LOOMNET, "executor", "--config", str(self.config)], env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        with trio.fail_after(timeout):
            while b"Stop with Ctrl-C" not in self.output:
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    raise AssertionError(
                        f"the executor exited before it was ready:\n{self.output.decode()[-3000:]}"
                    )
                self.output += chunk
        lines = self.output.decode().splitlines()
        self.addr = next(
            line.split()[-1]
            for line in lines
            if "listen  :" in line and f"/tcp/{self.port}/" in line
        )
        self.peer_id = self.addr.rsplit("/p2p/", 1)[1]
        return self.addr

    async def _wait(self, timeout: float) -> int:
        assert self.proc is not None
        with trio.fail_after(timeout):
            code = await self.proc.wait()
            while chunk := await self.proc.stdout.receive_some(65536):
                self.output += chunk
        return code

    async def kill(self, *, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return await self._wait(timeout)

    async def terminate(self, *, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self._wait(timeout)

    async def ensure_stopped(self) -> None:
        """For a ``finally``: kill it if it still runs."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with trio.move_on_after(10):
                await self.proc.wait()


async def serve_paced(nursery: trio.Nursery, **fake) -> tuple[Paced, str]:
    """A :class:`Paced` fake vLLM (``fake``: FakeOpenAI fields) on loopback; returns it and its URL."""
    paced = Paced(FakeOpenAI(flavour="vllm", **fake))
    return paced, await serve_app(nursery, paced)
