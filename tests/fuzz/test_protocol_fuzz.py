"""Property tests for the message parsers above the nv codec (issue 5, item 5).

Targets: the replication handshake (:mod:`pyhast.wire.handshake`: first
reply, refusal, version, PrimaryHello and SecondaryReply, the decision
table), request validation (:func:`pyhast.wire.messages.parse_request` and
``parse_reply``) and the control protocol (:class:`ControlRequest.from_nv`,
hastd's replies, the parent <-> worker messages of
:mod:`pyhast.wire.control`).

The invariant, as for the codecs: whatever arrives, each parser returns a
value or raises the project's protocol error (a :class:`ProtocolError`;
``parse_request`` only :class:`RequestError`; ``ControlRequest.from_nv``
only :class:`ControlRequestError`), never another exception, never a hang
(every call is timed, :data:`CALL_LIMIT`).  Inputs come three ways:

* nv lists built *structurally*: field names from each parser's vocabulary
  (plus indexed names and arbitrary ones), usually with the expected type
  and edge values, often with a wrong type or a missing field;
* arbitrary bytes and *mutated valid encodings* through ``NV.decode`` and
  then into every parser;
* round trips of valid messages, and the decision table's promises:
  split-brain is reported exactly when both sides wrote while apart, for
  either side as the secondary, and never turned into a synchronisation.

Budget: :data:`EXAMPLES` (10,600 Hypothesis examples here; with the wire,
NBD, config and activemap fuzz files the CI total is above 26,000 inputs).
The long target is ``python -m tests.fuzz.long``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyhast.defaults import HAST_PROTO_VERSION, HAST_TOKEN_SIZE, MAXPHYS
from pyhast.enums import ControlCmd, ControlError, Event, HioCmd, Role, SyncSrc
from pyhast.errors import HastError, NVError, ProtocolError
from pyhast.wire import control, handshake, messages
from pyhast.wire.control import ControlRequest, ControlRequestError
from pyhast.wire.handshake import (
    ERR_SPLITBRAIN,
    HandshakeError,
    PrimaryHello,
    SecondaryReply,
    decide,
    decision_reply,
)
from pyhast.wire.messages import RequestError
from pyhast.wire.nv import NV, NVType

EXAMPLES = {
    "handshake_structured": 1500,
    "handshake_roundtrip": 500,
    "decision_table": 1200,
    "requests_structured": 1500,
    "requests_roundtrip": 600,
    "replies": 600,
    "control_request": 1200,
    "control_replies": 1200,
    "worker_messages": 800,
    "bytes_everywhere": 1000,
    "mutated_valid": 500,
}
#: Seconds one parser call may take before it counts as a hang.
CALL_LIMIT = 2.0

T = TypeVar("T")


def fuzz(name: str) -> Any:
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def test_budget_is_at_least_ten_thousand_here() -> None:
    assert sum(EXAMPLES.values()) >= 10_000


# --- calling a parser -------------------------------------------------------------


def call(
    func: Callable[..., T], *args: Any, allowed: type[HastError] = ProtocolError, **kw: Any
) -> T | HastError:
    """``func(*args)``: its value, or the allowed error (returned); anything else fails."""
    start = time.monotonic()
    try:
        return func(*args, **kw)
    except allowed as exc:
        return exc
    finally:
        elapsed = time.monotonic() - start
        assert elapsed < CALL_LIMIT, f"{getattr(func, '__name__', func)} took {elapsed:.1f} s"


# --- nv lists, structurally ---------------------------------------------------------

_CHARS = st.characters(codec="utf-8", exclude_characters="\0")

_INT_RANGES: dict[NVType, tuple[int, int]] = {}
for _bits, (_s, _u) in {8: (1, 2), 16: (3, 4), 32: (5, 6), 64: (7, 8)}.items():
    _INT_RANGES[NVType(_s)] = (-(2 ** (_bits - 1)), 2 ** (_bits - 1) - 1)
    _INT_RANGES[NVType(_u)] = (0, 2**_bits - 1)
    _INT_RANGES[NVType(_s + 8)] = _INT_RANGES[NVType(_s)]
    _INT_RANGES[NVType(_u + 8)] = _INT_RANGES[NVType(_u)]

#: The type each parser expects for a field (indexed names: without the index).
EXPECTED: dict[str, NVType] = {
    # handshake
    "resource": NVType.STRING,
    "version": NVType.UINT8,
    "token": NVType.UINT8_ARRAY,
    "errmsg": NVType.STRING,
    "wait": NVType.UINT8,
    "resuid": NVType.UINT64,
    "localcnt": NVType.UINT64,
    "remotecnt": NVType.UINT64,
    "virgin": NVType.INT8,
    "datasize": NVType.INT64,
    "extentsize": NVType.INT32,
    "syncsrc": NVType.UINT8,
    "mapsize": NVType.UINT32,
    # requests and replies
    "cmd": NVType.UINT8,
    "seq": NVType.UINT64,
    "offset": NVType.UINT64,
    "length": NVType.UINT64,
    "memsync": NVType.UINT8,
    "received": NVType.INT8,
    "error": NVType.INT16,
    "size": NVType.UINT32,
    # control
    "role": NVType.UINT8,
    "force": NVType.UINT8,
    "event": NVType.UINT8,
    "status": NVType.STRING,
    "provname": NVType.STRING,
    "localpath": NVType.STRING,
    "remoteaddr": NVType.STRING,
    "sourceaddr": NVType.STRING,
    "replication": NVType.INT32,
    "checksum": NVType.INT32,
    "compression": NVType.INT32,
    "timeout": NVType.INT32,
    "exec": NVType.STRING,
    "metaflush": NVType.INT32,
    "workerpid": NVType.INT32,
    "nbd_uri": NVType.STRING,
    "devpath": NVType.STRING,
    **{name: NVType.UINT64 for name in control.WORKER_INT_FIELDS},
    "keepdirty": NVType.UINT32,
    "ready": NVType.UINT8,
}
HANDSHAKE_NAMES = [
    "resource",
    "version",
    "token",
    "errmsg",
    "wait",
    "resuid",
    "localcnt",
    "remotecnt",
    "virgin",
    "datasize",
    "extentsize",
    "syncsrc",
    "mapsize",
    "size",
]
REQUEST_NAMES = ["cmd", "seq", "offset", "length", "memsync", "received", "error", "size"]
CONTROL_NAMES = [
    "cmd",
    "role",
    "force",
    "error",
    "event",
    "status",
    "remoteaddr",
    "sourceaddr",
    "replication",
    "checksum",
    "compression",
    "timeout",
    "exec",
    "metaflush",
    "nbd_uri",
    "syncsrc",
    *control.WORKER_INT_FIELDS,
]
INDEXED = [
    "resource",
    "error",
    "role",
    "errmsg",
    "provname",
    "localpath",
    "remoteaddr",
    "sourceaddr",
    "replication",
    "checksum",
    "compression",
    "workerpid",
    "status",
    "nbd_uri",
    "syncsrc",
    "dirty",
    "localcnt",
    "ready",
]

_STRINGS = [
    "",
    "all",
    "r0",
    "primary",
    "secondary",
    "init",
    "complete",
    "degraded",
    "none",
    "crc32",
    "hole",
    "lzf",
    "sha256",
    ERR_SPLITBRAIN,
    handshake.ERR_TOKEN,
    "\u00e9",
    "x" * 300,
]


def expected_type(name: str) -> NVType | None:
    return EXPECTED.get(re.sub(r"\d+$", "", name))


def int_values(t: NVType) -> st.SearchStrategy[int]:
    lo, hi = _INT_RANGES[t]
    edges = (lo, hi, hi - 1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 255, 256, 512, 4096, MAXPHYS)
    return st.one_of(
        st.sampled_from(sorted({v for v in edges if lo <= v <= hi})), st.integers(lo, hi)
    )


def values_of(t: NVType) -> st.SearchStrategy[Any]:
    if t is NVType.STRING:
        return st.one_of(st.sampled_from(_STRINGS), st.text(_CHARS, max_size=24))
    if t is NVType.UINT8_ARRAY:
        return st.one_of(
            st.binary(min_size=HAST_TOKEN_SIZE, max_size=HAST_TOKEN_SIZE),
            st.binary(min_size=1, max_size=40),
        )
    if t.is_array:
        return st.lists(int_values(NVType(t - 8)), min_size=1, max_size=4).map(tuple)
    return int_values(t)


def add(nv: NV, name: str, t: NVType, value: Any) -> None:
    if t is NVType.STRING:
        nv.add_string(name, value)
    elif t is NVType.UINT8_ARRAY:
        nv.add_uint8_array(name, value)
    elif t.is_array:
        nv.add_array(name, t, value)
    else:
        getattr(nv, f"add_{t.name.lower()}")(name, value)


@st.composite
def fields(draw: st.DrawFn, names: list[str]) -> tuple[str, NVType, Any]:
    kind = draw(st.integers(0, 9))
    if kind < 7:
        name = draw(st.sampled_from(names))
    elif kind < 9:
        name = draw(st.sampled_from(INDEXED)) + str(draw(st.integers(0, 3)))
    else:
        name = draw(st.text(_CHARS, max_size=12))
    want = expected_type(name)
    if want is not None and draw(st.integers(0, 9)) < 7:
        t = want
    else:
        t = draw(st.sampled_from(list(NVType)))
    return name, t, draw(values_of(t))


def nv_lists(names: list[str], max_size: int = 10) -> st.SearchStrategy[NV]:
    def build(items: list[tuple[str, NVType, Any]]) -> NV:
        nv = NV()
        for name, t, value in items:
            add(nv, name, t, value)
        return nv

    return st.lists(fields(names), max_size=max_size).map(build)


def wire(nv: NV) -> NV | None:
    """``nv`` as a peer's would arrive: encoded and decoded (None if refused)."""
    try:
        return NV.decode(nv.encode())
    except NVError:
        return None  # duplicate names: refused at the codec


