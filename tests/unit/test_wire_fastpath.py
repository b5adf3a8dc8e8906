"""The fixed-layout codec of the replication messages is the generic codec, only faster.

Encoding: ``encode_request`` / ``encode_reply`` / ``encode_read_reply`` (and
``request_nv`` / ``reply_nv``, now built from layouts) must give exactly the
bytes, values and exception classes of the generic ``NV()`` + ``add_*`` +
``pipeline_send`` + ``encode_frame`` path, for every value, in range or not.

Decoding: with the layouts registered, ``NV.decode``, ``FrameDecoder``,
``payload_size``, ``parse_request``, ``parse_reply`` and ``pipeline_recv``
must give the same values or the same exceptions as with no layout
registered (the element-by-element path), on (a) the fixed layouts with any
values, (b) mutated, truncated or extended versions of them, (c) arbitrary
bytes, including bytes of exactly a layout's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyhast.enums import Checksum, Compression, HioCmd
from pyhast.errors import NVMissingError, NVTypeError
from pyhast.transport.aio import FramedConn
from pyhast.wire import nv as nv_module
from pyhast.wire.errnos import to_wire
from pyhast.wire.frame import NEED_DATA, FrameDecoder, encode_frame, payload_size
from pyhast.wire.messages import (
    encode_read_reply,
    encode_reply,
    encode_request,
    parse_reply,
    parse_request,
    reply_nv,
    request_nv,
)
from pyhast.wire.nv import NV, NVLayout, NVType, decode_fixed, register_layout
from pyhast.wire.pipeline import pipeline_recv, pipeline_send
from tests.unit.test_aio_conn import conn_pair, raw_tcp_pair, run

FAST = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- the generic path, as the code was before the fixed layouts ------------------


def generic_request_nv(cmd: Any, seq: Any, offset: Any, length: Any, memsync: Any) -> NV:
    nv = NV()
    nv.add_uint8("cmd", int(cmd))
    nv.add_uint64("seq", seq)
    nv.add_uint64("offset", offset)
    nv.add_uint64("length", length)
    if memsync:
        nv.add_uint8("memsync", 1)
    return nv


def generic_reply_nv(seq: Any, err: Any, received: Any) -> NV:
    nv = NV()
    nv.add_uint64("seq", seq)
    if received:
        nv.add_int8("received", 1)
    if err:
        nv.add_int16("error", to_wire(err))
    return nv


def generic_frame(
    nv_of: Callable[[], NV], data: Any, compression: Any, checksum: Any, version: Any
) -> tuple[bytes, bytes | None]:
    nv = nv_of()
    payload = None if data is None else pipeline_send(nv, data, compression, checksum)
    buffers = encode_frame(nv, payload, version)
    return bytes(buffers[0]), bytes(buffers[1]) if len(buffers) > 1 else None


@contextlib.contextmanager
def generic_decoding() -> Iterator[None]:
    """No layout registered: every list is decoded element by element."""
    saved = dict(nv_module._FIXED_LAYOUTS)
    nv_module._FIXED_LAYOUTS.clear()
    try:
        yield
    finally:
        nv_module._FIXED_LAYOUTS.update(saved)


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """``("ok", value)`` or ``("error", exception class)``."""
    try:
        return "ok", fn()
    except Exception as exc:
        return "error", type(exc)


def detailed(fn: Callable[[], Any]) -> tuple[str, Any]:
    """Like outcome(), with the exception's message and seq (decode paths share them)."""
    try:
        return "ok", fn()
    except Exception as exc:
        return "error", (type(exc), str(exc), getattr(exc, "seq", None))


def as_bytes(pair: tuple[bytes, Any]) -> tuple[bytes, bytes | None]:
    head, payload = pair
    return bytes(head), None if payload is None else bytes(payload)


def elements(nv: NV) -> list[tuple[str, NVType, type, Any]]:
    return [(name, t, type(value), value) for name, t, value in nv]


# --- strategies -------------------------------------------------------------------

