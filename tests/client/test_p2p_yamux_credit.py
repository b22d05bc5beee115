"""Yamux flow-control credit (trap Z, ``client/_p2p_yamux.py``) against real py-libp2p
hosts on 127.0.0.1: a window of one whole frame, credit once 16 KiB is owed, or sooner
while the sender may be waiting.

py-libp2p 0.8.1 sent a WINDOW_UPDATE frame for almost every read (6.3 of them for 4
data frames per request on a session stream): each a Noise message and a socket write,
most of what py-libp2p added to a request. The other tests hold the other half, from two
reviews of the change: nothing stalls (py-libp2p's writer gives up after 5 s without
credit), a whole frame can be written to a reader that refuses it unread, and no stream
holds more than its window. py-libp2p's rule, go-yamux's half window, a 256 KiB window,
credit only at 16 KiB, at 64 KiB, at every read, and credit ahead of the reader each
fail at least one test here.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
import trio

from loomnet.client._p2p import P2PNode, P2PStream
from loomnet.client._p2p_yamux import CREDIT_AFTER, CREDIT_AT, WINDOW

from ..limits import fail_after

pytestmark = pytest.mark.integration

ECHO = "/loomnet/test/echo/1.0.0"
BULK = "/loomnet/test/bulk/1.0.0"
_TYPE_WINDOW_UPDATE = 1


def count_window_updates(*nodes: P2PNode) -> list[int]:
    """Count, from now on, the plain WINDOW_UPDATE frames (no SYN/ACK/FIN/RST: credit,
    not a stream opening or ending) that ``nodes``' open connections write."""
    counted = [0]
    for node in nodes:
        for muxer in node._guard.open_muxers():
            write = muxer._write_frame

            async def counting(data: bytes, write: Any = write) -> None:
                _, kind, flags, _, _ = struct.unpack(">BBHII", data[:12])
                if kind == _TYPE_WINDOW_UPDATE and flags == 0:
                    counted[0] += 1
                await write(data)

            muxer._write_frame = counting
    return counted


async def read_exactly(stream: P2PStream, size: int, *, piece: int = 65536) -> bytes:
    data = bytearray()
    while len(data) < size:
        data += await stream.receive_some(min(piece, size - len(data)), timeout=10)
    return bytes(data)