# --- every parser at once --------------------------------------------------------------


def all_handshake_parsers(nv: NV) -> None:
    call(handshake.check_refusal, nv)
    call(handshake.negotiate_version, nv)
    got = call(handshake.parse_first_reply, nv)
    if not isinstance(got, HastError):
        version, token = got
        assert 1 <= version <= HAST_PROTO_VERSION and len(token) == HAST_TOKEN_SIZE
    hello = call(PrimaryHello.from_nv, nv)
    if isinstance(hello, PrimaryHello):
        assert call(PrimaryHello.from_nv, hello.to_nv()) == hello
        for s in ((0, 0, 0), (hello.resuid, hello.remotecnt, hello.localcnt), (7, 1, 1)):
            decision = call(decide, s_resuid=s[0], s_localcnt=s[1], s_remotecnt=s[2], hello=hello)
            assert not isinstance(decision, HastError)
    else:
        assert isinstance(hello, HandshakeError)
    reply = call(SecondaryReply.from_nv, nv)
    if isinstance(reply, SecondaryReply):
        assert reply.syncsrc in (SyncSrc.PRIMARY, SyncSrc.SECONDARY)
        assert "errmsg" not in nv
    else:
        assert isinstance(reply, ProtocolError)


def all_request_parsers(nv: NV) -> None:
    for sectorsize, datasize in ((512, 1 << 30), (4096, 16 << 20), (512, 4096)):
        req = call(
            messages.parse_request,
            nv,
            sectorsize=sectorsize,
            datasize=datasize,
            allowed=RequestError,
        )
        if isinstance(req, messages.Request):
            check_valid_request(req, sectorsize, datasize)
    rep = call(messages.parse_reply, nv)
    if isinstance(rep, messages.Reply):
        assert rep.seq >= 0 and rep.error >= 0