U64 = 2**64 - 1
#: In range, at the edges, out of range, and not plain ints (bool, IntEnum, float).
any_u64 = st.one_of(
    st.integers(0, U64),
    st.sampled_from([0, 1, U64, U64 + 1, -1]),
    st.booleans(),
    st.just(HioCmd.WRITE),
    st.just(1.5),
)
commands = st.one_of(st.sampled_from(list(HioCmd)), st.integers(-1, 256))
flags = st.one_of(st.booleans(), st.integers(0, 2))
errnos = st.one_of(
    st.just(0),
    st.sampled_from([errno.EIO, errno.EINVAL, errno.ENOTCONN, errno.EOPNOTSUPP, errno.ENOSPC]),
    st.integers(-3, 200),
    st.booleans(),
)
versions = st.one_of(st.integers(0, 255), st.sampled_from([2, 2, 2, -1, 256]))
compressions = st.one_of(st.sampled_from(list(Compression)), st.integers(0, 3))
checksums = st.one_of(st.sampled_from(list(Checksum)), st.integers(0, 3))
datas = st.one_of(
    st.none(),
    st.binary(max_size=3000),
    st.sampled_from([0, 1, 1024, 1025, 4096, 8192]).map(bytes),
    st.integers(1025, 5000).map(lambda n: (b"compressible " * n)[:n]),
    st.binary(min_size=1, max_size=64).map(bytearray),
    st.binary(min_size=1, max_size=64).map(lambda b: memoryview(b)),
    st.just(7),  # not a buffer: TypeError, after any error of the header fields
)

#: Every registered layout, in registration order.
LAYOUTS: list[NVLayout] = [lay for group in nv_module._FIXED_LAYOUTS.values() for lay in group]
LAYOUT_SIZES = sorted({lay.size for lay in LAYOUTS})

_RANGE = {
    NVType.INT8: (-(2**7), 2**7 - 1),
    NVType.UINT8: (0, 2**8 - 1),
    NVType.INT16: (-(2**15), 2**15 - 1),
    NVType.UINT16: (0, 2**16 - 1),
    NVType.INT32: (-(2**31), 2**31 - 1),
    NVType.UINT32: (0, 2**32 - 1),
    NVType.INT64: (-(2**63), 2**63 - 1),
    NVType.UINT64: (0, 2**64 - 1),
}


def scalar(t: NVType) -> st.SearchStrategy[int]:
    lo, hi = _RANGE[t]
    edges = [v for v in (lo, hi, 0, 1, 2, 5, 512, 4096) if lo <= v <= hi]
    return st.one_of(st.integers(lo, hi), st.sampled_from(edges))


#: Values of requests that a secondary may accept (so that parsing gets past validation).
_PLAUSIBLE = {
    "cmd": st.integers(0, 6),
    "seq": st.sampled_from([0, 1, 2, U64]),
    "offset": st.integers(0, 2048).map(lambda k: k * 512),
    "length": st.integers(0, 2049).map(lambda k: k * 512),
    "memsync": st.sampled_from([0, 1, 2, 255]),
    "received": st.sampled_from([0, 1, -1, 127]),
    "error": st.sampled_from([0, 5, 22, 45, 57, 73, -1, 999]),
}


@st.composite
def layout_lists(draw: st.DrawFn) -> bytes:
    """A registered layout with any in-range (or plausible) values, encoded generically."""
    layout = draw(st.sampled_from(LAYOUTS))
    plausible = draw(st.booleans())
    nv = NV()
    for name, t in layout.fields:
        values = _PLAUSIBLE.get(name) if plausible else None
        nv._add_scalar(name, int(t), draw(values if values is not None else scalar(t)))
    return nv.encode()


