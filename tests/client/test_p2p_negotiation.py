"""Traps N and O of the libp2p adapter: what a node does before any loomnet limit applies.

* O: multistream-select reads a protocol line of whatever length its varint announces
  (libp2p 0.8.1); one connection's 60 streams announcing 16 MiB each grew an executor by
  over 200 MB. Now a line over 1 KiB fails the negotiation after its length prefix.
* N: libp2p listens with ``SO_REUSEPORT``, so a second node on a port in use started
  silently and took part of the first node's inbound connections.
"""

from __future__ import annotations

import socket

import pytest
import trio

from loomnet.client import ClientConfig, open_client
from loomnet.client._p2p import MultiselectCommunicator, MultiselectCommunicatorError
from loomnet.client._p2p_bounds import MAX_MULTISELECT_MESSAGE
from loomnet.protocol import ConfigError

from ..limits import fail_after
from .test_p2p_limits import ECHO, ask, echo_upper, start_node  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


class EndlessLine:
    """A reader announcing a ``length``-byte multistream line, then sending it forever."""

    def __init__(self, length: int) -> None:
        self.pending = uvarint(length)
        self.taken = 0

    async def read(self, n: int = -1) -> bytes:
        if not self.pending:
            self.pending = b"a" * 65536
        n = len(self.pending) if n is None or n < 0 else n
        data, self.pending = self.pending[:n], self.pending[n:]
        self.taken += len(data)
        return data


@pytest.mark.parametrize("announced", [MAX_MULTISELECT_MESSAGE + 1, 16 << 20, (1 << 63) - 1])
async def test_a_long_multistream_line_is_refused_after_its_length(announced):
    reader = EndlessLine(announced)
    with pytest.raises(MultiselectCommunicatorError):
        await MultiselectCommunicator(reader).read()  # type: ignore[arg-type]
    assert reader.taken <= 10  # the varint only: nothing of the line was read


async def test_an_honest_multistream_line_still_reads():
    line = b"/loomnet/infer/1\n"

    class Reader:
        data = uvarint(len(line)) + line

        async def read(self, n: int = -1) -> bytes:
            out, Reader.data = Reader.data[:n], Reader.data[n:]
            return out

    assert await MultiselectCommunicator(Reader()).read() == "/loomnet/infer/1"  # type: ignore[arg-type]


@fail_after(60)
async def test_a_peer_announcing_huge_protocol_ids_is_reset_and_others_are_served(start_node):  # noqa: F811
    server, info = await start_node()
    server.set_stream_handler(ECHO, echo_upper)
    attacker, _ = await start_node()
    await attacker.connect(info.addrs[0], timeout=10)
    swarm = attacker._host.get_network()  # a hostile peer speaks raw yamux
    muxed = [c for conns in swarm.connections.values() for c in conns][0].muxed_conn

    async def announce_huge() -> int:
        """Bytes of the line the server took before it reset the stream."""
        stream = await muxed.open_stream()
        await stream.write(uvarint(19) + b"/multistream/1.0.0\n")
        await stream.write(uvarint(16 << 20) + b"/")
        sent = 0
        try:
            with trio.fail_after(20):
                while sent < 16 << 20:
                    await stream.write(b"a" * 16384)
                    sent += 16384
        except trio.TooSlowError:
            return -1  # held open: neither read nor reset
        except Exception:  # noqa: BLE001 - reset by the server: what should happen
            return sent
        return sent

    taken: list[int] = []
    async with trio.open_nursery() as attack:
        for _ in range(8):
            attack.start_soon(_collect, announce_huge, taken)
    # each stream is reset once its length prefix is read: what it could send is what
    # yamux's flow-control window (256 KiB) lets through before the reset arrives
    assert all(0 <= n <= 512 * 1024 for n in taken), taken
    # an honest peer is served meanwhile and after
    honest, _ = await start_node()
    assert await ask(honest, info.peer_id, info.addrs, b"hi") == b"HI"


async def _collect(fn, out: list) -> None:
    out.append(await fn())


@fail_after(60)
async def test_a_second_node_on_a_port_in_use_is_refused(tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    listen = [f"/ip4/127.0.0.1/tcp/{port}"]
    first = ClientConfig(data_dir=str(tmp_path / "a"), discover_local=False, listen=listen)
    second = ClientConfig(data_dir=str(tmp_path / "b"), discover_local=False, listen=listen)
    async with open_client(first):
        with pytest.raises(ConfigError, match="in use"):
            async with open_client(second):
                pass
    async with open_client(second):  # free again once the first node stopped
        pass


@fail_after(60)
async def test_a_port_held_by_another_program_is_a_config_error_not_a_group(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        config = ClientConfig(data_dir=str(tmp_path / "c"), discover_local=False,
                              listen=[f"/ip4/127.0.0.1/tcp/{holder.getsockname()[1]}"])
        with pytest.raises(ConfigError):  # itself, never wrapped in an ExceptionGroup
            async with open_client(config):
                pass
    finally:
        holder.close()