def check_valid_request(req: messages.Request, sectorsize: int, datasize: int) -> None:
    """What an accepted request promises the secondary."""
    if req.cmd is HioCmd.KEEPALIVE:
        return
    assert req.seq != 0
    if req.cmd is HioCmd.FLUSH:
        assert req.offset == req.length == 0
        return
    assert req.cmd in (HioCmd.READ, HioCmd.WRITE, HioCmd.DELETE)
    assert req.length > 0
    assert req.offset % sectorsize == 0 and req.length % sectorsize == 0
    assert req.offset + req.length <= datasize
    assert req.cmd is HioCmd.DELETE or req.length <= MAXPHYS
    assert not req.memsync or req.cmd is HioCmd.WRITE


def all_control_parsers(nv: NV) -> None:
    req = call(ControlRequest.from_nv, nv, allowed=ControlRequestError)
    if isinstance(req, ControlRequest):
        assert req.cmd in (ControlCmd.SETROLE, ControlCmd.STATUS)
        assert req.resources and all(isinstance(r, str) for r in req.resources)
        assert (req.role is not None) == (req.cmd is ControlCmd.SETROLE)
        again = call(ControlRequest.from_nv, req.to_nv(), allowed=ControlRequestError)
        assert isinstance(again, ControlRequest)
        # force only travels with SETROLE (a STATUS request has no use for it)
        assert again == req or (req.cmd is ControlCmd.STATUS and again.resources == req.resources)
    for cmd in (ControlCmd.SETROLE, ControlCmd.STATUS):
        reply = call(control.parse_reply, nv, cmd)
        if isinstance(reply, control.ControlReply):
            assert isinstance(reply.first_error, int)
            for status in reply.statuses:
                doc = status.to_json()
                assert doc["name"] == status.name
    all_worker_parsers(nv)


