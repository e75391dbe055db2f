"""Framing STUN and ChannelData over a byte stream (TCP/TLS), sans-I/O.

RFC 8489 §6.2.2: STUN messages carry their length in the header.  RFC 8656
§12.5: over streams ChannelData MUST be padded to a multiple of four bytes;
some clients don't, so after an unaligned ChannelData frame turnd looks at
where the next frame starts (after the padding, or right away) and takes it.
"""

from __future__ import annotations

from . import constants as c
from .errors import StunDecodeError

# The largest frame: a STUN message (20 + 65,532 bytes) or padded ChannelData (4 + 65,535
# + 1).  A reader never needs to hold more than this to find the end of a frame.
MAX_FRAME = c.HEADER_SIZE + 0xFFFC
_COOKIE = c.MAGIC_COOKIE_BYTES


class StreamFramer:
    """Feed bytes in; take whole frames out.

    ``next_frame_untrusted()`` returns one STUN message or one ChannelData
    frame (padding removed from the returned bytes), None when more bytes are
    needed, and raises StunDecodeError when the stream is not STUN (the
    caller closes the connection).  ``channel_end``: first bytes from 0x40 up
    to it are ChannelData (0x50: channels 0x4000-0x4FFF, RFC 8656; 0x80 with
    RFC 5766's range).
    """

    __slots__ = ("_buf", "_pad", "channel_end")

    def __init__(self, channel_end: int = 0x50) -> None:
        self._buf = bytearray()
        self._pad = 0  # after unaligned ChannelData: how many padding bytes may follow
        self.channel_end = channel_end

    def feed(self, data: bytes) -> None:
        """Add bytes; a reader that reads at most ``room`` bytes at a time never overflows."""
        self._buf += data
        if len(self._buf) > MAX_FRAME:
            raise StunDecodeError("stream buffer overflow")

    @property
    def room(self) -> int:
        """How many bytes may be fed now (after taking every whole frame, always >= 1)."""
        return MAX_FRAME - len(self._buf)

    def _skip_padding(self) -> bool:
        """After unaligned ChannelData: drop its padding, if it has any (RFC 8656 §12.5 says
        it must; clients pad with zeros).  A frame found right after it means the client did
        not pad.  False while the bytes can't tell yet."""
        buf, pad = self._buf, self._pad
        if not buf:
            return False
        if any(buf[:pad]):  # not zeros: the next frame starts here (the parser judges it)
            self._pad = 0
            return True
        if len(buf) < pad:
            return False
        if pad == 1:
            # One zero byte: padding, or the first byte of a STUN message type 0x00XX?
            if len(buf) < 2:
                return False
            if not 0x40 <= buf[1] < self.channel_end:  # else: padding, then ChannelData
                if len(buf) >= 8 and buf[4:8] == _COOKIE:
                    self._pad = 0  # a STUN header right here: no padding
                    return True
                if len(buf) < 9:
                    return False
        # Two or three zero bytes can't start a STUN message (type 0x0000): padding.
        del buf[:pad]
        self._pad = 0
        return True

    def next_frame_untrusted(self) -> bytes | None:
        if self._pad and not self._skip_padding():
            return None
        buf = self._buf
        if len(buf) < 4:
            return None
        first = buf[0]
        length = (buf[2] << 8) | buf[3]
        if first < 0x40:
            if len(buf) >= 8 and buf[4:8] != _COOKIE:
                raise StunDecodeError("stream is not STUN: no magic cookie")
            if length % 4:
                raise StunDecodeError("stream is not STUN: bad length")
            total = c.HEADER_SIZE + length
        elif first < self.channel_end:
            total = 4 + length
        else:
            raise StunDecodeError("stream is neither STUN nor ChannelData")
        if len(buf) < total:
            return None
        frame = bytes(buf[:total])
        del buf[:total]
        self._pad = -total % 4
        return frame

    def state(self) -> tuple[bytes, int]:
        """(bytes not yet framed, padding still to skip): for a hand-over."""
        return bytes(self._buf), self._pad

    def restore(self, data: bytes, pad: int) -> None:
        self._buf = bytearray(data)
        self._pad = pad

    @property
    def buffered(self) -> int:
        return len(self._buf)
