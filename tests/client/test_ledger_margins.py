"""The executor's margin in the ledger (schema version 4): which backend answered each
receipt and what its provider charged; a version 3 file is migrated keeping every row."""

from __future__ import annotations

import sqlite3

import pytest

from loomnet.client import _ledger
from loomnet.client._ledger import Ledger, Margin
from loomnet.protocol import digest

from .test_ledger import EXECUTOR, signed_receipt
from .test_ledger_accounts import V2_ROWS, raw_rows, schema_of, write_v2_ledger


async def book(ledger: Ledger, n: int, *, backend=None, provider_cost=None, now: float = 2000.0, **overrides):
    envelope, receipt = signed_receipt(n, **overrides)
    await ledger.record_receipt(envelope, receipt, role="executor", executor=EXECUTOR.peer_id, now=now,
                                backend=backend, provider_cost=provider_cost)  # fmt: skip
    return receipt


async def test_margins_per_model_and_backend_over_a_period(tmp_path):
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        a = await book(ledger, 1, backend="desk", provider_cost=None, now=100.0)
        b = await book(ledger, 2, backend="hosted", provider_cost=700, now=200.0)
        c = await book(ledger, 3, backend="hosted", provider_cost=300, now=300.0)
        await book(ledger, 4, backend="hosted", provider_cost=5, now=999.0)  # outside the period asked for
        margins = await ledger.margins(since=100.0, until=999.0)
    model = a.model
    assert margins == [
        Margin(model=model, backend="desk", receipts=1, input_tokens=a.input_tokens, output_tokens=a.output_tokens,
               earned=a.cost, paid=0),
        Margin(model=model, backend="hosted", receipts=2, input_tokens=b.input_tokens + c.input_tokens,
               output_tokens=b.output_tokens + c.output_tokens, earned=b.cost + c.cost, paid=1000),
    ]  # fmt: skip
    assert margins[1].margin == b.cost + c.cost - 1000


async def test_only_the_executor_books_a_backend_and_costs_are_not_negative(tmp_path):
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        envelope, receipt = signed_receipt(1)
        with pytest.raises(ValueError, match="only the executor"):
            await ledger.record_receipt(envelope, receipt, role="client", executor=EXECUTOR.peer_id, now=1.0,
                                        backend="desk")  # fmt: skip
        with pytest.raises(ValueError, match="negative"):
            await ledger.record_receipt(envelope, receipt, role="executor", executor=EXECUTOR.peer_id, now=1.0,
                                        provider_cost=-1)  # fmt: skip
    raw = sqlite3.connect(tmp_path / "ledger.sqlite")
    try:  # the same rules in SQL, for any other writer
        with pytest.raises(sqlite3.IntegrityError):
            raw.execute("INSERT INTO receipts (receipt_digest, receipt_payload, receipt_signer, receipt_sig, role, "
                        "executor, client, model, input_tokens, output_tokens, cost, count_source, issued_at, "
                        "recorded_at, status, provider_cost) VALUES (x'00', x'00', x'00', x'00', 'client', 'e', 'c', "
                        "'m', 1, 1, 1, 'runtime', 1, 1, 'accepted', 5)")  # fmt: skip
    finally:
        raw.close()


async def test_a_version_3_ledger_is_migrated_keeping_every_row(tmp_path):
    path = tmp_path / "v3.sqlite"
    write_v2_ledger(path, V2_ROWS)
    raw = sqlite3.connect(path)
    try:  # what loomnet's version 3 did to it
        for statement in _ledger._MIGRATIONS[2][:2]:
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 3")
        raw.commit()
    finally:
        raw.close()
    columns = ("receipt_digest", "receipt_payload", "status", "account")
    before = raw_rows(path, columns)
    async with await Ledger.open(path) as ledger:
        assert [e.backend for e in await ledger.entries()] == [None] * 4
        receipt = await book(ledger, 9, backend="desk", provider_cost=12)
        (row,) = [m for m in await ledger.margins() if m.backend == "desk"]
        assert row.paid == 12 and row.earned == receipt.cost
    after = [r for r in raw_rows(path, (*columns, "backend", "provider_cost"))
             if r[0] != digest(signed_receipt(9)[0].payload)]  # fmt: skip
    assert after == [(*r, None, None) for r in before]
    version, _, names = schema_of(path)
    assert version == _ledger.SCHEMA_VERSION == 5 and names[-2:] == ["backend", "provider_cost"]


async def test_charges_no_receipt_bills_count_as_paid(tmp_path):
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        receipt = await book(ledger, 1, backend="hosted", provider_cost=100, now=100.0)
        await ledger.record_provider_charge(backend="hosted", model=receipt.model, input_tokens=900, output_tokens=0,
                                            cost=45, now=150.0)  # fmt: skip
        await ledger.record_provider_charge(backend="hosted", model="other", input_tokens=10, output_tokens=0,
                                            cost=5, now=999.0)  # fmt: skip
        with pytest.raises(ValueError):
            await ledger.record_provider_charge(backend="hosted", model="m", input_tokens=-1, output_tokens=0,
                                                cost=1, now=1.0)  # fmt: skip
        margins = await ledger.margins(until=500.0)
    assert margins == [Margin(model=receipt.model, backend="hosted", receipts=1, input_tokens=receipt.input_tokens,
                              output_tokens=receipt.output_tokens, earned=receipt.cost, paid=145)]  # fmt: skip


async def test_a_version_4_ledger_gets_the_charges_table(tmp_path):
    path = tmp_path / "v4.sqlite"
    write_v2_ledger(path, V2_ROWS)
    raw = sqlite3.connect(path)
    try:  # what loomnet's version 4 did to it
        for statement in [*_ledger._MIGRATIONS[2][:2], *_ledger._ADD_PROVIDER]:
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 4")
        raw.commit()
    finally:
        raw.close()
    async with await Ledger.open(path) as ledger:
        await ledger.record_provider_charge(backend="b", model="m", input_tokens=1, output_tokens=0, cost=2, now=1.0)
        assert [(m.model, m.paid) for m in await ledger.margins() if m.backend == "b"] == [("m", 2)]
        assert len(await ledger.entries()) == 4
    assert schema_of(path)[0] == 5
