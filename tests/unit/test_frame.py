"""Frame codec: golden frames from the spec Appendix, the sans-IO decoder, limits."""

from __future__ import annotations

import tracemalloc

import pytest

from pyhast.defaults import MAXPHYS
from pyhast.errors import FrameError, NVError, ProtocolError
from pyhast.wire.frame import (
    DEFAULT_MAX_NV_SIZE,
    DEFAULT_MAX_PAYLOAD,
    ERPCMISMATCH,
    HEADER_SIZE,
    NEED_DATA,
    DecoderState,
    Frame,
    FrameDecoder,
    NeedData,
    decode_header,
    encode_frame,
    encode_header,
    payload_size,
)
from pyhast.wire.nv import NV


def H(*parts: str | bytes) -> bytes:
    """Join hex strings (spaces allowed) and literal byte strings."""
    return b"".join(bytes.fromhex(p) if isinstance(p, str) else p for p in parts)


TOKEN = bytes.fromhex("00112233445566778899aabbccddeeff")

# Appendix: reply to the first handshake message, exactly as seen on the wire.
FIRST_REPLY = H(
    "02 34000000",
    "02 08 01000000", b"version\0", "02", "00000000000000",
    "0a 06 10000000", b"token\0", "0000", TOKEN,
)  # fmt: skip

# Appendix: a successful WRITE reply, {seq: uint64 0x0102030405060708}.
WRITE_REPLY = H("02 16000000", "08 04 08000000", b"seq\0", "00000000", "0807060504030201")

# Request header {cmd 2, seq 9, offset 0, length 4} + {size: uint32 4} + 4 data bytes.
WRITE_REQ = H(
    "02 6e000000",
    "02 04 01000000", b"cmd\0", "00000000", "02 00000000000000",
    "08 04 08000000", b"seq\0", "00000000", "0900000000000000",
    "08 07 08000000", b"offset\0", "00", "0000000000000000",
    "08 07 08000000", b"length\0", "00", "0400000000000000",
    "06 05 04000000", b"size\0", "000000", "04000000 00000000",
    b"DATA",
)  # fmt: skip

KEEPALIVE = H("02 16000000", "02 04 01000000", b"cmd\0", "00000000", "05 00000000000000")


def frames_of(dec: FrameDecoder) -> list[Frame]:
    out: list[Frame] = []
    while True:
        item = dec.next_frame()
        if item is NEED_DATA:
            return out
        assert isinstance(item, Frame)
        out.append(item)


def write_request_nv() -> NV:
    nv = NV()
    nv.add_uint8("cmd", 2)
    nv.add_uint64("seq", 9)
    nv.add_uint64("offset", 0)
    nv.add_uint64("length", 4)
    nv.add_uint32("size", 4)
    return nv


# --- encoding -------------------------------------------------------------------


def test_encode_first_handshake_reply_matches_appendix() -> None:
    nv = NV()
    nv.add_uint8("version", 2)
    nv.add_uint8_array("token", TOKEN)
    bufs = encode_frame(nv)
    assert len(bufs) == 1
    assert b"".join(bufs) == FIRST_REPLY


def test_encode_write_reply_matches_appendix() -> None:
    nv = NV()
    nv.add_uint64("seq", 0x0102030405060708)
    assert b"".join(encode_frame(nv)) == WRITE_REPLY


def test_encode_with_payload_returns_it_uncopied() -> None:
    payload = b"DATA"
    bufs = encode_frame(write_request_nv(), payload)
    assert len(bufs) == 2
    assert bufs[1] is payload
    assert b"".join(bufs) == WRITE_REQ
    view = memoryview(bytearray(b"DATA"))
    assert encode_frame(write_request_nv(), view)[1] is view


def test_encode_first_handshake_message_with_version_1() -> None:
    # 6.1 step 1 / 6.2: the primary's first message carries frame version 1.
    nv = NV()
    nv.add_string("resource", "r")
    nv.add_uint8("version", 2)
    golden = H(
        "01 34000000",  # 30 + 22 = 52 bytes of nv
        "11 09 02000000", b"resource\0", "00000000000000", b"r\0", "000000000000",
        "02 08 01000000", b"version\0", "02 00000000000000",
    )  # fmt: skip
    assert b"".join(encode_frame(nv, version=1)) == golden
    dec = FrameDecoder()
    dec.feed(golden)
    (frame,) = frames_of(dec)
    assert frame.version == 1
    assert frame.nv.get_string("resource") == "r"


