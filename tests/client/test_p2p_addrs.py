from loomnet.client import _p2p_types


def test_wildcard_listen_address_is_reported_on_loopback_and_every_interface(monkeypatch):
    monkeypatch.setattr(_p2p_types, "_interface_ipv4", lambda: ["192.0.2.7", "10.1.2.3"])
    assert _p2p_types._dialable("/ip4/0.0.0.0/tcp/4001/p2p/12D3KooWx") == [
        "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWx",
        "/ip4/192.0.2.7/tcp/4001/p2p/12D3KooWx",
        "/ip4/10.1.2.3/tcp/4001/p2p/12D3KooWx",
    ]


def test_specific_addresses_are_kept_as_they_are():
    assert _p2p_types._dialable("/ip4/192.0.2.7/tcp/4001") == ["/ip4/192.0.2.7/tcp/4001"]
    assert _p2p_types._dialable("/ip6/::/tcp/4001") == ["/ip6/::1/tcp/4001"]


def test_interfaces_are_read_without_loopback():
    assert all(not ip.startswith("127.") for ip in _p2p_types._interface_ipv4())
