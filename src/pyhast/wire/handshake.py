"""The replication handshake (spec 6.1 and 8), sans-IO.

Two TCP connections per session, both opened by the primary:

* conn A ("out" on the primary, "in" on the secondary) carries requests, and
  the secondary's handshake replies;
* conn B ("in" on the primary, "out" on the secondary) carries replies.

Messages, in order::

    1. primary -> A   {resource, version: uint8 2}            (frame version 1)
    2. A -> primary   {version: uint8, token: uint8[16]} | {errmsg, [wait]}
    3. primary -> B   {resource, token, [virgin: int8 1], resuid, localcnt, remotecnt}
    4. A -> primary   {datasize: int64, extentsize: int32, localcnt, remotecnt,
                       [virgin], syncsrc: uint8, mapsize: uint32} + bitmap
                      | {errmsg, ...}

This module builds and checks those messages and holds the secondary's
decision table (:func:`decide`); sockets live elsewhere.
"""

from __future__ import annotations

import dataclasses

from pyhast.defaults import HAST_PROTO_VERSION, HAST_TOKEN_SIZE
from pyhast.enums import SyncSrc
from pyhast.errors import ExitCode, NVError, ProtocolError
from pyhast.wire.nv import NV

#: errmsg texts, exactly as FreeBSD's secondary sends them.
ERR_NOT_CONFIGURED = "Resource not configured."
ERR_NO_ACCESS = "No access to the resource."
ERR_TOKEN = "Token doesn't match."
ERR_SPLITBRAIN = "Split-brain condition!"


def err_role(role_label: str) -> str:
    """The refusal a node sends when it is not secondary for the resource."""
    return f"Remote node acts as {role_label} for the resource and not as secondary."


def err_resuid(primary: int, secondary: int) -> str:
    return f"Resource unique ID mismatch (primary={primary}, secondary={secondary})."


class HandshakeError(ProtocolError):
    """The peer refused the session or sent a handshake we cannot accept.

    ``errmsg`` is the peer's own text when it sent one.
    """

    def __init__(self, message: str, errmsg: str | None = None, wait: bool = False) -> None:
        super().__init__(message)
        self.errmsg = errmsg
        self.wait = wait


# -- step 1 and 2 -------------------------------------------------------------


def first_request(resource: str) -> NV:
    """Message 1: the primary introduces itself on conn A."""
    nv = NV()
    nv.add_string("resource", resource)
    nv.add_uint8("version", HAST_PROTO_VERSION)
    return nv


def first_reply(version: int, token: bytes) -> NV:
    """Message 2: the secondary's parent accepts conn A."""
    nv = NV()
    nv.add_uint8("version", version)
    nv.add_uint8_array("token", token)
    return nv


def errmsg_reply(text: str, wait: bool = False) -> NV:
    """A refusal (``wait`` when the peer should retry soon: it is primary)."""
    nv = NV()
    nv.add_string("errmsg", text)
    if wait:
        nv.add_uint8("wait", 1)
    return nv


def negotiate_version(request: NV) -> int:
    """The version both sides speak: min(peer's, ours); a missing field means 1."""
    peer = request.get_uint8("version", default=1)
    return max(1, min(peer, HAST_PROTO_VERSION))


def check_refusal(reply: NV) -> None:
    """Raise HandshakeError if the reply carries ``errmsg``."""
    errmsg = reply.get_string("errmsg", default=None)
    if errmsg is not None:
        wait = reply.get_uint8("wait", default=0) != 0
        raise HandshakeError(errmsg, errmsg=errmsg, wait=wait)


def parse_first_reply(reply: NV) -> tuple[int, bytes]:
    """Message 2 as the primary sees it: (negotiated version, token)."""
    check_refusal(reply)
    try:
        version = reply.get_uint8("version", default=1)
        token = reply.get_uint8_array("token")
    except NVError as exc:
        raise HandshakeError(f"Handshake header has no usable 'token' field: {exc}") from exc
    if version < 1 or version > HAST_PROTO_VERSION:
        raise HandshakeError(f"Remote node speaks protocol version {version}, we speak at most 2.")
    if len(token) != HAST_TOKEN_SIZE:
        raise HandshakeError(
            f"Handshake header contains 'token' of wrong size "
            f"(got {len(token)}, expected {HAST_TOKEN_SIZE})."
        )
    return version, token


# -- step 3 -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrimaryHello:
    """Message 3: what the primary tells the secondary about itself."""

    resource: str
    token: bytes
    resuid: int
    localcnt: int
    remotecnt: int
    virgin: bool = False

    def to_nv(self) -> NV:
        nv = NV()
        nv.add_string("resource", self.resource)
        nv.add_uint8_array("token", self.token)
        if self.virgin:
            nv.add_int8("virgin", 1)
        nv.add_uint64("resuid", self.resuid)
        nv.add_uint64("localcnt", self.localcnt)
        nv.add_uint64("remotecnt", self.remotecnt)
        return nv

    @classmethod
    def from_nv(cls, nv: NV) -> PrimaryHello:
        try:
            return cls(
                resource=nv.get_string("resource"),
                token=nv.get_uint8_array("token"),
                resuid=nv.get_uint64("resuid"),
                localcnt=nv.get_uint64("localcnt"),
                remotecnt=nv.get_uint64("remotecnt"),
                virgin=nv.get_int8("virgin", default=0) != 0,
            )
        except NVError as exc:
            raise HandshakeError(f"Invalid handshake header from the primary: {exc}") from exc