def all_worker_parsers(nv: NV) -> None:
    for func in (
        control.parse_error,
        control.parse_event,
        control.parse_event_ack,
        control.parse_conn_request,
        control.parse_conn_reply,
        control.parse_worker_cmd,
        control.ReloadRequest.from_nv,
    ):
        call(func, nv)
    for suffix in ("", "0", "1"):
        ws = call(control.WorkerStatus.from_nv, nv, suffix)
        if isinstance(ws, control.WorkerStatus):
            assert isinstance(ws.serving, bool)
    for i in range(3):
        call(control.ResourceStatus.from_nv, nv, i)
        call(control.RoleResult.from_nv, nv, i)


def every_parser(nv: NV) -> None:
    all_handshake_parsers(nv)
    all_request_parsers(nv)
    all_control_parsers(nv)


# --- handshake ---------------------------------------------------------------------


@fuzz("handshake_structured")
@given(nv_lists(HANDSHAKE_NAMES))
def test_handshake_parsers_only_raise_protocol_errors(nv: NV) -> None:
    all_handshake_parsers(nv)
    received = wire(nv)
    if received is not None:
        all_handshake_parsers(received)


counters = st.one_of(st.integers(0, 6), st.integers(0, 2**64 - 1))
tokens = st.binary(min_size=HAST_TOKEN_SIZE, max_size=HAST_TOKEN_SIZE)


@fuzz("handshake_roundtrip")
@given(
    st.text(_CHARS, min_size=1, max_size=30),
    tokens,
    st.integers(1, 2**64 - 1),
    counters,
    counters,
    st.booleans(),
)
def test_primary_hello_round_trip(
    resource: str, token: bytes, resuid: int, local: int, remote: int, virgin: bool
) -> None:
    hello = PrimaryHello(resource, token, resuid, local, remote, virgin)
    received = NV.decode(hello.to_nv().encode())
    assert PrimaryHello.from_nv(received) == hello
    all_handshake_parsers(received)


