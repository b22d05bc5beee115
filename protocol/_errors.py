"""One exception tree and one registry of stable error codes for all of loomnet.

The same integer codes travel in error frames, sit on every exception raised by
loomnet code, appear in CLI output and are listed in ``docs/errors.md``. A code is
never renumbered or reused; retired codes stay commented out.

Hierarchy::

    LoomError                       root; every error carries ``code``
    ├── ProtocolError               the peer broke the wire protocol
    │   ├── FrameError              bad length prefix, frame over the hard maximum
    │   ├── MessageDecodeError      bytes that do not decode to the expected message
    │   ├── UnexpectedFrame         a valid frame in the wrong place in a stream
    │   └── StreamTruncated         a stream ended without its terminal frame
    ├── SignatureError              envelope signature or signer check failed
    ├── RequestRejected             the executor refused a request (audience,
    │                               freshness, nonce, price, model, capacity, ...)
    ├── InvalidRequest              the caller's own request breaks the protocol's
    │                               limits: refused locally, before any traffic
    ├── RemoteError                 the peer answered with an error frame
    ├── BackendError                the LLM runtime behind an executor failed
    ├── NetworkError                dial, stream open, read or write failed
    │   └── NetworkTimeout          ... or did not finish before its deadline
    ├── NoOfferError                no live offer matches what was asked
    ├── ReceiptError                a receipt does not match what was streamed
    ├── LedgerError                 the ledger could not be written or read
    └── ConfigError                 configuration or identity is unusable
"""

from __future__ import annotations

import enum

__all__ = [
    "BackendError",
    "ConfigError",
    "ErrorCode",
    "FrameError",
    "InvalidRequest",
    "LedgerError",
    "LoomError",
    "MessageDecodeError",
    "NetworkError",
    "NetworkTimeout",
    "NoOfferError",
    "ProtocolError",
    "ReceiptError",
    "RemoteError",
    "RequestRejected",
    "SignatureError",
    "StreamTruncated",
    "UnexpectedFrame",
]