def test_encode_payload_size_must_match() -> None:
    nv = write_request_nv()  # size 4
    with pytest.raises(ValueError):
        encode_frame(nv, b"12345")
    with pytest.raises(ValueError):
        encode_frame(nv)  # header announces 4 bytes but none given
    plain = NV()
    plain.add_uint8("cmd", 1)
    with pytest.raises(ValueError):
        encode_frame(plain, b"x")  # no size field
    bad = NV()
    bad.add_uint64("size", 1)
    with pytest.raises(ValueError):
        encode_frame(bad, b"x")


def test_encode_empty_payload_is_omitted() -> None:
    nv = NV()
    nv.add_uint64("seq", 1)
    nv.add_uint32("size", 0)
    assert len(encode_frame(nv, b"")) == 1


def test_header_helpers() -> None:
    assert encode_header(2, 0x16) == H("02 16000000")
    assert decode_header(H("02 16000000")) == (2, 0x16)
    assert decode_header(H("01 ffff0000")) == (1, 0xFFFF)
    with pytest.raises(FrameError) as info:
        decode_header(H("03 16000000"))
    assert info.value.errno == ERPCMISMATCH == 73
    with pytest.raises(FrameError):
        decode_header(H("02 00000000"))
    with pytest.raises(FrameError):
        decode_header(H("02 16"))
    with pytest.raises(FrameError):
        decode_header(H("02 01001000"), max_nv_size=1024 * 1024)
    assert decode_header(H("03 16000000"), max_version=3) == (3, 0x16)
    with pytest.raises(ValueError):
        encode_header(256, 1)
    with pytest.raises(ValueError):
        encode_header(2, 2**32)


# --- decoding -------------------------------------------------------------------


def test_decode_appendix_frames() -> None:
    dec = FrameDecoder()
    dec.feed(FIRST_REPLY + WRITE_REPLY)
    first, second = frames_of(dec)
    assert first.version == 2
    assert first.nv.get_uint8("version") == 2
    assert first.nv.get_uint8_array("token") == TOKEN
    assert first.payload is None
    assert second.nv.get_uint64("seq") == 0x0102030405060708
    assert list(second.nv) == [("seq", second.nv.type_of("seq"), 0x0102030405060708)]
    assert dec.at_frame_boundary
    assert dec.buffered == 0


def test_decode_frame_with_payload() -> None:
    dec = FrameDecoder()
    dec.feed(WRITE_REQ)
    (frame,) = frames_of(dec)
    assert frame.nv.get_uint8("cmd") == 2
    assert frame.nv.get_uint32("size") == 4
    assert frame.payload is not None
    assert frame.payload == b"DATA"
    assert frame.payload.readonly


def test_many_frames_in_one_feed() -> None:
    stream = (WRITE_REQ + KEEPALIVE + WRITE_REPLY) * 300
    dec = FrameDecoder()
    dec.feed(stream)
    frames = frames_of(dec)
    assert len(frames) == 900
    assert [f.payload for f in frames[:3]] == [b"DATA", None, None]
    assert frames[-1].nv.get_uint64("seq") == 0x0102030405060708
    assert dec.at_frame_boundary


def test_one_byte_at_a_time() -> None:
    stream = FIRST_REPLY + WRITE_REQ + KEEPALIVE + WRITE_REQ
    dec = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        frames += frames_of(dec)
        if i < len(FIRST_REPLY) - 1:
            assert not frames
    assert [f.nv.type_of("cmd") is not None for f in frames] == [False, True, True, True]
    assert [f.payload for f in frames] == [None, b"DATA", None, b"DATA"]


