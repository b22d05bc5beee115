"""``loomnet gateway``: serve the OpenAI and Anthropic HTTP APIs on the network.

The command is thin over :mod:`loomnet.client.gateway`; this module reads its TOML
(``configs/gateway.toml`` is the worked example), prints where it listens, and stops
on Ctrl-C or SIGTERM, letting answers in flight finish for a few seconds.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import click
import msgspec
import trio

from loomnet.client import open_client
from loomnet.client.gateway import DEFAULT_PORT, GatewayConfig, serve_gateway
from loomnet.client.gateway._serve import GRACEFUL_TIMEOUT
from loomnet.protocol import ConfigError

from ._redact import Redactor, install_log_redaction
from .config import _expand_secrets

__all__ = ["gateway", "load_gateway_config"]

log = logging.getLogger("loomnet.gateway")

#: seconds after the graceful drain before whatever is left is cancelled (the client's
#: ledger closing, streams resetting)
_SHUTDOWN_GRACE = 3.0


def load_gateway_config(path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read ``path`` (TOML; None = defaults) and validate it. ``${VAR}`` in a key's
    ``key`` is replaced by the environment variable ``VAR`` (write keys that way: the
    file then holds no secret).

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key, wrong type or bad value,
            an unset variable; the message names the file and the key, never a secret.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {where}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {where} is not valid TOML: {exc}") from None
    try:
        if isinstance(raw.get("keys"), list):
            raw["keys"] = _expand_secrets(raw["keys"], "keys", environ)
        return msgspec.convert(raw, GatewayConfig, strict=False)
    except msgspec.ValidationError as exc:  # msgspec names the path and the rule, never the value
        raise ConfigError(f"config {where}: {exc}") from None
    except ValueError as exc:  # __post_init__
        raise ConfigError(f"config {where}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"config {where}: {exc.message}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file (configs/gateway.toml).")
@click.option("--host", help="Address to listen on [default: 127.0.0.1, or the config's].")
@click.option("--port", type=click.IntRange(0, 65535), help=f"Port to listen on; 0 = any free one [default: {DEFAULT_PORT}].")
@click.option(
    "--bootstrap", multiple=True,
    help="Peer multiaddr with /p2p/<id> to join through (repeatable); added to the config's.",
)  # fmt: skip
@click.option("--data-dir", type=click.Path(file_okay=False), help="Client identity and ledger folder.")
@click.option("--wait", type=float, help="Seconds a request waits for a matching offer [default: 5].")
def gateway(config_path, host, port, bootstrap, data_dir, wait) -> None:
    """Serve the OpenAI (/v1/chat/completions, /v1/models) and Anthropic (/v1/messages)
    HTTP APIs on the network: point any OpenAI or Anthropic client's base URL here."""
    from .cli import _check_bootstrap, _fail, _run

    _check_bootstrap(None, None, bootstrap)
    try:
        config = load_gateway_config(config_path) if config_path else GatewayConfig()
    except ConfigError as exc:
        _fail(exc)
    client = config.client
    changes: dict[str, object] = {}
    if bootstrap:
        changes["bootstrap"] = [*client.bootstrap, *bootstrap]
    if data_dir or (client.data_dir is None and os.environ.get("LOOMNET_DATA_DIR")):
        changes["data_dir"] = data_dir or os.environ.get("LOOMNET_DATA_DIR")
    if wait is not None:
        changes["offer_timeout"] = wait
    if changes:
        client = msgspec.structs.replace(client, **changes)
    top: dict[str, object] = {"client": client}
    if host is not None:
        top["host"] = host
    if port is not None:
        top["port"] = port
    config = msgspec.structs.replace(config, **top)
    install_log_redaction(Redactor([k.key for k in config.keys]))
    _run(_gateway_main, config)


async def _gateway_main(config: GatewayConfig) -> None:
    """Serve until Ctrl-C or SIGTERM; then stop accepting and let answers in flight
    finish (hypercorn's graceful shutdown, :data:`GRACEFUL_TIMEOUT` seconds), with a
    backstop a little later that cancels whatever is left."""
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                async with open_client(config.client) as client:
                    async with trio.open_nursery() as inner:
                        try:
                            server = await inner.start(functools.partial(serve_gateway, client, config,
                                                                         shutdown=stop.wait))  # fmt: skip
                        except* OSError as group:
                            exc = group.exceptions[0]
                            while isinstance(exc, BaseExceptionGroup):
                                exc = exc.exceptions[0]
                            raise ConfigError(f"cannot listen on {config.host}:{config.port}: "
                                              f"{getattr(exc, 'strerror', None) or exc}") from None  # fmt: skip
                        _print_ready(config, server.url, len(client.offers()))
                nursery.cancel_scope.cancel()  # drained (or failed): the signal loop is done too

            nursery.start_soon(serve)
            async for signum in signals:
                click.echo(f"\n{signal.Signals(signum).name}: shutting down; answers in flight get "
                           f"{GRACEFUL_TIMEOUT:g} s to finish", err=True)  # fmt: skip
                stop.set()
                nursery.cancel_scope.deadline = trio.current_time() + GRACEFUL_TIMEOUT + _SHUTDOWN_GRACE
                break
            await trio.sleep_forever()  # until serve() ends or the backstop passes


def _print_ready(config: GatewayConfig, url: str, offers: int) -> None:
    click.echo(f"loomnet gateway listening on {url}")
    click.echo(f"  OpenAI base URL:    {url}/v1")
    click.echo(f"  Anthropic base URL: {url}")
    if config.keys:
        click.echo(f"  keys: {len(config.keys)} ({', '.join(k.name for k in config.keys[:8])}"
                   f"{', ...' if len(config.keys) > 8 else ''}); requests without one get 401")  # fmt: skip
    else:
        click.echo("  keys: none; anyone who can reach this address may use it (and spend this client's credits)")
        if not _is_loopback(config.host):
            click.echo(f"warning: listening on {config.host} without keys: add [[keys]] to the config", err=True)
    if offers:
        click.echo(f"  offers: {offers} live now")
    else:
        click.echo("  offers: none yet; start an executor on this machine (`loomnet executor`, found within seconds)"
                   " or pass --bootstrap /ip4/<host>/tcp/<port>/p2p/<peer id>")  # fmt: skip
    auth = ' -H "Authorization: Bearer $YOUR_KEY"' if config.keys else ""
    click.echo(f"Try: curl{auth} {url}/v1/models")
    click.echo("Stop with Ctrl-C.")
    sys.stdout.flush()