@fuzz("decision_table")
@given(
    st.sampled_from([0, 7, 8]),
    counters,
    counters,
    st.sampled_from([7, 8]),
    counters,
    counters,
    st.booleans(),
    st.integers(1, 1 << 20),
)
def test_decision_table_split_brain_is_never_resolved_silently(
    s_resuid: int,
    s_local: int,
    s_remote: int,
    p_resuid: int,
    p_local: int,
    p_remote: int,
    virgin: bool,
    mapsize: int,
) -> None:
    hello = PrimaryHello("r0", bytes(16), p_resuid, p_local, p_remote, virgin)
    d = decide(s_resuid=s_resuid, s_localcnt=s_local, s_remotecnt=s_remote, hello=hello)
    same = s_resuid == p_resuid != 0
    split = same and s_local > p_remote and p_local > s_remote
    # Refused as split-brain exactly when both sides wrote while apart...
    assert (d.errmsg == ERR_SPLITBRAIN) == split, d
    # ...whichever of the two is the secondary.
    swapped = decide(
        s_resuid=p_resuid,
        s_localcnt=p_local,
        s_remotecnt=p_remote,
        hello=PrimaryHello("r0", bytes(16), s_resuid or p_resuid, s_local, s_remote),
    )
    if s_resuid:
        assert (swapped.errmsg == ERR_SPLITBRAIN) == split, swapped
    if s_resuid == 0:
        assert d.adopt_resuid == p_resuid and d.errmsg is None
    elif not same:
        assert d.errmsg is not None and "unique ID" in d.errmsg
    elif not split:
        assert d.errmsg is None
        if s_local > p_remote and s_remote == p_local:
            assert d.syncsrc is SyncSrc.SECONDARY  # the primary is out of date
        if s_local == p_remote and s_remote <= p_local:
            assert d.syncsrc is SyncSrc.PRIMARY and d.bitmap == "ondisk"
    # The reply carries the decision, and the primary reads it back.
    nv = decision_reply(
        d,
        datasize=1 << 20,
        extentsize=1 << 16,
        localcnt=s_local,
        remotecnt=s_remote,
        mapsize=0 if d.bitmap == "none" else mapsize,
    )
    got = call(SecondaryReply.from_nv, NV.decode(nv.encode()))
    if d.errmsg is not None:
        assert isinstance(got, HandshakeError) and got.errmsg == d.errmsg
    else:
        assert isinstance(got, SecondaryReply)
        assert (got.syncsrc, got.virgin) == (d.syncsrc, d.virgin)
        assert (got.localcnt, got.remotecnt) == (s_local, s_remote)


# --- requests and replies ------------------------------------------------------------


@fuzz("requests_structured")
@given(nv_lists(REQUEST_NAMES))
def test_request_validation_only_raises_request_errors(nv: NV) -> None:
    all_request_parsers(nv)
    received = wire(nv)
    if received is not None:
        all_request_parsers(received)


@fuzz("requests_roundtrip")
@given(
    st.sampled_from(list(HioCmd)),
    st.integers(0, 2**64 - 1),
    st.one_of(st.integers(0, 1 << 24).map(lambda x: x * 512), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 4096).map(lambda x: x * 512), st.integers(0, 2**64 - 1)),
    st.booleans(),
)
def test_request_round_trip(cmd: HioCmd, seq: int, offset: int, length: int, ms: bool) -> None:
    if cmd is HioCmd.KEEPALIVE:
        nv = messages.keepalive_nv()
    else:
        nv = messages.request_nv(cmd, seq, offset, length, ms)
    nv = NV.decode(nv.encode())
    req = call(messages.parse_request, nv, sectorsize=512, datasize=1 << 30, allowed=RequestError)
    if isinstance(req, messages.Request):
        check_valid_request(req, 512, 1 << 30)
        if cmd not in (HioCmd.KEEPALIVE, HioCmd.FLUSH):
            assert (req.cmd, req.seq, req.offset, req.length) == (cmd, seq, offset, length)
    else:
        assert isinstance(req, RequestError)
        assert req.seq in (0, seq)
        inside = offset + length <= 1 << 30 and offset % 512 == 0 and length % 512 == 0
        valid = (
            cmd is not HioCmd.UNDEF
            and seq != 0
            and length > 0
            and inside
            and (cmd is HioCmd.DELETE or length <= MAXPHYS)
        )
        assert not valid, f"a valid {cmd.name} request was refused: {req}"