def test_big_payload_in_chunks_is_copied_once_into_its_own_buffer() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    nv = NV()
    nv.add_uint64("seq", 1)
    nv.add_uint32("size", len(data))
    stream = b"".join(encode_frame(nv, data)) + KEEPALIVE
    dec = FrameDecoder()
    got: list[Frame] = []
    for i in range(0, len(stream), 65536):
        dec.feed(memoryview(stream)[i : i + 65536])
        got += frames_of(dec)
    assert len(got) == 2
    assert got[0].payload == data
    assert got[1].nv.get_uint8("cmd") == 5


def test_payload_window_takes_the_rest_of_the_payload_and_nothing_more() -> None:
    data = bytes(range(256)) * 1024  # 256 KiB
    nv = NV()
    nv.add_uint64("seq", 1)
    nv.add_uint32("size", len(data))
    head, body = encode_frame(nv, data)
    dec = FrameDecoder()
    assert dec.payload_window() is None  # no payload started
    dec.feed(bytes(head) + bytes(body[:1000]))
    assert dec.next_frame() is NEED_DATA
    assert dec.payload_window(len(data)) is None  # less than asked for is missing
    window = dec.payload_window(64 * 1024)
    assert window is not None and len(window) == len(data) - 1000
    window[:5000] = body[1000:6000]  # a short read into it
    dec.payload_filled(5000)
    assert dec.next_frame() is NEED_DATA
    window = dec.payload_window()
    assert window is not None and len(window) == len(data) - 6000
    window[:] = body[6000:]
    dec.payload_filled(len(window))
    frame = dec.next_frame()
    assert isinstance(frame, Frame) and frame.payload == data
    assert dec.payload_window() is None
    with pytest.raises(ValueError):
        dec.payload_filled(1)
    dec.feed(KEEPALIVE)  # the next frame goes through feed() as usual
    frame = dec.next_frame()
    assert isinstance(frame, Frame) and frame.nv.get_uint8("cmd") == 5


def test_payload_byte_at_a_time() -> None:
    data = bytes(range(256)) * 64
    nv = NV()
    nv.add_uint64("seq", 1)
    nv.add_uint32("size", len(data))
    stream = b"".join(encode_frame(nv, data))
    dec = FrameDecoder()
    got: list[Frame] = []
    for b in stream:
        dec.feed(bytes((b,)))
        got += frames_of(dec)
    assert len(got) == 1 and got[0].payload == data


def test_need_data_and_state() -> None:
    dec = FrameDecoder()
    assert dec.next_frame() is NEED_DATA
    assert isinstance(NEED_DATA, NeedData)
    dec.feed(WRITE_REQ[:3])
    assert dec.next_frame() is NEED_DATA
    assert dec.state is DecoderState.HEADER
    assert not dec.at_frame_boundary
    dec.feed(WRITE_REQ[3:10])
    assert dec.next_frame() is NEED_DATA
    assert dec.state is DecoderState.NV
    dec.feed(WRITE_REQ[10:-2])
    assert dec.next_frame() is NEED_DATA
    assert dec.state is DecoderState.PAYLOAD
    assert dec.buffered == len(WRITE_REQ) - 2 - HEADER_SIZE - 0x6E
    dec.feed(WRITE_REQ[-2:])
    frame = dec.next_frame()
    assert isinstance(frame, Frame) and frame.payload == b"DATA"
    assert dec.state is DecoderState.HEADER


def test_version_1_is_accepted() -> None:
    dec = FrameDecoder()
    dec.feed(b"\x01" + KEEPALIVE[1:])
    (frame,) = frames_of(dec)
    assert frame.version == 1


@pytest.mark.parametrize("version", [0, 3, 255])
def test_bad_version_rejected_after_header_only(version: int) -> None:
    dec = FrameDecoder()
    dec.feed(bytes([version]) + KEEPALIVE[1:5])
    with pytest.raises(FrameError) as info:
        dec.next_frame()
    assert info.value.errno == ERPCMISMATCH
    assert dec.state is DecoderState.ERROR


def test_error_state_is_sticky() -> None:
    dec = FrameDecoder()
    dec.feed(H("03 16000000"))
    with pytest.raises(FrameError):
        dec.next_frame()
    with pytest.raises(FrameError):
        dec.next_frame()
    with pytest.raises(FrameError):
        dec.feed(KEEPALIVE)


def test_empty_nv_rejected() -> None:
    dec = FrameDecoder()
    dec.feed(H("02 00000000"))
    with pytest.raises(FrameError):
        dec.next_frame()