@st.composite
def mutated_lists(draw: st.DrawFn) -> bytes:
    """A layout's bytes with one to three edits (byte, padding garbage, cut, extend, insert)."""
    data = bytearray(draw(layout_lists()))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["byte", "padding", "cut", "extend", "insert"]))
        if kind == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "padding" and data:
            # The name padding of some element: garbage that decode ignores.
            starts = [0]
            while starts[-1] + 8 <= len(data):
                namesize, dsize = data[starts[-1] + 1], data[starts[-1] + 2]
                nxt = starts[-1] + 6 + ((namesize + 7) & ~7) + ((dsize + 7) & ~7)
                if nxt <= starts[-1]:
                    break
                starts.append(nxt)
            pos = draw(st.sampled_from(starts[:-1] or [0]))
            if pos + 2 <= len(data):
                namesize = data[pos + 1]
                pad = range(pos + 6 + namesize, pos + 6 + ((namesize + 7) & ~7))
                if pad and pad[-1] < len(data):
                    data[draw(st.sampled_from(pad))] = draw(st.integers(1, 255))
        elif kind == "cut":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "extend":
            data += draw(st.one_of(st.binary(max_size=30), st.sampled_from([b"\0", b"\0junk"])))
        elif kind == "insert":
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@st.composite
def plausible_messages(draw: st.DrawFn) -> bytes:
    """A request or reply layout with values that mostly pass validation."""
    layout = draw(st.sampled_from(LAYOUTS))
    nv = NV()
    for name, t in layout.fields:
        if name == "cmd":
            value = draw(st.sampled_from([2, 2, 2, 1, 3, 4, 5, 0, 6]))
        elif name == "seq":
            value = draw(st.sampled_from([1, 2, U64, 0]))
        else:
            value = draw(_PLAUSIBLE.get(name, scalar(t)))
        nv._add_scalar(name, int(t), value)
    return nv.encode()


arbitrary_lists = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(LAYOUT_SIZES).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
)
any_list = st.one_of(layout_lists(), mutated_lists(), arbitrary_lists)

# --- encoding ---------------------------------------------------------------------


@FAST
@given(commands, any_u64, any_u64, any_u64, flags, datas, compressions, checksums, versions)
def test_encode_request_is_the_generic_encoding(
    cmd: Any,
    seq: Any,
    offset: Any,
    length: Any,
    memsync: Any,
    data: Any,
    compression: Any,
    checksum: Any,
    version: Any,
) -> None:
    def generic() -> tuple[bytes, bytes | None]:
        def nv_of() -> NV:
            return generic_request_nv(cmd, seq, offset, length, memsync)

        return generic_frame(nv_of, data, compression, checksum, version)

    def fast() -> tuple[bytes, bytes | None]:
        pair = encode_request(
            cmd,
            seq,
            offset,
            length,
            data,
            memsync=memsync,
            compression=compression,
            checksum=checksum,
            version=version,
        )
        return as_bytes(pair)

    def via_request_nv() -> tuple[bytes, bytes | None]:
        return generic_frame(
            lambda: request_nv(cmd, seq, offset, length, memsync),
            data,
            compression,
            checksum,
            version,
        )

    expected = outcome(generic)
    assert outcome(fast) == expected
    assert outcome(via_request_nv) == expected


@FAST
@given(commands, any_u64, any_u64, any_u64, flags)
def test_request_nv_is_the_generic_list(
    cmd: Any, seq: Any, offset: Any, length: Any, memsync: Any
) -> None:
    def describe(nv: NV) -> tuple[Any, ...]:
        return elements(nv), nv.encode(), repr(nv), len(nv)

    expected = detailed(lambda: describe(generic_request_nv(cmd, seq, offset, length, memsync)))
    assert detailed(lambda: describe(request_nv(cmd, seq, offset, length, memsync))) == expected


@FAST
@given(any_u64, errnos, flags, versions)
def test_encode_reply_is_the_generic_encoding(seq: Any, err: Any, received: Any, v: Any) -> None:
    expected = outcome(
        lambda: generic_frame(lambda: generic_reply_nv(seq, err, received), None, 0, 0, v)
    )
    assert outcome(lambda: (encode_reply(seq, err, received, version=v), None)) == expected
    assert outcome(lambda: generic_frame(lambda: reply_nv(seq, err, received), None, 0, 0, v)) == (
        expected
    )
    generic = detailed(lambda: elements(generic_reply_nv(seq, err, received)))
    assert detailed(lambda: elements(reply_nv(seq, err, received))) == generic


@FAST
@given(any_u64, datas.filter(lambda d: d is not None), compressions, checksums, versions)
def test_encode_read_reply_is_the_generic_encoding(
    seq: Any, data: Any, compression: Any, checksum: Any, version: Any
) -> None:
    expected = outcome(
        lambda: generic_frame(
            lambda: generic_reply_nv(seq, 0, False), data, compression, checksum, version
        )
    )
    fast = outcome(
        lambda: as_bytes(
            encode_read_reply(
                seq, data, compression=compression, checksum=checksum, version=version
            )
        )
    )
    assert fast == expected


