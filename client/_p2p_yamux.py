"""Yamux flow-control credit: a window of one whole frame, credit once 16 KiB is owed
(or sooner while the sender may be waiting) (trap Z).

py-libp2p 0.8.1's ``YamuxStream._auto_tune_and_send_window_update`` runs after every
read and, besides go-yamux's rule, has three rules of its own (``pending flush``,
``partial slack`` and, on by default through ``PY_YAMUX_RELEASE_ON_READ``, ``release on
read``) that send a ``WINDOW_UPDATE`` frame for almost every read: 6.3 window updates
for 4 data frames per request on a session stream (``bench/seam_bench.py``, counted at
``Yamux._write_frame``). Each is a Noise message and a socket write on the sender, a
decrypt and a few task wake-ups on the receiver: py-libp2p's per-frame cost is most of
what it adds to a request (``bench/RESULTS.md``).

The rule kept here, per stream:

* **The window is one whole loomnet frame** (:data:`WINDOW`: ``MAX_FRAME_SIZE`` plus
  room), granted at the stream's first read (protocol negotiation reads first), and
  fixed after that. A peer can always write a whole frame (a 1 MiB request) without
  waiting for us to read it: an executor refusing a request from its header leaves the
  body unread, and a client whose write waited for credit that never came failed after
  5 s with STREAM_FAILED instead of reading the executor's refusal (py-libp2p's
  auto-tuning had grown windows to 2-4 MiB by the end of negotiation, so this held
  before, by accident; 256 KiB broke it: review of this change).
* **Credit goes back once the reader has taken** :data:`CREDIT_AT` **bytes** (16 KiB)
  since the last credit, all of it at once: a session's requests and answers (a few
  hundred bytes to a few KiB each) cost a window update every dozen requests or so
  instead of one or two per frame.
* **Or sooner, while the sender may be waiting**: with less than :data:`LOW_WINDOW` of
  its window left, whatever the reader took goes back at a read that comes
  :data:`CREDIT_AFTER` (0.1 s) or more after the last credit. py-libp2p's writer gives
  up after 5 s at a zero window (``YamuxStream.write``: "Timed out waiting for window
  update"; go-yamux waits as long as the stream's write deadline), so a reader that
  takes a little and pauses, or reads small pieces slowly, must not hold credit back
  for 16 KiB. With this rule a blocked sender goes on whenever its reader reads at
  least once in 5 s, as with py-libp2p's own rule (but for reads less than 0.1 s apart
  that take under 16 KiB in all before a pause over 5 s); it costs at most ten extra
  updates a second, and only on a stream whose sender is nearly out of window.

Why not py-libp2p's auto-tuning: it doubled a stream's window on its first credit (its
epoch starts at zero) and on, up to 16 MiB, past the unread bytes after which trap K
closes a connection as flooded (``_p2p_guard``; 8 MiB then, 16 MiB now, which eight
streams' windows fit in): an honest stream that sped up
and then slowed down had its connection closed. loomnet's streams carry text; a fixed
window of ~1 MiB is 10 MB/s per stream at a 100 ms round trip.

What a peer can make us hold: credit is what the reader took, never ahead of it, so a
stream holds at most :data:`WINDOW` unread from an honest peer (before, 2-16 MiB), and
trap K bounds what a dishonest one sends past it. A peer running py-libp2p's rule still
sends us its frequent updates; that is correct yamux either way.

This module imports nothing of libp2p: ``_p2p`` installs :func:`credit_when_owed` on
libp2p's ``YamuxStream``.
"""

from __future__ import annotations

from typing import Any

import trio

from loomnet.protocol import MAX_FRAME_SIZE

__all__ = ["CREDIT_AFTER", "CREDIT_AT", "LOW_WINDOW", "WINDOW", "credit_when_owed"]

#: A stream's receive window (bytes): one whole frame, its length prefix and room.
WINDOW = MAX_FRAME_SIZE + 64 * 1024
#: Bytes a reader takes before their credit goes back to the sender.
CREDIT_AT = 16 * 1024
#: Window left to the sender (bytes) under which it may be about to wait for credit.
LOW_WINDOW = 64 * 1024
#: Seconds after the last credit from which, under ``LOW_WINDOW``, any credit owed goes.
CREDIT_AFTER = 0.1


async def credit_when_owed(self: Any, *, bytes_read: int = 0) -> None:
    """``YamuxStream._auto_tune_and_send_window_update`` with the rule of the module doc.

    Args:
        self: a py-libp2p ``YamuxStream``.
        bytes_read: bytes the read that calls this took off the buffer; the credit
            owed is read off the window itself (a read cancelled after taking bytes
            is made up at the next one), so the amount only matters to the callers.
    """
    del bytes_read
    increment = 0
    async with self.window_lock:
        if self.target_recv_window < WINDOW:  # the stream's first read: one frame's window
            increment = WINDOW - self.target_recv_window
            self.target_recv_window = WINDOW
            self.recv_window += increment
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        owed = self.target_recv_window - (self.recv_window + buffered)
        now = trio.current_time()
        if owed > 0 and (
            owed >= CREDIT_AT
            or (self.recv_window < LOW_WINDOW and now - getattr(self, "_credited_at", 0.0) >= CREDIT_AFTER)
        ):
            self.recv_window += owed
            increment += owed
        if increment:
            self._credited_at = now
    if increment:  # never under window_lock: inbound updates need it (libp2p's rule)
        await self.send_window_update(increment, skip_lock=True)
