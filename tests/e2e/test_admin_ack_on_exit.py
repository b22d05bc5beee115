"""A one-shot client (``loomnet chat``: open a client, ask once, close it) leaves its
receipt acknowledged in the executor's ledger: the client closing gives the ack it has
just written its moment to reach the executor (each session half-closed, and read until
the executor ends it, a second at most) before it stops its host. A real ``loomnet
executor`` process (so the executor reads on its own schedule, as in production), real
clients over py-libp2p on loopback, a loopback OpenAI-compatible runtime."""

from __future__ import annotations

import sqlite3

import pytest
import trio

from loomnet.client import ClientConfig, open_client
from loomnet.protocol import ChatMessage

from .executor_process import ExecutorProcess, free_port, serve_paced

pytestmark = pytest.mark.integration

RUNS = 10


def statuses(path) -> dict[str, int]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT status, count(*) FROM receipts WHERE role = 'executor' GROUP BY status"))


async def test_one_shot_clients_leave_acknowledged_receipts(nursery, tmp_path):
    _, url = await serve_paced(nursery)
    executor = ExecutorProcess(tmp_path / "executor", url, port=free_port())
    try:
        addr = await executor.start()
        config = ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[addr], discover_local=False,
                              offer_timeout=10.0)  # fmt: skip
        for _ in range(RUNS):
            async with open_client(config) as client:
                await client.chat([ChatMessage("user", "hi")], model="m1")
                asked = trio.current_time()
            assert trio.current_time() - asked < 3.0  # closing lingers a second at most (plus the host's own stop)
        with trio.fail_after(30):  # the executor books each receipt once it read its ack, or gave up (ack-timeout)
            while sum((counts := statuses(executor.ledger_path)).values()) < RUNS:
                await trio.sleep(0.1)
        assert counts == {"acknowledged": RUNS}
    finally:
        await executor.ensure_stopped()
