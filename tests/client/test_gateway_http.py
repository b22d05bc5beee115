"""The gateway's HTTP limits, over real loopback TCP: a body too large, a body that never
finishes arriving, more requests at once than the gateway answers. No executor is
needed: each is refused before anything is routed."""

from __future__ import annotations

import logging

import httpx
import trio

from loomnet.client.gateway import GatewayConfig, serve_gateway


async def start(nursery, client, **settings):
    return await nursery.start(serve_gateway, client, GatewayConfig(port=0, **settings))


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


async def test_a_body_over_the_limit_is_413_in_the_apis_shape(nursery, lone_client):
    server = await start(nursery, lone_client, max_body_bytes=1024)
    async with httpx.AsyncClient(base_url=server.url) as http:
        big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}'
        answer = await http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "request_too_large" and answer.json()["error"]["loomnet_code"] == 601

        async def chunked():  # no content-length: the limit holds while reading
            for _ in range(4):
                yield b" " * 600

        answer = await http.post("/v1/messages", content=chunked())
        assert answer.status_code == 413 and answer.json()["error"]["type"] == "request_too_large"


async def test_a_body_that_stalls_is_408_after_the_body_timeout(nursery, lone_client):
    server = await start(nursery, lone_client, body_timeout=0.5)
    stream = await trio.open_tcp_stream(*host_port(server.url))
    async with stream:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n" % len(BODY))  # fmt: skip
        await stream.send_all(head + BODY[:10])  # and then nothing more
        received = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
                data = await stream.receive_some(65536)
                if not data:
                    break
                received += data
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b'"loomnet_code":210' in received


async def test_past_max_concurrent_requests_is_429_with_retry_after(nursery, lone_client, caplog):
    caplog.set_level(logging.INFO, logger="loomnet.gateway")
    server = await start(nursery, lone_client, max_concurrent_requests=2)
    # two requests held open: their bodies never finish (each holds a slot until its body timeout)
    held = []
    for _ in range(2):
        stream = await trio.open_tcp_stream(*host_port(server.url))
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        held.append(stream)
    with trio.fail_after(10):
        while server.gateway.in_flight < 2:
            await trio.sleep(0.01)
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.post("/v1/chat/completions", content=BODY)
    assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["code"] == "over_capacity"
    assert server.gateway.statistics().requests["over_capacity"] == 1
    for stream in held:
        await stream.aclose()
    with trio.fail_after(10):  # the log line is written once the response is out
        while not any("-> over_capacity" in r.getMessage() for r in caplog.records):
            await trio.sleep(0.01)