@fuzz("replies")
@given(
    st.one_of(
        nv_lists(["seq", "error", "received", "size"]),
        st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 200), st.booleans()).map(
            lambda t: messages.reply_nv(*t)
        ),
    )
)
def test_replies_only_raise_protocol_errors(nv: NV) -> None:
    rep = call(messages.parse_reply, nv)
    if isinstance(rep, messages.Reply):
        assert rep.seq == nv.get_uint64("seq")


# --- control protocol -------------------------------------------------------------------


@st.composite
def control_requests(draw: st.DrawFn) -> NV:
    """Mostly-valid hastctl requests with one thing wrong (or nothing)."""
    nv = NV()
    cmd = draw(st.sampled_from([0, 1, 2, 3, 255]))
    if draw(st.integers(0, 9)):
        nv.add_uint8("cmd", cmd)
    if draw(st.booleans()):
        add(nv, "role", NVType.UINT8, draw(st.sampled_from([0, 1, 2, 3, 4, 255])))
    if draw(st.integers(0, 3)) == 0:
        nv.add_uint8("force", draw(st.integers(0, 255)))
    for i in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 9)) == 0:
            t = draw(st.sampled_from(list(NVType)))
            add(nv, f"resource{i}", t, draw(values_of(t)))
            break
        nv.add_string(f"resource{i}", draw(st.sampled_from(_STRINGS[:6])))
    for name, t, value in draw(st.lists(fields(CONTROL_NAMES), max_size=3)):
        add(nv, name, t, value)
    return nv


@st.composite
def status_replies(draw: st.DrawFn) -> NV:
    """hastd's STATUS/SETROLE replies as the real builders make them, then damaged."""
    nv = NV()
    for i in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            ws = control.WorkerStatus(
                status=draw(st.sampled_from(["complete", "degraded"])),
                dirty=draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))),
                extentsize=draw(st.one_of(st.none(), st.integers(0, 2**32 - 1))),
                ready=draw(st.one_of(st.none(), st.integers(0, 255))),
                nbd_uri=draw(st.one_of(st.none(), st.text(_CHARS, max_size=20))),
            )
            control.ResourceStatus(
                name=f"r{i}",
                error=draw(st.sampled_from([0, 0, 1])),
                role=draw(st.sampled_from(["primary", "secondary", "init"])),
                workerpid=draw(st.integers(0, 2**31 - 1)),
                worker=draw(st.sampled_from([None, ws])),
            ).add_to(nv, i)
        else:
            control.RoleResult(
                f"r{i}",
                draw(st.integers(-(2**15), 2**15 - 1)),
                draw(st.sampled_from([None, "init", "primary"])),
                draw(st.sampled_from([None, "busy"])),
            ).add_to(nv, i)
    for name, t, value in draw(st.lists(fields(CONTROL_NAMES), max_size=3)):
        add(nv, name, t, value)
    return nv


@fuzz("control_request")
@given(st.one_of(control_requests(), nv_lists(CONTROL_NAMES)))
def test_control_request_only_raises_control_request_errors(nv: NV) -> None:
    req = call(ControlRequest.from_nv, nv, allowed=ControlRequestError)
    if isinstance(req, ControlRequestError):
        assert req.code in (
            ControlError.INVALID_REQUEST,
            ControlError.UNIMPLEMENTED,
        )
    received = wire(nv)
    if received is not None:
        all_control_parsers(received)


@fuzz("control_replies")
@given(st.one_of(status_replies(), nv_lists(CONTROL_NAMES + [f"{n}0" for n in INDEXED])))
def test_control_replies_only_raise_protocol_errors(nv: NV) -> None:
    all_control_parsers(nv)