class ErrorCode(enum.IntEnum):
    """Stable wire and exit codes. Grouped by hundreds; never renumber."""

    # 1xx: the wire protocol itself
    #: A frame's length prefix is malformed.
    MALFORMED_FRAME = 100
    #: A frame is larger than the hard maximum.
    FRAME_TOO_LARGE = 101
    #: A frame's bytes do not decode to the expected message.
    MALFORMED_MESSAGE = 102
    #: A well-formed frame arrived where the stream state does not allow it.
    UNEXPECTED_FRAME = 103
    #: The stream ended before its terminal frame (receipt or error).
    STREAM_TRUNCATED = 104

    # 2xx: an executor refused the request
    #: The envelope's signature does not verify.
    BAD_SIGNATURE = 200
    #: The request's signer is not the peer at the other end of the stream.
    SIGNER_MISMATCH = 201
    #: The request is addressed to another executor.
    WRONG_AUDIENCE = 202
    #: The request's nonce was seen before.
    REPLAYED_NONCE = 203
    #: The request is older than the executor accepts.
    REQUEST_EXPIRED = 204
    #: The request is dated too far in the future.
    REQUEST_FROM_FUTURE = 205
    #: The advertised price is above the request's price cap.
    PRICE_CAP_EXCEEDED = 206
    #: The executor does not serve the requested model.
    UNKNOWN_MODEL = 207
    #: The executor has no free generation slot (its wait queue for the model is full,
    #: or no slot came within the queue deadline).
    OVER_CAPACITY = 208
    #: The request is well-formed but its contents are unusable.
    BAD_REQUEST = 209
    #: The request did not arrive before the executor's read deadline.
    REQUEST_TIMEOUT = 210
    #: The peer holds more connections, streams or buffered bytes than the executor
    #: allows one peer (or all peers together), or its whole share of the executor's
    #: replay memory (its recent requests' nonces); retry once some finish.
    PEER_LIMIT = 211
    #: The client peer is over one of the executor's rate limits (requests or tokens
    #: per minute); retry after ``retry_after`` seconds.
    RATE_LIMITED = 212
    #: The executor is shutting down (draining): it finishes what it has and takes
    #: nothing new; retry with another executor.
    SHUTTING_DOWN = 213
    #: The request's ``max_tokens`` is above the model's context window (as the
    #: executor advertises it): no answer can be that long. Retryable: another
    #: executor may run the model with a larger window.
    MAX_TOKENS_OVER_CONTEXT = 214

    # 3xx: the LLM runtime behind the executor
    #: The backend cannot be reached or is not ready.
    BACKEND_UNAVAILABLE = 300
    #: The backend answered with an error.
    BACKEND_ERROR = 301
    #: The backend did not answer in time.
    BACKEND_TIMEOUT = 302
    #: The backend does not support a feature the request needs.
    UNSUPPORTED_FEATURE = 303
    #: The backend refused to answer this prompt (content filter, safety, recitation);
    #: the same prompt will be refused again.
    CONTENT_FILTERED = 304

    # 4xx: what the client sees of the network
    #: No live offer matches the model, category or price cap asked for.
    NO_OFFER = 400
    #: A receipt is unsigned, wrongly signed, or about another request.
    RECEIPT_INVALID = 401
    #: A receipt's counts or text digest disagree with what was streamed.
    RECEIPT_MISMATCH = 402
    #: Could not dial the peer or open a stream to it.
    CONNECT_FAILED = 403
    #: A read, write, dial or stream open passed its deadline.
    NETWORK_TIMEOUT = 404
    #: The stream broke (reset, closed) while in use.
    STREAM_FAILED = 405
    #: The client's own spending budget for this period cannot cover the request's
    #: worst-case cost; refused locally, before anything is sent.
    BUDGET_EXCEEDED = 406

    # 5xx: local problems
    #: The configuration is invalid.
    CONFIG_INVALID = 500
    #: The node identity file is unusable.
    IDENTITY_INVALID = 501
    #: The ledger could not be written or read.
    LEDGER_FAILED = 502
    #: A bug: an error no other code describes.
    INTERNAL = 503

    # 6xx: the HTTP gateway (``loomnet gateway``)
    #: The gateway requires a key and the request carries none, or one it does not know.
    GATEWAY_UNAUTHORIZED = 600
    #: The request body is larger than the gateway accepts.
    REQUEST_TOO_LARGE = 601

    # 7xx: the operator's side (``node/_operator``, ``node/_admin``, the executor's config)
    #: An admin route was called without the admin token, or with another one.
    ADMIN_UNAUTHORIZED = 700
    #: Too many refused admin tokens came from this address within the window: every
    #: admin call from it is refused until ``Retry-After`` (seconds) has passed.
    ADMIN_LOCKED_OUT = 701
    #: A model's alias is already a name: another model's name or alias, a category, or
    #: a route keyword (``cheapest``, ``fastest``); clients could not reach it.
    NAME_TAKEN = 702
    #: An admin change names a model this executor neither serves nor configures: it
    #: would change nothing (the advertised name or an alias is expected).
    ADMIN_NO_SUCH_MODEL = 703
    #: An admin change names a backend this executor does not have.
    ADMIN_NO_SUCH_BACKEND = 704


#: What a peer is told for an error whose own message is not for peers (see
#: :attr:`LoomError.peer_message`): loomnet's words, one line per code.
PEER_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.BACKEND_UNAVAILABLE: "the model's runtime is unavailable; try another executor",
    ErrorCode.BACKEND_ERROR: "the model's runtime failed",
    ErrorCode.BACKEND_TIMEOUT: "the model's runtime did not answer in time",
    ErrorCode.UNSUPPORTED_FEATURE: "the model's runtime does not support a feature this request needs",
    ErrorCode.UNKNOWN_MODEL: "the model's runtime does not serve this model now",
    ErrorCode.OVER_CAPACITY: "the model's runtime is over capacity",
    ErrorCode.BAD_REQUEST: "the model's runtime refused this request as malformed",
    ErrorCode.CONTENT_FILTERED: "the model's runtime refused to answer this prompt",
    ErrorCode.LEDGER_FAILED: "the executor could not book this request",
    ErrorCode.CONFIG_INVALID: "the executor is misconfigured",
    ErrorCode.STREAM_FAILED: "the executor's stream failed",
    ErrorCode.NETWORK_TIMEOUT: "the executor's stream timed out",
}


class LoomError(Exception):
    """Root of every loomnet error. ``code`` is an :class:`ErrorCode`.

    Two texts: ``message`` is for the operator's log and the local caller; it may
    quote a library, an endpoint or a file. ``peer_message`` is what a *peer* may be
    told in an error frame: loomnet's own words only, never a provider, an endpoint,
    a key or a library's text. Classes whose messages are built only from loomnet's
    words about the peer's own request (``RequestRejected``, ``ProtocolError``,
    ``SignatureError``) send ``message``; every other class sends ``public`` when
    given, else the generic line for its code.
    """

    code: ErrorCode = ErrorCode.INTERNAL
    #: Whether trying again (elsewhere, or later) may succeed.
    retryable: bool = False
    #: Whether ``message`` may go to a peer verbatim (see the class doc).
    message_is_public: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        retryable: bool | None = None,
        public: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.public = public
        if code is not None:
            self.code = ErrorCode(code)
        if retryable is not None:
            self.retryable = retryable

    @property
    def peer_message(self) -> str:
        """The text a peer may see: ``public``, else ``message`` if the class allows it,
        else a generic line for ``code``. Never a library's text."""
        if self.public is not None:
            return self.public
        if self.message_is_public:
            return self.message
        return PEER_MESSAGES.get(self.code, "the executor failed")

    def __str__(self) -> str:
        return f"[{int(self.code)} {self.code.name}] {self.message}"


