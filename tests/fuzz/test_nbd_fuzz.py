"""Fuzzing the NBD codec: arbitrary bytes in, events or ProtocolError out.

The invariant (h11's): whatever a client sends, fed whole, byte by byte or
in random chunks, the handshake and the transmission decoders either produce
events or raise :class:`ProtocolError`, never another exception and never a
hang (every loop below is bounded by the number of bytes fed).
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyhast.errors import ProtocolError
from pyhast.frontend.nbd.protocol import (
    MAX_PAYLOAD,
    NEED_DATA,
    ExportInfo,
    HandshakeAborted,
    HandshakeComplete,
    Request,
    RequestDecoder,
    ServerHandshake,
    encode_requests,
    validate_request,
)

EXPORTS = {
    "disk": ExportInfo("disk", 1 << 30, can_multi_conn=True, description="d"),
    "ro": ExportInfo("ro", 4096, read_only=True, block_size=(512, 4096, 1 << 20)),
}
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def drive_handshake(chunks: list[bytes]) -> tuple[list[object], bytes]:
    hs = ServerHandshake(EXPORTS, "disk")
    out = hs.data_to_send()
    events: list[object] = []
    try:
        for n, chunk in enumerate(chunks):
            hs.receive_data(chunk)
            for _ in range(len(chunk) + 1):  # each event consumes >= 1 byte
                event = hs.next_event()
                out += hs.data_to_send()
                if event is NEED_DATA:
                    break
                if isinstance(event, HandshakeComplete):
                    # Bytes after the final option belong to transmission,
                    # whichever chunk they arrived in.
                    rest = event.trailing_data + b"".join(chunks[n + 1 :])
                    events.append(HandshakeComplete(event.export, rest))
                    return events, out
                events.append(event)
                if isinstance(event, HandshakeAborted):
                    return events, out
            else:
                raise AssertionError("handshake produced events without consuming bytes")
    except ProtocolError:
        events.append("ProtocolError")
    return events, out


def drive_decoder(chunks: list[bytes]) -> list[object]:
    dec = RequestDecoder()
    got: list[object] = []
    try:
        for chunk in chunks:
            dec.feed(chunk)
            got += dec.read_requests()
    except ProtocolError:
        got.append("ProtocolError")
    return got


# Option streams that look like real ones, so the fuzzer gets past the magic.
options = st.lists(
    st.tuples(
        st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1),
        st.binary(max_size=64)
        | st.builds(
            lambda name, infos: (
                struct.pack(">I", len(name))
                + name
                + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos)
            ),
            st.sampled_from([b"", b"disk", b"ro", b"nope", b"\xff"]),
            st.lists(st.integers(0, 5), max_size=4),
        ),
    ),
    max_size=6,
)


@st.composite
def handshake_streams(draw: st.DrawFn) -> bytes:
    flags = draw(st.sampled_from([0, 1, 2, 3, 4, 0xFFFFFFFF]))
    stream = struct.pack(">I", flags)
    for opt, data in draw(options):
        stream += b"IHAVEOPT" + struct.pack(">II", opt, len(data)) + data
    if draw(st.booleans()):
        stream += draw(st.binary(max_size=64))
    return stream


@FUZZ
@given(st.binary(max_size=512) | handshake_streams(), st.lists(st.integers(0, 4096), max_size=8))
def test_handshake_only_protocol_error(data: bytes, cuts: list[int]) -> None:
    whole = drive_handshake([data])
    assert drive_handshake(chunked(data, cuts)) == whole
    assert drive_handshake([data[i : i + 1] for i in range(len(data))]) == whole


# Request streams: valid headers (any command, flags, range), payloads, garbage.
requests = st.lists(
    st.builds(
        lambda cmd, flags, cookie, offset, length: Request(
            cmd, flags, cookie, offset, length, bytes(length) if cmd == 1 else None
        ),
        st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 100]),
        st.integers(0, 0xFFFF),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 70_000),
    ),
    max_size=8,
)


@FUZZ
@given(st.binary(max_size=1024), st.lists(st.integers(0, 4096), max_size=8))
def test_decoder_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    whole = drive_decoder([data])
    assert drive_decoder(chunked(data, cuts)) == whole
    assert drive_decoder([data[i : i + 1] for i in range(len(data))]) == whole


@FUZZ
@given(requests, st.binary(max_size=64), st.lists(st.integers(0, 1 << 20), max_size=8))
def test_decoder_roundtrip_then_garbage(reqs: list[Request], tail: bytes, cuts: list[int]) -> None:
    stream = encode_requests(reqs)
    got = drive_decoder(chunked(stream + tail, cuts))
    assert got[: len(reqs)] == reqs
    # The garbage tail parses as more requests or ends in ProtocolError.
    assert "ProtocolError" not in got[:-1]
    for r in reqs:  # validation of any decoded request is total
        for export in EXPORTS.values():
            assert isinstance(validate_request(r, export), int)


@settings(max_examples=50, deadline=None)
@given(st.integers(MAX_PAYLOAD + 1, 2**32 - 1), st.integers(0, 100))
def test_hostile_write_length_never_buffers(length: int, extra: int) -> None:
    dec = RequestDecoder()
    header = struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, length)
    dec.feed(header + bytes(extra))
    try:
        dec.read_requests()
    except ProtocolError:
        return
    raise AssertionError("hostile WRITE was accepted")
