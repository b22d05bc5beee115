"""What the ledger's queries return (rows, totals, margins, pages) and the checks and
WHERE clauses they share; the queries themselves are :class:`~._ledger.Ledger`'s.

Every window is over ``recorded_at`` (this side's clock, seconds since the epoch):
``since`` inclusive, ``until`` exclusive, None unbounded. SQL is parameterised; the
only text put into a statement comes from the fixed ``_GROUPS`` table.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from loomnet.protocol import InvalidRequest

from ._ledger_schema import _ACCOUNT, _ALL_STATUSES, ACCOUNT_MAX_CHARS

class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One row: a signed receipt (the exact bytes, their sha256, the executor's key and
    signature), what it says, which side wrote it (``role``), the client's ack once
    there is one, and the row's ``status`` (see :data:`STATUSES`) with, for a disputed
    receipt, why the client did not accept it. ``cost`` is in micro-credits, times in
    seconds since the epoch.
    """

    receipt_digest: bytes
    receipt_payload: bytes
    receipt_signer: bytes
    receipt_sig: bytes
    role: str
    executor: str
    client: str
    model: str
    input_tokens: int
    output_tokens: int
    cost: int
    count_source: str
    issued_at: float
    recorded_at: float
    ack_payload: bytes | None = None
    ack_signer: bytes | None = None
    ack_sig: bytes | None = None
    status: str
    #: why the client disputes the receipt; None unless ``status`` is ``"disputed"``
    dispute_reason: str | None = None
    #: whose request it was (a client row only); None: the client's own
    account: str | None = None
    #: the executor's backend that answered (an executor row only; its operator-visible
    #: name, never an endpoint), and what its provider charged for it, micro-credits
    #: (None: a backend without a price)
    backend: str | None = None
    provider_cost: int | None = None


class LedgerTotals(msgspec.Struct, frozen=True):
    """Sums over the receipts in a ledger (or those of one status); ``cost`` in micro-credits."""

    receipts: int
    input_tokens: int
    output_tokens: int
    cost: int


class Margin(msgspec.Struct, frozen=True, kw_only=True):
    """An executor's receipts of one model answered by one backend: what clients were
    billed (``earned``) and what the provider charged (``paid``), micro-credits."""

    model: str
    #: None: receipts booked before the ledger knew backends, or by the embedded path
    backend: str | None
    receipts: int
    input_tokens: int
    output_tokens: int
    earned: int
    paid: int

    @property
    def margin(self) -> int:
        return self.earned - self.paid


def check_account(account: str) -> str:
    """``account`` if it is a valid account name: 1 to :data:`ACCOUNT_MAX_CHARS` of
    ``A-Z a-z 0-9 . _ -``, so a valid one is safe to put in logs and error messages as
    it is.

    Raises:
        InvalidRequest: (a ``ValueError``, ``field="account"``) anything else; the
            message never repeats a bad name (it might be a key pasted by mistake).
    """
    if not isinstance(account, str):
        raise InvalidRequest(f"an account name is a string, not {type(account).__name__}", field="account")
    if _ACCOUNT.fullmatch(account) is None:
        raise InvalidRequest(
            f"an account name is 1 to {ACCOUNT_MAX_CHARS} of the characters A-Z a-z 0-9 . _ -; "
            f"this one has {len(account)} character(s)",
            field="account",
        )
    return account


def _filter(
    status: str | None, account: str | None = None, since: float | None = None
) -> tuple[str, tuple[object, ...]]:
    """The WHERE clause (with its leading space, or empty) and its parameters."""
    terms: list[str] = []
    params: list[object] = []
    if status is not None:
        if status not in _ALL_STATUSES:
            raise ValueError(f"status must be one of {_ALL_STATUSES}, not {status!r}")
        terms.append("status = ?")
        params.append(status)
    if account is not None:
        terms.append("account = ?")
        params.append(check_account(account))
    if since is not None:
        terms.append("recorded_at >= ?")
        params.append(since)
    return (" WHERE " + " AND ".join(terms) if terms else ""), tuple(params)


#: How :meth:`Ledger.totals_by` groups; each maps to a fixed SQL expression, never to input.
Grouping = Literal["day", "model", "peer", "account"]
_GROUPS: dict[str, str] = {
    "day": "strftime('%Y-%m-%d', recorded_at, 'unixepoch')",
    "model": "model",
    "peer": "CASE role WHEN 'executor' THEN client ELSE executor END",
    "account": "account",
}
GROUPINGS: tuple[str, ...] = tuple(_GROUPS)


class GroupTotals(msgspec.Struct, frozen=True):
    """Sums over the receipts of one group (:meth:`Ledger.totals_by`); ``cost`` in micro-credits."""

    #: the day, model, peer id or account; None: no account (the client's own, or an executor row)
    key: str | None
    receipts: int
    input_tokens: int
    output_tokens: int
    cost: int


class LedgerCursor(msgspec.Struct, frozen=True):
    """Where a :class:`LedgerPage` ended: its last row's ``recorded_at`` and SQLite rowid."""

    recorded_at: float
    rowid: int


class LedgerPage(msgspec.Struct, frozen=True):
    """One page of :meth:`Ledger.page`; pass ``next`` as ``after`` for the following one."""

    entries: list[LedgerEntry]
    #: None: this was the last page
    next: LedgerCursor | None


def _window(
    status: str | None, account: str | None, since: float | None, until: float | None
) -> tuple[str, tuple[object, ...]]:
    """:func:`_filter`'s WHERE clause and parameters, with ``recorded_at < until`` added."""
    if since is not None and until is not None and since > until:
        raise ValueError(f"the window starts ({since}) after it ends ({until})")
    where, params = _filter(status, account, since)
    if until is None:
        return where, params
    return (f"{where} AND recorded_at < ?" if where else " WHERE recorded_at < ?"), (*params, until)
