"""What the gateway answers when a request fails: one HTTP status and one stable *kind*
per failure, whatever API the request came in (``_openai`` and ``_anthropic`` each
render it in their own error shape).

Theory of operation: every failure is a :class:`GatewayError` by the time it leaves a
handler. The gateway's own refusals (a bad body, a missing key) are raised as one;
anything the client library raises (:class:`~loomnet.protocol.LoomError`) is mapped by
:func:`failure_of`, by its error code, so the mapping is a table, not a chain of
``isinstance`` checks. The status is the one an OpenAI or Anthropic SDK expects for
that kind (its own exception class follows from it: 404 ``NotFoundError``, 429
``RateLimitError``, ...).

| kind | status | when |
| --- | --- | --- |
| ``invalid_request`` | 400 | the body is not a valid request; a field breaks the protocol's limits; the model cannot do what it asks (tools, images, JSON); an executor refused the request's ``max_cost`` or price caps |
| ``unauthorized`` | 401 | keys are configured and the request carries none, or an unknown one |
| ``budget_exhausted`` | 402 | the key's (or the gateway's) budget cannot cover the request's worst case |
| ``model_not_found`` | 404 | ``model`` names nothing the network offers (no model, alias or category) |
| ``unknown_url`` | 404 | no such endpoint, or not with this method (as OpenAI's API answers both) |
| ``request_timeout`` | 408 | the body did not arrive within ``body-timeout`` |
| ``request_too_large`` | 413 | the body is over ``max-body-bytes`` |
| ``rate_limited`` | 429 | executors said the client is over their rate or peer limits (``Retry-After``) |
| ``over_capacity`` | 429 | every executor tried was busy, or the gateway is answering ``max-concurrent-requests`` already (``Retry-After``) |
| ``executor_failed`` | 502 | the executor, its backend or the stream failed |
| ``no_offer`` | 503 | no live offer fits (none heard yet, all benched, none under the price cap) |
| ``internal`` | 500 | a bug or a local failure (the ledger) |

Messages are loomnet's words: an executor's address or a provider never appears (the
client library's errors never carry them: executors send only loomnet's codes and words).
"""

from __future__ import annotations

import math

from loomnet.protocol import ErrorCode, LoomError, NetworkError

__all__ = ["GatewayError", "failure_of", "public_text", "retry_after_header"]

#: kind -> HTTP status
STATUS: dict[str, int] = {
    "invalid_request": 400,
    "unauthorized": 401,
    "budget_exhausted": 402,
    "model_not_found": 404,
    "unknown_url": 404,
    "request_timeout": 408,
    "request_too_large": 413,
    "rate_limited": 429,
    "over_capacity": 429,
    "internal": 500,
    "executor_failed": 502,
    "no_offer": 503,
}

#: loomnet error code -> kind (codes not listed: ``executor_failed``)
_KIND_OF_CODE: dict[ErrorCode, str] = {
    ErrorCode.BAD_REQUEST: "invalid_request",
    ErrorCode.UNSUPPORTED_FEATURE: "invalid_request",
    ErrorCode.CONTENT_FILTERED: "invalid_request",
    ErrorCode.BUDGET_EXCEEDED: "budget_exhausted",
    ErrorCode.GATEWAY_UNAUTHORIZED: "unauthorized",
    ErrorCode.REQUEST_TOO_LARGE: "request_too_large",
    ErrorCode.RATE_LIMITED: "rate_limited",
    ErrorCode.PEER_LIMIT: "rate_limited",
    ErrorCode.OVER_CAPACITY: "over_capacity",
    ErrorCode.SHUTTING_DOWN: "no_offer",  # a 503 with Retry-After: the next try goes elsewhere
    ErrorCode.NO_OFFER: "no_offer",
    ErrorCode.PRICE_CAP_EXCEEDED: "invalid_request",  # the executor refused the request's own max_cost or caps
    ErrorCode.MAX_TOKENS_OVER_CONTEXT: "invalid_request",  # as OpenAI answers a max_tokens over the window
    ErrorCode.UNKNOWN_MODEL: "no_offer",
    ErrorCode.LEDGER_FAILED: "internal",
    ErrorCode.CONFIG_INVALID: "internal",
    ErrorCode.INTERNAL: "internal",
}

