"""The admin token: required on every admin route, compared in constant time, never echoed.

End to end (a real executor's admin API refusing without the token and with a wrong
one) is ``tests/e2e/test_admin_actions.py``; this pins the comparison itself: every
presented bearer token, of any length or prefix, goes through ``hmac.compare_digest``
(whose time does not depend on where the first differing byte is), never ``==``.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

import time

from loomnet.node import _operator
from loomnet.node._admin_guard import AdminGuard

TOKEN = "adm-0123456789abcdef0123456789abcdef"


def refusal_of(authorization: str | None, token: str | None):
    """The admin's answer to one request, with a lockout guard that never trips here
    (the lockout itself is ``tests/node/test_admin_guard.py``)."""
    guard = AdminGuard(failures=1_000, clock=time.monotonic)
    return _operator._admin_refusal(request(authorization), token, guard)


def request(authorization: str | None) -> Request:
    headers = [(b"authorization", authorization.encode("latin-1"))] if authorization is not None else []
    return Request({"type": "http", "method": "POST", "path": "/admin/drain", "query_string": b"", "headers": headers,
                    "client": ("203.0.113.9", 40000)})  # fmt: skip


def test_every_presented_token_is_compared_in_constant_time_and_only_the_token_passes(monkeypatch, caplog):
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(_operator.hmac, "compare_digest", spy)
    wrong = [TOKEN[:-1] + "0", TOKEN[:8], TOKEN + "0", "0" * len(TOKEN), "", TOKEN.upper()]
    for given in wrong:
        refusal = refusal_of(f"Bearer {given}", TOKEN)
        assert refusal is not None and refusal.status_code == 401, given
        assert refusal.headers["www-authenticate"] == "Bearer"
        assert given.encode() not in refusal.body or not given  # what was sent is never echoed
    assert compared == [(g.encode(), TOKEN.encode()) for g in wrong]
    for header in (None, TOKEN, f"Basic {TOKEN}", f"Token {TOKEN}"):  # no bearer: refused, nothing to compare
        assert refusal_of(header, TOKEN).status_code == 401, header
    assert refusal_of(f"Bearer {TOKEN}", TOKEN) is None
    assert refusal_of(f"bearer  {TOKEN} ", TOKEN) is None  # scheme case, spaces
    assert TOKEN not in caplog.text and TOKEN[:8] not in caplog.text  # the refusals were logged without it


def test_without_a_configured_token_nothing_passes():
    refusal = refusal_of(f"Bearer {TOKEN}", None)
    assert refusal is not None and refusal.status_code == 401 and b"no admin token configured" in refusal.body
