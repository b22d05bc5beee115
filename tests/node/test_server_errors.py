"""What the server tells a peer when something fails (issue 7 §1 and §4, executor side).

A peer gets a stable code and loomnet's own words; the library's text (which may quote
a key, an endpoint, a file path) goes to the operator's log only. A failure while
booking a partial receipt never replaces the error that ended the answer.
"""

from __future__ import annotations

import logging

import pytest

from loomnet.protocol import BackendError, ErrorCode, LedgerError

from ..limits import fail_after
from .server_harness import Finished, Harness, ScriptedBackend, TextDelta, events

CANARY = "sk-CANARY-4f1e9a"


def log_text(caplog) -> str:
    return "\n".join(r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in caplog.records)


async def failing_ledger(harness, message: str) -> None:
    async def record_receipt(*args, **kwargs):
        raise LedgerError(message)

    harness.server.ledger.record_receipt = record_receipt  # the sqlite side is the ledger's own test's job


@fail_after(30)
async def test_a_ledger_failure_reaches_the_peer_as_a_code_and_the_log_in_full(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    backend = ScriptedBackend(events(TextDelta("Hello"), Finished(finish_reason="stop")))
    harness = await Harness.start(tmp_path, [backend])
    await failing_ledger(harness, f"ledger: could not record a receipt in /home/{CANARY}/ledger.sqlite: disk I/O error")
    answer = await harness.ask("m1")
    assert answer.error is not None and answer.error.code == ErrorCode.LEDGER_FAILED
    assert CANARY not in answer.error.message and "sqlite" not in answer.error.message
    assert CANARY in log_text(caplog)


@pytest.mark.parametrize("after_text", [False, True], ids=["before-output", "mid-stream"])
@fail_after(30)
async def test_an_unexpected_backend_exception_is_internal_to_the_peer_and_logged(tmp_path, caplog, after_text):
    async def script(params):
        if after_text:
            yield TextDelta("Hello")
        raise RuntimeError(f"adapter bug: header value b'Bearer {CANARY}\\n' is invalid")

    caplog.set_level(logging.INFO)
    harness = await Harness.start(tmp_path, [ScriptedBackend(script)])
    answer = await harness.ask("m1")
    assert answer.error is not None and answer.error.code == ErrorCode.INTERNAL
    assert CANARY not in answer.error.message and "Bearer" not in answer.error.message
    assert CANARY in log_text(caplog)
    if after_text:  # the client got text: it gets the receipt for exactly that text
        assert answer.error_receipt is not None and answer.check(answer.error_receipt) == []
    else:
        assert answer.error_receipt is None


@fail_after(30)
async def test_a_backend_error_carries_loomnet_words_not_the_library_text(tmp_path, caplog):
    async def script(params):
        yield TextDelta("Hel")
        raise BackendError(f"openai is unreachable at http://user:{CANARY}@10.0.0.7/v1", code=ErrorCode.BACKEND_UNAVAILABLE,
                           retryable=True)

    caplog.set_level(logging.INFO)
    harness = await Harness.start(tmp_path, [ScriptedBackend(script)])
    answer = await harness.ask("m1")
    error = answer.error
    assert error is not None and error.code == ErrorCode.BACKEND_UNAVAILABLE and error.retryable
    assert CANARY not in error.message and "http" not in error.message and "openai" not in error.message
    assert answer.error_receipt is not None


@fail_after(30)
async def test_a_failure_to_book_the_partial_receipt_never_replaces_the_original_error(tmp_path, caplog):
    async def script(params):
        yield TextDelta("one two ")
        raise BackendError("the runtime crashed", code=ErrorCode.BACKEND_ERROR, retryable=True)

    caplog.set_level(logging.INFO)
    harness = await Harness.start(tmp_path, [ScriptedBackend(script)])
    await failing_ledger(harness, "ledger: could not record a receipt: database or disk is full")
    answer = await harness.ask("m1")
    error = answer.error
    assert answer.text == "one two "
    assert error is not None and (error.code, error.retryable) == (ErrorCode.BACKEND_ERROR, True)
    assert answer.error_receipt is None  # it could not be booked, so it is not sent
    assert "database or disk is full" in log_text(caplog)
