"""The gateway's keys are secrets: neither a configured key nor the key a caller presented
appears in a response (body or headers) or in any log line, whatever the request."""

from __future__ import annotations

import logging

import openai
import pytest

from loomnet.client.gateway import GatewayKey

from .gateway_kit import HELLO, USER_KEY, embedded_gateway, in_thread, sdk

pytestmark = [pytest.mark.integration, pytest.mark.model]

WRONG_KEY = "lg-wrong-key-5e1d9c3b7a2f4e6d8c0b"
OTHER_KEY = "lg-other-key-0a9b8c7d6e5f4a3b2c1d"


async def test_no_key_shows_in_responses_or_logs(nursery, tmp_path, executor, caplog):
    caplog.set_level(logging.DEBUG)
    keys = [GatewayKey(name="alice", key=USER_KEY), GatewayKey(name="bob", key=OTHER_KEY)]
    server = await embedded_gateway(nursery, tmp_path, executor, keys=keys)
    seen: list[str] = []
    wrong = sdk(server, api_key=WRONG_KEY)
    for call in (lambda: wrong.chat.completions.create(model="smol", messages=HELLO),
                 lambda: wrong.chat.completions.create(model="smol", messages=HELLO, stream=True),
                 lambda: wrong.models.list(), lambda: wrong.models.retrieve("smol"),
                 lambda: sdk(server, api_key="unused", default_headers={"x-api-key": WRONG_KEY}).models.list(
                     extra_headers={"Authorization": openai.Omit()})):  # fmt: skip
        with pytest.raises(openai.AuthenticationError) as info:
            await in_thread(call)
        seen += [info.value.response.text, repr(dict(info.value.response.headers)), str(info.value)]
    raw = await in_thread(sdk(server, api_key=USER_KEY).models.with_raw_response.list)
    seen += [raw.http_response.text, repr(dict(raw.headers))]
    seen += [r.getMessage() for r in caplog.records] + [caplog.text]
    seen += [repr(server.gateway.config), repr(keys), repr(server.gateway.statistics())]
    everything = "\n".join(seen)
    for secret in (USER_KEY, OTHER_KEY, WRONG_KEY):
        assert secret not in everything
        assert secret[-12:] not in everything  # nor a tail of one
