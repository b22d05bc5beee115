"""The ledger's queries for ``loomnet ledger``: totals by day, model, peer and account over a
window of recording times, and keyset pages for listing and export.

A real SQLite file under ``tmp_path`` and real signed receipts throughout; times are
chosen around UTC midnights so the window bounds and the day grouping are exact.
"""

from __future__ import annotations

import pytest

from loomnet.client._ledger import GROUPINGS, GroupTotals, Ledger, LedgerCursor
from loomnet.protocol import InvalidRequest, SigningKey

from .test_ledger import CLIENT, EXECUTOR, signed_receipt

MAY_1 = 1_714_521_600.0  # 2024-05-01T00:00:00Z
DAY = 86_400.0
OTHER_CLIENT = SigningKey(bytes(range(2, 34))).peer_id
OTHER_EXECUTOR = SigningKey(bytes(range(3, 35))).peer_id


async def book(ledger: Ledger, n: int, *, now: float, role: str = "client", executor: str = EXECUTOR.peer_id,
               account: str | None = None, dispute: str | None = None, **overrides):  # fmt: skip
    envelope, receipt = signed_receipt(n, **overrides)
    key = await ledger.record_receipt(envelope, receipt, role=role, executor=executor, now=now, account=account,
                                      dispute=dispute)  # fmt: skip
    return key, receipt


def summed(key, *receipts) -> GroupTotals:
    return GroupTotals(key, len(receipts), sum(r.input_tokens for r in receipts),
                       sum(r.output_tokens for r in receipts), sum(r.cost for r in receipts))  # fmt: skip


@pytest.fixture
async def ledger(tmp_path):
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        yield ledger


async def test_totals_by_utc_day_split_at_midnight(ledger):
    _, late = await book(ledger, 1, now=MAY_1 - 0.001)  # the last millisecond of April 30
    _, a = await book(ledger, 2, now=MAY_1)
    _, b = await book(ledger, 3, now=MAY_1 + DAY - 1)
    _, c = await book(ledger, 4, now=MAY_1 + DAY)
    assert await ledger.totals_by("day") == [summed("2024-04-30", late), summed("2024-05-01", a, b),
                                             summed("2024-05-02", c)]  # fmt: skip


async def test_totals_by_model(ledger):
    _, a = await book(ledger, 1, now=MAY_1, model="beta")
    _, b = await book(ledger, 2, now=MAY_1, model="alpha")
    _, c = await book(ledger, 3, now=MAY_1, model="beta")
    assert await ledger.totals_by("model") == [summed("alpha", b), summed("beta", a, c)]


async def test_totals_by_peer_is_the_other_side_of_each_row(ledger):
    # the executor's rows: the peer is the client; the client's rows: the executor
    _, a = await book(ledger, 1, now=MAY_1, role="executor", client=CLIENT.peer_id)
    _, b = await book(ledger, 2, now=MAY_1, role="executor", client=OTHER_CLIENT)
    _, c = await book(ledger, 3, now=MAY_1, role="client", executor=OTHER_EXECUTOR)
    expected = sorted([summed(CLIENT.peer_id, a), summed(OTHER_CLIENT, b), summed(OTHER_EXECUTOR, c)],
                      key=lambda t: t.key)  # fmt: skip
    assert await ledger.totals_by("peer") == expected


async def test_totals_by_account_with_the_clients_own_first(ledger):
    _, own = await book(ledger, 1, now=MAY_1)
    _, a1 = await book(ledger, 2, now=MAY_1, account="bob")
    _, a2 = await book(ledger, 3, now=MAY_1, account="alice")
    _, a3 = await book(ledger, 4, now=MAY_1, account="alice")
    assert await ledger.totals_by("account") == [summed(None, own), summed("alice", a2, a3), summed("bob", a1)]
    assert await ledger.totals_by("account", account="alice") == [summed("alice", a2, a3)]


async def test_totals_by_within_a_window_and_a_status(ledger):
    await book(ledger, 1, now=MAY_1 - 1)  # before since
    _, a = await book(ledger, 2, now=MAY_1)  # since is inclusive
    _, b = await book(ledger, 3, now=MAY_1 + 10, dispute="tokens above the bound")
    await book(ledger, 4, now=MAY_1 + DAY)  # until is exclusive
    window = {"since": MAY_1, "until": MAY_1 + DAY}
    assert await ledger.totals_by("day", **window) == [summed("2024-05-01", a, b)]
    assert await ledger.totals_by("model", status="accepted", **window) == [summed(a.model, a)]
    assert await ledger.totals_by("model", status="disputed", **window) == [summed(b.model, b)]
    assert await ledger.totals_by("model", until=MAY_1 - 1) == []
    assert await ledger.totals_by("model", since=MAY_1 + DAY + 1) == []


