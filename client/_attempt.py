"""The attempt loop: try ranked candidates in turn until one starts answering.

Theory of operation. The router has ranked the candidates (``_route.Router``). For each
one, within the request's total deadline and at most ``max_attempts`` times:

1. skip it if its executor was tried already in this request, or the circuit breaker
   benches it now (``Health.benched``: failures earlier in this request may have);
2. under a budget, reserve its worst-case cost (``_budget``); a candidate whose worst
   case does not fit is skipped (a cheaper one further down may fit), and the request
   carries ``max_cost`` = the reservation;
3. dial, send, and read frames until the first one with content, or the terminal
   frame (``ChatStream.open`` + ``ChatStream.start``). Nothing has reached the caller
   yet, so on a failure that :func:`fails_over` the attempt is recorded in the health
   table (``Health.failed``), its reservation released, and the next candidate tried.

The first attempt that starts answering is handed to the caller as the ``ChatStream``
(``stream.attempts`` lists the ones before it). From then on a failure ends the stream
with a typed error and the partial receipt, as ``ChatStream`` documents: the answer is
never continued by another executor, so two executors' text is never mixed.

What fails over (:func:`fails_over`): anything about *this executor*: a dial or stream
failure, no first byte in time, a reset, a protocol violation, a refusal the executor
marks retryable (``OVER_CAPACITY``, ``BACKEND_UNAVAILABLE``, ``PEER_LIMIT``, ...), and
refusals that are about its state even when it does not say so (:data:`EXECUTOR_FAULTS`:
a stale advert, its clock, a capability it advertised but lacks). What does not: a
refusal about *the request* (:data:`REQUEST_FAULTS`: ``BAD_REQUEST``,
``CONTENT_FILTERED``, ``PRICE_CAP_EXCEEDED``, ...), which another executor would give
too, local errors, and a receipt problem (the request was served; never pay twice).

When every candidate failed, the error is the last attempt's, as the same class with
the same code (so ``except RemoteError`` and ``e.code`` still work), its message listing
each attempt briefly (when there was more than one), and ``.attempts`` holding them all.

Health bookkeeping (:class:`AttemptTracker`): ``started`` before the dial (so a failed
dial is balanced by its ``failed``), ``first_token`` with the TTFT counted from the
request sent, then exactly one of ``finished`` (a receipt: its output tokens over the
seconds from the request sent to the receipt; or, with 0 tokens, an end that is nobody's
fault: the caller left, or the request was refused for itself) or ``failed`` (the
executor's fault, a disputed receipt included). Health times are trio seconds.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import msgspec
import trio

from loomnet.protocol import (
    ChatMessage,
    ErrorCode,
    InvalidRequest,
    LedgerError,
    LoomError,
    NoOfferError,
    ProtocolError,
    Receipt,
    ReceiptError,
    cost_of,
)

from ._budget import Budget, BudgetExceeded, JointBudget, JointReservation, Reservation
from ._chat_stream import ChatStream
from ._events import Attempt
from ._offers import Offer
from ._route import Candidate, Health, RequestShape
from ._session_pool import ExecutorBusy
from ._shape import worst_case_cost
from ._stream_kit import RequestOptions, StreamKit

__all__ = ["EXECUTOR_FAULTS", "REQUEST_FAULTS", "AttemptTracker", "blames_executor", "fails_over", "open_first"]

#: refusals about the request itself: every executor would answer the same, so they
#: are never failed over, whatever the ``retryable`` flag says
REQUEST_FAULTS = frozenset(
    {
        ErrorCode.BAD_REQUEST,
        ErrorCode.CONTENT_FILTERED,
        ErrorCode.PRICE_CAP_EXCEEDED,
        ErrorCode.BUDGET_EXCEEDED,
    }
)
#: refusals about this executor's state, failed over even when not marked retryable:
#: it does not serve the model its advert named (stale advert), lacks a capability it
#: advertised, its clock disagrees with ours, or it misread our (valid) signature
EXECUTOR_FAULTS = frozenset(
    {
        ErrorCode.UNKNOWN_MODEL,
        ErrorCode.UNSUPPORTED_FEATURE,
        ErrorCode.REQUEST_EXPIRED,
        ErrorCode.REQUEST_FROM_FUTURE,
        ErrorCode.REPLAYED_NONCE,
        ErrorCode.WRONG_AUDIENCE,
        ErrorCode.BAD_SIGNATURE,
        ErrorCode.SIGNER_MISMATCH,
    }
)

_LOCAL = (InvalidRequest, LedgerError, BudgetExceeded)


def fails_over(error: LoomError) -> bool:
    """Whether an attempt that ended with ``error`` before any content may be retried
    on the next candidate (see the module doc)."""
    if error.code in REQUEST_FAULTS or isinstance(error, (*_LOCAL, ReceiptError)):
        return False
    return error.retryable or error.code in EXECUTOR_FAULTS or isinstance(error, ProtocolError)


def blames_executor(error: LoomError) -> bool:
    """Whether ``error`` counts against the executor's health (its breaker). Not this
    client's own queue to it running full (``ExecutorBusy``)."""
    return error.code not in REQUEST_FAULTS and not isinstance(error, (*_LOCAL, ExecutorBusy))


