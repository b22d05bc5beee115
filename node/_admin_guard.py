"""The admin routes' guard against token guessing: a source (the remote address) whose
admin tokens are refused too often is locked out for a while (``_operator``).

After ``failures`` refused tokens within ``window`` seconds, every admin call from that
source is refused, with ``429``, ``ADMIN_LOCKED_OUT`` and ``Retry-After``, until
``window`` seconds after the refusal that locked it: even one carrying the right token
(answering it would tell a guesser that its guess was right, undoing the lockout).
Accepted tokens count for nothing. The lockout is logged once per source and window,
with the address and never what was sent.

Memory is bounded: at most ``max_sources`` sources are tracked; past that, the one
touched longest ago is forgotten (an attacker spraying addresses can make the guard
forget some of them, never make it grow).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable

import trio

__all__ = ["AdminGuard"]

log = logging.getLogger("loomnet.operator")


class _Source:
    __slots__ = ("failures", "locked_until")

    def __init__(self) -> None:
        #: the times (s, the guard's clock) of its refused tokens within the window, oldest first
        self.failures: collections.deque[float] = collections.deque()
        #: when its lockout ends (0: not locked)
        self.locked_until = 0.0


class AdminGuard:
    """Counts refused admin tokens per source (see the module doc).

    ``clock`` gives seconds on a monotonic scale (default: trio's clock, so tests can
    drive it with the autojump clock).
    """

    def __init__(self, *, failures: int = 10, window: float = 60.0, max_sources: int = 1024,
                 clock: Callable[[], float] = trio.current_time) -> None:  # fmt: skip
        if failures < 1 or not window > 0 or max_sources < 1:
            raise ValueError("failures and max-sources must be at least 1, window positive")
        self.failures = failures
        self.window = window
        self.max_sources = max_sources
        self._clock = clock
        self._sources: collections.OrderedDict[str, _Source] = collections.OrderedDict()

    def __len__(self) -> int:
        """Sources tracked now (at most ``max_sources``)."""
        return len(self._sources)

    def retry_after(self, source: str) -> int | None:
        """None when ``source`` may try a token now; else the whole seconds until it may."""
        entry = self._sources.get(source)
        if entry is None:
            return None
        left = entry.locked_until - self._clock()
        return max(1, math.ceil(left)) if left > 0 else None

    def refused(self, source: str) -> int | None:
        """Count one refused token from ``source``; returns the lockout's seconds when
        this refusal locks it out (logged here, once), else None."""
        now = self._clock()
        entry = self._sources.pop(source, None) or _Source()
        self._sources[source] = entry  # the most recently touched last
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        while entry.failures and entry.failures[0] <= now - self.window:
            entry.failures.popleft()
        entry.failures.append(now)
        if len(entry.failures) < self.failures:
            return None
        entry.failures.clear()
        entry.locked_until = now + self.window
        log.warning("admin: %s locked out for %g s after %d refused admin tokens within %g s",
                    source, self.window, self.failures, self.window)  # fmt: skip
        return max(1, math.ceil(self.window))