async def test_totals_by_refuses_what_it_cannot_group_or_filter_by(ledger):
    with pytest.raises(ValueError, match="group must be one of"):
        await ledger.totals_by("client; DROP TABLE receipts")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status must be one of"):
        await ledger.totals_by("day", status="paid")
    with pytest.raises(ValueError, match="starts .* after it ends"):
        await ledger.totals_by("day", since=MAY_1 + 1, until=MAY_1)
    with pytest.raises(InvalidRequest) as info:
        await ledger.totals_by("account", account="sk-not an account")
    assert "sk-not" not in str(info.value)
    assert GROUPINGS == ("day", "model", "peer", "account")
    assert await ledger.totals_by("day") == []  # the table is still there, and empty


async def test_pages_walk_every_row_once_in_recording_order(ledger):
    # three rows share one recording time: the rowid breaks the tie, across a page boundary
    times = [MAY_1 + 5, MAY_1 + 1, MAY_1 + 3, MAY_1 + 3, MAY_1 + 3, MAY_1 + 9, MAY_1 + 2]
    keys = {n: (await book(ledger, n, now=t))[0] for n, t in enumerate(times)}
    order = sorted(keys, key=lambda n: (times[n], n))  # booked in n order: rowid follows n

    seen, after, pages = [], None, []
    while True:
        page = await ledger.page(after=after, limit=3)
        pages.append(len(page.entries))
        seen += [e.receipt_digest for e in page.entries]
        if page.next is None:
            break
        after = page.next
    assert pages == [3, 3, 1]
    assert seen == [keys[n] for n in order]

    newest = await ledger.page(limit=len(times), newest_first=True)
    assert [e.receipt_digest for e in newest.entries] == [keys[n] for n in reversed(order)] and newest.next is None
    first = await ledger.page(limit=2, newest_first=True)
    rest = await ledger.page(limit=10, newest_first=True, after=first.next)
    assert [e.receipt_digest for e in first.entries + rest.entries] == [keys[n] for n in reversed(order)]


async def test_a_full_last_page_says_there_is_no_next_one(ledger):
    for n in range(4):
        await book(ledger, n, now=MAY_1 + n)
    first = await ledger.page(limit=2)
    assert isinstance(first.next, LedgerCursor) and first.next.recorded_at == MAY_1 + 1
    second = await ledger.page(limit=2, after=first.next)
    assert [e.recorded_at for e in second.entries] == [MAY_1 + 2, MAY_1 + 3] and second.next is None


async def test_rows_booked_between_pages_come_last_and_none_twice(ledger):
    for n in range(3):
        await book(ledger, n, now=MAY_1 + n)
    first = await ledger.page(limit=2)
    late, _ = await book(ledger, 9, now=MAY_1 + 100)
    second = await ledger.page(limit=2, after=first.next)
    assert [e.recorded_at for e in first.entries + second.entries] == [MAY_1, MAY_1 + 1, MAY_1 + 2, MAY_1 + 100]
    assert second.entries[-1].receipt_digest == late and second.next is None


async def test_pages_filter_as_totals_do(ledger):
    await book(ledger, 1, now=MAY_1 - 1, account="alice")
    a, _ = await book(ledger, 2, now=MAY_1, account="alice")
    await book(ledger, 3, now=MAY_1 + 1, account="bob")
    d, _ = await book(ledger, 4, now=MAY_1 + 2, account="alice", dispute="cost above the cap")
    await book(ledger, 5, now=MAY_1 + DAY, account="alice")
    window = {"since": MAY_1, "until": MAY_1 + DAY, "account": "alice"}
    assert [e.receipt_digest for e in (await ledger.page(**window)).entries] == [a, d]
    assert [e.receipt_digest for e in (await ledger.page(status="disputed", **window)).entries] == [d]
    assert (await ledger.page(status="acknowledged", **window)).entries == []


async def test_pages_refuse_bad_arguments(ledger):
    with pytest.raises(ValueError, match="at least one"):
        await ledger.page(limit=0)
    with pytest.raises(ValueError, match="status must be one of"):
        await ledger.page(status="nope")
    with pytest.raises(ValueError, match="after it ends"):
        await ledger.page(since=2.0, until=1.0)
    with pytest.raises(InvalidRequest):
        await ledger.page(account="")
    empty = await ledger.page()
    assert empty.entries == [] and empty.next is None
