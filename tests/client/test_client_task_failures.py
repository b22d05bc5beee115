"""A failure in one of the client's own background tasks, seen from a program that runs
the client with ``open_client`` around nested nurseries (an ASGI server's, the
gateway's): the client's error leaves the block as itself, never a group of the
cancellations it caused (which a caller would take for a clean stop and exit 0). And
running out of file descriptors for a moment is no failure of the local-executor scan."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from loomnet.client import ClientConfig, _local, _member, local_executors, open_client, write_local_executor
from loomnet.client.gateway import GatewayConfig, serve_gateway


async def test_a_background_task_failure_leaves_open_client_as_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMNET_STATE_DIR", str(tmp_path / "state"))

    calls = []

    def broken(*args, **kwargs):  # the scans at start succeed; a later one, with the server up, fails
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("the scan broke")
        return []

    monkeypatch.setattr(_member, "local_executors", broken)
    monkeypatch.setattr(_member.Member, "LOCAL_SCAN", 0.5)
    config = ClientConfig(data_dir=str(tmp_path / "client"), discover_local=True)
    with pytest.raises(RuntimeError, match="the scan broke"):
        async with open_client(config) as client:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_gateway, client, GatewayConfig(port=0))
                try:
                    await trio.sleep_forever()
                except trio.Cancelled as cancelled:
                    # what an ASGI server's strict nurseries do with the cancellation the
                    # client's failure caused (seen from hypercorn): a group of Cancelled
                    raise BaseExceptionGroup("the server's nurseries", [cancelled]) from None


def test_out_of_descriptors_lists_no_local_executor_instead_of_failing(tmp_path, monkeypatch):
    write_local_executor("12D3KooWPeer", ["/ip4/127.0.0.1/tcp/1"], directory=tmp_path)
    assert [e.peer_id for e in local_executors(directory=tmp_path)] == ["12D3KooWPeer"]

    def no_descriptors(self, pattern):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(Path, "glob", no_descriptors)
    assert local_executors(directory=tmp_path) == []
    assert _local.local_executors is local_executors