# -- step 4 -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decision:
    """The secondary's answer to a PrimaryHello (spec 8, five cases).

    ``bitmap`` says what to send: "none" (virgin: mapsize 0), "ondisk" (the
    secondary's own bitmap), "full" (every bit set).  ``errmsg`` set means
    refusal; the secondary then exits with ``exit_code``.
    """

    syncsrc: SyncSrc = SyncSrc.PRIMARY
    bitmap: str = "ondisk"
    virgin: bool = False
    adopt_resuid: int | None = None
    errmsg: str | None = None
    exit_code: ExitCode = ExitCode.OK
    note: str = ""


def decide(
    *,
    s_resuid: int,
    s_localcnt: int,
    s_remotecnt: int,
    hello: PrimaryHello,
) -> Decision:
    """Compare the secondary's counters (S) with the primary's (P).

    ======================================  ==========================================
    S.resuid == 0                           adopt P's resuid; virgin -> nothing to
                                            sync, else full sync from the primary
    resuids differ                          refuse: resuid mismatch (exit 78)
    S.local > P.remote, S.remote == P.local primary is stale: sync from secondary
    S.local == P.remote, S.remote == P.local in sync: dirty extents, from primary
    S.local == P.remote, S.remote <  P.local secondary is stale: from primary
    S.local > P.remote, P.local > S.remote  split-brain: refuse (exit 78)
    anything else                           "should never happen": full sync
    ======================================  ==========================================
    """
    p_local, p_remote = hello.localcnt, hello.remotecnt
    if s_resuid == 0:
        if hello.virgin:
            return Decision(bitmap="none", virgin=True, adopt_resuid=hello.resuid, note="virgin")
        return Decision(bitmap="full", virgin=True, adopt_resuid=hello.resuid, note="new")
    if s_resuid != hello.resuid:
        return Decision(
            errmsg=err_resuid(hello.resuid, s_resuid),
            exit_code=ExitCode.CONFIG,
            note="resuid mismatch",
        )
    s_local_gt = s_localcnt > p_remote
    if s_local_gt:
        if s_remotecnt == p_local:
            return Decision(syncsrc=SyncSrc.SECONDARY, note="primary out of date")
        if p_local > s_remotecnt:
            return Decision(errmsg=ERR_SPLITBRAIN, exit_code=ExitCode.CONFIG, note="split-brain")
    if s_localcnt == p_remote:
        if s_remotecnt == p_local:
            return Decision(note="in sync")
        if s_remotecnt < p_local:
            return Decision(note="secondary out of date")
    return Decision(
        syncsrc=SyncSrc.SECONDARY if s_local_gt else SyncSrc.PRIMARY,
        bitmap="full",
        note="This should never happen",
    )


def decision_reply(
    decision: Decision,
    *,
    datasize: int,
    extentsize: int,
    localcnt: int,
    remotecnt: int,
    mapsize: int,
) -> NV:
    """Message 4 (without the bitmap payload; the pipeline adds ``size``)."""
    nv = NV()
    nv.add_int64("datasize", datasize)
    nv.add_int32("extentsize", extentsize)
    nv.add_uint64("localcnt", localcnt)
    nv.add_uint64("remotecnt", remotecnt)
    if decision.errmsg is not None:
        nv.add_string("errmsg", decision.errmsg)
        return nv
    if decision.virgin:
        nv.add_int8("virgin", 1)
    nv.add_uint8("syncsrc", int(decision.syncsrc))
    nv.add_uint32("mapsize", mapsize)
    return nv


@dataclasses.dataclass(frozen=True)
class SecondaryReply:
    """Message 4 as the primary sees it."""

    datasize: int
    extentsize: int
    localcnt: int
    remotecnt: int
    syncsrc: SyncSrc
    mapsize: int
    virgin: bool

    @classmethod
    def from_nv(cls, nv: NV) -> SecondaryReply:
        check_refusal(nv)
        try:
            syncsrc_raw = nv.get_uint8("syncsrc")
            reply = cls(
                datasize=nv.get_int64("datasize"),
                extentsize=nv.get_int32("extentsize"),
                localcnt=nv.get_uint64("localcnt"),
                remotecnt=nv.get_uint64("remotecnt"),
                syncsrc=SyncSrc(syncsrc_raw) if syncsrc_raw in (1, 2) else SyncSrc.UNDEF,
                mapsize=nv.get_uint32("mapsize", default=0),
                virgin=nv.get_int8("virgin", default=0) != 0,
            )
        except NVError as exc:
            raise HandshakeError(f"Invalid handshake reply from the secondary: {exc}") from exc
        if reply.syncsrc is SyncSrc.UNDEF:
            raise HandshakeError(f"Invalid synchronization source {syncsrc_raw} from secondary.")
        return reply
