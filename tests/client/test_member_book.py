"""The peer book behind ``loomnet peers``, pure: how each peer was found, counts by
reason, and bounded memory whoever sends."""

from __future__ import annotations

from loomnet.client._peer_book import Found, PeerBook
from loomnet.client._validator import Rejection


def test_how_a_peer_was_found_first_way_wins() -> None:
    book = PeerBook()
    book.bootstrap([("boot", Found.BOOTSTRAP), ("local", Found.LOCAL_FILE)])
    book.found("lan", Found.MDNS)
    book.found("lan", Found.DIALED)  # found on the LAN first: stays mdns
    book.found("boot", Found.MDNS)  # a bootstrap peer is a bootstrap peer
    connections = {"boot": "outbound", "local": "outbound", "lan": "outbound", "caller": "inbound", "exec": "outbound"}
    found = {r.peer_id: (r.found, r.connection) for r in book.records(connections)}
    assert found == {
        "boot": ("bootstrap", "outbound"),
        "local": ("local-file", "outbound"),
        "lan": ("mdns", "outbound"),
        "caller": ("inbound", "inbound"),  # it dialed us, and we knew it no other way
        "exec": ("gossip", "outbound"),  # we dialed the address its advert gave
    }


def test_adverts_and_rejections_are_counted_per_peer_and_reason() -> None:
    book = PeerBook()
    for _ in range(3):
        book.received("a")
    book.rejected("a", Rejection.STALE)
    book.rejected("a", Rejection.STALE)
    book.rejected("a", Rejection.BAD_SIGNATURE)
    book.rejected("far", Rejection.EXPIRED)  # a publisher we are not connected to
    records = book.records({"a": "outbound", "quiet": "inbound"})
    assert [(r.peer_id, r.adverts, r.rejected) for r in records] == [
        ("a", 3, {"stale": 2, "bad-signature": 1}),
        ("quiet", 0, {}),
        ("far", 0, {"expired": 1}),  # not connected, listed after the connected ones
    ]
    assert records[2].connection is None and records[2].found == "gossip"


def test_memory_is_bounded_however_many_identities_send() -> None:
    book = PeerBook(max_peers=100)
    book.bootstrap([("boot", Found.BOOTSTRAP)])
    book.received("honest")
    for i in range(10_000):
        book.rejected(f"minted-{i}", Rejection.BAD_SIGNATURE)
        book.rejected(f"minted-{i}", Rejection.STALE)
    assert len(book._entries) == 100
    assert all(len(e.rejected) <= len(Rejection) for e in book._entries.values())
    assert book.how("boot") is Found.BOOTSTRAP  # bootstrap peers are never forgotten
    assert "honest" not in book._entries  # the least recently active went first
    book.received("honest")  # an active peer comes back
    assert len(book._entries) == 100 and any(r.peer_id == "honest" and r.adverts == 1 for r in book.records({}))
