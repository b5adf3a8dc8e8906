"""Request validation on the secondary and the reply codec (spec 6.4)."""

from __future__ import annotations

import errno

import pytest

from pyhast.enums import HioCmd
from pyhast.wire.errnos import from_wire, to_wire
from pyhast.wire.frame import encode_frame
from pyhast.wire.messages import (
    RequestError,
    keepalive_nv,
    parse_reply,
    parse_request,
    reply_nv,
    request_nv,
)
from pyhast.wire.nv import NV

GEOM = {"sectorsize": 512, "datasize": 1 << 30}


def test_write_reply_golden_bytes() -> None:
    # The Appendix: 02 16000000 | 08 04 08000000 "seq\0"+4pad <8-byte LE seq>
    seq = 0x0102030405060708
    expected = b"\x02\x16\x00\x00\x00\x08\x04\x08\x00\x00\x00seq\x00" + bytes(4)
    expected += seq.to_bytes(8, "little")
    assert b"".join(bytes(b) for b in encode_frame(reply_nv(seq))) == expected


def test_request_round_trip() -> None:
    nv = request_nv(HioCmd.WRITE, 9, 4096, 8192, memsync=True)
    req = parse_request(NV.decode(nv.encode()), **GEOM)
    assert (req.cmd, req.seq, req.offset, req.length, req.memsync) == (
        HioCmd.WRITE,
        9,
        4096,
        8192,
        True,
    )
    assert parse_request(keepalive_nv(), **GEOM).cmd is HioCmd.KEEPALIVE
    assert parse_request(request_nv(HioCmd.FLUSH, 3, 0, 0), **GEOM).cmd is HioCmd.FLUSH


@pytest.mark.parametrize(
    ("cmd", "seq", "offset", "length"),
    [
        (HioCmd.READ, 1, 100, 512),  # offset not sector aligned
        (HioCmd.WRITE, 1, 0, 100),  # length not aligned
        (HioCmd.READ, 1, 0, 0),  # zero length
        (HioCmd.WRITE, 1, 0, 2 * 1024 * 1024),  # over MAXPHYS
        (HioCmd.READ, 1, (1 << 30) - 512, 1024),  # past the end
        (HioCmd.READ, 0, 0, 512),  # no seq
    ],
)
def test_invalid_requests(cmd: HioCmd, seq: int, offset: int, length: int) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(request_nv(cmd, seq, offset, length), **GEOM)
    assert info.value.errno == errno.EINVAL
    assert info.value.seq == seq


def test_unknown_and_missing_cmd_answered() -> None:
    nv = NV()
    nv.add_uint8("cmd", 9)
    nv.add_uint64("seq", 5)
    with pytest.raises(RequestError) as info:
        parse_request(nv, **GEOM)
    assert info.value.seq == 5
    with pytest.raises(RequestError):
        parse_request(NV(), **GEOM)


def test_delete_over_maxphys_accepted() -> None:
    req = parse_request(request_nv(HioCmd.DELETE, 1, 0, 8 << 20), **GEOM)
    assert req.length == 8 << 20


def test_reply_errors_translated() -> None:
    nv = reply_nv(4, errno.EOPNOTSUPP)
    assert nv.get_int16("error") == 45  # FreeBSD's number on the wire
    reply = parse_reply(nv)
    assert (reply.seq, reply.error, reply.received) == (4, errno.EOPNOTSUPP, False)
    assert parse_reply(reply_nv(4, received=True)).received


def test_errno_translation_table() -> None:
    assert to_wire(errno.EIO) == 5
    assert to_wire(errno.ENOTCONN) == 57
    assert to_wire(errno.ETIMEDOUT) == 60
    assert from_wire(57) == errno.ENOTCONN
    assert from_wire(45) == errno.EOPNOTSUPP
    assert from_wire(1000) == errno.EIO
    assert to_wire(errno.ENOMEDIUM) == errno.EIO  # no FreeBSD counterpart
