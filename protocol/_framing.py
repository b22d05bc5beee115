"""Length-prefixed framing: a 4-byte big-endian length, then that many bytes.

The decoder is sans-IO (h11's ``receive_data`` / ``next_frame`` verbs). It rejects a
frame as soon as its *header* announces more than the hard maximum, before a single
byte of the body is buffered, so a peer cannot make us allocate without bound. Fed
arbitrary bytes it returns frames, ``NEED_DATA`` or ``END``, or raises
:class:`FrameError` / :class:`StreamTruncated` — never anything else.
"""

from __future__ import annotations

from ._errors import ErrorCode, FrameError, StreamTruncated
from ._messages import MAX_FRAME_SIZE

__all__ = ["END", "NEED_DATA", "FrameDecoder", "encode_frame"]

_HEADER = 4


class _Sentinel(type):
    def __repr__(cls) -> str:
        return cls.__name__


class NEED_DATA(metaclass=_Sentinel):
    """More bytes are needed before the next frame is complete."""


class END(metaclass=_Sentinel):
    """The peer closed its side cleanly, at a frame boundary."""


def encode_frame(body: bytes, *, max_size: int = MAX_FRAME_SIZE) -> bytes:
    """Prefix ``body`` with its length. Raises FrameError if it is over ``max_size``."""
    if not body:
        raise FrameError("a frame cannot be empty")
    if len(body) > max_size:
        raise FrameError(
            f"frame of {len(body)} bytes is over the {max_size}-byte maximum",
            code=ErrorCode.FRAME_TOO_LARGE,
        )
    return len(body).to_bytes(_HEADER, "big") + body


class FrameDecoder:
    """Splits a byte stream into frames. One per stream direction."""

    def __init__(self, *, max_size: int = MAX_FRAME_SIZE) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the stream; ``b""`` means the peer closed its side.

        Raises:
            FrameError: more bytes are buffered than one maximal frame could need
                (the caller is not draining frames) — code FRAME_TOO_LARGE.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise FrameError("data after end of stream")
        self._buffer += data
        if len(self._buffer) > 2 * (self.max_size + _HEADER):
            raise FrameError("receive buffer over its bound", code=ErrorCode.FRAME_TOO_LARGE)

    def next_frame(self) -> bytes | type[NEED_DATA] | type[END]:
        """The next complete frame body, or ``NEED_DATA``, or ``END``.

        Raises:
            FrameError: a zero or over-maximum length prefix.
            StreamTruncated: the stream ended in the middle of a frame.
        """
        buf = self._buffer
        if len(buf) >= _HEADER:
            size = int.from_bytes(buf[:_HEADER], "big")
            if size == 0:
                raise FrameError("zero-length frame")
            if size > self.max_size:
                raise FrameError(
                    f"peer announced a {size}-byte frame; the maximum is {self.max_size}",
                    code=ErrorCode.FRAME_TOO_LARGE,
                )
            if len(buf) >= _HEADER + size:
                body = bytes(buf[_HEADER:_HEADER + size])
                del buf[:_HEADER + size]
                return body
        if self._eof:
            if buf:
                raise StreamTruncated(f"stream ended inside a frame ({len(buf)} bytes pending)")
            return END
        return NEED_DATA
