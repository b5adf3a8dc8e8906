"""Payload pipeline (spec 6.3 + Appendix): compression, checksum, size."""

from __future__ import annotations

import hashlib
import random
import zlib

import lzf
import pytest

from pyhast.defaults import MAXPHYS
from pyhast.enums import Checksum, Compression
from pyhast.errors import ChecksumError, CompressionError, FrameError
from pyhast.wire.frame import Frame, FrameDecoder, encode_frame
from pyhast.wire.nv import NV, NVType
from pyhast.wire.pipeline import HAST_LZF_COMPRESS_MIN, is_all_zero, pipeline_recv, pipeline_send


def H(*parts: str | bytes) -> bytes:
    """Join hex strings (spaces allowed) and literal byte strings."""
    return b"".join(bytes.fromhex(p) if isinstance(p, str) else p for p in parts)


RNG = random.Random(20240601)
INCOMPRESSIBLE = RNG.randbytes(65536)
COMPRESSIBLE = (b"HAST replicates blocks. " * 3000)[:65536]
SMALL_COMPRESSIBLE = b"a" * 1024  # compressible but not > 1024 bytes

DATASETS = {
    "zeros_4k": bytes(4096),
    "zeros_1m": bytes(MAXPHYS),
    "compressible": COMPRESSIBLE,
    "incompressible": INCOMPRESSIBLE,
    "small_compressible": SMALL_COMPRESSIBLE,
    "just_over_1k": b"b" * 1025,  # would have to shrink to 1 byte: sent as is
    "repeated_2k": b"b" * 2048,
    "one_byte": b"\x01",
    "one_zero": b"\x00",
}


def fields(nv: NV) -> list[tuple[str, NVType]]:
    return [(n, t) for n, t, _ in nv]


# --- golden ----------------------------------------------------------------------


def test_hole_golden() -> None:
    nv = NV()
    payload = pipeline_send(nv, bytes(4096), Compression.HOLE, Checksum.NONE)
    assert payload == H("00100000")  # LE u32 4096
    assert nv.encode() == H(
        "11 0c 05000000", b"compression\0", "00000000", b"hole\0", "000000",
        "06 05 04000000", b"size\0", "000000", "04000000 00000000",
    )  # fmt: skip
    assert pipeline_recv(nv, payload) == bytes(4096)


def test_crc32_golden() -> None:
    # CRC-32/IEEE of "123456789" is 0xCBF43926 (the standard check value), stored LE.
    nv = NV()
    data = b"123456789"
    payload = pipeline_send(nv, data, Compression.NONE, Checksum.CRC32)
    assert payload is data
    assert nv.encode() == H(
        "11 09 06000000", b"checksum\0", "00000000000000", b"crc32\0", "0000",
        "0a 05 04000000", b"hash\0", "000000", "2639f4cb 00000000",
        "06 05 04000000", b"size\0", "000000", "09000000 00000000",
    )  # fmt: skip
    assert pipeline_recv(nv, payload) is data