def test_fast_encoders_keep_the_payload_uncopied() -> None:
    data = bytes(range(256)) * 16
    _, payload = encode_request(HioCmd.WRITE, 7, 0, len(data), data)
    assert payload is data
    view = memoryview(bytearray(data))
    assert encode_read_reply(3, view)[1] is view
    _, payload = encode_request(HioCmd.WRITE, 7, 0, 0, b"")
    assert payload is None  # size 0: no payload, as encode_frame
    assert encode_request(HioCmd.READ, 8, 0, 4096) == (
        b"".join(encode_frame(generic_request_nv(HioCmd.READ, 8, 0, 4096, False))),
        None,
    )


# --- decoding ---------------------------------------------------------------------

GEOMETRIES = [(512, 1 << 40), (4096, 1 << 20)]


def observe(data: bytes) -> tuple[Any, ...]:
    """Everything the receive path derives from an nv list, each from a fresh decode.

    Fresh, so that each reader sees the list as decode returns it (a fixed
    layout not yet turned into elements).
    """

    def decode() -> NV:
        return NV.decode(data)

    def summary() -> tuple[Any, ...]:
        nv = decode()
        types = {name: nv.type_of(name) for name in ("cmd", "seq", "size", "error", "x")}
        return elements(nv), nv.encode(), types, len(nv), repr(nv)

    def request(sectorsize: int, datasize: int) -> Any:
        return parse_request(decode(), sectorsize=sectorsize, datasize=datasize)

    requests = [detailed(functools.partial(request, *geometry)) for geometry in GEOMETRIES]
    return (
        detailed(summary),
        *requests,
        detailed(lambda: parse_reply(decode())),
        detailed(lambda: payload_size(decode(), 8192)),
        detailed(lambda: bytes(pipeline_recv(decode(), b"p" * 4096, max_size=4096))),
        detailed(lambda: decode().get_uint64("seq", default=None)),
        detailed(lambda: decode().get_uint8("cmd")),
        detailed(lambda: decode() == NV.decode(data)),
    )


def frames_of(stream: bytes, bytewise: bool) -> list[Any]:
    """What a FrameDecoder returns for ``stream``, until NEED_DATA or an error."""
    dec = FrameDecoder()
    out: list[Any] = []
    chunks = [stream[i : i + 1] for i in range(len(stream))] if bytewise else [stream]
    try:
        for chunk in chunks:
            dec.feed(chunk)
            while (frame := dec.next_frame()) is not NEED_DATA:
                assert not isinstance(frame, type(NEED_DATA))
                payload = None if frame.payload is None else bytes(frame.payload)
                out.append((frame.version, elements(frame.nv), frame.nv.encode(), payload))
                out.append(detailed(functools.partial(parse_reply, frame.nv)))
                request = functools.partial(parse_request, sectorsize=512, datasize=1 << 40)
                out.append(detailed(functools.partial(request, frame.nv)))
    except Exception as exc:
        out.append((type(exc), str(exc)))
    return out


def assert_same_as_generic(data: bytes) -> None:
    fast = observe(data)
    with generic_decoding():
        generic = observe(data)
    assert fast == generic


@FAST
@given(layout_lists())
def test_decode_fixed_layouts(data: bytes) -> None:
    nv = decode_fixed(data, 0, len(data))
    assert nv is not None and nv.shape is not None  # the fast path is taken
    assert_same_as_generic(data)


@FAST
@given(plausible_messages())
def test_decode_plausible_messages(data: bytes) -> None:
    assert_same_as_generic(data)


@FAST
@given(mutated_lists())
def test_decode_mutated_layouts(data: bytes) -> None:
    assert_same_as_generic(data)


@FAST
@given(arbitrary_lists)
def test_decode_arbitrary_lists(data: bytes) -> None:
    assert_same_as_generic(data)


