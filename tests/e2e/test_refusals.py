"""Every refusal, end to end over real libp2p, arrives as an error frame with its code."""

import os
import time

import pytest
import trio

from loomnet.client import P2PStream
from loomnet.protocol import (
    END,
    INFER_PROTOCOL,
    NEED_DATA,
    ChatMessage,
    Envelope,
    ErrorCode,
    ErrorFrame,
    FrameDecoder,
    InferenceRequest,
    ReceiptFrame,
    RemoteError,
    RequestFrame,
    SignedKind,
    SigningKey,
    credits_to_micro,
    decode_frame,
    encode_frame,
    encode_frame_body,
    seal,
)

from .conftest import PRICE_IN, PRICE_OUT

pytestmark = [pytest.mark.integration, pytest.mark.model]


def request(executor, **overrides) -> InferenceRequest:
    fields = dict(
        audience=executor.peer_id,
        nonce=os.urandom(16),
        created_at=time.time(),
        model="smollm2-135m",
        messages=[ChatMessage("user", "Say hi.")],
        max_tokens=2,
    )
    fields.update(overrides)
    return InferenceRequest(**fields)


async def exchange(client, executor, data: bytes) -> list:
    """Send raw bytes on a fresh inference stream; return every frame the executor sends."""
    stream: P2PStream = await client.member.node.open_stream(
        executor.peer_id, INFER_PROTOCOL, addrs=executor.info.addrs, timeout=5
    )
    decoder, frames = FrameDecoder(), []
    try:
        await stream.send_all(data, timeout=5)
        while True:
            decoder.receive_data(await stream.receive_some(timeout=20))
            while (body := decoder.next_frame()) is not NEED_DATA:
                if body is END:
                    return frames
                frames.append(decode_frame(body))
                if isinstance(frames[-1], (ErrorFrame, ReceiptFrame)):
                    return frames
    finally:
        await stream.reset()


def framed(envelope: Envelope) -> bytes:
    return encode_frame(encode_frame_body(RequestFrame(envelope)))


async def refusal_code(client, executor, data: bytes) -> int:
    with trio.fail_after(30):
        frames = await exchange(client, executor, data)
    assert isinstance(frames[-1], ErrorFrame), frames
    assert frames[-1].message  # a clear reason, not just a number
    return frames[-1].code


async def test_bad_signature(executor, client):
    env = seal(SignedKind.REQUEST, request(executor), client.key)
    forged = Envelope(payload=env.payload, signer=env.signer, sig=bytes(64))
    assert await refusal_code(client, executor, framed(forged)) == ErrorCode.BAD_SIGNATURE


async def test_signer_is_not_the_remote_peer(executor, client):
    someone_else = SigningKey(os.urandom(32))
    env = seal(SignedKind.REQUEST, request(executor), someone_else)
    assert await refusal_code(client, executor, framed(env)) == ErrorCode.SIGNER_MISMATCH


async def test_wrong_audience(executor, client):
    env = seal(SignedKind.REQUEST, request(executor, audience=SigningKey(os.urandom(32)).peer_id), client.key)
    assert await refusal_code(client, executor, framed(env)) == ErrorCode.WRONG_AUDIENCE


async def test_replayed_nonce(executor, client):
    env = seal(SignedKind.REQUEST, request(executor), client.key)
    with trio.fail_after(60):
        first = await exchange(client, executor, framed(env))
    assert isinstance(first[-1], ReceiptFrame)
    assert await refusal_code(client, executor, framed(env)) == ErrorCode.REPLAYED_NONCE


async def test_expired_request(executor, client):
    env = seal(SignedKind.REQUEST, request(executor, created_at=time.time() - 3600), client.key)
    assert await refusal_code(client, executor, framed(env)) == ErrorCode.REQUEST_EXPIRED


async def test_request_from_the_future(executor, client):
    env = seal(SignedKind.REQUEST, request(executor, created_at=time.time() + 3600), client.key)
    assert await refusal_code(client, executor, framed(env)) == ErrorCode.REQUEST_FROM_FUTURE


async def test_price_cap_below_the_advertised_price(executor, client):
    capped = request(executor, max_price_in=credits_to_micro(PRICE_IN), max_price_out=credits_to_micro(PRICE_OUT) - 1)
    env = seal(SignedKind.REQUEST, capped, client.key)
    assert await refusal_code(client, executor, framed(env)) == ErrorCode.PRICE_CAP_EXCEEDED


async def test_unknown_model(executor, client):
    env = seal(SignedKind.REQUEST, request(executor, model="gpt-17"), client.key)
    assert await refusal_code(client, executor, framed(env)) == ErrorCode.UNKNOWN_MODEL


async def test_oversized_frame(executor, client):
    header = (2 << 20).to_bytes(4, "big")  # announces 2 MiB; the maximum is 1 MiB
    assert await refusal_code(client, executor, header + b"x" * 1000) == ErrorCode.FRAME_TOO_LARGE


async def test_garbage_frame(executor, client):
    assert await refusal_code(client, executor, encode_frame(b"\xc1\xc1 not msgpack")) == ErrorCode.MALFORMED_MESSAGE


async def test_silent_client_times_out(executor, client):
    assert await refusal_code(client, executor, b"") == ErrorCode.REQUEST_TIMEOUT


async def test_refusal_reaches_the_library_caller_as_remote_error(executor, client, monkeypatch):
    # The client library signs correctly; make the executor's clock run an hour ahead so
    # the request looks expired, and check the error surfaces with the executor's code.
    monkeypatch.setattr(executor.server, "clock", lambda: time.time() + 3600)
    with trio.fail_after(60), pytest.raises(RemoteError) as info:
        await client.chat([ChatMessage("user", "hi")], model="smol", max_tokens=4)
    assert info.value.code == ErrorCode.REQUEST_EXPIRED
