"""``loomnet peers``: the peers a client reaches, how it found each, and what each sent.

It joins as ``loomnet chat`` and ``loomnet offers`` do (bootstrap addresses, executors
announced on this machine, and the LAN by mDNS with ``--mdns``), waits up to ``--wait``
seconds for a first connection, then prints one line per peer: connected peers first,
then peers heard of on gossip only. For each: how it was found (``bootstrap``,
``local-file``, ``mdns``, ``dialed``, ``inbound``, ``gossip``), the connection's
direction, the adverts it handed over or published that passed every check, and the
ones refused, counted by reason (``docs/network.md``, "Discovery").

``cli`` imports this module at its end, for the helpers it shares with the other client
commands; import ``loomnet.node.cli``, not this module, first.
"""

from __future__ import annotations

import sys

import click
import msgspec
import trio

from loomnet.client import ClientConfig, open_client

from .cli import _client_config, _run, _with_client_options

__all__ = ["peers"]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per peer.")
@click.option("--mdns", is_flag=True, help="Also find executors on the LAN by multicast DNS.")
@_with_client_options
def peers(as_json: bool, mdns: bool, bootstrap, data_dir, wait) -> None:
    """Print the connected peers: how each was found, the adverts each sent, and those
    refused, with the reason."""
    config = msgspec.structs.replace(_client_config(bootstrap, data_dir, wait), mdns=mdns)
    _run(_peers_main, config, as_json)


async def _peers_main(config: ClientConfig, as_json: bool) -> None:
    async with open_client(config) as client:
        with trio.move_on_after(config.offer_timeout):  # mDNS finds peers after the join
            while not client.member.node.connected_peers():
                await trio.sleep(0.1)
        records = client.member.peers()
        me = client.peer_id
    if as_json:
        for r in records:
            click.echo(msgspec.json.encode(r))
        return
    if not any(r.connection for r in records):
        click.echo(
            "no connected peers: start an executor (`loomnet executor`) on this machine, pass "
            "--bootstrap /ip4/<host>/tcp/<port>/p2p/<peer id>, or try --mdns on a LAN",
            err=True,
        )
        sys.exit(1)
    click.echo(f"{'PEER':52}  {'FOUND':10}  {'CONNECTION':10}  {'ADVERTS':>7}  REJECTED")
    for r in records:
        rejected = ", ".join(f"{reason}={n}" for reason, n in sorted(r.rejected.items())) or "-"
        click.echo(f"{r.peer_id:52}  {r.found:10}  {r.connection or '-':10}  {r.adverts:7}  {rejected}")
    click.echo(f"(this node: {me})", err=True)