def test_sha256_is_the_raw_digest() -> None:
    nv = NV()
    pipeline_send(nv, b"abc", Compression.NONE, Checksum.SHA256)
    assert nv.get_string("checksum") == "sha256"
    assert nv.get_uint8_array("hash") == bytes.fromhex(
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_appendix_all_zero_bitmap_arrives_as_hole_size_4() -> None:
    nv = NV()
    payload = pipeline_send(nv, bytes(512), Compression.HOLE, Checksum.CRC32)
    assert nv.get_string("compression") == "hole"
    assert nv.get_uint32("size") == 4
    assert nv.get_uint8_array("hash") == zlib.crc32(payload).to_bytes(4, "little")


# --- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("checksum", list(Checksum), ids=lambda c: c.label)
@pytest.mark.parametrize("compression", list(Compression), ids=lambda c: c.label)
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_round_trip(dataset: str, compression: Compression, checksum: Checksum) -> None:
    data = DATASETS[dataset]
    nv = NV()
    nv.add_uint64("seq", 1)
    payload = pipeline_send(nv, data, compression, checksum)
    size = len(payload)
    assert nv.get_uint32("size") == size
    # Through the frame codec, as on the wire.
    dec = FrameDecoder()
    for buf in encode_frame(nv, payload):
        dec.feed(buf)
    frame = dec.next_frame()
    assert isinstance(frame, Frame)
    got_nv, got_payload = frame.nv, frame.payload
    assert got_nv == nv
    result = pipeline_recv(got_nv, got_payload if got_payload is not None else b"")
    assert result == data

    zero = not any(data)
    comp = nv.get_string("compression", default=None)
    if compression is Compression.NONE:
        assert comp is None
        assert payload is data
    elif zero:
        assert comp == "hole" and size == 4
    elif compression is Compression.LZF and data in (COMPRESSIBLE, b"b" * 2048):
        assert comp == "lzf"
        assert size <= len(data) - HAST_LZF_COMPRESS_MIN + 4
    else:
        assert comp is None  # incompressible, too small, or HOLE on non-zero data
        assert payload is data
    if checksum is Checksum.NONE:
        assert "checksum" not in nv and "hash" not in nv
    else:
        assert nv.get_string("checksum") == checksum.label
        expected = (
            zlib.crc32(payload).to_bytes(4, "little")
            if checksum is Checksum.CRC32
            else hashlib.sha256(payload).digest()
        )
        assert nv.get_uint8_array("hash") == expected
    # Field order as in FreeBSD: compression, checksum, hash, size.
    order = [n for n, _ in fields(nv) if n != "seq"]
    assert order == [n for n in ("compression", "checksum", "hash", "size") if n in nv]


def test_lzf_stream_layout() -> None:
    nv = NV()
    payload = pipeline_send(nv, COMPRESSIBLE, Compression.LZF, Checksum.NONE)
    assert isinstance(payload, bytes)
    assert payload[:4] == len(COMPRESSIBLE).to_bytes(4, "little")
    assert lzf.decompress(payload[4:], len(COMPRESSIBLE)) == COMPRESSIBLE


def test_lzf_must_save_at_least_1k() -> None:
    # 2048 bytes that LZF shrinks, but by less than 1024 bytes.
    data = bytes(RNG.randbytes(1100)) + b"c" * 948
    assert lzf.compress(data) is not None
    nv = NV()
    payload = pipeline_send(nv, data, Compression.LZF, Checksum.NONE)
    assert payload is data
    assert "compression" not in nv


def test_memoryview_and_bytearray_inputs_are_not_copied() -> None:
    view = memoryview(bytearray(INCOMPRESSIBLE))
    nv = NV()
    assert pipeline_send(nv, view, Compression.LZF, Checksum.CRC32) is view
    assert pipeline_recv(nv, view) is view
    zero_view = memoryview(bytearray(8192))
    nv = NV()
    assert pipeline_send(nv, zero_view, Compression.LZF, Checksum.NONE) == H("00200000")
    ba = bytearray(b"xyz")
    nv = NV()
    out = pipeline_send(nv, ba, Compression.NONE, Checksum.NONE)
    assert isinstance(out, memoryview) and out.obj is ba


def test_compressible_memoryview_with_lzf() -> None:
    nv = NV()
    payload = pipeline_send(nv, memoryview(COMPRESSIBLE), Compression.LZF, Checksum.SHA256)
    assert nv.get_string("compression") == "lzf"
    assert pipeline_recv(nv, memoryview(payload)) == COMPRESSIBLE


def test_empty_data() -> None:
    nv = NV()
    payload = pipeline_send(nv, b"", Compression.HOLE, Checksum.NONE)
    assert payload == b"" and nv.get_uint32("size") == 0 and "compression" not in nv


def test_existing_pipeline_field_is_refused() -> None:
    nv = NV()
    nv.add_uint32("size", 3)
    with pytest.raises(ValueError):
        pipeline_send(nv, b"abc", Compression.NONE, Checksum.NONE)


def test_is_all_zero() -> None:
    assert is_all_zero(b"")
    assert is_all_zero(bytes(4096))
    assert not is_all_zero(b"\0" * 4095 + b"\1")
    big = bytearray(3 * MAXPHYS + 17)  # longer than the zero reference buffer
    assert is_all_zero(big)
    assert is_all_zero(memoryview(big))
    big[MAXPHYS + 5] = 1
    assert not is_all_zero(big)
    assert not is_all_zero(memoryview(big))
    big[MAXPHYS + 5] = 0
    big[-1] = 1
    assert not is_all_zero(big)


# --- receive errors ----------------------------------------------------------------


def nv_with(*items: tuple[str, str, object]) -> NV:
    nv = NV()
    for name, kind, value in items:
        getattr(nv, f"add_{kind}")(name, value)
    return nv


def test_checksum_mismatch() -> None:
    nv = NV()
    payload = pipeline_send(nv, b"some data", Compression.NONE, Checksum.CRC32)
    with pytest.raises(ChecksumError):
        pipeline_recv(nv, bytes(payload[:-1]) + b"X")
    nv = NV()
    payload = pipeline_send(nv, bytes(4096), Compression.HOLE, Checksum.SHA256)
    with pytest.raises(ChecksumError):
        pipeline_recv(nv, H("00200000"))  # hash covers the compressed bytes


@pytest.mark.parametrize(
    "nv",
    [
        nv_with(("checksum", "string", "md5"), ("hash", "uint8_array", b"\0" * 16)),
        nv_with(("checksum", "string", "crc32")),  # hash missing
        nv_with(("checksum", "string", "crc32"), ("hash", "uint32", 0)),  # hash wrong type
        nv_with(("checksum", "string", "crc32"), ("hash", "uint8_array", b"\0" * 5)),
        nv_with(("checksum", "string", "sha256"), ("hash", "uint8_array", b"\0" * 4)),
        nv_with(("checksum", "uint8", 1), ("hash", "uint8_array", b"\0" * 4)),
    ],
    ids=["unknown", "missing_hash", "hash_type", "crc_len", "sha_len", "checksum_type"],
)
def test_checksum_errors(nv: NV) -> None:
    with pytest.raises(ChecksumError):
        pipeline_recv(nv, b"data")


def lzf_payload(data: bytes, declared: int | None = None) -> bytes:
    stream = lzf.compress(data)
    assert stream is not None
    return (len(data) if declared is None else declared).to_bytes(4, "little") + stream


@pytest.mark.parametrize(
    ("nv", "payload"),
    [
        (nv_with(("compression", "string", "gzip")), b"data"),
        (nv_with(("compression", "uint8", 1)), b"data"),
        (nv_with(("compression", "string", "hole")), b"\0\0\0"),
        (nv_with(("compression", "string", "hole")), b"\0\0\0\0\0"),
        (nv_with(("compression", "string", "hole")), (MAXPHYS + 1).to_bytes(4, "little")),
        (nv_with(("compression", "string", "lzf")), b"\x10\0\0\0"),
        (nv_with(("compression", "string", "lzf")), b"\0\0\0\0\0abc"),
        (nv_with(("compression", "string", "lzf")), lzf_payload(COMPRESSIBLE, MAXPHYS + 1)),
        (nv_with(("compression", "string", "lzf")), lzf_payload(COMPRESSIBLE, 1000)),
        (nv_with(("compression", "string", "lzf")), lzf_payload(COMPRESSIBLE, 70000)),
        (nv_with(("compression", "string", "lzf")), lzf_payload(COMPRESSIBLE)[:-10]),
        (nv_with(("compression", "string", "lzf")), b"\x00\x04\x00\x00\xff\xff\xff\xff"),
    ],
    ids=[
        "unknown",
        "wrong_type",
        "hole_short",
        "hole_long",
        "hole_too_big",
        "lzf_no_stream",
        "lzf_zero_length",
        "lzf_too_big",
        "lzf_declared_short",
        "lzf_declared_long",
        "lzf_truncated",
        "lzf_garbage",
    ],
)
def test_compression_errors(nv: NV, payload: bytes) -> None:
    with pytest.raises(CompressionError):
        pipeline_recv(nv, payload)


def test_max_size_applies_to_every_path() -> None:
    nv = NV()
    payload = pipeline_send(nv, bytes(8192), Compression.HOLE, Checksum.NONE)
    with pytest.raises(CompressionError):
        pipeline_recv(nv, payload, max_size=4096)
    assert pipeline_recv(nv, payload, max_size=8192) == bytes(8192)
    with pytest.raises(FrameError):
        pipeline_recv(NV(), b"x" * 10, max_size=9)
    big_hole = NV()
    big_hole.add_string("compression", "hole")
    result = pipeline_recv(big_hole, (4 * MAXPHYS).to_bytes(4, "little"), max_size=4 * MAXPHYS)
    assert len(result) == 4 * MAXPHYS and not any(result[-16:])


def test_no_pipeline_fields_passes_payload_through() -> None:
    data = b"plain"
    assert pipeline_recv(NV(), data) is data
