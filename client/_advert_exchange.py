"""The ``/loomnet/adverts/1`` exchange, both ends, each under one deadline.

The responder writes one ``AdvertFrame`` per advert it holds and closes; the asker reads
frames until the end of the stream. Both ends are bounded as a whole, never per read or
per write: a peer that drips one byte a second, or reads one, holds the other end for
at most ``deadline``, however many reads that takes. The asker also bounds what it
takes: frames no bigger than the largest advert, and at most ``limit`` adverts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from loomnet.protocol import (
    END,
    NEED_DATA,
    AdvertFrame,
    EndOfStream,
    Envelope,
    FrameDecoder,
    NetworkTimeout,
    SignedKind,
    UnexpectedFrame,
    decode_frame,
    encode_frame,
    encode_frame_body,
)

from ._frame_io import FrameIO, FrameReadTimeout
from ._stream_kit import ByteStream

__all__ = ["MAX_ADVERT_FRAME", "receive_adverts", "send_adverts"]

#: The largest advert frame body: a maximal signed advert plus the frame's tag, the
#: signer, the signature and msgpack's headers (under 100 bytes; 1 KiB of room).
MAX_ADVERT_FRAME = SignedKind.ADVERT.max_payload + 1024


def _left(deadline: float) -> float:
    """The per-call limit a stream wants; the enclosing ``move_on_at`` is the real one."""
    return max(deadline - trio.current_time(), 0.0) + 1.0


async def receive_adverts(
    stream: ByteStream, *, deadline: float, limit: int, keep: Callable[[Envelope], object]
) -> int:
    """Read the adverts a peer hands over, passing each envelope to ``keep``.

    Args:
        stream: the stream we opened; the caller closes or resets it.
        deadline: ``trio.current_time()`` by which the whole answer must be in.
        limit: most adverts taken from this peer; reading stops after that many.
        keep: called with each advert's envelope, unverified (the offer table verifies).

    Returns:
        How many adverts were read (at most ``limit``).

    Raises:
        NetworkTimeout: the answer was not over by ``deadline`` (the adverts read so
            far were kept).
        ProtocolError: a frame over ``MAX_ADVERT_FRAME`` (``FrameError``, refused at its
            header), undecodable, or not an advert; the stream ended inside a frame.
        NetworkError: the stream broke.
    """
    io = FrameIO(stream, AdvertReader())
    read = 0
    while read < limit:
        try:
            frame = await io.next_event(deadline=deadline)
        except FrameReadTimeout:
            raise NetworkTimeout(f"the adverts were not over within the exchange's deadline ({read} read)") from None
        if isinstance(frame, EndOfStream):
            return read
        read += 1
        keep(frame.envelope)  # type: ignore[union-attr]
    return read  # the rest, if any, is never read: the caller resets the stream


class AdvertReader:
    """The asker's side of ``/loomnet/adverts/1``, sans-IO, in ``InferenceConnection``'s
    shape (``receive_data``, ``next_event``) so ``FrameIO`` drives it: advert frames
    until the end of the stream, each no bigger than ``MAX_ADVERT_FRAME``.

    Raises (from ``receive_data``/``next_event``): ``FrameError`` for a frame announced
    over the maximum, ``UnexpectedFrame`` for a frame that is not an advert, what
    ``decode_frame`` raises for bytes that are no frame, and ``StreamTruncated`` for an
    end inside a frame.
    """

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = FrameDecoder(max_size=MAX_ADVERT_FRAME)

    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    def next_event(self) -> AdvertFrame | EndOfStream | type[NEED_DATA]:
        body = self._decoder.next_frame()
        if body is NEED_DATA:
            return NEED_DATA
        if body is END:
            return EndOfStream()
        frame = decode_frame(body)  # type: ignore[arg-type]
        if not isinstance(frame, AdvertFrame):
            raise UnexpectedFrame(f"a {type(frame).__name__} where adverts were expected")
        return frame


async def send_adverts(stream: ByteStream, envelopes: Sequence[Envelope], *, deadline: float) -> None:
    """Write one ``AdvertFrame`` per envelope, then close our side.

    Raises:
        NetworkTimeout: the peer did not take them all by ``deadline``.
        NetworkError: the stream broke.
    """
    with trio.move_on_at(deadline):
        for envelope in envelopes:
            await stream.send_all(encode_frame(encode_frame_body(AdvertFrame(envelope))), timeout=_left(deadline))
        await stream.close()
        return
    raise NetworkTimeout("the asking peer did not take the adverts within the exchange's deadline")
