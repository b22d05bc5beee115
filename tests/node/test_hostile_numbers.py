"""Hostile numbers at the executor: a signed request sent 1000 times runs once, and a
number a runtime hands the executor (a ``retry-after`` of ``inf``, ``NaN`` or next year)
reaches the peer clamped into the error frame's range, never as a frame the client
cannot decode. (Each peer-supplied field's range: ``tests/protocol/test_hostile_numbers.py``.)

The real ``InferenceServer`` over in-memory streams (``server_harness``).
"""

from __future__ import annotations

import math

import pytest
import trio

from loomnet.node.backends._http import retry_after_seconds
from loomnet.protocol import (
    BackendError,
    ErrorCode,
    ErrorFrame,
    InferenceConnection,
    ReceiptFrame,
    RequestFrame,
    Role,
    SignedKind,
    seal,
)

from ..limits import fail_after
from .server_harness import Finished, Harness, ScriptedBackend, TextDelta, next_frame, warm_tokens

import httpx


@pytest.fixture(autouse=True)
def _tokens():
    warm_tokens()


@fail_after(120)
async def test_one_signed_request_sent_1000_times_runs_exactly_once(tmp_path):
    runs = []

    async def script(params):
        runs.append(params)
        yield TextDelta("Hello")
        yield Finished(finish_reason="stop")

    backend = ScriptedBackend(script)
    harness = await Harness.start(tmp_path, [backend], ledger=":memory:")
    client, executor = harness.session()  # one session stream: 1000 requests, one after another
    conn = InferenceConnection(Role.CLIENT, session=True)
    frame = RequestFrame(seal(SignedKind.REQUEST, harness.request("m1"), harness.client_key))
    codes: dict[int, int] = {}
    receipts = 0
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.server.handle, executor)
            for _ in range(1000):
                await client.send_all(conn.send(frame), timeout=10)
                while True:
                    event = await next_frame(client, conn, timeout=10)
                    if isinstance(event, ReceiptFrame):
                        receipts += 1
                        break
                    if isinstance(event, ErrorFrame):
                        codes[event.code] = codes.get(event.code, 0) + 1
                        break
            await client.close()
    finally:
        await harness.aclose()
    assert len(runs) == 1 and backend.entered == 1
    assert receipts == 1 and codes == {int(ErrorCode.REPLAYED_NONCE): 999}


@pytest.mark.parametrize(
    ("header", "expected"),
    [("nan", None), ("inf", None), ("-inf", None), ("1e999", None), ("-5", 0.0), ("7.5", 7.5),
     ("1e12", 86400.0), ("Fri, 01 Jan 9999 00:00:00 GMT", 86400.0)],
)
def test_a_runtimes_retry_after_is_finite_and_at_most_a_day(header, expected):
    for name, value in (("retry-after", header), ("retry-after-ms", header))[: 1 if "GMT" in header else 2]:
        got = retry_after_seconds(httpx.Headers({name: value}))
        if expected is None:
            assert got is None, (name, value, got)
        else:
            assert got is not None and math.isfinite(got) and 0.0 <= got <= 86400.0, (name, value, got)
            if name == "retry-after" and expected < 86400.0:
                assert got == expected


@pytest.mark.parametrize("retry_after", [math.inf, math.nan, 1e12, -3.0])
@fail_after(30)
async def test_a_backend_errors_hostile_retry_after_reaches_the_peer_clamped(tmp_path, retry_after):
    async def script(params):
        raise BackendError("the runtime is overloaded", code=ErrorCode.OVER_CAPACITY, retryable=True,
                           retry_after=retry_after)
        yield  # pragma: no cover - a generator

    harness = await Harness.start(tmp_path, [ScriptedBackend(script)], ledger=":memory:")
    try:
        answer = await harness.ask("m1")
    finally:
        await harness.aclose()
    error = answer.error  # it decoded: every field within the frame's schema
    assert error is not None and error.code == ErrorCode.OVER_CAPACITY
    assert error.retry_after is None or 0.0 <= error.retry_after <= 86400.0
    if retry_after == 1e12:
        assert error.retry_after == 86400.0
