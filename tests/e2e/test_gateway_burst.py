"""A burst through the gateway against one executor with default settings (capacity 1,
a queue of 8, 8 streams per peer): the gateway's client queues what the executor would
refuse, so every caller is answered instead of half of them getting 429."""

from __future__ import annotations

import httpx
import trio


async def test_twenty_callers_at_once_are_all_answered(nursery, client):
    from loomnet.client.gateway import GatewayConfig, serve_gateway

    server = await nursery.start(serve_gateway, client, GatewayConfig(port=0))
    await client.wait_for_offers(timeout=10) if hasattr(client, "wait_for_offers") else None
    statuses: list[int] = []

    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        async def one(i: int) -> None:
            answer = await http.post("/v1/chat/completions", json={
                "model": "smol", "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 4,
            })  # fmt: skip
            statuses.append(answer.status_code)

        async with trio.open_nursery() as callers:
            for i in range(20):
                callers.start_soon(one, i)
    assert statuses == [200] * 20
    stats = client.sessions.statistics()
    assert stats.waited > 0 and stats.busy == 0 and stats.active == 0
