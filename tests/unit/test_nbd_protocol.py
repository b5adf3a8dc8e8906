"""Unit tests of the NBD sans-IO codec and of FileBackend.

Expected bytes are written out by hand from the NBD protocol document
(doc/proto.md), not produced by the code under test.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from pathlib import Path

import pytest

from pyhast.errors import ProtocolError
from pyhast.frontend.eager import _resume
from pyhast.frontend.nbd.backend import BlockBackend, FileBackend
from pyhast.frontend.nbd.protocol import (
    DIRECT_PAYLOAD_THRESHOLD,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    MAX_PAYLOAD,
    NEED_DATA,
    ExportInfo,
    HandshakeAborted,
    HandshakeComplete,
    OptionHandled,
    Request,
    RequestDecoder,
    ServerHandshake,
    encode_requests,
    encode_simple_reply,
    nbd_error,
    transmission_flags,
    validate_request,
)

MiB = 1024 * 1024

# Literal protocol values, spelled out from the document.
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
REQ_MAGIC = bytes.fromhex("25609513")
SIMPLE_REPLY_MAGIC = bytes.fromhex("67446698")
C_FIXED_NEWSTYLE = 1
C_NO_ZEROES = 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY = 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP = 0x80000001
REP_ERR_INVALID = 0x80000003
REP_ERR_UNKNOWN = 0x80000006
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF = 1, 2, 4
# HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN
RW_MULTI_FLAGS = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100


def option(opt: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", opt, len(data)) + data


def go_data(name: bytes, *infos: int) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def option_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return REPLY_MAGIC + struct.pack(">III", opt, rep, len(data)) + data


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        assert data[:8] == REPLY_MAGIC
        opt, rep, length = struct.unpack(">III", data[8:20])
        out.append((opt, rep, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


DISK = ExportInfo("disk", 64 * MiB, can_multi_conn=True, description="the disk")
SPARE = ExportInfo("spare", 8 * MiB, read_only=True)


def handshake(*exports: ExportInfo, default: str | None = None) -> ServerHandshake:
    hs = ServerHandshake({e.name: e for e in exports}, default)
    hs.data_to_send()  # greeting, tested separately
    return hs


def run(hs: ServerHandshake, data: bytes) -> tuple[list[object], bytes]:
    hs.receive_data(data)
    events: list[object] = []
    while not hs.done:
        event = hs.next_event()
        if event is NEED_DATA:
            break
        events.append(event)
    return events, hs.data_to_send()


# -- handshake ----------------------------------------------------------------


def test_greeting_bytes() -> None:
    hs = ServerHandshake({"disk": DISK})
    # NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE (bit 0) | NO_ZEROES (bit 1).
    assert hs.data_to_send() == b"NBDMAGICIHAVEOPT\x00\x03"
    assert hs.data_to_send() == b""
    assert hs.next_event() is NEED_DATA


def test_opt_go_exchange() -> None:
    hs = handshake(DISK)
    first_request = REQ_MAGIC + bytes(24)
    events, out = run(
        hs,
        struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES)
        + option(OPT_GO, go_data(b"disk", INFO_BLOCK_SIZE))
        + first_request,
    )
    assert out == (
        option_reply(OPT_GO, REP_INFO, struct.pack(">HQH", INFO_EXPORT, 64 * MiB, RW_MULTI_FLAGS))
        + option_reply(OPT_GO, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, 32 * MiB))
        + option_reply(OPT_GO, REP_ACK)
    )
    assert events == [HandshakeComplete(DISK, first_request)]
    assert hs.done


def test_opt_info_then_go_with_name_and_description() -> None:
    hs = handshake(DISK)
    events, out = run(
        hs,
        struct.pack(">I", C_FIXED_NEWSTYLE)
        + option(OPT_INFO, go_data(b"disk", INFO_NAME, INFO_DESCRIPTION)),
    )
    assert events == [OptionHandled(OPT_INFO, REP_ACK, "disk")]
    replies = parse_option_replies(out)
    assert [(o, r) for o, r, _ in replies] == [(OPT_INFO, REP_INFO)] * 4 + [(OPT_INFO, REP_ACK)]
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for _, r, d in replies if r == REP_INFO}
    assert infos[INFO_NAME] == b"disk"
    assert infos[INFO_DESCRIPTION] == b"the disk"
    assert not hs.done
    events, _ = run(hs, option(OPT_GO, go_data(b"disk")))
    assert events == [HandshakeComplete(DISK, b"")]


def test_go_unknown_export_is_an_error_reply_not_a_disconnect() -> None:
    hs = handshake(DISK, SPARE)
    events, out = run(hs, struct.pack(">I", 1) + option(OPT_GO, go_data(b"nope")))
    assert events == [OptionHandled(OPT_GO, REP_ERR_UNKNOWN, "nope")]
    assert parse_option_replies(out)[0][:2] == (OPT_GO, REP_ERR_UNKNOWN)
    # Two exports: the empty name is unknown too.
    events, out = run(hs, option(OPT_GO, go_data(b"")))
    assert parse_option_replies(out)[0][:2] == (OPT_GO, REP_ERR_UNKNOWN)
    events, out = run(hs, option(OPT_GO, go_data(b"spare")))
    assert events == [HandshakeComplete(SPARE, b"")]
    export_info = parse_option_replies(out)[0][2]
    # READ_ONLY (bit 1) with HAS_FLAGS and SEND_FLUSH only.
    assert struct.unpack(">HQH", export_info) == (INFO_EXPORT, 8 * MiB, 0x0001 | 0x0002 | 0x0004)


def test_empty_name_selects_the_sole_export() -> None:
    hs = handshake(DISK, default="disk")
    events, out = run(hs, struct.pack(">I", 1) + option(OPT_GO, go_data(b"", INFO_NAME)))
    assert events == [HandshakeComplete(DISK, b"")]
    names = [d[2:] for _, r, d in parse_option_replies(out) if d[:2] == b"\x00\x01"]
    assert names == [b"disk"]


@pytest.mark.parametrize(
    ("client_flags", "tail"),
    [(C_FIXED_NEWSTYLE, bytes(124)), (C_FIXED_NEWSTYLE | C_NO_ZEROES, b""), (0, bytes(124))],
)
def test_opt_export_name(client_flags: int, tail: bytes) -> None:
    hs = handshake(DISK)
    events, out = run(hs, struct.pack(">I", client_flags) + option(OPT_EXPORT_NAME, b"disk"))
    assert out == struct.pack(">QH", 64 * MiB, RW_MULTI_FLAGS) + tail
    assert events == [HandshakeComplete(DISK, b"")]


def test_opt_export_name_unknown_drops_the_connection() -> None:
    hs = handshake(DISK)
    with pytest.raises(ProtocolError, match="unknown export"):
        run(hs, struct.pack(">I", 1) + option(OPT_EXPORT_NAME, b"other"))
    with pytest.raises(ProtocolError):  # stays broken
        hs.next_event()


def test_opt_list() -> None:
    hs = handshake(DISK, SPARE)
    events, out = run(hs, struct.pack(">I", 1) + option(OPT_LIST))
    assert events == [OptionHandled(OPT_LIST, REP_ACK)]
    assert out == (
        option_reply(OPT_LIST, REP_SERVER, struct.pack(">I", 4) + b"disk" + b"the disk")
        + option_reply(OPT_LIST, REP_SERVER, struct.pack(">I", 5) + b"spare")
        + option_reply(OPT_LIST, REP_ACK)
    )
    _, out = run(hs, option(OPT_LIST, b"x"))
    assert parse_option_replies(out)[0][:2] == (OPT_LIST, REP_ERR_INVALID)


def test_opt_abort() -> None:
    hs = handshake(DISK)
    events, out = run(hs, struct.pack(">I", 1) + option(OPT_ABORT, b"ignored"))
    assert events == [HandshakeAborted()]
    assert out == option_reply(OPT_ABORT, REP_ACK)
    assert hs.done


@pytest.mark.parametrize("opt", [OPT_STARTTLS, OPT_STRUCTURED_REPLY, 4, 9, 10, 11, 0xDEADBEEF])
def test_unsupported_options_get_err_unsup_and_parsing_continues(opt: int) -> None:
    hs = handshake(DISK)
    events, out = run(hs, struct.pack(">I", 1) + option(opt, b"junk" * 3) + option(OPT_LIST))
    replies = parse_option_replies(out)
    assert replies[0][:2] == (opt, REP_ERR_UNSUP)
    assert replies[-1][:2] == (OPT_LIST, REP_ACK)
    assert events == [OptionHandled(opt, REP_ERR_UNSUP), OptionHandled(OPT_LIST, REP_ACK)]


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00",  # shorter than 6 bytes
        struct.pack(">I", 100) + b"disk" + b"\x00\x00",  # name overruns the option
        go_data(b"disk", 3)[:-1],  # info list shorter than announced
        go_data(b"disk") + b"\x00",  # trailing byte
        go_data(b"di\xffk"),  # not UTF-8
        go_data(b"di\x00k"),  # NUL in name
    ],
)
def test_malformed_go_is_err_invalid(data: bytes) -> None:
    hs = handshake(DISK)
    events, out = run(hs, struct.pack(">I", 1) + option(OPT_GO, data))
    assert events == [OptionHandled(OPT_GO, REP_ERR_INVALID)]
    assert [r[:2] for r in parse_option_replies(out)] == [(OPT_GO, REP_ERR_INVALID)]
    assert not hs.done


def test_unknown_client_flags_drop() -> None:
    hs = handshake(DISK)
    hs.receive_data(struct.pack(">I", 4))
    with pytest.raises(ProtocolError, match="client flags"):
        hs.next_event()


def test_bad_option_magic_drops() -> None:
    hs = handshake(DISK)
    with pytest.raises(ProtocolError, match="magic"):
        run(hs, struct.pack(">I", 1) + b"IHAVEOPX" + bytes(8))


def test_option_length_limit_checked_before_data_arrives() -> None:
    hs = handshake(DISK)
    header = IHAVEOPT + struct.pack(">II", OPT_GO, MAX_OPTION_LENGTH + 1)
    with pytest.raises(ProtocolError, match="over the limit"):
        run(hs, struct.pack(">I", 1) + header)
    ok = handshake(DISK)
    events, _ = run(ok, struct.pack(">I", 1) + IHAVEOPT + struct.pack(">II", 99, MAX_OPTION_LENGTH))
    assert events == []  # waits for the data


def test_too_many_options_drop() -> None:
    hs = handshake(DISK)
    with pytest.raises(ProtocolError, match="more than"):
        run(hs, struct.pack(">I", 1) + option(99) * (MAX_OPTIONS + 1))


def test_handshake_byte_by_byte_matches_whole() -> None:
    stream = (
        struct.pack(">I", 3)
        + option(OPT_LIST)
        + option(OPT_STRUCTURED_REPLY)
        + option(OPT_INFO, go_data(b"disk", INFO_BLOCK_SIZE))
        + option(OPT_GO, go_data(b"disk"))
    )
    whole_events, whole_out = run(handshake(DISK), stream)
    hs = handshake(DISK)
    events: list[object] = []
    out = b""
    for i in range(len(stream)):
        ev, o = run(hs, stream[i : i + 1])
        events += ev
        out += o
    assert (events, out) == (whole_events, whole_out)
    assert isinstance(events[-1], HandshakeComplete)


def test_export_info_validation() -> None:
    with pytest.raises(ValueError):
        ExportInfo("x", 1 * MiB, block_size=(3, 4096, MiB))  # min not a power of 2
    with pytest.raises(ValueError):
        ExportInfo("x", 1 * MiB, block_size=(512, 256, MiB))  # preferred < 512
    with pytest.raises(ValueError):
        ExportInfo("x", 1 * MiB, block_size=(1, 4096, MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        ExportInfo("a\0b", 1)
    assert ExportInfo("x", 0, block_size=(512, 4096, MiB)).flags == RW_MULTI_FLAGS & ~0x0100


def test_transmission_flags() -> None:
    assert transmission_flags(read_only=False, can_multi_conn=True) == RW_MULTI_FLAGS
    assert transmission_flags(read_only=False, can_multi_conn=False) == RW_MULTI_FLAGS & ~0x100
    assert transmission_flags(read_only=True, can_multi_conn=False) == 0x0001 | 0x0002 | 0x0004


# -- transmission: requests ---------------------------------------------------


def request_bytes(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQ_MAGIC + struct.pack(">HHQQI", flags, cmd, cookie, offset, length)


def test_read_request_and_reply_bytes() -> None:
    dec = RequestDecoder()
    dec.feed(request_bytes(CMD_READ, 0x0102030405060708, 4096, 512))
    assert dec.next_request() == Request(CMD_READ, 0, 0x0102030405060708, 4096, 512, None)
    assert dec.next_request() is None
    assert dec.at_boundary
    # Simple reply: magic, error 0, the cookie echoed; the 512 data bytes follow.
    assert encode_simple_reply(0, 0x0102030405060708) == (
        SIMPLE_REPLY_MAGIC + b"\x00\x00\x00\x00" + bytes.fromhex("0102030405060708")
    )
    assert encode_simple_reply(22, 7) == SIMPLE_REPLY_MAGIC + bytes([0, 0, 0, 22]) + bytes(
        [0, 0, 0, 0, 0, 0, 0, 7]
    )


def test_many_requests_in_one_buffer() -> None:
    stream = b"".join(
        [
            request_bytes(CMD_WRITE, 1, 0, 4, FLAG_FUA) + b"abcd",
            request_bytes(CMD_READ, 2, 8, 4096),
            request_bytes(CMD_FLUSH, 3, 0, 0),
            request_bytes(CMD_WRITE, 4, 4096, 3) + b"xyz",
            request_bytes(CMD_WRITE_ZEROES, 5, 0, 8192, FLAG_NO_HOLE),
            request_bytes(CMD_TRIM, 6, 0, 512),
            request_bytes(CMD_DISC, 7, 0, 0),
        ]
    )
    expected = [
        Request(CMD_WRITE, FLAG_FUA, 1, 0, 4, b"abcd"),
        Request(CMD_READ, 0, 2, 8, 4096),
        Request(CMD_FLUSH, 0, 3, 0, 0),
        Request(CMD_WRITE, 0, 4, 4096, 3, b"xyz"),
        Request(CMD_WRITE_ZEROES, FLAG_NO_HOLE, 5, 0, 8192),
        Request(CMD_TRIM, 0, 6, 0, 512),
        Request(CMD_DISC, 0, 7, 0, 0),
    ]
    dec = RequestDecoder()
    dec.feed(stream + request_bytes(CMD_READ, 8, 0, 1)[:10])
    assert dec.read_requests() == expected
    assert not dec.at_boundary
    # Byte by byte gives the same requests.
    dec = RequestDecoder()
    got: list[Request] = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        got += dec.read_requests()
    assert got == expected
    assert encode_requests(expected) == stream


def test_read_requests_limit() -> None:
    dec = RequestDecoder()
    dec.feed(b"".join(request_bytes(CMD_READ, i, 0, 1) for i in range(10)))
    assert [r.cookie for r in dec.read_requests(3)] == [0, 1, 2]
    assert [r.cookie for r in dec.read_requests(0)] == []
    assert [r.cookie for r in dec.read_requests()] == list(range(3, 10))


def test_read_requests_byte_budget() -> None:
    dec = RequestDecoder()
    dec.feed(b"".join(request_bytes(CMD_READ, i, 0, 4096) for i in range(4)))
    dec.feed(request_bytes(CMD_FLUSH, 4, 0, 0) + request_bytes(CMD_WRITE, 5, 0, 2) + b"ok")
    assert [r.cookie for r in dec.read_requests(max_bytes=8192)] == [0, 1]
    assert [r.cookie for r in dec.read_requests(max_bytes=1)] == [2]  # always progresses
    assert [r.cookie for r in dec.read_requests(max_bytes=4097)] == [3, 4, 5]
    assert dec.at_boundary


def test_small_payload_is_an_owned_copy() -> None:
    dec = RequestDecoder()
    dec.feed(request_bytes(CMD_WRITE, 1, 0, 4) + b"abcd")
    (req,) = dec.read_requests()
    assert isinstance(req.data, bytes)
    # Reusing the receive buffer does not change the payload handed out.
    dec.feed(request_bytes(CMD_WRITE, 2, 0, 4) + b"WXYZ")
    assert dec.read_requests()[0].data == b"WXYZ"
    assert req.data == b"abcd"


def test_large_payload_is_received_into_its_own_buffer() -> None:
    length = 3 * MiB + 5
    payload = os.urandom(length)
    dec = RequestDecoder()
    dec.feed(request_bytes(CMD_WRITE, 9, 0, length) + payload[:1000])
    assert dec.read_requests() == []
    pos = 1000
    while pos < length:
        buf = dec.get_buffer()
        assert len(buf) <= length - pos  # never reads past this payload
        n = min(len(buf), 100_000)
        buf[:n] = payload[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        del buf
    dec.feed(request_bytes(CMD_FLUSH, 10, 0, 0))
    write, flush = dec.read_requests()
    assert isinstance(write.data, bytearray)
    assert write.data == payload
    assert flush == Request(CMD_FLUSH, 0, 10, 0, 0)
    assert dec.at_boundary


def test_payload_below_threshold_waits_in_receive_buffer() -> None:
    length = DIRECT_PAYLOAD_THRESHOLD - 1
    dec = RequestDecoder()
    dec.feed(request_bytes(CMD_WRITE, 1, 0, length) + bytes(10))
    assert dec.read_requests() == []
    dec.feed(b"\x01" * (length - 10))
    (req,) = dec.read_requests()
    assert req.data == bytes(10) + b"\x01" * (length - 10)


def test_bad_request_magic_drops_and_stays_broken() -> None:
    dec = RequestDecoder()
    dec.feed(request_bytes(CMD_READ, 1, 0, 1) + b"\x25\x60\x95\x14" + bytes(24))
    # The request before the violation is delivered, then the error.
    assert dec.read_requests() == [Request(CMD_READ, 0, 1, 0, 1)]
    with pytest.raises(ProtocolError, match="magic"):
        dec.read_requests()
    with pytest.raises(ProtocolError):
        dec.next_request()


def test_hostile_write_length_drops_before_payload() -> None:
    dec = RequestDecoder()
    dec.feed(request_bytes(CMD_WRITE, 1, 0, MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match="over the limit"):
        dec.read_requests()
    ok = RequestDecoder()
    ok.feed(request_bytes(CMD_WRITE, 1, 0, MAX_PAYLOAD))
    assert ok.read_requests() == []  # legal: waits for 32 MiB


# -- validation and errors ----------------------------------------------------

SMALL = ExportInfo("d", 1 * MiB, block_size=(1, 4096, 64 * 1024))
ALIGNED = ExportInfo("d", 1 * MiB, block_size=(512, 4096, 64 * 1024))
RO = ExportInfo("d", 1 * MiB, read_only=True)


@pytest.mark.parametrize(
    ("export", "req", "err"),
    [
        (SMALL, Request(CMD_READ, 0, 1, 0, 4096), 0),
        (SMALL, Request(CMD_READ, FLAG_FUA, 1, 0, 4096), 0),
        (SMALL, Request(CMD_READ, FLAG_DF, 1, 0, 4096), errno.EINVAL),
        (SMALL, Request(CMD_READ, 0x8000, 1, 0, 4096), errno.EINVAL),
        (SMALL, Request(5, 0, 1, 0, 4096), errno.EINVAL),  # CACHE, not advertised
        (SMALL, Request(7, 0, 1, 0, 4096), errno.EINVAL),  # BLOCK_STATUS
        (SMALL, Request(999, 0, 1, 0, 0), errno.EINVAL),
        (SMALL, Request(CMD_READ, 0, 1, 0, 0), errno.EINVAL),
        (SMALL, Request(CMD_READ, 0, 1, MiB - 1, 2), errno.EINVAL),
        (SMALL, Request(CMD_READ, 0, 1, 2**64 - 1, 1), errno.EINVAL),
        (SMALL, Request(CMD_READ, 0, 1, 0, 64 * 1024 + 1), errno.EINVAL),
        (SMALL, Request(CMD_WRITE, 0, 1, MiB - 1, 2, b"xx"), errno.ENOSPC),
        (SMALL, Request(CMD_WRITE, 0, 1, 0, 64 * 1024 + 1), errno.EINVAL),
        (SMALL, Request(CMD_WRITE, FLAG_NO_HOLE, 1, 0, 1, b"x"), errno.EINVAL),
        (SMALL, Request(CMD_WRITE_ZEROES, FLAG_NO_HOLE | FLAG_FUA, 1, 0, 512), 0),
        (SMALL, Request(CMD_WRITE_ZEROES, 0, 1, MiB - 1, 2), errno.ENOSPC),
        (SMALL, Request(CMD_WRITE_ZEROES, 0, 1, 0, 64 * 1024 + 1), errno.EINVAL),
        (SMALL, Request(CMD_TRIM, 0, 1, 0, MiB), 0),  # TRIM: only the export bounds it
        (SMALL, Request(CMD_TRIM, 0, 1, 1, MiB), errno.EINVAL),
        (SMALL, Request(CMD_FLUSH, 0, 1, 0, 0), 0),
        (SMALL, Request(CMD_FLUSH, 0, 1, 0, 1), errno.EINVAL),
        (ALIGNED, Request(CMD_READ, 0, 1, 512, 1024), 0),
        (ALIGNED, Request(CMD_READ, 0, 1, 511, 1024), errno.EINVAL),
        (ALIGNED, Request(CMD_WRITE, 0, 1, 512, 1000), errno.EINVAL),
        (RO, Request(CMD_READ, 0, 1, 0, 1), 0),
        (RO, Request(CMD_WRITE, 0, 1, 0, 1, b"x"), errno.EPERM),
        (RO, Request(CMD_TRIM, 0, 1, 0, 1), errno.EPERM),
        (RO, Request(CMD_WRITE_ZEROES, 0, 1, 0, 1), errno.EPERM),
        (RO, Request(CMD_FLUSH, 0, 1, 0, 0), 0),
    ],
)
def test_validate_request(export: ExportInfo, req: Request, err: int) -> None:
    assert validate_request(req, export) == err


@pytest.mark.parametrize(
    ("err", "wire"),
    [
        (0, 0),
        (errno.EPERM, 1),
        (errno.EROFS, 1),
        (errno.EACCES, 1),
        (errno.EIO, 5),
        (errno.ENOMEM, 12),
        (errno.EINVAL, 22),
        (errno.ENOSPC, 28),
        (errno.EDQUOT, 28),
        (errno.EFBIG, 28),
        (errno.EOVERFLOW, 75),
        (errno.ENOTSUP, 95),
        (errno.EOPNOTSUPP, 95),
        (errno.ESHUTDOWN, 108),
        (errno.ENOENT, 5),
        (errno.ENXIO, 5),
        (None, 5),
    ],
)
def test_nbd_error_mapping(err: int | None, wire: int) -> None:
    assert nbd_error(err) == wire


# -- FileBackend ----------------------------------------------------------------


def test_file_backend(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"H" * 4096 + os.urandom(2 * MiB) + b"T" * 4096)
    backend = FileBackend(path, offset=4096, size=2 * MiB)
    assert isinstance(backend, BlockBackend)
    assert (backend.size, backend.read_only, backend.can_multi_conn) == (2 * MiB, False, True)

    async def exercise() -> None:
        await backend.write(0, b"\xaa" * 8192, False)
        await backend.write(8192, b"\xbb" * 4096, True)
        big = os.urandom(MiB)
        await backend.write(MiB, big, False)  # above inline_max: thread pool
        assert await backend.read(MiB, MiB) == big
        await backend.flush()
        await backend.trim(0, 4096, False)
        await backend.write_zeroes(4096, 4096, True, False)
        await backend.write_zeroes(16384, 4096, False, True)
        assert await backend.read(0, 8192) == bytes(8192)
        assert await backend.read(8192, 4096) == b"\xbb" * 4096

    asyncio.run(exercise())
    backend.close()
    backend.close()
    data = path.read_bytes()
    assert data[:4096] == b"H" * 4096  # nothing outside the window changed
    assert data[-4096:] == b"T" * 4096
    assert data[4096 + 16384 : 4096 + 20480] == bytes(4096)


def test_file_backend_reads_past_eof_as_zeroes(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(b"x" * 100)
    backend = FileBackend(path, size=4096, read_only=True)
    try:
        assert backend.read_only
        data = asyncio.run(backend.read(0, 4096))
        assert data == b"x" * 100 + bytes(3996)
        with pytest.raises(OSError) as info:
            asyncio.run(backend.write(0, b"y", False))
        assert info.value.errno == errno.EBADF
    finally:
        backend.close()


# -- the server's eager start ---------------------------------------------------


def test_resume_finishes_a_suspended_coroutine_as_a_task() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        trace: list[str] = []

        async def work() -> None:
            trace.append("start")
            trace.append(await fut)
            await asyncio.sleep(0)
            trace.append("end")

        coro = work()
        first = coro.send(None)  # runs eagerly up to the first suspension
        assert first is fut and trace == ["start"]
        task = loop.create_task(_resume(coro, first))
        await asyncio.sleep(0)
        assert not task.done()
        fut.set_result("value")
        await task
        assert trace == ["start", "value", "end"]

        # Cancelling the task throws into the coroutine, which can clean up.
        gate: asyncio.Future[None] = loop.create_future()

        async def cancellable() -> None:
            try:
                await gate
            except asyncio.CancelledError:
                trace.append("cancelled")
                raise

        coro = cancellable()
        task = loop.create_task(_resume(coro, coro.send(None)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert trace[-1] == "cancelled"

    asyncio.run(main())