def test_oversize_nv_rejected_before_allocation() -> None:
    dec = FrameDecoder()
    dec.feed(encode_header(2, DEFAULT_MAX_NV_SIZE + 1))  # only the header
    with pytest.raises(FrameError):
        dec.next_frame()
    small = FrameDecoder(max_nv_size=64)
    small.feed(encode_header(2, 65))
    with pytest.raises(FrameError):
        small.next_frame()
    ok = FrameDecoder(max_nv_size=0x16)
    ok.feed(KEEPALIVE)
    assert len(frames_of(ok)) == 1


def test_huge_advertised_nv_size_does_not_allocate() -> None:
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        dec.feed(H("02 ffffffff"))
        with pytest.raises(FrameError):
            dec.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_oversize_payload_rejected_before_allocation() -> None:
    nv = NV()
    nv.add_uint64("seq", 1)
    nv.add_uint32("size", 0xFFFFFFFF)  # 4 GiB advertised
    head = b"".join(encode_frame_unchecked(nv))
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        dec.feed(head)  # header + nv only, no payload byte
        with pytest.raises(FrameError):
            dec.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def encode_frame_unchecked(nv: NV) -> list[bytes]:
    """Header + nv without encode_frame's payload consistency check."""
    data = nv.encode()
    return [encode_header(2, len(data)), data]


def test_payload_limit_is_configurable_and_default_is_maxphys_plus_64() -> None:
    assert DEFAULT_MAX_PAYLOAD == MAXPHYS + 64
    nv = NV()
    nv.add_uint32("size", 100)
    head = b"".join(encode_frame_unchecked(nv))
    dec = FrameDecoder(max_payload=99)
    dec.feed(head)
    with pytest.raises(FrameError):
        dec.next_frame()
    dec = FrameDecoder(max_payload=10)
    dec.max_payload = 100  # e.g. raised by the handshake before the bitmap
    dec.feed(head + bytes(100))
    (frame,) = frames_of(dec)
    assert frame.payload == bytes(100)


def test_size_field_with_wrong_type_rejected() -> None:
    nv = NV()
    nv.add_uint64("size", 4)
    dec = FrameDecoder()
    dec.feed(b"".join(encode_frame_unchecked(nv)))
    with pytest.raises(FrameError):
        dec.next_frame()


def test_size_zero_means_no_payload() -> None:
    nv = NV()
    nv.add_uint64("seq", 3)
    nv.add_uint32("size", 0)
    dec = FrameDecoder()
    dec.feed(b"".join(encode_frame(nv)) + KEEPALIVE)
    frames = frames_of(dec)
    assert [f.payload for f in frames] == [None, None]


def test_bad_nv_inside_frame_raises_nverror() -> None:
    dec = FrameDecoder()
    dec.feed(H("02 08000000", "02 04 01000000 63 6d 64"))  # name not terminated
    with pytest.raises(NVError):
        dec.next_frame()
    assert dec.state is DecoderState.ERROR


def test_payload_size_helper() -> None:
    nv = NV()
    assert payload_size(nv) == 0
    nv.add_uint32("size", 4096)
    assert payload_size(nv) == 4096
    with pytest.raises(FrameError):
        payload_size(nv, max_payload=4095)
    bad = NV()
    bad.add_string("size", "4096")
    with pytest.raises(FrameError):
        payload_size(bad)


def test_compaction_keeps_buffer_bounded() -> None:
    dec = FrameDecoder()
    total = 0
    for _ in range(10):
        dec.feed(KEEPALIVE * 3000 + KEEPALIVE[:7])  # always a partial frame left
        total += len(frames_of(dec))
        assert dec.buffered < len(KEEPALIVE)
        assert len(dec._buf) < 2 * FrameDecoder.COMPACT_THRESHOLD + 3000 * len(KEEPALIVE)
        dec.feed(KEEPALIVE[7:])
        total += len(frames_of(dec))
    assert total == 10 * 3001


def test_errors_are_protocol_errors() -> None:
    assert issubclass(FrameError, ProtocolError)
    assert issubclass(NVError, ProtocolError)
