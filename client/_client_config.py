"""What a client is configured with: where it keeps its files, how it joins, its
deadlines and limits (``ClientConfig``); split from ``_client`` to keep each module to
one job. Times are seconds, money micro-credits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from ._budget import BudgetConfig
from ._receipts import DEFAULT_MAX_HIDDEN_REASONING_TOKENS
from ._stream_kit import MAX_ANSWER_BYTES, Deadlines

__all__ = ["ClientConfig", "default_data_dir"]


def default_data_dir() -> Path:
    """``$LOOMNET_DATA_DIR``, else ``$XDG_DATA_HOME/loomnet``, else ``~/.local/share/loomnet``."""
    if explicit := os.environ.get("LOOMNET_DATA_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "loomnet"


class ClientConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    """How a client joins, how long it waits and what it pays for. Times are seconds.

    The three answer deadlines are each one deadline over their whole span, never per
    read (see ``_chat_stream``); a deadline that passes raises ``NetworkTimeout``.
    """

    #: identity and ledger live in ``<data_dir>/client``; None = ``default_data_dir()``
    data_dir: str | None = None
    listen: list[str] = msgspec.field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    #: full multiaddrs (with ``/p2p/<peer id>``) of peers to join through
    bootstrap: list[str] = []
    #: also join through executors announced on this machine (see ``_local``)
    discover_local: bool = True
    #: find and join executors announced on the LAN by multicast DNS (see ``_mdns``); a
    #: client only listens and asks, it never announces itself. Off by default: mDNS
    #: queries are multicast to every machine of the LAN, which some networks forbid
    mdns: bool = False
    #: longest dial and stream open
    connect_timeout: float = 5.0
    #: longest one peer may take to hand over its adverts, stream open to the last one
    #: (one deadline over the whole exchange; peers are asked at once, so joining waits
    #: for the dials plus at most this)
    join_timeout: float = 10.0
    #: longest wait from the request sent to the first complete frame (a progress chunk
    #: counts: the executor sends one every few seconds while its backend is silent)
    first_byte_timeout: float = 60.0
    #: longest wait from the request sent to the first content (text, reasoning or a
    #: tool call): progress chunks keep an attempt alive while a model thinks silently,
    #: but not past this; then the attempt has failed and the next executor is tried (an
    #: executor sending only progress chunks cannot hold a request to the total deadline)
    first_content_timeout: float = 300.0
    #: longest wait for each next complete frame once the answer streams
    idle_timeout: float = 30.0
    #: longest a whole request may take, dial to receipt; generous, because a reasoning
    #: model may think for minutes before it answers
    total_timeout: float = 900.0
    #: how long ``chat`` waits for a matching offer to appear
    offer_timeout: float = 5.0
    #: most output tokens of reasoning a receipt may bill without streaming it (Gemini's
    #: thoughts, OpenAI's ``reasoning_tokens``): there are no bytes to check them against,
    #: so a receipt over this is booked as disputed and raises RECEIPT_MISMATCH
    max_hidden_reasoning_tokens: int = DEFAULT_MAX_HIDDEN_REASONING_TOKENS
    #: most UTF-8 bytes of one answer (text, reasoning and tool calls together) the client
    #: holds; an executor streaming more ends the stream with FRAME_TOO_LARGE. 64 MiB is
    #: far above any honest answer (a million tokens of English is ~4 MB)
    max_answer_bytes: Annotated[int, Meta(ge=1024)] = MAX_ANSWER_BYTES
    #: seconds an idle session stream (``/loomnet/infer/2``) is kept for the next request
    #: to its executor; below the executors' ``session-idle-timeout`` (60 s by default)
    session_idle_timeout: Annotated[float, Meta(gt=0)] = 20.0
    #: idle session streams kept per executor (0: a new stream for every request). Keep
    #: it at least the requests this client has in flight to one executor at once: past
    #: it, a request finding no idle session opens a stream (~7 ms here). 8 matches an
    #: executor's default ``max-streams-per-peer``; idle sessions count there too, but a
    #: client reuses its idle sessions before it opens another, so they never crowd it out
    max_idle_sessions: Annotated[int, Meta(ge=0, le=64)] = 8
    #: requests this client has open to one executor at once (an executor's default
    #: ``max-streams-per-peer`` is 8); more wait, in order, for one to end, up to the
    #: first-byte deadline, then fail over (``PEER_LIMIT``). A client serving many
    #: callers (the gateway) so queues a burst instead of having the executor refuse it
    max_streams_per_executor: Annotated[int, Meta(ge=1, le=1024)] = 8
    #: the most executors one request is sent to (failover before the first content)
    max_attempts: Annotated[int, Meta(ge=1, le=16)] = 3
    #: output tokens a request without ``max_tokens`` is assumed to need, for routing
    #: (context length, expected cost) and for its budget reservation; under a budget
    #: such a request is sent with this ``max_tokens``
    assumed_max_tokens: Annotated[int, Meta(ge=1, le=1 << 20)] = 1024
    #: a spending limit per period (``[budget]``: amount, period, warn-at); None = none
    budget: BudgetConfig | None = None

    def __post_init__(self) -> None:
        # Meta constraints hold when a config is decoded; a config built in code is checked here
        if not self.session_idle_timeout > 0:  # NaN too
            raise ValueError("session-idle-timeout must be positive")
        if not 0 <= self.max_idle_sessions <= 64:
            raise ValueError("max-idle-sessions must be from 0 to 64")
        if not 1 <= self.max_streams_per_executor <= 1024:
            raise ValueError("max-streams-per-executor must be from 1 to 1024")

    @property
    def deadlines(self) -> Deadlines:
        return Deadlines(
            connect=self.connect_timeout,
            first_byte=self.first_byte_timeout,
            first_content=self.first_content_timeout,
            idle=self.idle_timeout,
            total=self.total_timeout,
        )
