import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnd.stun import StunDecodeError
from turnd.stun.framing import StreamFramer

from .helpers import binding_request


def channel_data(number: int, payload: bytes, padded: bool = True) -> bytes:
    frame = number.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload
    return frame + b"\x00" * (-len(frame) % 4) if padded else frame


@given(st.lists(st.tuples(st.binary(max_size=50), st.integers(0, 2), st.booleans()),
                min_size=1, max_size=6), st.data())
def test_any_split_gives_the_same_frames(items, data):
    """STUN messages and ChannelData, padded (RFC 8656 §12.5) or not, cut anywhere."""
    frames = []
    for i, (p, kind, padded) in enumerate(items):
        frames.append(binding_request()[1] if kind == 0 else channel_data(0x4000 + i, p, padded))
    blob = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=6)))
    framer, got, last = StreamFramer(), [], 0
    for cut in cuts + [len(blob)]:
        framer.feed(blob[last:cut])
        last = cut
        while (f := framer.next_frame_untrusted()) is not None:
            got.append(f)
    expected = [f if f[0] < 0x40 else f[:4 + int.from_bytes(f[2:4], "big")] for f in frames]
    assert got == expected
    last = frames[-1]
    # One zero byte after the last ChannelData may be padding or a STUN message's first
    # byte: it waits for the next bytes to tell.  Two or three zeros are padding.
    total = 4 + int.from_bytes(last[2:4], "big")
    assert framer.buffered == (1 if last[0] >= 0x40 and len(last) - total == 1 else 0)


def test_unpadded_channel_data_then_stun_then_channel_data():
    blob = channel_data(0x4001, b"abcde", padded=False) + binding_request()[1] \
        + channel_data(0x4002, b"x", padded=False) + channel_data(0x4003, b"yz")
    framer = StreamFramer()
    framer.feed(blob)
    got = []
    while (f := framer.next_frame_untrusted()) is not None:
        got.append(f)
    assert [g[:2] for g in got] == [b"\x40\x01", binding_request()[1][:2], b"\x40\x02", b"\x40\x03"]
    assert got[0][4:] == b"abcde" and got[2][4:] == b"x" and got[3][4:] == b"yz"


def test_legacy_channel_range():
    framer = StreamFramer(channel_end=0x80)
    framer.feed(channel_data(0x7FFF, b"hi"))
    assert framer.next_frame_untrusted() == b"\x7f\xff\x00\x02hi"
    with pytest.raises(StunDecodeError):
        strict = StreamFramer()
        strict.feed(channel_data(0x7FFF, b"hi"))
        strict.next_frame_untrusted()


@pytest.mark.parametrize("junk", [b"\x80\x01\x00\x00", b"\x00\x01\x00\x00\x00\x00\x00\x00",
                                  b"\x00\x01\x00\x03\x21\x12\xa4\x42"])
def test_not_stun_raises(junk):
    framer = StreamFramer()
    framer.feed(junk)
    with pytest.raises(StunDecodeError):
        framer.next_frame_untrusted()
