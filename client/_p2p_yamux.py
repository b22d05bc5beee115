"""Yamux flow-control credit returned once 16 KiB is owed, in a fixed window (trap Z).

py-libp2p 0.8.1's ``YamuxStream._auto_tune_and_send_window_update`` runs after every
read and, besides go-yamux's rule, has three rules of its own (``pending flush``,
``partial slack`` and, on by default through ``PY_YAMUX_RELEASE_ON_READ``, ``release on
read``) that send a ``WINDOW_UPDATE`` frame for almost every read: 6.3 window updates
for 4 data frames per request on a session stream (``bench/seam_bench.py``, counted at
``Yamux._write_frame``). Each is a Noise message and a socket write on the sender, a
decrypt and a few task wake-ups on the receiver: py-libp2p's per-frame cost is most of
what it adds to a request (``bench/RESULTS.md``).

The rule kept here: credit goes back once the reader has taken :data:`CREDIT_AT`
bytes (16 KiB) since the last credit, all of it at once. A session's requests and
answers (a few hundred bytes to a few KiB each) then cost a window update every dozen
requests or so instead of one or two per frame.

Why not go-yamux's half window: py-libp2p's writer gives up after 5 s at a zero window
(``YamuxStream.write``: "Timed out waiting for window update"; go-yamux waits as long
as its stream's write deadline), so credit held back for 128 KiB starved a sender whose
reader took a little and paused, or read steadily but slowly (20 KB/s), where
py-libp2p's own rule did not (review of this change, ``tests/client/test_p2p_yamux_credit.py``).
With 16 KiB, a sender waits for credit only while its reader has taken less than
16 KiB since the last credit: a reader taking 16 KiB per 5 s (3.2 KB/s) keeps any
sender going, and a reader that stops reading stops it, as before.

Why the window stays at 256 KiB (yamux's default; py-libp2p's auto-tuning is not
kept): py-libp2p doubled a stream's window on its first credit (its epoch starts at
zero) and up to 16 MiB, past the 8 MiB of unread bytes after which trap K closes a
connection as flooded (``_p2p_guard``); an honest stream that sped up and then slowed
down got its connection closed. loomnet's streams carry text: 256 KiB is 2.5 MB/s per
stream at a 100 ms round trip.

What a peer can make us hold is unchanged: credit never takes a stream past its
window (``owed`` is what the reader took; nothing is granted ahead), and trap K's bound
on unread bytes still applies. A peer running py-libp2p's rule still sends us its
frequent updates; that is correct yamux either way.

This module imports nothing of libp2p: ``_p2p`` installs :func:`credit_when_owed` on
libp2p's ``YamuxStream``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CREDIT_AT", "credit_when_owed"]

#: Bytes a reader takes before their credit goes back to the sender (at most half the
#: stream's window). See the module doc for why not more, and not less.
CREDIT_AT = 16 * 1024


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
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        owed = self.target_recv_window - (self.recv_window + buffered)
        if owed > 0 and owed >= min(CREDIT_AT, self.target_recv_window // 2):
            self.recv_window += owed
            increment = owed
    if increment:  # never under window_lock: inbound updates need it (libp2p's rule)
        await self.send_window_update(increment, skip_lock=True)
