"""Framing STUN and ChannelData over a byte stream (TCP/TLS), sans-I/O.

RFC 8489 §6.2.2: STUN messages carry their length in the header.  RFC 8656
§12.5: over streams ChannelData is padded to a multiple of four bytes.
"""

from __future__ import annotations

from . import constants as c
from .errors import StunDecodeError

# The largest frame: a STUN message (20 + 65,532 bytes) or padded ChannelData (4 + 65,535
# + 1).  A reader never needs to hold more than this to find the end of a frame.
MAX_FRAME = c.HEADER_SIZE + 0xFFFC


class StreamFramer:
    """Feed bytes in; take whole frames out.

    ``next_frame_untrusted()`` returns one STUN message or one ChannelData
    frame (padding removed from the returned bytes), None when more bytes are
    needed, and raises StunDecodeError when the stream is not STUN (the
    caller closes the connection).
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        """Add bytes; a reader that reads at most ``room`` bytes at a time never overflows."""
        self._buf += data
        if len(self._buf) > MAX_FRAME:
            raise StunDecodeError("stream buffer overflow")

    @property
    def room(self) -> int:
        """How many bytes may be fed now (after taking every whole frame, always >= 1)."""
        return MAX_FRAME - len(self._buf)

    def next_frame_untrusted(self) -> bytes | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        first = buf[0]
        length = (buf[2] << 8) | buf[3]
        if first < 0x40:
            if len(buf) >= 8 and buf[4:8] != c.MAGIC_COOKIE_BYTES:
                raise StunDecodeError("stream is not STUN: no magic cookie")
            if length % 4:
                raise StunDecodeError("stream is not STUN: bad length")
            total = c.HEADER_SIZE + length
            take = total
        elif first < 0x50:
            total = 4 + length
            take = total + (-total % 4)
        else:
            raise StunDecodeError("stream is neither STUN nor ChannelData")
        if len(buf) < take:
            return None
        frame = bytes(buf[:total])
        del buf[:take]
        return frame

    @property
    def buffered(self) -> int:
        return len(self._buf)