@fuzz("worker_messages")
@given(
    st.one_of(
        nv_lists(CONTROL_NAMES),
        st.builds(
            lambda r: control.ReloadRequest(*r).to_nv(),
            st.tuples(
                st.text(_CHARS, max_size=20),
                st.text(_CHARS, max_size=20),
                st.integers(-(2**31), 2**31 - 1),
                st.integers(-(2**31), 2**31 - 1),
                st.integers(-(2**31), 2**31 - 1),
                st.integers(-(2**31), 2**31 - 1),
                st.text(_CHARS, max_size=10),
                st.integers(-(2**31), 2**31 - 1),
            ),
        ),
        st.sampled_from(
            [control.worker_status_request(), control.conn_request(), control.conn_reply(5)]
        ),
        st.integers(0, 255).map(lambda e: _event_nv(e)),
    )
)
def test_worker_messages_only_raise_protocol_errors(nv: NV) -> None:
    all_worker_parsers(nv)


def _event_nv(raw: int) -> NV:
    nv = NV()
    nv.add_uint8("event", raw)
    return nv


# --- bytes -------------------------------------------------------------------------------


def valid_encodings() -> list[bytes]:
    """One valid message of every kind the parsers above read."""
    hello = PrimaryHello("r0", bytes(range(16)), 42, 3, 2, True)
    d = handshake.Decision(syncsrc=SyncSrc.SECONDARY, virgin=True)
    msgs = [
        handshake.first_request("r0"),
        handshake.first_reply(2, bytes(16)),
        handshake.errmsg_reply(ERR_SPLITBRAIN, wait=True),
        hello.to_nv(),
        decision_reply(d, datasize=1 << 20, extentsize=65536, localcnt=1, remotecnt=2, mapsize=64),
        messages.request_nv(HioCmd.WRITE, 9, 4096, 8192, True),
        messages.request_nv(HioCmd.DELETE, 10, 0, 1 << 30),
        messages.keepalive_nv(),
        messages.reply_nv(9, 5, True),
        ControlRequest.set_role(Role.PRIMARY, ["r0", "r1"], force=True).to_nv(),
        ControlRequest.status().to_nv(),
        control.error_reply(2),
        control.event_message(Event.SPLITBRAIN),
        control.ReloadRequest("tcp4://a", "", 1, 2, 2, 20, "/x", 1).to_nv(),
        control.WorkerStatus("complete", dirty=5, ready=1, nbd_uri="nbd://x").to_nv(),
    ]
    status = NV()
    control.ResourceStatus(
        "r0", role="primary", workerpid=7, worker=control.WorkerStatus("degraded", dirty=1)
    ).add_to(status, 0)
    control.RoleResult("r1", 1, "init", "nope").add_to(status, 1)
    msgs.append(status)
    return [m.encode() for m in msgs]


VALID = valid_encodings()


@st.composite
def mutated_valid(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete", "splice"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[i] = draw(st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF]))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        else:
            data[i:i] = draw(st.sampled_from(VALID))[: draw(st.integers(8, 64))]
    return bytes(data)


def decode_and_parse(data: bytes) -> None:
    nv = call(NV.decode, data, allowed=NVError)
    if isinstance(nv, NV):
        every_parser(nv)
    loose = call(NV.decode, data, allow_duplicates=True, allowed=NVError)
    if isinstance(loose, NV):
        every_parser(loose)


@fuzz("bytes_everywhere")
@given(st.binary(max_size=300))
def test_arbitrary_bytes_through_nv_decode_into_every_parser(data: bytes) -> None:
    decode_and_parse(data)


@fuzz("mutated_valid")
@given(mutated_valid())
def test_mutated_valid_messages_into_every_parser(data: bytes) -> None:
    decode_and_parse(data)


def test_valid_messages_parse() -> None:
    for data in VALID:
        every_parser(NV.decode(data))