@FAST
@given(
    st.lists(st.tuples(any_list, st.integers(0, 255), st.binary(max_size=40)), max_size=3),
    st.booleans(),
)
def test_frame_decoder_same_as_generic(
    frames: list[tuple[bytes, int, bytes]], bytewise: bool
) -> None:
    """Frames around the lists, each with a version byte and trailing bytes (payload or next)."""
    stream = b"".join(
        struct.pack("<BI", version, len(nvbytes)) + nvbytes + tail
        for nvbytes, version, tail in frames
    )
    fast = frames_of(stream, bytewise)
    with generic_decoding():
        generic = frames_of(stream, bytewise)
    assert fast == generic


@FAST
@given(commands.filter(lambda c: 0 <= int(c) <= 255), st.integers(1, U64), st.integers(0, U64))
def test_encoded_requests_decode_as_generic(cmd: Any, seq: int, offset: int) -> None:
    data = bytes(4096)
    for payload in (None, data, b"x" * 4096):
        head, body = encode_request(
            cmd, seq, offset, 4096, payload, memsync=seq % 2 == 0, compression=Compression.HOLE
        )
        stream = head + (bytes(body) if body is not None else b"")
        assert frames_of(stream, False) == _generic_frames(stream)
    for err, received in ((0, False), (0, True), (errno.EIO, False), (errno.EIO, True)):
        stream = encode_reply(seq, err, received)
        assert frames_of(stream, False) == _generic_frames(stream)
    head, body = encode_read_reply(seq, b"r" * 512)
    stream = head + bytes(body or b"")
    assert frames_of(stream, False) == _generic_frames(stream)


def _generic_frames(stream: bytes) -> list[Any]:
    with generic_decoding():
        return frames_of(stream, False)


def test_garbage_in_name_padding_takes_the_generic_path() -> None:
    good = request_nv(HioCmd.WRITE, 5, 4096, 4096).encode()
    bad = bytearray(good)
    bad[6 + 4] = 0x55  # the padding after "cmd\0"
    assert decode_fixed(bytes(bad), 0, len(bad)) is None
    nv = NV.decode(bytes(bad))
    assert nv.shape is None
    assert elements(nv) == elements(NV.decode(good))
    assert nv.encode() == good  # padding written back as zeros


def test_trailing_terminator_takes_the_generic_path() -> None:
    good = reply_nv(9).encode()
    nv = NV.decode(good + b"\0garbage")
    assert nv.shape is None and elements(nv) == elements(NV.decode(good))


# --- the lazy (shaped) nv list ----------------------------------------------------


def test_shaped_list_reads_like_the_generic_one() -> None:
    raw = generic_request_nv(HioCmd.WRITE, 3, 512, 1024, True).encode()
    nv = NV.decode(raw)
    assert nv.shape is not None
    assert nv.get_uint64("offset") == 512
    assert nv.get_uint64("missing", default=None) is None
    with pytest.raises(NVTypeError):
        nv.get_uint32("seq")
    with pytest.raises(NVMissingError):
        nv.get_string("checksum")
    assert "memsync" in nv and nv.exists("cmd") and nv.type_of("length") is NVType.UINT64
    assert nv.has_any(("x", "memsync")) and not nv.has_any(("x", "size"))
    assert nv.shape is not None  # none of that built the element list
    with generic_decoding():
        generic = NV.decode(raw)
    assert nv == generic and generic == nv
    assert repr(nv) == repr(generic) and len(nv) == 5 and list(nv) == list(generic)


def test_adding_a_field_keeps_or_drops_the_shape() -> None:
    nv = request_nv(HioCmd.WRITE, 3, 512, 1024)
    layout = nv.shape[0] if nv.shape else None
    nv.add_uint32("size", 1024)  # what pipeline_send adds: still a fixed layout
    assert nv.shape is not None and nv.shape[0] is not layout
    assert nv.shape[1] == (2, 3, 512, 1024, 1024)
    nv.add_string("checksum", "crc32")  # not one: element list from now on
    assert nv.shape is None
    expected = generic_request_nv(HioCmd.WRITE, 3, 512, 1024, False)
    expected.add_uint32("size", 1024)
    expected.add_string("checksum", "crc32")
    assert elements(nv) == elements(expected) and nv.encode() == expected.encode()
    decoded = NV.decode(reply_nv(4).encode())
    decoded.add_int8("received", 1)  # decoded lists grow the same way
    assert decoded.get_int8("received") == 1 and decoded.encode() == reply_nv(4, 0, True).encode()
    decoded.add_uint64("seq", 8)  # a duplicate name: the first one still wins
    assert decoded.shape is None and decoded.get_uint64("seq") == 4


