"""Yamux flow-control credit returned as go-yamux returns it: at half a window (trap Z).

py-libp2p 0.8.1's ``YamuxStream._auto_tune_and_send_window_update`` runs after every
read and, besides go-yamux's rule, has three rules of its own (``pending flush``,
``partial slack`` and, on by default through ``PY_YAMUX_RELEASE_ON_READ``, ``release on
read``) that send a ``WINDOW_UPDATE`` frame for almost every read: 6.3 window updates
for 4 data frames per request on a session stream (``bench/seam_bench.py``, counted at
``Yamux._write_frame``). Each is a Noise message and a socket write on the sender, a
decrypt and a wake-up on the receiver: py-libp2p's per-frame cost is most of what it
adds to a request (``bench/RESULTS.md``).

go-yamux (``Stream.sendWindowUpdate`` with ``segmentedBuffer.GrowTo``) returns credit
only once the credit owed reaches half the window, and grows the window (doubling, up
to its maximum) when that happens within four round trips of the last time: a stream
moving small messages sends no window update at all, one moving bulk data one per half
window. That is the rule kept here, with py-libp2p's own pieces (``_grow_threshold``,
``_grow_to_delta``, ``_apply_autotune_epoch``), so the window sizes and the auto-tuning
stay libp2p's.

Why it cannot stall a stream: a sender waits only with its send window at zero, which
means our ``recv_window`` is zero too; the reader then drains the buffer (it waits for
data only once the buffer is empty), and at that read the credit owed is the whole
window, over the threshold, so the update goes out. The peer's own updates are not
ours to change; a peer that sends fewer of them is still correct yamux.

This module imports nothing of libp2p: ``_p2p`` installs :func:`credit_at_half_window`
on libp2p's ``YamuxStream``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["credit_at_half_window"]


async def credit_at_half_window(self: Any, *, bytes_read: int = 0) -> None:
    """``YamuxStream._auto_tune_and_send_window_update`` with go-yamux's rule alone.

    Args:
        self: a py-libp2p ``YamuxStream``.
        bytes_read: bytes the read that calls this took off the buffer; the credit
            owed is recomputed from the window itself, so the amount only matters to
            the callers' signature.
    """
    del bytes_read  # the credit owed is read off the window, as go-yamux does
    increment = 0
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        owed = self.target_recv_window - (self.recv_window + buffered)
        if owed > 0 and owed >= self._grow_threshold():
            increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
    if increment > 0:  # never under window_lock: inbound updates need it (libp2p's rule)
        await self.send_window_update(increment, skip_lock=True)
