"""The admin routes' guard against token guessing (``node/_admin_guard``): a source
locked out after too many refused tokens, with 429, ``ADMIN_LOCKED_OUT`` and
``Retry-After``, until the window passes (trio's autojump clock: no real sleep); accepted
tokens never count; the memory of sources is bounded; the lockout is logged once, never
with the token."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import httpx
import pytest
import trio

from loomnet.node._admin_guard import AdminGuard
from loomnet.node._operator import operator_app
from loomnet.node.config import ExecutorConfig, OperatorConfig
from loomnet.protocol import ErrorCode

TOKEN = "admin-token-0123456789abcdef"
WRONG = "wrong-guess-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_source_is_locked_out_after_n_refusals_within_the_window_and_no_longer():
    clock = Clock()
    guard = AdminGuard(failures=3, window=60.0, clock=clock)
    assert [guard.refused("10.0.0.1") for _ in range(2)] == [None, None]
    assert guard.retry_after("10.0.0.1") is None and guard.retry_after("10.0.0.2") is None
    assert guard.refused("10.0.0.1") == 60  # the third locks it
    clock.now += 59.5
    assert guard.retry_after("10.0.0.1") == 1 and guard.retry_after("10.0.0.2") is None
    clock.now += 0.5
    assert guard.retry_after("10.0.0.1") is None
    # failures older than the window do not add up
    for _ in range(2):
        assert guard.refused("10.0.0.1") is None
        clock.now += 61
    assert guard.refused("10.0.0.1") is None and guard.retry_after("10.0.0.1") is None


def test_the_memory_is_bounded_and_forgets_the_oldest_source():
    guard = AdminGuard(failures=2, window=60.0, max_sources=3, clock=Clock())
    for i in range(10):
        guard.refused(f"10.0.0.{i}")
        assert len(guard) <= 3
    guard.refused("10.0.0.9")  # the newest is locked
    assert guard.retry_after("10.0.0.9") == 60
    guard.refused("10.0.0.0")  # the oldest was forgotten: this is its first refusal again
    assert guard.retry_after("10.0.0.0") is None and len(guard) == 3


def test_bad_settings_are_refused():
    for kw in ({"failures": 0}, {"window": 0}, {"window": float("nan")}, {"max_sources": 0}):
        with pytest.raises(ValueError):
            AdminGuard(**kw)


def app_for(guard: AdminGuard):
    """The real operator app over the parts of an executor the admin routes read."""
    executor = SimpleNamespace(config=ExecutorConfig(operator=OperatorConfig(admin_token=TOKEN)),
                               admin=SimpleNamespace(backends=lambda: [], source=None))  # fmt: skip
    return operator_app(executor, guard=guard)


def http(app, host: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(host, 40000)), base_url="http://op")


async def test_guessing_the_token_locks_the_source_out_until_the_window_passes(autojump_clock, caplog):
    guard = AdminGuard(failures=10, window=60.0, clock=trio.current_time)
    app = app_for(guard)
    good, bad = {"authorization": f"Bearer {TOKEN}"}, {"authorization": f"Bearer {WRONG}"}
    caplog.set_level(logging.WARNING, logger="loomnet.operator")
    async with http(app, "203.0.113.7") as guesser, http(app, "203.0.113.8") as operator:
        # accepted tokens never count: many of them leave the source unlocked
        for _ in range(25):
            assert (await guesser.get("/admin/backends", headers=good)).status_code == 200
        for i in range(9):
            refused = await guesser.get("/admin/backends", headers=bad)
            assert refused.status_code == 401 and refused.json()["code"] == ErrorCode.ADMIN_UNAUTHORIZED
        locked = await guesser.post("/admin/drain", headers=bad)  # the tenth
        assert locked.status_code == 429 and locked.json()["code"] == ErrorCode.ADMIN_LOCKED_OUT
        assert locked.headers["retry-after"] == "60"
        await trio.sleep(20)
        for headers in (bad, good, {}):  # even the right token, while locked out
            answer = await guesser.get("/admin/backends", headers=headers)
            assert answer.status_code == 429 and answer.json()["code"] == ErrorCode.ADMIN_LOCKED_OUT
            assert answer.headers["retry-after"] == "40"
        # another address is not locked out
        assert (await operator.get("/admin/backends", headers=good)).status_code == 200
        await trio.sleep(40)
        assert (await guesser.get("/admin/backends", headers=good)).status_code == 200
        assert (await guesser.get("/admin/backends", headers=bad)).status_code == 401  # counting anew
    lockouts = [r.getMessage() for r in caplog.records if "locked out" in r.getMessage()]
    assert lockouts == ["admin: 203.0.113.7 locked out for 60 s after 10 refused admin tokens within 60 s"]
    assert not any(TOKEN in r.getMessage() or WRONG in r.getMessage() for r in caplog.records)


async def test_without_a_configured_token_refusals_do_not_lock_anyone_out(autojump_clock):
    executor = SimpleNamespace(config=ExecutorConfig(), admin=SimpleNamespace(backends=lambda: [], source=None))
    guard = AdminGuard(failures=2, window=60.0)
    async with http(operator_app(executor, guard=guard), "127.0.0.1") as client:
        for _ in range(5):
            assert (await client.get("/admin/backends")).status_code == 401
    assert len(guard) == 0


async def test_an_unauthenticated_oversized_body_is_refused_as_unauthenticated(autojump_clock):
    """Auth is checked before the body's size: a stranger learns 401, never 413."""
    async with http(app_for(AdminGuard()), "127.0.0.1") as client:
        for path in ("/admin/backends", "/admin/backends/desk/spend-budget"):
            answer = await client.post(path, content=b"x" * 200_000)
            assert answer.status_code == 401 and answer.json()["code"] == ErrorCode.ADMIN_UNAUTHORIZED
        answer = await client.patch("/admin/models/m1", content=b"x" * 200_000,
                                    headers={"authorization": f"Bearer {WRONG}"})  # fmt: skip
        assert answer.status_code == 401


async def test_the_status_page_policy_allows_its_own_icon():
    """The page's ``<link rel="icon" href="data:,">`` is allowed by its CSP (no console error)."""
    async with http(app_for(AdminGuard()), "127.0.0.1") as client:
        page = await client.get("/")
    assert 'href="data:,"' in page.text
    img = next(d for d in page.headers["content-security-policy"].split(";") if d.strip().startswith("img-src"))
    assert "data:" in img.split()
