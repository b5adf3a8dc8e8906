"""The secondary's decision table (spec 8 and the Appendix's observed cases)."""

from __future__ import annotations

import pytest

from pyhast.enums import SyncSrc
from pyhast.errors import ExitCode
from pyhast.wire.frame import encode_frame
from pyhast.wire.handshake import (
    ERR_SPLITBRAIN,
    HandshakeError,
    PrimaryHello,
    SecondaryReply,
    decide,
    decision_reply,
    first_reply,
    first_request,
    negotiate_version,
    parse_first_reply,
)
from pyhast.wire.nv import NV

TOKEN = bytes(range(16))


def hello(local: int, remote: int, resuid: int = 7, virgin: bool = False) -> PrimaryHello:
    return PrimaryHello("r0", TOKEN, resuid, local, remote, virgin)


# Secondary holds local=3, remote=3 (the Appendix's observations on FreeBSD).
@pytest.mark.parametrize(
    ("p_local", "p_remote", "syncsrc", "bitmap"),
    [
        (3, 3, SyncSrc.PRIMARY, "ondisk"),
        (4, 3, SyncSrc.PRIMARY, "ondisk"),
        (3, 2, SyncSrc.SECONDARY, "ondisk"),
        (2, 2, SyncSrc.SECONDARY, "full"),
        (4, 4, SyncSrc.PRIMARY, "full"),
    ],
)
def test_observed_cases(p_local: int, p_remote: int, syncsrc: SyncSrc, bitmap: str) -> None:
    d = decide(s_resuid=7, s_localcnt=3, s_remotecnt=3, hello=hello(p_local, p_remote))
    assert d.errmsg is None
    assert d.syncsrc is syncsrc
    assert d.bitmap == bitmap


def test_split_brain() -> None:
    d = decide(s_resuid=7, s_localcnt=3, s_remotecnt=3, hello=hello(4, 2))
    assert d.errmsg == ERR_SPLITBRAIN == "Split-brain condition!"
    assert d.exit_code is ExitCode.CONFIG


def test_resuid_mismatch() -> None:
    d = decide(s_resuid=8, s_localcnt=0, s_remotecnt=0, hello=hello(0, 0, resuid=7))
    assert d.errmsg == "Resource unique ID mismatch (primary=7, secondary=8)."
    assert d.exit_code is ExitCode.CONFIG


def test_fresh_secondary_adopts_resuid() -> None:
    d = decide(s_resuid=0, s_localcnt=0, s_remotecnt=0, hello=hello(1, 0, virgin=True))
    assert (d.adopt_resuid, d.bitmap, d.virgin) == (7, "none", True)
    d = decide(s_resuid=0, s_localcnt=0, s_remotecnt=0, hello=hello(1, 0))
    assert (d.adopt_resuid, d.bitmap, d.syncsrc) == (7, "full", SyncSrc.PRIMARY)


def test_first_exchange_and_version() -> None:
    req = first_request("r0")
    assert req.get_string("resource") == "r0"
    assert negotiate_version(req) == 2
    assert negotiate_version(NV()) == 1
    v3 = NV()
    v3.add_uint8("version", 3)
    assert negotiate_version(v3) == 2
    assert parse_first_reply(first_reply(2, TOKEN)) == (2, TOKEN)
    with pytest.raises(HandshakeError, match="wrong size"):
        parse_first_reply(first_reply(2, TOKEN[:15]))


def test_first_reply_golden_bytes() -> None:
    # The Appendix: 02 34000000 | 02 08 01000000 "version\0" 02+7pad |
    #               0a 06 10000000 "token\0"+2pad <16 token bytes>
    expected = (
        b"\x02\x34\x00\x00\x00"
        + b"\x02\x08\x01\x00\x00\x00version\x00\x02"
        + bytes(7)
        + b"\x0a\x06\x10\x00\x00\x00token\x00"
        + bytes(2)
        + TOKEN
    )
    assert b"".join(bytes(b) for b in encode_frame(first_reply(2, TOKEN))) == expected


def test_decision_reply_round_trip() -> None:
    d = decide(s_resuid=7, s_localcnt=3, s_remotecnt=3, hello=hello(3, 2))
    nv = decision_reply(d, datasize=1 << 20, extentsize=65536, localcnt=3, remotecnt=3, mapsize=512)
    r = SecondaryReply.from_nv(nv)
    assert (r.datasize, r.extentsize, r.localcnt, r.remotecnt) == (1 << 20, 65536, 3, 3)
    assert (r.syncsrc, r.mapsize, r.virgin) == (SyncSrc.SECONDARY, 512, False)
    sb = decide(s_resuid=7, s_localcnt=3, s_remotecnt=3, hello=hello(4, 2))
    with pytest.raises(HandshakeError) as info:
        SecondaryReply.from_nv(
            decision_reply(sb, datasize=1, extentsize=1, localcnt=3, remotecnt=3, mapsize=0)
        )
    assert info.value.errmsg == ERR_SPLITBRAIN


def test_primary_hello_round_trip() -> None:
    h = hello(5, 4, virgin=True)
    assert PrimaryHello.from_nv(NV.decode(h.to_nv().encode())) == h