@fail_after(60)
async def test_small_messages_back_and_forth_send_no_window_update(nodes: Any) -> None:
    server, info = await nodes()
    client, _ = await nodes()

    async def echo(stream: P2PStream) -> None:
        while True:
            header = await stream.receive_some(4, timeout=10)
            if not header:
                return
            size = int.from_bytes(header, "big")
            await stream.send_all(header + await read_exactly(stream, size, piece=size), timeout=10)

    server.set_stream_handler(ECHO, echo)
    stream = await client.open_stream(info.peer_id, ECHO, addrs=info.addrs, timeout=5)
    await stream.send_all(b"\0\0\0\1x", timeout=5)  # the connection and stream are up
    assert await read_exactly(stream, 5) == b"\0\0\0\1x"
    counted = count_window_updates(client, server)
    rounds, size = 200, 600  # a request and its answer, on a session: 240 KB each way
    for i in range(rounds):
        body = os.urandom(size)
        await stream.send_all(len(body).to_bytes(4, "big") + body, timeout=5)
        # read in the executor's exact manner: the header, then the body
        assert await read_exactly(stream, 4, piece=4) == len(body).to_bytes(4, "big")
        assert await read_exactly(stream, size, piece=size) == body
    await stream.close()
    # 600 reads a side: credit once per 16 KiB each way, not once or twice per read
    each_way = rounds * (4 + size)
    assert counted[0] <= 2 * (each_way // CREDIT_AT + 1), f"{counted[0]} window updates for {rounds} round trips"


@pytest.mark.parametrize("reader", ["small pieces", "slow"])
@fail_after(60)
async def test_many_windows_of_bulk_data_never_stall(nodes: Any, reader: str) -> None:
    server, info = await nodes()
    client, _ = await nodes()
    total = 3 * WINDOW + 12345  # past the window several times, and not a multiple of it
    payload = os.urandom(total)
    sent = trio.Event()

    async def bulk(stream: P2PStream) -> None:
        await stream.receive_some(1, timeout=10)
        for start in range(0, total, 16 * 1024):
            await stream.send_all(payload[start : start + 16 * 1024], timeout=10)
        sent.set()
        await stream.close()

    server.set_stream_handler(BULK, bulk)
    stream = await client.open_stream(info.peer_id, BULK, addrs=info.addrs, timeout=5)
    counted = count_window_updates(client)
    await stream.send_all(b"g", timeout=5)
    got = bytearray()
    reads = 0
    started = trio.current_time()
    while len(got) < total:
        got += await stream.receive_some(1000 if reader == "small pieces" else 65536, timeout=10)
        reads += 1
        if reader == "slow" and reads % 4 == 0:
            await trio.sleep(0.05)  # the sender fills the window and waits for credit
    await sent.wait()
    assert bytes(got) == payload
    # about one credit per 16 KiB read: ~200, not one per read (3 300 of 1 000 bytes),
    # and not one per 64 KiB (~50); at most one per CREDIT_AFTER more while the sender
    # is nearly out of window
    extra = (trio.current_time() - started) / CREDIT_AFTER
    assert total // (CREDIT_AT + 65536) < counted[0] <= total // CREDIT_AT + 2 + extra, counted[0]
    if reader == "small pieces":
        assert counted[0] >= total // (CREDIT_AT + 1000) - 2, counted[0]
    await stream.close()


@fail_after(60)
async def test_both_sides_writing_more_than_a_window_before_reading_all_never_stall(nodes: Any) -> None:
    """Each side writes a window and a half, then reads: each side's reader runs beside
    its writer, so credit must flow both ways while both are sending."""
    server, info = await nodes()
    client, _ = await nodes()
    total = WINDOW + WINDOW // 2

    async def serve(stream: P2PStream) -> None:
        async def send() -> None:
            await stream.send_all(b"s" * total, timeout=10)

        async with trio.open_nursery() as inner:
            inner.start_soon(send)
            assert await read_exactly(stream, total, piece=4096) == b"c" * total

    server.set_stream_handler(BULK, serve)
    stream = await client.open_stream(info.peer_id, BULK, addrs=info.addrs, timeout=5)
    async with trio.open_nursery() as inner:

        async def send() -> None:
            await stream.send_all(b"c" * total, timeout=10)

        inner.start_soon(send)
        assert await read_exactly(stream, total, piece=4096) == b"s" * total
    await stream.close()


async def write_then_read(stream: P2PStream, out: bytes, size: int) -> bytes:
    await stream.send_all(out, timeout=10)
    return await read_exactly(stream, size)


def sender(payload: bytes, outcome: list[str]) -> Any:
    """A handler that waits for one byte, writes ``payload`` in one write and records
    how that went (py-libp2p's writer fails after 5 s without credit)."""

    async def send(stream: P2PStream) -> None:
        await stream.receive_some(1, timeout=10)
        try:
            await stream.send_all(payload, timeout=30)
            outcome.append("sent")
        except Exception as exc:  # noqa: BLE001 - the test reports it
            outcome.append(repr(exc))
        await stream.close()

    return send


@fail_after(60)
async def test_a_reader_that_takes_a_message_and_pauses_leaves_its_sender_going(nodes: Any) -> None:
    """The sender writes a window and 100 KB; the reader takes 100 KB, then works on it
    for longer than py-libp2p's writer waits for credit (5 s). Held back for half a
    window, the 100 KB's credit never went, and the write failed after 5 s."""
    server, info = await nodes()
    client, _ = await nodes()
    message = 100 * 1024
    payload = os.urandom(WINDOW + message)
    outcome: list[str] = []
    server.set_stream_handler(BULK, sender(payload, outcome))
    stream = await client.open_stream(info.peer_id, BULK, addrs=info.addrs, timeout=5)
    await stream.send_all(b"g", timeout=5)
    await trio.sleep(0.3)  # the window fills; the sender waits for credit
    first = await read_exactly(stream, message)
    await trio.sleep(5.5)
    assert outcome == ["sent"]
    assert first + await read_exactly(stream, len(payload) - message) == payload
    await stream.close()


@fail_after(60)
async def test_a_slow_reader_of_small_pieces_leaves_its_sender_going(nodes: Any) -> None:
    """A reader taking 3 KiB every 2 s of a sender that filled the window and has 12 KiB
    left: credit only at 16 KiB read came after 10 s, and the write failed after 5 s.
    Under a low window, what was read goes back at a read 0.1 s after the last credit."""
    server, info = await nodes()
    client, _ = await nodes()
    piece = 3 * 1024
    payload = os.urandom(WINDOW + 4 * piece)
    outcome: list[str] = []
    server.set_stream_handler(BULK, sender(payload, outcome))
    stream = await client.open_stream(info.peer_id, BULK, addrs=info.addrs, timeout=5)
    await stream.send_all(b"g", timeout=5)
    await trio.sleep(0.3)  # the window fills; the sender waits for credit
    got = b""
    for _ in range(4):
        got += await read_exactly(stream, piece, piece=piece)
        await trio.sleep(2.0)
    assert outcome == ["sent"]
    assert got + await read_exactly(stream, len(payload) - len(got)) == payload
    await stream.close()


@fail_after(60)
async def test_a_whole_frame_reaches_a_reader_that_refuses_it_unread(nodes: Any) -> None:
    """An executor refuses a request from its header (rate limit, budget) and leaves the
    body unread: the client's write of a 900 KB request must end, so that it reads the
    refusal. In a 256 KiB window the write waited for credit that never came and failed
    after 5 s with STREAM_FAILED, the executor's answer lost."""
    server, info = await nodes()
    client, _ = await nodes()
    refusal = b"\0\0\0\7REFUSED"

    async def refuse(stream: P2PStream) -> None:
        await read_exactly(stream, 4, piece=4)
        await stream.send_all(refusal, timeout=5)

    server.set_stream_handler(BULK, refuse)
    stream = await client.open_stream(info.peer_id, BULK, addrs=info.addrs, timeout=5)
    size = 900 * 1024
    with trio.fail_after(4):  # well inside py-libp2p's 5 s wait
        await stream.send_all(size.to_bytes(4, "big") + os.urandom(size), timeout=10)
    assert await read_exactly(stream, len(refusal)) == refusal
    await stream.reset()


@fail_after(60)
async def test_a_fast_sender_never_gets_past_the_window(nodes: Any) -> None:
    """Credit is what the reader took, never ahead of it, and the window stays one frame
    (py-libp2p's auto-tuning doubled it up to 16 MiB, past trap K's bound (then 8 MiB) on a
    connection's unread bytes): what waits unread stays within one window."""
    server, info = await nodes()
    client, _ = await nodes()
    total = 4 * WINDOW

    async def bulk(stream: P2PStream) -> None:
        await stream.receive_some(1, timeout=10)
        await stream.send_all(b"b" * total, timeout=30)
        await stream.close()

    server.set_stream_handler(BULK, bulk)
    stream = await client.open_stream(info.peer_id, BULK, addrs=info.addrs, timeout=5)
    muxed = stream._stream.muxed_stream
    buffers = muxed.conn.stream_buffers
    await stream.send_all(b"g", timeout=5)
    got, most_waiting, reads = 0, 0, 0
    while got < total:
        most_waiting = max(most_waiting, len(buffers.get(muxed.stream_id, b"")))
        got += len(await stream.receive_some(4096, timeout=10))
        reads += 1
        if reads % 50 == 0:
            await trio.sleep(0.02)  # the sender catches up and fills the window
    assert got == total
    assert WINDOW // 2 < most_waiting <= WINDOW, most_waiting
    assert muxed.target_recv_window == WINDOW
    await stream.close()


@fail_after(60)
async def test_eight_whole_frames_waiting_unread_keep_their_connection(nodes: Any) -> None:
    """A client's eight streams (an executor's max-streams-per-peer) each carrying a 1 MiB
    request before the executor reads any: 8 MiB and more unread, which trap K's old
    8 MiB per-connection bound closed as a flood (review of trap Z). Honest traffic
    stays within the windows, and the bound is above eight windows."""
    server, info = await nodes()
    client, _ = await nodes()
    size = 1 << 20
    go, read = trio.Event(), []

    async def late_reader(stream: P2PStream) -> None:
        await go.wait()
        header = await read_exactly(stream, 4, piece=4)
        read.append(len(await read_exactly(stream, int.from_bytes(header, "big"))))
        await stream.send_all(b"ok", timeout=5)

    server.set_stream_handler(BULK, late_reader)
    streams = [await client.open_stream(info.peer_id, BULK, addrs=info.addrs, timeout=5) for _ in range(8)]

    async def send(stream: P2PStream) -> None:
        await stream.send_all(size.to_bytes(4, "big") + os.urandom(size), timeout=10)

    async with trio.open_nursery() as inner:
        for stream in streams:
            inner.start_soon(send, stream)
    with trio.fail_after(10):  # all of it arrives, none read yet
        while server.statistics().unread_bytes <= 8 * size:
            await trio.sleep(0.02)
    go.set()
    for stream in streams:
        assert await read_exactly(stream, 2) == b"ok"
        await stream.close()
    assert read == [size] * 8
    assert server.statistics().connections_flooded == 0
