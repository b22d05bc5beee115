"""Fixtures the client tests share."""

from __future__ import annotations

import os

import pytest

from loomnet.client import ClientConfig, LoomClient
from loomnet.client._p2p import P2PConfig, P2PNode


@pytest.fixture
async def lone_client(nursery, tmp_path):
    """A running client joined to nothing (the gateway's HTTP limits need no executor)."""
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), discover_local=False, offer_timeout=30.0))
    await nursery.start(client.run)
    return client


@pytest.fixture
async def nodes(nursery):
    """Start real ``P2PNode``s on 127.0.0.1 (default config): ``await nodes()`` gives
    ``(node, NodeInfo)``; every node started is stopped when the test ends."""
    started: list[P2PNode] = []

    async def start():
        node = P2PNode(os.urandom(32), P2PConfig())
        started.append(node)
        return node, await nursery.start(node.run)

    try:
        yield start
    finally:
        for node in started:
            node.stop()