class ProtocolError(LoomError):
    """The peer broke the wire protocol."""

    message_is_public = True

    code = ErrorCode.MALFORMED_MESSAGE


class FrameError(ProtocolError):
    """A length prefix is malformed or announces a frame over the hard maximum."""

    code = ErrorCode.MALFORMED_FRAME


class MessageDecodeError(ProtocolError):
    """Bytes that do not decode to the expected message type."""

    code = ErrorCode.MALFORMED_MESSAGE


class UnexpectedFrame(ProtocolError):
    """A valid frame in a place the stream state machine does not allow."""

    code = ErrorCode.UNEXPECTED_FRAME


class StreamTruncated(ProtocolError):
    """The stream ended without a terminal frame: the peer crashed, reset or quit."""

    code = ErrorCode.STREAM_TRUNCATED
    retryable = True


class SignatureError(LoomError):
    """An envelope's signature, or its signer, did not check out."""

    message_is_public = True

    code = ErrorCode.BAD_SIGNATURE


class RequestRejected(LoomError):
    """An executor refused a request; ``code`` says why."""

    message_is_public = True

    code = ErrorCode.BAD_REQUEST


class InvalidRequest(LoomError, ValueError):
    """The caller's request breaks a limit of the protocol's schema (temperature NaN or
    above 2, ``max_tokens`` 0, no messages, an unknown role, a request over the frame
    maximum, ...). The client library refuses it before any traffic; ``field`` names the
    offending field as a path (``"temperature"``, ``"messages[0].role"``), or is None
    when the request as a whole is at fault. Also a ``ValueError``: it is the caller's
    argument that is wrong.

    .. versionadded:: issue 7
    """

    code = ErrorCode.BAD_REQUEST

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RemoteError(LoomError):
    """The peer answered with an error frame; ``code`` and ``retryable`` are the peer's."""

    #: seconds the peer asked us to wait before trying it again, if it said
    retry_after: float | None = None
    #: when part of an answer streamed before the failure: the client's verified
    #: result for exactly that part (its receipt is booked in the client's ledger)
    result: object | None = None


class BackendError(LoomError):
    """The LLM runtime failed. ``retry_after`` is in seconds when the runtime said.

    ``message`` may quote the runtime (its status, its error text) and goes to the
    operator's log only, redacted; ``public`` is what the client may learn, in
    loomnet's words (e.g. ``"the backend refused the prompt (content filter: SAFETY)"``).
    """

    code = ErrorCode.BACKEND_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        public: str | None = None,
    ) -> None:
        super().__init__(message, code=code, retryable=retryable, public=public)
        self.retry_after = retry_after
        #: whether asking the same backend again is worth it (a 404 is retryable
        #: elsewhere, not here); None = same as ``retryable``
        self.retry_here: bool | None = None
        #: the signed receipt for output already streamed when this error ended it
        self.receipt: object | None = None


class NetworkError(LoomError):
    """A dial, stream open, read or write failed."""

    code = ErrorCode.STREAM_FAILED
    retryable = True


class NetworkTimeout(NetworkError):
    """A dial, stream open, read or write did not finish before its deadline."""

    code = ErrorCode.NETWORK_TIMEOUT


class NoOfferError(LoomError):
    """No live offer matches the model, category or price cap asked for.

    ``live_models`` names the models the offer table did hold (sorted, possibly empty):
    empty means no executor was heard from at all, which a CLI explains differently from
    "an executor answered, but not with that model".
    """

    code = ErrorCode.NO_OFFER

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        live_models: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, code=code)
        self.live_models = tuple(live_models)


class ReceiptError(LoomError):
    """A receipt is invalid or disagrees with what was streamed."""

    code = ErrorCode.RECEIPT_INVALID


class LedgerError(LoomError):
    """The ledger could not be written or read."""

    code = ErrorCode.LEDGER_FAILED


class ConfigError(LoomError):
    """The configuration or the identity file is unusable."""

    code = ErrorCode.CONFIG_INVALID
