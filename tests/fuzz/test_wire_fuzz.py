"""Property tests for the wire codecs (nv, frame, pipeline).

Invariants (h11's fuzz rule): arbitrary or mutated input, fed whole or one
byte at a time, either decodes or raises ProtocolError, nothing else, and
the incremental decoder reaches the same result as the one-shot one.

Budget: 11,000 Hypothesis examples in total (see EXAMPLES); several tests
check more than one derived input per example (prefixes, whole vs bytewise).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Any

import lzf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyhast.errors import NVError, ProtocolError
from pyhast.wire.frame import NEED_DATA, Frame, FrameDecoder, encode_frame, encode_header
from pyhast.wire.nv import NV, NVType
from pyhast.wire.pipeline import pipeline_recv

EXAMPLES = {
    "nv_round_trip": 2000,
    "nv_arbitrary": 2000,
    "frame_arbitrary": 3500,
    "mutations": 1500,
    "pipeline": 2000,
}


def fuzz_settings(name: str) -> Any:
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- strategies -------------------------------------------------------------------

_CHARS = st.characters(codec="utf-8", exclude_characters="\0")


def _trim_name(name: str) -> str:
    while len(name.encode("utf-8")) > 254:
        name = name[:-1]
    return name


names = st.one_of(
    st.sampled_from(["cmd", "seq", "offset", "length", "size", "hash", "compression"]),
    st.text(_CHARS, min_size=1, max_size=12),
    st.text(_CHARS, min_size=1, max_size=254).map(_trim_name),
)

_RANGES: dict[NVType, tuple[int, int]] = {}
for _bits, (_s, _u) in {8: (1, 2), 16: (3, 4), 32: (5, 6), 64: (7, 8)}.items():
    _RANGES[NVType(_s)] = (-(2 ** (_bits - 1)), 2 ** (_bits - 1) - 1)
    _RANGES[NVType(_u)] = (0, 2**_bits - 1)
    _RANGES[NVType(_s + 8)] = _RANGES[NVType(_s)]
    _RANGES[NVType(_u + 8)] = _RANGES[NVType(_u)]


def _value_strategy(t: NVType) -> st.SearchStrategy[Any]:
    if t is NVType.STRING:
        return st.text(_CHARS, max_size=40)
    if t is NVType.UINT8_ARRAY:
        return st.binary(min_size=1, max_size=40)
    lo, hi = _RANGES[t]
    ints = st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0]))
    if t.is_array:
        return st.lists(ints, min_size=1, max_size=10).map(tuple)
    return ints


elements = st.one_of([st.tuples(names, st.just(t), _value_strategy(t)) for t in NVType])
element_lists = st.lists(elements, max_size=6)


def build(items: list[tuple[str, NVType, Any]]) -> NV:
    nv = NV()
    for name, t, value in items:
        if t is NVType.STRING:
            nv.add_string(name, value)
        elif t is NVType.UINT8_ARRAY:
            nv.add_uint8_array(name, value)
        elif t.is_array:
            nv.add_array(name, t, value)
        else:
            getattr(nv, f"add_{t.name.lower()}")(name, value)
    return nv


def get(nv: NV, name: str, t: NVType) -> Any:
    if t is NVType.STRING:
        return nv.get_string(name)
    if t is NVType.UINT8_ARRAY:
        return nv.get_uint8_array(name)
    if t.is_array:
        return nv.get_array(name, t)
    return getattr(nv, f"get_{t.name.lower()}")(name)


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    """One or two valid frames (some with payloads), concatenated."""
    out = b""
    for _ in range(draw(st.integers(1, 2))):
        items = [(n, t, v) for n, t, v in draw(element_lists) if n != "size"]
        nv = build(items)
        payload = draw(st.one_of(st.none(), st.binary(min_size=1, max_size=64)))
        if payload is not None:
            nv.add_uint32("size", len(payload))
        if len(nv) == 0:
            nv.add_uint8("cmd", 5)
        out += b"".join(encode_frame(nv, payload, version=draw(st.sampled_from([1, 2]))))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[i] = draw(st.sampled_from([0, 0x80, 0xFF, 0x11, 0x7F, 1]))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


# --- helpers ----------------------------------------------------------------------


def decode_all(chunks: list[bytes]) -> tuple[list[tuple[int, bytes, bytes | None]], str]:
    """Feed ``chunks`` to a FrameDecoder; return the frames and how it ended."""
    dec = FrameDecoder(max_nv_size=4096, max_payload=4096)
    frames: list[tuple[int, bytes, bytes | None]] = []
    try:
        for chunk in chunks:
            dec.feed(chunk)
            while True:
                item = dec.next_frame()
                if item is NEED_DATA:
                    break
                assert isinstance(item, Frame)
                payload = None if item.payload is None else bytes(item.payload)
                frames.append((item.version, item.nv.encode(), payload))
    except ProtocolError as exc:
        return frames, type(exc).__name__
    return frames, "need-data"


def check_frame_stream(data: bytes) -> None:
    whole = decode_all([data])
    bytewise = decode_all([data[i : i + 1] for i in range(len(data))])
    assert whole == bytewise


def check_nv_decode(data: bytes | bytearray) -> None:
    try:
        nv = NV.decode(data)
    except NVError:
        return
    # Whatever decodes re-encodes to something that decodes to the same list.
    assert NV.decode(nv.encode()) == nv


# --- properties -------------------------------------------------------------------


@fuzz_settings("nv_round_trip")
@given(element_lists)
def test_nv_round_trip(items: list[tuple[str, NVType, Any]]) -> None:
    nv = build(items)
    data = nv.encode()
    assert len(data) == nv.encoded_size()
    assert len(data) % 8 == 6 * len(items) % 8
    back = NV.decode(data, allow_duplicates=True)
    assert back == nv
    assert list(back) == [(n, t, v) for n, t, v in items]
    assert back.encode() == data
    first: dict[str, tuple[NVType, Any]] = {}
    for name, t, value in items:
        first.setdefault(name, (t, value))
    for name, (t, value) in first.items():
        assert get(back, name, t) == value
    unique = len(first) == len(items)
    try:
        NV.decode(data)
        assert unique
    except NVError:
        assert not unique


@fuzz_settings("nv_arbitrary")
@given(st.one_of(st.binary(max_size=200), mutated(element_lists.map(lambda i: build(i).encode()))))
def test_nv_decode_arbitrary_bytes(data: bytes) -> None:
    check_nv_decode(data)
    check_nv_decode(bytearray(data))
    for i in range(0, len(data), max(1, len(data) // 16)):  # as the bytes trickle in
        check_nv_decode(data[:i])


@fuzz_settings("frame_arbitrary")
@given(
    st.one_of(
        st.binary(max_size=120),
        st.builds(
            lambda version, body: encode_header(version, len(body)) + body,
            st.integers(0, 3),
            st.binary(max_size=120),
        ),
    )
)
def test_frame_decoder_arbitrary_bytes(data: bytes) -> None:
    check_frame_stream(data)


@fuzz_settings("mutations")
@given(st.one_of(frame_streams(), mutated(frame_streams())))
def test_frame_decoder_mutated_frames(data: bytes) -> None:
    check_frame_stream(data)
    if len(data) > 5:
        check_nv_decode(data[5:])


_JUNK_FIELDS = st.sampled_from(["size", "other", "hash"])
_ALGOS = st.sampled_from(["hole", "lzf", "crc32", "sha256", "none", "", "HOLE"])


def _add_junk(draw: st.DrawFn, nv: NV, name: str) -> None:
    kind = draw(st.sampled_from(["string", "uint8_array", "uint32", "uint8"]))
    if kind == "string":
        nv.add_string(name, draw(st.one_of(_ALGOS, st.text(_CHARS, max_size=8))))
    elif kind == "uint8_array":
        nv.add_uint8_array(name, draw(st.binary(min_size=1, max_size=40)))
    elif kind == "uint32":
        nv.add_uint32(name, draw(st.integers(0, 2**32 - 1)))
    else:
        nv.add_uint8(name, draw(st.integers(0, 255)))


@st.composite
def lzf_payloads(draw: st.DrawFn) -> bytes:
    original = draw(st.binary(min_size=1, max_size=64)) * draw(st.integers(1, 40))
    stream = lzf.compress(original) or b"\x00"
    declared = draw(st.one_of(st.just(len(original)), st.integers(0, 2**32 - 1)))
    data = struct.pack("<I", declared) + stream
    return draw(mutated(st.just(data))) if draw(st.booleans()) else data


@st.composite
def pipeline_messages(draw: st.DrawFn) -> tuple[NV, bytes]:
    """(nv, payload) pairs, mostly well-formed enough to reach decompression."""
    nv = NV()
    comp = draw(st.sampled_from(["absent", "hole", "lzf", "junk"]))
    if comp == "hole":
        payload = draw(
            st.one_of(st.integers(0, 2**32 - 1).map(struct.Struct("<I").pack), st.binary())
        )
    elif comp == "lzf":
        payload = draw(st.one_of(lzf_payloads(), st.binary(max_size=8)))
    else:
        payload = draw(st.binary(max_size=200))
    if comp in ("hole", "lzf"):
        nv.add_string("compression", comp)
    elif comp == "junk":
        _add_junk(draw, nv, "compression")
    csum = draw(st.sampled_from(["absent", "crc32", "sha256", "bad", "junk"]))
    if csum in ("crc32", "sha256"):
        digest = zlib.crc32(payload).to_bytes(4, "little")
        if csum == "sha256":
            digest = hashlib.sha256(payload).digest()
        nv.add_string("checksum", csum)
        nv.add_uint8_array("hash", digest)
    elif csum == "bad":
        nv.add_string("checksum", draw(_ALGOS))
        nv.add_uint8_array("hash", draw(st.binary(min_size=1, max_size=40)))
    elif csum == "junk":
        _add_junk(draw, nv, "checksum")
    for _ in range(draw(st.integers(0, 2))):
        _add_junk(draw, nv, draw(_JUNK_FIELDS))
    return nv, payload


@fuzz_settings("pipeline")
@given(pipeline_messages(), st.integers(0, 1 << 16))
def test_pipeline_recv_only_raises_protocol_errors(msg: tuple[NV, bytes], max_size: int) -> None:
    nv, payload = msg
    try:
        result = pipeline_recv(nv, payload, max_size=max_size)
    except ProtocolError:
        return
    assert len(result) <= max_size
