"""``loomnet peers`` as a person uses it: against a real executor process, and against a
peer that hands over forged adverts (the refusals are printed with their reasons)."""

from __future__ import annotations

import json
import os
import time

import msgspec
import pytest
import trio

from loomnet.client import P2PConfig, P2PNode
from loomnet.protocol import (
    ADVERTS_PROTOCOL,
    Advert,
    AdvertFrame,
    Envelope,
    ModelOffer,
    SignedKind,
    SigningKey,
    encode_frame,
    encode_frame_body,
    seal,
)

from .test_cli import LOOMNET, env, executor_process, run  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration]


def ready_addr(ready: str) -> str:
    return next(line.split(": ", 1)[1].strip() for line in ready.splitlines() if line.strip().startswith("listen"))


@pytest.mark.model
def test_peers_lists_the_executor_and_how_it_was_found(executor_process, env):  # noqa: F811
    _, ready = executor_process
    peer_id = ready.split("peer id : ")[1].split()[0]
    local = run(env, "peers")  # no flags: the executor announced itself on this machine
    assert local.returncode == 0, local.stderr
    header, *rows = local.stdout.strip().splitlines()
    assert header.split() == ["PEER", "FOUND", "CONNECTION", "ADVERTS", "REJECTED"]
    [row] = rows
    assert row.split()[:3] == [peer_id, "local-file", "outbound"] and int(row.split()[3]) >= 1
    assert row.split()[4] == "-"

    other = {**env, "LOOMNET_STATE_DIR": env["LOOMNET_STATE_DIR"] + "-elsewhere"}  # no state file: bootstrap
    joined = run(other, "peers", "--json", "--bootstrap", ready_addr(ready))
    assert joined.returncode == 0, joined.stderr
    [record] = [json.loads(line) for line in joined.stdout.splitlines()]
    assert record == {**record, "peer_id": peer_id, "found": "bootstrap", "connection": "outbound", "rejected": {}}


def test_no_peer_is_one_clear_line_and_nonzero(env):  # noqa: F811
    result = run(env, "peers", "--wait", "0.5")
    assert result.returncode == 1
    assert "no connected peers" in result.stderr and "Traceback" not in result.stderr


def frame(envelope: Envelope) -> bytes:
    return encode_frame(encode_frame_body(AdvertFrame(envelope)))


async def test_peers_prints_the_adverts_a_peer_sent_and_those_refused_with_the_reason(nursery, env):  # noqa: F811
    # A peer answering the adverts stream with one valid advert of its own and three
    # forged ones: a bad signature, an expired advert and an older copy of its own.
    key = SigningKey(os.urandom(32))
    now = time.time()
    own = seal(SignedKind.ADVERT, Advert(seq=5, issued_at=now, ttl=600.0, models=[ModelOffer(name="m")]), key)
    older = seal(SignedKind.ADVERT, Advert(seq=4, issued_at=now, ttl=600.0, models=[ModelOffer(name="m")]), key)
    stranger = SigningKey(os.urandom(32))
    expired = seal(SignedKind.ADVERT, Advert(seq=1, issued_at=now - 3600, ttl=60.0), stranger)
    forged = msgspec.structs.replace(seal(SignedKind.ADVERT, Advert(seq=1, issued_at=now, ttl=60.0), stranger), sig=bytes(64))

    async def serve(stream) -> None:
        for envelope in (own, older, expired, forged):
            await stream.send_all(frame(envelope), timeout=5)

    node = P2PNode(key.seed, P2PConfig())
    node.set_stream_handler(ADVERTS_PROTOCOL, serve)
    info = await nursery.start(node.run)
    result = await trio.run_process(
        [LOOMNET, "peers", "--bootstrap", info.addrs[0], "--wait", "2"],
        env=env, capture_stdout=True, capture_stderr=True, check=False,
    )
    stdout = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    [row] = stdout.strip().splitlines()[1:]
    peer, found, connection, adverts, rejected = row.split(None, 4)
    assert (peer, found, connection, adverts) == (key.peer_id, "bootstrap", "outbound", "1")
    assert rejected == "bad-signature=1, expired=1, stale=1"
    node.stop()
