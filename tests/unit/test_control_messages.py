"""Control and parent <-> worker messages, renderers, reload plans, resource JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pyhast.cli import cmd_list, cmd_status
from pyhast.config import HastConfig, ResourceConfig
from pyhast.daemon.reload import needs_reload, needs_restart, plan_reload, reload_request
from pyhast.daemon.resource_json import resource_from_json, resource_to_json
from pyhast.enums import Checksum, Compression, ControlCmd, ControlError, Event, Replication, Role
from pyhast.errors import ProtocolError
from pyhast.node import NodeIdentity
from pyhast.wire.control import (
    CONTROL_RELOAD,
    CONTROL_STATUS,
    ControlReply,
    ControlRequest,
    ControlRequestError,
    ReloadRequest,
    ResourceStatus,
    RoleResult,
    WorkerStatus,
    conn_reply,
    conn_request,
    copy_fields,
    error_reply,
    event_ack,
    event_message,
    parse_conn_reply,
    parse_conn_request,
    parse_error,
    parse_event,
    parse_reply,
    parse_worker_cmd,
    worker_status_request,
)
from pyhast.wire.frame import NEED_DATA, Frame, FrameDecoder, encode_frame
from pyhast.wire.nv import NV, NVType


def roundtrip(nv: NV) -> NV:
    """Through the real frame codec, as on a socket."""
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode_frame(nv)))
    frame = decoder.next_frame()
    assert frame is not NEED_DATA and isinstance(frame, Frame)
    return frame.nv


def fields(nv: NV) -> list[tuple[str, NVType, object]]:
    return list(nv)


# --------------------------------------------------------------------------
# hastctl -> hastd


def test_setrole_request_wire_fields() -> None:
    nv = ControlRequest.set_role(Role.SECONDARY, ["r0", "r1"]).to_nv()
    assert fields(nv) == [
        ("cmd", NVType.UINT8, 1),
        ("role", NVType.UINT8, 3),
        ("resource0", NVType.STRING, "r0"),
        ("resource1", NVType.STRING, "r1"),
    ]
    req = ControlRequest.from_nv(roundtrip(nv))
    assert req == ControlRequest(ControlCmd.SETROLE, ("r0", "r1"), Role.SECONDARY)
    assert not req.all


def test_status_request_defaults_to_all() -> None:
    nv = ControlRequest.status().to_nv()
    assert fields(nv) == [("cmd", NVType.UINT8, 2), ("resource0", NVType.STRING, "all")]
    req = ControlRequest.from_nv(roundtrip(nv))
    assert req.cmd is ControlCmd.STATUS and req.all and req.role is None
    assert ControlRequest.from_nv(ControlRequest.status(["all", "x"]).to_nv()).all


def _nv(**items: tuple[NVType, object]) -> NV:
    nv = NV()
    for name, (t, value) in items.items():
        if t is NVType.STRING:
            nv.add_string(name, str(value))
        elif t is NVType.UINT8:
            nv.add_uint8(name, int(value))  # type: ignore[call-overload]
        elif t is NVType.UINT32:
            nv.add_uint32(name, int(value))  # type: ignore[call-overload]
    return nv


@pytest.mark.parametrize(
    ("nv", "code"),
    [
        (_nv(resource0=(NVType.STRING, "r0")), ControlError.INVALID_REQUEST),
        (_nv(cmd=(NVType.UINT8, 2)), ControlError.INVALID_REQUEST),
        (_nv(cmd=(NVType.UINT8, 9), resource0=(NVType.STRING, "r0")), ControlError.UNIMPLEMENTED),
        (_nv(cmd=(NVType.UINT8, 1), resource0=(NVType.STRING, "r0")), ControlError.INVALID_REQUEST),
        (
            _nv(cmd=(NVType.UINT8, 1), role=(NVType.UINT8, 7), resource0=(NVType.STRING, "r0")),
            ControlError.INVALID_REQUEST,
        ),
        (
            _nv(cmd=(NVType.UINT32, 2), resource0=(NVType.STRING, "r0")),
            ControlError.INVALID_REQUEST,
        ),
    ],
    ids=["no-cmd", "no-resource0", "unknown-cmd", "no-role", "bad-role", "cmd-wrong-type"],
)
def test_invalid_requests(nv: NV, code: ControlError) -> None:
    with pytest.raises(ControlRequestError) as info:
        ControlRequest.from_nv(nv)
    assert info.value.code is code
    assert fields(error_reply(int(code))) == [("error", NVType.INT16, int(code))]


def test_setrole_reply() -> None:
    nv = NV()
    RoleResult("r0", role="init").add_to(nv, 0)
    RoleResult("nope", error=1).add_to(nv, 1)
    assert fields(nv) == [
        ("resource0", NVType.STRING, "r0"),
        ("error0", NVType.INT16, 0),
        ("role0", NVType.STRING, "init"),
        ("resource1", NVType.STRING, "nope"),
        ("error1", NVType.INT16, 1),
    ]
    reply = parse_reply(roundtrip(nv), ControlCmd.SETROLE)
    assert reply.roles == (RoleResult("r0", 0, "init"), RoleResult("nope", 1, None))
    assert reply.first_error == 1
    assert parse_reply(error_reply(2), ControlCmd.SETROLE) == ControlReply(error=2)


WORKER = WorkerStatus(
    status="complete",
    dirty=4194304,
    extentsize=2097152,
    keepdirty=64,
    stat_read=10,
    stat_write=20,
    stat_delete=1,
    stat_flush=2,
    stat_activemap_update=3,
    stat_read_error=0,
    stat_write_error=1,
    stat_delete_error=0,
    stat_flush_error=0,
    idle_queue_size=250,
    local_queue_size=1,
    send_queue_size=2,
    recv_queue_size=3,
    done_queue_size=0,
    nbd_uri="nbd+unix:///r0?socket=/var/run/hast/r0.nbd",
    syncsrc="primary",
    sync_left=1048576,
    sync_rate=10485760,
    localcnt=3,
    remotecnt=2,
)

PRIMARY = ResourceStatus(
    name="r0",
    provname="r0",
    localpath="/dev/ada1",
    remoteaddr="tcp4://192.0.2.12:8457",
    sourceaddr="tcp4://192.0.2.11",
    replication="memsync",
    checksum="crc32",
    compression="lzf",
    role="primary",
    workerpid=4242,
    worker=WORKER,
)
INIT = ResourceStatus(
    name="vol1",
    provname="data",
    localpath="/dev/ada2",
    remoteaddr="192.0.2.12",
    replication="fullsync",
    checksum="none",
    compression="hole",
    role="init",
)


def test_status_reply_roundtrip() -> None:
    nv = NV()
    PRIMARY.add_to(nv, 0)
    INIT.add_to(nv, 1)
    ResourceStatus("nope", error=1).add_to(nv, 2)
    assert nv.type_of("workerpid0") is NVType.INT32
    assert nv.type_of("extentsize0") is NVType.UINT32
    assert nv.type_of("dirty0") is NVType.UINT64
    assert "sourceaddr1" not in nv and "status1" not in nv
    reply = parse_reply(roundtrip(nv), ControlCmd.STATUS)
    assert reply.statuses == (PRIMARY, INIT, ResourceStatus("nope", error=1))
    assert reply.first_error == 1


def test_worker_status_reply_and_copy_with_suffix() -> None:
    reply = WorkerStatus(status="degraded", dirty=0, extentsize=2097152, keepdirty=0).to_nv()
    reply.add_uint32("stat_read", 7)  # a worker may pick another integer width
    reply.add_string("future_field", "kept")
    assert reply.get_int16("error") == 0
    out = NV()
    INIT.add_to(out, 3)
    copy_fields(out, roundtrip(reply), suffix="3", skip=("error",))
    assert "error3" in out and out.get_int16("error3") == 0  # from INIT.add_to, not the worker
    assert out.type_of("extentsize3") is NVType.UINT32
    assert out.get_string("future_field3") == "kept"
    status = ResourceStatus.from_nv(out, 3)
    assert status is not None and status.worker is not None
    assert status.worker.status == "degraded"
    assert status.worker.stat_read == 7
    assert status.worker.stat_write is None
    assert not status.worker.serving
    assert WORKER.serving
    assert WorkerStatus("complete", ready=1).serving


def test_worker_ctrl_messages() -> None:
    assert fields(worker_status_request()) == [("cmd", NVType.UINT8, CONTROL_STATUS)]
    assert parse_worker_cmd(worker_status_request()) == CONTROL_STATUS
    req = ReloadRequest(
        remoteaddr="tcp4://10.0.0.2:8457",
        sourceaddr="",
        replication=int(Replication.ASYNC),
        checksum=int(Checksum.SHA256),
        compression=int(Compression.NONE),
        timeout=30,
        exec="/usr/local/libexec/hast-hook",
        metaflush=0,
    )
    nv = req.to_nv()
    assert fields(nv) == [
        ("cmd", NVType.UINT8, CONTROL_RELOAD),
        ("remoteaddr", NVType.STRING, "tcp4://10.0.0.2:8457"),
        ("sourceaddr", NVType.STRING, ""),
        ("replication", NVType.INT32, 2),
        ("checksum", NVType.INT32, 2),
        ("compression", NVType.INT32, 0),
        ("timeout", NVType.INT32, 30),
        ("exec", NVType.STRING, "/usr/local/libexec/hast-hook"),
        ("metaflush", NVType.INT32, 0),
    ]
    assert ReloadRequest.from_nv(roundtrip(nv)) == req
    assert parse_worker_cmd(nv) == CONTROL_RELOAD
    with pytest.raises(ProtocolError):
        ReloadRequest.from_nv(worker_status_request())
    assert parse_error(error_reply(5)) == 5
    assert parse_error(NV()) == 0


@pytest.mark.parametrize("event", [e for e in Event if e is not Event.NONE])
def test_event_messages(event: Event) -> None:
    nv = event_message(event)
    assert fields(nv) == [("event", NVType.UINT8, int(event))]
    assert parse_event(roundtrip(nv)) is event
    assert fields(event_ack()) == [("error", NVType.INT16, 0)]


@pytest.mark.parametrize("raw", [0, 7, 255])
def test_unknown_events(raw: int) -> None:
    nv = NV()
    nv.add_uint8("event", raw)
    with pytest.raises(ProtocolError):
        parse_event(nv)
    with pytest.raises(ProtocolError):
        parse_event(NV())


def test_conn_messages() -> None:
    assert fields(conn_request()) == [("cmd", NVType.UINT8, 1)]
    parse_conn_request(roundtrip(conn_request()))
    bad = NV()
    bad.add_uint8("cmd", 2)
    with pytest.raises(ProtocolError):
        parse_conn_request(bad)
    assert fields(conn_reply(111)) == [("error", NVType.INT16, 111)]
    assert parse_conn_reply(conn_reply(0)) == 0


# --------------------------------------------------------------------------
# Renderers (golden text)


def test_render_status_golden() -> None:
    text = cmd_status.render([PRIMARY, INIT, ResourceStatus("nope", error=1)])
    assert text == (
        "Name\tStatus\t Role\t\tComponents\n"
        "r0\tcomplete primary        /dev/ada1\ttcp4://192.0.2.12:8457\n"
        "vol1\t-        init           /dev/ada2\t192.0.2.12\n"
        "nope\tERR1\n"
    )
    assert cmd_status.render([]) == ""


def test_render_list_golden() -> None:
    text = cmd_list.render([PRIMARY, INIT, ResourceStatus("nope", error=1)])
    assert text == (
        "r0:\n"
        "  role: primary\n"
        "  provname: r0\n"
        "  localpath: /dev/ada1\n"
        "  extentsize: 2097152 (2.0MB)\n"
        "  keepdirty: 64\n"
        "  remoteaddr: tcp4://192.0.2.12:8457\n"
        "  sourceaddr: tcp4://192.0.2.11\n"
        "  replication: memsync\n"
        "  status: complete\n"
        "  workerpid: 4242\n"
        "  dirty: 4194304 (4.0MB)\n"
        "  nbd: nbd+unix:///r0?socket=/var/run/hast/r0.nbd\n"
        "  synchronization: 1048576 bytes left, 10MB/s\n"
        "  statistics:\n"
        "    reads: 10\n"
        "    writes: 20\n"
        "    deletes: 1\n"
        "    flushes: 2\n"
        "    activemap updates: 3\n"
        "    local errors: read: 0, write: 1, delete: 0, flush: 0\n"
        "    queues: local: 1, send: 2, recv: 3, done: 0, idle: 250\n"
        "vol1:\n"
        "  role: init\n"
        "  provname: data\n"
        "  localpath: /dev/ada2\n"
        "  extentsize: 0 (0B)\n"
        "  keepdirty: 0\n"
        "  remoteaddr: 192.0.2.12\n"
        "  replication: fullsync\n"
        "  dirty: 0 (0B)\n"
        "  statistics:\n"
        "    reads: 0\n"
        "    writes: 0\n"
        "    deletes: 0\n"
        "    flushes: 0\n"
        "    activemap updates: 0\n"
        "    local errors: read: 0, write: 0, delete: 0, flush: 0\n"
        "    queues: local: 0, send: 0, recv: 0, done: 0, idle: 0\n"
        "nope:\n"
        "  error: 1\n"
    )


def test_render_json_typed() -> None:
    doc = json.loads(cmd_status.render_json([PRIMARY, INIT, ResourceStatus("nope", error=1)]))
    r0, vol1, nope = doc["resources"]
    assert r0["name"] == "r0" and r0["role"] == "primary" and r0["status"] == "complete"
    assert r0["workerpid"] == 4242 and r0["dirty"] == 4194304 and r0["extentsize"] == 2097152
    assert r0["nbd_uri"] == WORKER.nbd_uri and r0["sync_left"] == 1048576
    assert r0["sourceaddr"] == "tcp4://192.0.2.11"
    assert vol1["status"] is None and vol1["nbd_uri"] is None and vol1["sourceaddr"] is None
    assert vol1["workerpid"] == 0 and vol1["error"] == 0
    assert nope == {"name": "nope", "error": 1}


# --------------------------------------------------------------------------
# Resource JSON and reload plans

RES = ResourceConfig(
    name="r0",
    provname="r0",
    localpath="/dev/ada1",
    remoteaddr="tcp4://192.0.2.12:8457",
    sourceaddr=None,
    replication=Replication.MEMSYNC,
    checksum=Checksum.CRC32,
    compression=Compression.LZF,
    timeout=20,
    exec="",
    metaflush=True,
)


def test_resource_json_roundtrip() -> None:
    text = resource_to_json(RES)
    assert json.loads(text)["replication"] == "memsync"
    assert resource_from_json(text) == RES
    other = dataclasses.replace(RES, sourceaddr="tcp4://192.0.2.11", metaflush=False, exec="/x")
    assert resource_from_json(resource_to_json(other)) == other


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"name": "r0"}',
        resource_to_json(RES).replace('"memsync"', '"sometimes"'),
        resource_to_json(RES).replace('"timeout":20', '"timeout":"20"'),
        resource_to_json(RES).replace('"metaflush":true', '"metaflush":1'),
        resource_to_json(RES).replace("}", ',"extra":1}'),
    ],
)
def test_resource_json_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        resource_from_json(text)


def _cfg(
    *resources: ResourceConfig, control: str = "uds:///c", listen: tuple[str, ...] = ("a",)
) -> HastConfig:
    return HastConfig(
        path="/etc/hast.conf",
        node=NodeIdentity("nodea", node="nodea"),
        control=control,
        pidfile="/p",
        listen=listen,
        resources={r.name: r for r in resources},
    )


@pytest.mark.parametrize(
    ("change", "role", "restart", "reload"),
    [
        ({"localpath": "/dev/ada9"}, Role.PRIMARY, True, False),
        ({"provname": "x"}, Role.INIT, True, False),
        ({"remoteaddr": "10.0.0.1"}, Role.INIT, True, False),
        ({"timeout": 5}, Role.SECONDARY, True, False),
        ({"metaflush": False}, Role.SECONDARY, True, False),
        ({"remoteaddr": "10.0.0.1"}, Role.PRIMARY, False, True),
        ({"sourceaddr": "10.0.0.3"}, Role.PRIMARY, False, True),
        ({"checksum": Checksum.SHA256}, Role.PRIMARY, False, True),
        ({"exec": "/hook"}, Role.PRIMARY, False, True),
        ({}, Role.PRIMARY, False, False),
        ({}, Role.SECONDARY, False, False),
    ],
)
def test_restart_or_reload(
    change: dict[str, object], role: Role, restart: bool, reload: bool
) -> None:
    new = dataclasses.replace(RES, **change)  # type: ignore[arg-type]
    assert needs_restart(RES, new, role) is restart
    assert needs_reload(RES, new, role) is reload


def test_plan_reload() -> None:
    r1 = dataclasses.replace(RES, name="r1")
    r2 = dataclasses.replace(RES, name="r2")
    r3 = dataclasses.replace(RES, name="r3")
    old = _cfg(RES, r1, r2, listen=("a", "b"))
    new = _cfg(
        dataclasses.replace(RES, timeout=9),
        dataclasses.replace(r2, timeout=9),
        r3,
        control="uds:///d",
        listen=("b", "c"),
    )
    plan = plan_reload(old, new, {"r0": Role.SECONDARY, "r1": Role.INIT, "r2": Role.PRIMARY})
    assert plan.control_changed
    assert plan.listen_add == ("c",)
    assert plan.listen_remove == ("a",)
    assert plan.removed == ("r1",)
    assert plan.added == ("r3",)
    assert plan.restart == ("r0",)
    assert plan.reload == ("r2",)
    assert plan_reload(old, old, {}).restart == ()
    msg = reload_request(dataclasses.replace(r2, timeout=9, sourceaddr=None))
    assert msg.timeout == 9 and msg.sourceaddr == "" and msg.metaflush == 1
    assert msg.replication == int(Replication.MEMSYNC)
