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
    Envelope,
    FrameDecoder,
    NetworkTimeout,
    SignedKind,
    UnexpectedFrame,
    decode_frame,
    encode_frame,
    encode_frame_body,
)

from ._chat_stream import ByteStream

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
    decoder = FrameDecoder(max_size=MAX_ADVERT_FRAME)
    read = 0
    with trio.move_on_at(deadline):
        while read < limit:
            while (body := decoder.next_frame()) is NEED_DATA:
                decoder.receive_data(await stream.receive_some(timeout=_left(deadline)))
            if body is END:
                return read
            frame = decode_frame(body)  # type: ignore[arg-type]
            if not isinstance(frame, AdvertFrame):
                raise UnexpectedFrame(f"a {type(frame).__name__} where adverts were expected")
            read += 1
            keep(frame.envelope)
        return read  # the rest, if any, is never read: the caller resets the stream
    raise NetworkTimeout(f"the adverts were not over within the exchange's deadline ({read} read)")


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