#: seconds a client is told to wait after a 429 or 503 when the executor said nothing
DEFAULT_RETRY_AFTER = 1.0


class GatewayError(LoomError):
    """A request the gateway answers with an error status.

    ``kind`` is one of :data:`STATUS`'s keys and fixes ``status``; ``param`` names the
    offending request field (``"messages[0].content"``) when one is to blame;
    ``retry_after`` (seconds) becomes a ``Retry-After`` header on a 429 or 503.
    ``code`` is the loomnet error code (``GATEWAY_UNAUTHORIZED``, ``BAD_REQUEST``,
    ``NO_OFFER``, ...): stable, and in every error body as ``loomnet_code``.
    """

    message_is_public = True

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        code: ErrorCode = ErrorCode.BAD_REQUEST,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        if kind not in STATUS:
            raise ValueError(f"unknown gateway error kind {kind!r}")
        super().__init__(message, code=code)
        self.kind = kind
        self.status = STATUS[kind]
        self.param = param
        self.retry_after = retry_after


def failure_of(exc: BaseException, *, model_known: bool = True) -> GatewayError:
    """The :class:`GatewayError` the gateway answers for ``exc``.

    ``model_known``: whether the request's ``model`` names something the network offers
    (a model, alias, category or strategy); a ``NO_OFFER`` for a name nothing offers is a
    404, otherwise a 503.
    """
    if isinstance(exc, GatewayError):
        return exc
    if not isinstance(exc, LoomError):
        return GatewayError("internal", "the gateway failed; see its log", code=ErrorCode.INTERNAL)
    kind = _KIND_OF_CODE.get(exc.code, "executor_failed")
    if kind == "no_offer" and not model_known and exc.code == ErrorCode.NO_OFFER:
        kind = "model_not_found"
    retry_after = getattr(exc, "retry_after", None)
    if STATUS[kind] in (429, 503) and retry_after is None:
        retry_after = DEFAULT_RETRY_AFTER
    text = public_text(exc) if kind not in ("internal",) else "the gateway failed; see its log"
    param = "model" if kind == "model_not_found" else getattr(exc, "field", None)
    return GatewayError(kind, text, code=exc.code, param=param, retry_after=retry_after)


#: what a caller is told of a failure on this client's own side of the network: the
#: client library's text names libp2p's errors and addresses, which stay in the log
_NETWORK_WORDS = {
    ErrorCode.CONNECT_FAILED: "could not reach the executor",
    ErrorCode.NETWORK_TIMEOUT: "the executor did not answer in time",
    ErrorCode.STREAM_FAILED: "the stream to the executor failed",
}


def public_text(exc: LoomError) -> str:
    """``exc``'s message for a caller: loomnet's words. Executors' error frames already
    are (``LoomError.peer_message``); a network failure here is told by its code only,
    since its text may quote libp2p and an executor's address. With several attempts,
    each is named by its executor's last 8 characters and outcome."""
    attempts = getattr(exc, "attempts", None) or []
    if len(attempts) > 1:
        parts = []
        for a in attempts:
            words = _NETWORK_WORDS.get(ErrorCode[a.outcome]) if a.outcome in ErrorCode.__members__ else None
            detail = words or a.detail
            parts.append(f"{a.executor[-8:]}: {a.outcome}" + (f" ({detail[:160]})" if detail else ""))
        return f"{len(attempts)} executor(s) tried, none answered: " + "; ".join(parts)
    if isinstance(exc, NetworkError):
        where = f" ({attempts[0].executor[-8:]})" if attempts else ""
        return _NETWORK_WORDS.get(exc.code, "the network failed") + where
    return exc.message


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) and ``retry-after-ms`` (the SDKs read
    it first) for a wait of ``seconds``; nothing for None or a value that is no finite
    number."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return {}
    return {"retry-after": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}
