"""The client library as a user meets it: errors raise as themselves out of
``open_client``, and invalid requests never leave the process.
"""

import time

import pytest
import trio

from loomnet.client import ClientConfig, open_client
from loomnet.protocol import (
    ChatMessage,
    ConfigError,
    ErrorCode,
    InvalidRequest,
    LedgerError,
    NetworkTimeout,
    NoOfferError,
    RemoteError,
    ResponseFormat,
    ToolCall,
    ToolSpec,
)

from ..limits import fail_after

pytestmark = [pytest.mark.integration, pytest.mark.model]

HELLO = [ChatMessage("user", "Say hi.")]


def config_for(executor, tmp_path, **overrides) -> ClientConfig:
    fields = dict(data_dir=str(tmp_path / "library-client"), bootstrap=[executor.info.addrs[0]], discover_local=False)
    return ClientConfig(**{**fields, **overrides})


async def raised_by(config: ClientConfig, body) -> BaseException:
    """What leaves ``async with open_client(config)`` when ``body(client)`` fails."""
    try:
        async with open_client(config) as client:
            await client.wait_for_offers(timeout=20)
            await body(client)
    except BaseException as exc:  # noqa: BLE001 - the point is to see exactly what escapes
        return exc
    pytest.fail("nothing was raised")


class Mine(Exception):
    """An application's own error."""


async def expired(executor, monkeypatch):
    monkeypatch.setattr(executor.server, "clock", lambda: time.time() + 3600)


@pytest.mark.parametrize(
    ("kind", "setup", "body", "code"),
    [
        (NoOfferError, None, lambda c: c.chat(HELLO, model="gpt-17", max_tokens=2), ErrorCode.NO_OFFER),
        (RemoteError, expired, lambda c: c.chat(HELLO, model="smol", max_tokens=2), ErrorCode.REQUEST_EXPIRED),
        (InvalidRequest, None, lambda c: c.chat(HELLO, temperature=float("nan")), ErrorCode.BAD_REQUEST),
        (NetworkTimeout, "impatient", lambda c: c.chat(HELLO, model="smol", max_tokens=2), ErrorCode.NETWORK_TIMEOUT),
        (Mine, None, None, None),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
@fail_after(60)
async def test_an_error_in_the_block_leaves_open_client_as_itself(
    executor, tmp_path, monkeypatch, kind, setup, body, code
):
    overrides = {}
    if setup == "impatient":
        overrides["first_byte_timeout"] = 1e-4  # no executor answers in 0.1 ms
    elif setup is not None:
        await setup(executor, monkeypatch)

    async def mine(client):
        raise Mine("the application's own")

    error = await raised_by(config_for(executor, tmp_path, **overrides), body or mine)
    assert type(error) is kind, repr(error)  # never an ExceptionGroup
    if code is not None:
        assert error.code == code
    try:  # and so a plain except clause catches it
        raise error
    except kind:
        pass


@pytest.mark.parametrize("broken", ["identity", "ledger"])
@fail_after(60)
async def test_an_error_starting_the_client_leaves_open_client_as_itself(tmp_path, broken):
    if broken == "identity":  # the data folder is a file: no identity can be made
        (tmp_path / "a-file").write_text("not a directory")
        config = ClientConfig(data_dir=str(tmp_path / "a-file"), discover_local=False)
    else:  # the ledger's path is a folder: the client fails once it runs
        (tmp_path / "home" / "client" / "ledger.sqlite").mkdir(parents=True)
        config = ClientConfig(data_dir=str(tmp_path / "home"), discover_local=False)
    with pytest.raises((LedgerError, ConfigError)) as info:
        async with open_client(config):
            pytest.fail("the client cannot start here")
    assert type(info.value) is {"identity": ConfigError, "ledger": LedgerError}[broken]


@fail_after(120)
async def test_invalid_requests_are_refused_before_any_traffic(executor, tmp_path):
    async with open_client(config_for(executor, tmp_path)) as client:
        await client.wait_for_offers(model="smol", timeout=20)
        await trio.testing.wait_all_tasks_blocked()
        before = client.member.node.statistics().streams_opened
        served = (executor.server.served, executor.server.refused)
        for kwargs, field in [
            (dict(temperature=float("nan")), "temperature"),
            (dict(temperature=-1.0), "temperature"),
            (dict(temperature=2.5), "temperature"),
            (dict(max_tokens=0), "max_tokens"),
            (dict(seed=-1), "seed"),
            (dict(max_price_out=-5), "max_price_out"),
            (dict(tool_choice="get_weather"), "tool_choice"),
            (dict(tools=[ToolSpec(name="f", parameters="{oops")]), "tools[0].parameters"),
            (dict(response_format=ResponseFormat(type="json_schema", schema="[]")), "response_format.schema"),
        ]:
            with pytest.raises(InvalidRequest) as info:
                await client.chat(HELLO, model="smol", **kwargs)
            assert info.value.field == field
        with pytest.raises(InvalidRequest) as info:
            await client.chat([], model="smol")
        assert info.value.field == "messages"
        with pytest.raises(InvalidRequest) as info:
            await client.chat([ChatMessage("wizard", "hi")], model="smol")
        assert info.value.field == "messages[0].role"
        called = ChatMessage("assistant", "", tool_calls=[ToolCall(id="c", name="f", arguments="not json")])
        with pytest.raises(InvalidRequest) as info:
            await client.chat([*HELLO, called, ChatMessage("tool", "1", tool_call_id="c")], model="smol")
        assert info.value.field == "messages[1].tool_calls[0].arguments"
        assert client.member.node.statistics().streams_opened == before
        assert (executor.server.served, executor.server.refused) == served
        # and the same client still chats
        result = await client.chat(HELLO, model="smol", max_tokens=4)
        assert result.receipt.output_tokens > 0


class Halt(BaseException):
    """A BaseException that is neither KeyboardInterrupt nor trio's."""


@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit, Halt])
@fail_after(60)
async def test_a_base_exception_in_the_block_leaves_open_client_as_itself(tmp_path, kind):
    # Ctrl-C in a trio program lands in whatever the main task runs: here, the block
    raised = kind("stop")
    config = ClientConfig(data_dir=str(tmp_path / "client"), discover_local=False)
    with pytest.raises(kind) as info:
        async with open_client(config):
            raise raised
    assert info.value is raised


@fail_after(60)
async def test_a_keyboard_interrupt_in_the_clients_own_task_leaves_as_itself(tmp_path, monkeypatch):
    # trio may deliver Ctrl-C to any task; here the client's offer-table expiry task gets it
    from loomnet.client import Member

    async def interrupted(self) -> None:
        await trio.sleep(0.1)
        raise KeyboardInterrupt

    monkeypatch.setattr(Member, "_expire_loop", interrupted)
    config = ClientConfig(data_dir=str(tmp_path / "client"), discover_local=False)
    with pytest.raises(KeyboardInterrupt):
        async with open_client(config):
            await trio.sleep_forever()


@pytest.mark.parametrize("where", ["outside", "inside"])
@fail_after(60)
async def test_cancelling_the_enclosing_scope_still_ends_the_block_cleanly(tmp_path, where):
    config = ClientConfig(data_dir=str(tmp_path / "client"), discover_local=False)
    reached = False
    with trio.move_on_after(2 if where == "outside" else 60) as scope:
        async with open_client(config) as client:
            if where == "inside":
                scope.cancel()
            await trio.sleep_forever()
        reached = True
    assert scope.cancelled_caught and not reached
    assert client.ledger is not None and client.ledger._conn is None  # the client ended: its ledger is closed
