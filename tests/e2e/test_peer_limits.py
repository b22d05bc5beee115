"""An executor stays reachable: a peer holding many connections, slow and heavy peers.

Issue 7, sections 0 and 0b, end to end: a real executor on the embedded model, real
py-libp2p hosts on 127.0.0.1 as clients and as hostile peers. Each test fails with
the workarounds in ``client/_p2p_guard.py`` or ``node/_intake.py`` removed.
"""

from __future__ import annotations

import os
import time

import msgspec
import pytest
import trio

from loomnet.client import ClientConfig, LoomClient, P2PConfig, P2PNode
from loomnet.protocol import (
    INFER_PROTOCOL,
    MAX_FRAME_SIZE,
    NEED_DATA,
    ChatMessage,
    ChunkFrame,
    ErrorCode,
    ErrorFrame,
    FrameDecoder,
    InferenceConnection,
    InferenceRequest,
    LoomError,
    ReceiptFrame,
    RequestFrame,
    Role,
    SignedKind,
    SigningKey,
    decode_frame,
    seal,
)

pytestmark = [pytest.mark.integration, pytest.mark.model]

HI = [ChatMessage("user", "Say hi.")]


async def honest_client(nursery: trio.Nursery, tmp_path, executor, name: str) -> LoomClient:
    """A new client process, as ``loomnet chat`` is: a new identity, a new connection."""
    config = ClientConfig(
        data_dir=str(tmp_path / name),
        bootstrap=[executor.info.addrs[0]],
        discover_local=False,
        first_byte_timeout=20.0,
    )
    client = LoomClient(config)
    await nursery.start(client.run)
    return client


async def start_peers(nursery: trio.Nursery, n: int, seed: bytes | None = None) -> list[P2PNode]:
    nodes = []
    for _ in range(n):
        node = P2PNode(seed or os.urandom(32), P2PConfig())
        await nursery.start(node.run)
        nodes.append(node)
    return nodes


