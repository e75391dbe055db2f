import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnd.stun import StunDecodeError
from turnd.stun.framing import StreamFramer

from .helpers import binding_request


def channel_data(number: int, payload: bytes) -> bytes:
    frame = number.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload
    return frame + b"\x00" * (-len(frame) % 4)


@given(st.lists(st.binary(max_size=50), min_size=1, max_size=5), st.data())
def test_any_split_gives_the_same_frames(payloads, data):
    frames = []
    for i, p in enumerate(payloads):
        frames.append(binding_request()[1] if i % 2 else channel_data(0x4000 + i, p))
    blob = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=6)))
    framer, got, last = StreamFramer(), [], 0
    for cut in cuts + [len(blob)]:
        framer.feed(blob[last:cut])
        last = cut
        while (f := framer.next_frame_untrusted()) is not None:
            got.append(f)
    expected = [f if f[0] < 0x40 else f[:4 + int.from_bytes(f[2:4], "big")] for f in frames]
    assert got == expected and framer.buffered == 0


@pytest.mark.parametrize("junk", [b"\x80\x01\x00\x00", b"\x00\x01\x00\x00\x00\x00\x00\x00",
                                  b"\x00\x01\x00\x03\x21\x12\xa4\x42"])
def test_not_stun_raises(junk):
    framer = StreamFramer()
    framer.feed(junk)
    with pytest.raises(StunDecodeError):
        framer.next_frame_untrusted()