class AttemptTracker:
    """The ``StreamObserver`` of one attempt: health and budget bookkeeping.

    Args:
        health: the health table.
        offer: the executor and model tried.
        reservation: the budget held for the attempt (in one budget or in several:
            ``JointReservation``), or None without a budget.
        wall_clock: wall-clock seconds, for the budget's period.
    """

    def __init__(
        self,
        health: Health,
        offer: Offer,
        reservation: Reservation | JointReservation | None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._health = health
        self._executor, self._model = offer.executor, offer.model.name
        self._reservation = reservation
        self._wall_clock = wall_clock
        self._price_in, self._price_out = offer.model.price_in, offer.model.price_out
        #: the padded prompt tokens (for what an abandoned answer is charged)
        self.prompt_tokens = 0
        #: UTF-8 bytes of answer received so far (``ChatStream`` keeps it current)
        self.delivered: Callable[[], int] = lambda: 0
        self._sent_at = 0.0
        self._first_at: float | None = None
        #: the error the attempt ended with, if any
        self.error: LoomError | None = None

    def started(self, *, now: float) -> None:
        self._sent_at = now
        self._health.started(self._executor, self._model, now=now)

    def sent(self, *, now: float) -> None:
        self._sent_at = now  # TTFT and the answer's seconds count from here, not the dial

    def first_frame(self, *, now: float) -> None:
        self._first_at = now
        self._health.first_token(self._executor, self._model, ttft=now - self._sent_at, now=now)

    def ended(self, *, now: float, receipt: Receipt | None, accepted: bool, error: LoomError | None) -> None:
        self.error = error
        if self._reservation is not None:
            if receipt is not None and accepted:
                self._reservation.settle(receipt.cost, now=self._wall_clock())
            elif receipt is None and error is None and self.delivered() > 0:
                self._reservation.settle(self.abandoned_cost(), now=self._wall_clock())
            else:
                self._reservation.release()
        if error is not None and blames_executor(error):
            self._health.failed(self._executor, self._model, now=now)
        elif receipt is not None and accepted and error is None:
            # tokens/s over the generation only: first token to receipt (TTFT is its own measure)
            since = self._first_at if self._first_at is not None else self._sent_at
            self._health.finished(self._executor, self._model, output_tokens=receipt.output_tokens,
                                  seconds=now - since, now=now)
        else:  # the caller left, or the request was at fault: neither a success nor a failure
            self._health.cancelled(self._executor, self._model, now=now)

    def abandoned_cost(self) -> int:
        """What an answer the caller left part-way through is charged to the budget, in
        micro-credits: the executor books a receipt for what it sent (``client_gone``)
        that this client never receives, so the client charges its own generous
        estimate instead, at most the reservation: the padded prompt, and a token per 3
        bytes received (English runs ~4). Without it a caller who always hangs up just
        before the end would never spend its budget."""
        estimate = cost_of(self.prompt_tokens, max(1, -(-self.delivered() // 3)), self._price_in, self._price_out)
        return min(estimate, self._reservation.amount if self._reservation is not None else estimate)

    def release(self) -> None:
        """Free the reservation of an attempt that never began (nothing was sent)."""
        if self._reservation is not None:
            self._reservation.release()


def _exhausted(errors: list[LoomError], attempts: list[Attempt]) -> LoomError:
    """The last error, as the same class and code, naming every attempt (the error
    itself when there was only one)."""
    last = errors[-1]
    if len(attempts) == 1:
        return last
    error = copy.copy(last)
    error.message = f"{len(attempts)} executor(s) tried, none answered: " + "; ".join(a.brief() for a in attempts)
    error.args = (error.message,)
    return error


def _proven(health: Health, candidate: Candidate, *, now: float) -> bool | None:
    """True: this client has a success of the pair on record and no failure since;
    False: it failed last; None: no record (unknown)."""
    offer = candidate.offer
    est = health.estimate(offer.executor, offer.model.name, now=now, prior_ttft=0.0, prior_tps=0.0)
    if est is None:
        return None
    if est.failures:
        return False
    return True if est.tps is not None else None


def trial_order(candidates: Sequence[Candidate], health: Health, max_attempts: int, *, now: float) -> list[Candidate]:
    """The order the attempt loop tries ``candidates`` in: the router's, except that

    * a pair that failed last (consecutive failures short of the breaker's bench) goes
      after every other, so a failing executor is not tried again ahead of the rest;
    * when none of the first ``max_attempts`` has served this client before but one
      further down has, the best such one takes the last attempt.

    Why: identities are free, so a flood of new executors undercutting a working one
    by a little could otherwise fill every attempt of every request (each is unknown,
    so never benched) and keep the executor that works from being tried at all.
    """
    verdicts = [_proven(health, c, now=now) for c in candidates]
    order = [c for c, v in zip(candidates, verdicts) if v is not False]
    order += [c for c, v in zip(candidates, verdicts) if v is False]
    if max_attempts < 2 or len(order) <= max_attempts:
        return order
    proven = {id(c) for c, v in zip(candidates, verdicts) if v is True}
    if any(id(c) in proven for c in order[:max_attempts]):
        return order
    best = next((c for c in order[max_attempts:] if id(c) in proven), None)
    if best is None:
        return order
    order.remove(best)
    order.insert(max_attempts - 1, best)
    return order


async def open_first(
    kit: StreamKit,
    candidates: Sequence[Candidate],
    messages: list[ChatMessage],
    options: RequestOptions,
    *,
    shape: RequestShape,
    health: Health,
    budget: Budget | JointBudget | None = None,
    max_attempts: int = 3,
    wall_clock: Callable[[], float] = time.time,
) -> ChatStream:
    """The stream of the first candidate that starts answering (see the module doc).
    The caller must ``aclose()`` it.

    Args:
        kit: what each attempt's stream uses (its deadlines: the total one spans every
            attempt).
        candidates: ranked, best first.
        shape: the request's padded prompt tokens and max tokens (for the worst case).
        budget: reserve each attempt's worst case in it (a ``JointBudget``: in each of
            its budgets); None: no budget.
        max_attempts: the most executors to send the request to.

    Raises:
        InvalidRequest: the request breaks the protocol's schema (nothing sent).
        BudgetExceeded: no candidate's worst case fits what the budget has left (of a
            joint budget: the refusal of one that cannot cover the cheapest).
        NoOfferError: every candidate was benched or already tried (none sent).
        RemoteError, NetworkError, NetworkTimeout, ProtocolError: every attempt failed
            (the last one's error, naming them all; ``.attempts``), or one failed in a
            way that is not failed over (that error, ``.attempts`` too).
        ReceiptError: an empty answer's receipt was rejected.

    Cancellation: the attempt in flight is reset and its reservation released.
    """
    deadline = trio.current_time() + kit.deadlines.total
    attempts: list[Attempt] = []
    errors: list[LoomError] = []
    over_budget: list[int] = []
    tried: set[str] = set()
    sent = 0
    for candidate in trial_order(candidates, health, max_attempts, now=trio.current_time()):
        offer = candidate.offer
        now = trio.current_time()
        if sent >= max_attempts or now >= deadline:
            break
        if offer.executor in tried or health.benched(offer.executor, now=now, model=offer.model.name):
            continue
        worst = worst_case_cost(shape, offer)
        if options.max_cost is not None:
            worst = min(worst, options.max_cost)
        reservation = None
        attempt_options = options
        if budget is not None:
            if not budget.fits(worst, now=wall_clock()):
                over_budget.append(worst)
                attempts.append(Attempt(executor=offer.executor, model=offer.model.name, outcome="skipped",
                                        detail=f"worst case {worst} micro-credits is over the budget left"))  # fmt: skip
                continue
            reservation = budget.reserve(worst, now=wall_clock())
            changes: dict[str, object] = {"max_cost": worst}
            if options.max_tokens is None:  # under a budget the output is bounded as reserved
                changes["max_tokens"] = shape.max_tokens
            attempt_options = msgspec.structs.replace(options, **changes)
        tried.add(offer.executor)
        sent += 1
        tracker = AttemptTracker(health, offer, reservation, wall_clock=wall_clock)
        tracker.prompt_tokens = shape.prompt_tokens
        stream = ChatStream(kit, offer, messages, attempt_options, total_deadline=deadline, observer=tracker)
        tracker.delivered = stream.delivered_bytes
        stream.attempts = list(attempts)  # before start(): an empty answer settles there
        try:
            await stream.open()
            await stream.start()
        except LoomError as exc:
            await stream.aclose()
            tracker.release()  # when open() refused before sending, nothing else frees it
            attempts.append(Attempt(executor=offer.executor, model=offer.model.name, outcome=exc.code.name,
                                    detail=exc.message[:160]))  # fmt: skip
            exc.attempts = list(attempts)  # type: ignore[attr-defined]
            if not fails_over(exc):
                raise
            errors.append(exc)
            continue
        except BaseException:
            await stream.aclose()
            tracker.release()
            raise
        return stream
    if errors:
        error = _exhausted(errors, attempts)
        error.attempts = list(attempts)  # type: ignore[attr-defined]
        if error is errors[-1]:
            raise error
        raise error from errors[-1]
    if over_budget and budget is not None:
        error = budget.refusal(min(over_budget), now=wall_clock())
        error.attempts = list(attempts)  # type: ignore[attr-defined]
        raise error
    raise NoOfferError(
        f"none of the {len(candidates)} candidate(s) could be tried (benched by the circuit breaker)",
        code=ErrorCode.NO_OFFER,
    )