def test_layout_rules() -> None:
    with pytest.raises(ValueError):
        NVLayout()
    with pytest.raises(ValueError):
        NVLayout(("a", NVType.UINT8), ("a", NVType.UINT16))
    with pytest.raises(ValueError):
        NVLayout(("a", NVType.STRING))
    layout = NVLayout(("a", NVType.UINT8))
    assert layout.plus("b", NVType.INT16) is layout.plus("b", NVType.INT16)
    assert layout.frame(2, (256,)) is None and layout.frame(256, (1,)) is None
    with pytest.raises(ValueError):
        layout.build((256,))
    with pytest.raises(TypeError):
        layout.build(("x",))  # type: ignore[arg-type]
    built = layout.build((True,))  # stored as 1, like add_uint8
    assert built.shape is None and elements(built) == [("a", NVType.UINT8, int, 1)]
    before = dict(nv_module._FIXED_LAYOUTS)
    try:
        register_layout(layout)
        register_layout(layout)
        assert nv_module._FIXED_LAYOUTS[layout.size].count(layout) == 1
    finally:
        nv_module._FIXED_LAYOUTS.clear()
        nv_module._FIXED_LAYOUTS.update(before)


# --- FramedConn.send_encoded ------------------------------------------------------


def test_send_encoded_puts_the_same_bytes_on_the_wire_in_order() -> None:
    data = bytes(range(256)) * 32
    big = b"B" * 100_000

    def generic_stream() -> bytes:
        parts = [generic_frame(lambda: generic_reply_nv(1, 0, True), None, 0, 0, 2)]
        parts.append(generic_frame(lambda: generic_request_nv(2, 2, 0, 8192, 0), data, 0, 0, 2))
        parts.append(generic_frame(lambda: generic_reply_nv(3, 0, False), None, 0, 0, 2))
        parts.append(generic_frame(lambda: generic_reply_nv(4, 0, False), big, 0, 0, 2))
        return b"".join(head + (body or b"") for head, body in parts)

    async def main(coalesce: bool) -> bytes:
        client, peer = await raw_tcp_pair()
        conn = await FramedConn.open(client)
        conn.coalesce = coalesce
        conn.send_encoded(encode_reply(1, 0, True))
        conn.send_encoded(*encode_request(HioCmd.WRITE, 2, 0, len(data), data))
        conn.send_frame(reply_nv(3))
        conn.send_encoded(*encode_read_reply(4, big))
        expected = generic_stream()
        loop = asyncio.get_running_loop()
        got = b""
        while len(got) < len(expected):
            got += await loop.sock_recv(peer, 1 << 20)
        conn.abort()
        peer.close()
        return got

    for coalesce in (False, True):
        assert run(main(coalesce)) == generic_stream()


def test_send_encoded_from_a_handler_is_batched_with_send_frame() -> None:
    async def main() -> list[tuple[int, bool]]:
        req_out, req_in = await conn_pair()
        rep_out, rep_in = await conn_pair()

        def on_request(frame: Any) -> None:
            seq = frame.nv.get_uint64("seq")
            rep_out.send_encoded(encode_reply(seq, 0, True))
            rep_out.send_frame(reply_nv(seq))

        req_in.set_frame_handler(on_request)
        for seq in range(1, 4):
            req_out.send_encoded(*encode_request(HioCmd.FLUSH, seq, 0, 0))
        got = []
        for _ in range(6):
            reply = parse_reply((await rep_in.recv_frame(5.0)).nv)
            got.append((reply.seq, reply.received))
        for conn in (req_out, req_in, rep_out, rep_in):
            conn.abort()
        return got

    assert run(main()) == [(1, True), (1, False), (2, True), (2, False), (3, True), (3, False)]