async def wait_until(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


def first_frame(data: bytes):
    """The first frame in ``data``, or None if there is no whole one."""
    decoder = FrameDecoder()
    decoder.receive_data(data)
    body = decoder.next_frame() if data else NEED_DATA
    return decode_frame(body) if isinstance(body, bytes) else None


@pytest.fixture
def executor_config(executor_config):
    return msgspec.structs.replace(
        executor_config,
        max_connections=8,
        max_connections_per_peer=3,
        max_streams_per_peer=4,
        max_request_bytes_per_peer=2 * (MAX_FRAME_SIZE + 4),
        max_request_bytes=3 * (MAX_FRAME_SIZE + 4),
        request_read_timeout=2.0,  # this module's drips are measured against these two
        ack_timeout=2.0,
    )


async def test_a_peer_holding_many_connections_does_not_lock_others_out(nursery, tmp_path, executor):
    seed = os.urandom(32)
    hostile = await start_peers(nursery, 10, seed)  # ten hosts, one identity: more than max-connections
    for node in hostile:
        try:
            await node.connect(executor.info.addrs[0], timeout=10)
        except LoomError:
            pass  # closed right after the handshake
    # without a per-peer limit the hostile peer holds every one of the 8 places
    client = await honest_client(nursery, tmp_path, executor, "honest")
    with trio.fail_after(60):
        result = await client.chat(HI, model="smol", max_tokens=4)
    assert result.receipt.output_tokens >= 1
    stats = executor.member.node.statistics()
    assert stats.connections_refused == 7 and stats.connections_inbound == 3 + 1
    for node in hostile:
        node.stop()
    await wait_until(lambda: executor.member.node.statistics().connections_inbound == 1)


async def test_a_request_dripped_byte_by_byte_meets_one_deadline(nursery, executor):
    # conftest: request-read-timeout = 2 s. Each byte comes in 0.5 s, so a per-read
    # timeout never fires; the whole frame's deadline does.
    [peer] = await start_peers(nursery, 1)
    stream = await peer.open_stream(executor.peer_id, INFER_PROTOCOL, addrs=executor.info.addrs, timeout=10)
    answer = b""

    async def drip() -> None:
        await stream.send_all(MAX_FRAME_SIZE.to_bytes(4, "big"), timeout=5)
        for _ in range(60):
            await trio.sleep(0.5)
            await stream.send_all(b"x", timeout=5)

    start = trio.current_time()
    try:
        async with trio.open_nursery() as dripping:
            dripping.start_soon(drip)
            while chunk := await stream.receive_some(timeout=40):
                answer += chunk
            dripping.cancel_scope.cancel()
    except LoomError:
        pass  # the drip's write may fail once the executor is done with the stream
    finally:
        await stream.reset()
    elapsed = trio.current_time() - start
    frame = first_frame(answer)
    assert isinstance(frame, ErrorFrame) and frame.code == ErrorCode.REQUEST_TIMEOUT
    assert 1.5 <= elapsed < 15  # the old per-read timeout answered only after the 30 s drip
    assert executor.server.intake.statistics().timeouts == 1


async def test_a_heavy_peer_stays_within_its_byte_bounds_while_others_are_served(nursery, tmp_path, executor):
    executor.server.intake.read_timeout = 60.0  # the byte budget, not the deadline, must hold it
    [hostile] = await start_peers(nursery, 1)
    partial = MAX_FRAME_SIZE.to_bytes(4, "big") + b"\0" * 100_000  # announces 1 MiB, sends 100 KB of it
    answers: list[bytes] = []
    held = trio.Event()

    async def hold_one() -> None:
        stream = await hostile.open_stream(executor.peer_id, INFER_PROTOCOL, addrs=executor.info.addrs, timeout=10)
        try:
            await stream.send_all(partial, timeout=10)
            answer = b""
            with trio.move_on_after(5):  # refused streams answer at once; held ones never do
                while chunk := await stream.receive_some(timeout=10):
                    answer += chunk
            answers.append(answer)
            await held.wait()
        finally:
            await stream.reset()

    async with trio.open_nursery() as attack:
        for _ in range(40):
            attack.start_soon(hold_one)
        await wait_until(lambda: len(answers) == 40, timeout=60)
        intake = executor.server.intake.statistics()
        p2p = executor.member.node.statistics()
        # 4 streams in the handler (max-streams-per-peer), 2 of them within the peer's
        # byte budget (each frame's announced 1 MiB counts against it at its header)
        # (a stream refused for bytes frees its place, so how the 38 refusals split varies)
        assert intake.refused_streams + intake.refused_bytes == 38 and intake.refused_streams >= 30
        assert intake.announced_bytes == 2 * (MAX_FRAME_SIZE + 4)
        assert intake.buffered_bytes == intake.peak_peer_bytes == 2 * len(partial)  # what is held
        assert intake.peak_bytes <= 3 * (MAX_FRAME_SIZE + 4)
        assert p2p.unread_bytes <= 16 << 20 and p2p.connections_flooded == 0
        codes = [f.code for f in map(first_frame, answers) if isinstance(f, ErrorFrame)]
        assert codes == [ErrorCode.PEER_LIMIT] * 38
        # an honest client is served meanwhile
        client = await honest_client(nursery, tmp_path, executor, "honest")
        with trio.fail_after(60):
            result = await client.chat(HI, model="smol", max_tokens=4)
        assert result.receipt.output_tokens >= 1
        held.set()
    await client.sessions.aclose()  # the honest client's idle session is an inbound stream too
    hostile.stop()
    await wait_until(
        lambda: (s := executor.member.node.statistics()).unread_bytes == 0
        and s.streams_inbound == 0
        and s.connections_inbound == 1
    )
    intake = executor.server.intake.statistics()
    assert intake.buffered_bytes == 0 and intake.buffered_peers == 0


async def test_identities_sending_only_frame_headers_do_not_lock_honest_clients_out(nursery, tmp_path, executor):
    # Review of §0: each header announcing 1 MiB was charged 1 MiB of the total, so two
    # free identities sending 16 bytes in all refused every honest client (PEER_LIMIT)
    # for as long as they kept their streams. Now a header costs the total its 4 bytes.
    executor.server.intake.read_timeout = 60.0  # the budget, not the deadline, is tested
    streams = []
    try:
        for node in await start_peers(nursery, 2):
            for _ in range(2):
                stream = await node.open_stream(executor.peer_id, INFER_PROTOCOL, addrs=executor.info.addrs, timeout=10)
                await stream.send_all(MAX_FRAME_SIZE.to_bytes(4, "big"), timeout=10)  # the header only
                streams.append(stream)
        await wait_until(lambda: executor.server.intake.statistics().announced_bytes == 4 * (MAX_FRAME_SIZE + 4))
        assert executor.server.intake.statistics().buffered_bytes == 16  # over the 3 MiB total if announced
        client = await honest_client(nursery, tmp_path, executor, "honest")
        with trio.fail_after(60):
            result = await client.chat(HI, model="smol", max_tokens=4)
        assert result.receipt.output_tokens >= 1
    finally:
        for stream in streams:
            await stream.reset()


async def test_identities_holding_real_bytes_do_not_lock_honest_clients_out(nursery, tmp_path, executor):
    # A Sybil with real bytes: 2 identities x 2 streams, each within its own budget,
    # each holding all but 4 bytes of a 1 MiB frame: 4 MiB against a 3 MiB total. The
    # frames arriving the longest make room; an honest request is read and answered.
    executor.server.intake.read_timeout = 60.0
    streams = []
    partial = MAX_FRAME_SIZE.to_bytes(4, "big") + b"\0" * (MAX_FRAME_SIZE - 4)
    try:
        for node in await start_peers(nursery, 2):
            for _ in range(2):
                stream = await node.open_stream(executor.peer_id, INFER_PROTOCOL, addrs=executor.info.addrs, timeout=10)
                await stream.send_all(partial, timeout=20)
                streams.append(stream)
        await wait_until(lambda: executor.server.intake.statistics().evicted >= 1)
        assert executor.server.intake.statistics().peak_bytes <= 3 * (MAX_FRAME_SIZE + 4)
        client = await honest_client(nursery, tmp_path, executor, "honest")
        with trio.fail_after(60):
            result = await client.chat(HI, model="smol", max_tokens=4)
        assert result.receipt.output_tokens >= 1
        stats = executor.server.intake.statistics()
        assert stats.evicted >= 2 and stats.peak_bytes <= 3 * (MAX_FRAME_SIZE + 4)
    finally:
        for stream in streams:
            await stream.reset()


async def test_an_ack_dripped_after_the_receipt_meets_one_deadline(nursery, executor):
    # Review of §0b/§3: after its receipt a peer announces a 1 MiB ack frame, sends
    # ~500 KB, then drips a byte a second. conftest: ack-timeout = 2 s. The ack wait was
    # per read, so the executor held the handler, the stream and the bytes for as long
    # as the drip went on (15 s and counting).
    seed = os.urandom(32)
    [peer] = await start_peers(nursery, 1, seed)
    key = SigningKey(seed)
    request = InferenceRequest(
        audience=executor.peer_id, nonce=os.urandom(16), created_at=time.time(), model="smol",
        messages=HI, max_tokens=2, temperature=0.0, seed=1,
    )
    stream = await peer.open_stream(executor.peer_id, INFER_PROTOCOL, addrs=executor.info.addrs, timeout=10)
    conn = InferenceConnection(Role.CLIENT)
    await stream.send_all(conn.send(RequestFrame(seal(SignedKind.REQUEST, request, key))), timeout=10)
    with trio.fail_after(60):
        while not isinstance(event := conn.next_event(), ReceiptFrame):
            if event is NEED_DATA:
                conn.receive_data(await stream.receive_some(timeout=60))
            else:
                assert isinstance(event, ChunkFrame), event
    got_receipt = trio.current_time()
    await stream.send_all(MAX_FRAME_SIZE.to_bytes(4, "big") + b"\0" * 512_000, timeout=10)
    try:
        with trio.move_on_after(15):
            while executor.member.node.statistics().streams_inbound:
                await trio.sleep(1.0)
                await stream.send_all(b"\0", timeout=2)
    except LoomError:
        pass  # the executor closed the stream: the drip fails
    released_after = trio.current_time() - got_receipt
    await stream.reset()
    assert executor.member.node.statistics().streams_inbound == 0 and released_after < 6
    assert executor.server.intake.statistics().buffered_bytes == 0
