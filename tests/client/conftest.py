"""Fixtures the client tests share."""

from __future__ import annotations

import pytest

from loomnet.client import ClientConfig, LoomClient


@pytest.fixture
async def lone_client(nursery, tmp_path):
    """A running client joined to nothing (the gateway's HTTP limits need no executor)."""
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), discover_local=False, offer_timeout=30.0))
    await nursery.start(client.run)
    return client
