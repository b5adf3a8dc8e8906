"""Control (hastctl <-> hastd) and parent <-> worker messages, sans-IO.

Every message is an nv list carried in a frame (spec 6.2), exactly as on the
replication connections.  This module only builds and checks nv lists; the
daemon and hastctl move them over sockets.

hastctl -> hastd (spec 2.3)::

    {cmd: uint8 1 SETROLE | 2 STATUS, [role: uint8 1|2|3], resource0, resource1, ...: string}

``resource0 == "all"`` means every configured resource.  hastd answers::

    {[error: int16 2 invalid request | 4 unimplemented]}          request-level failure
    {resource<i>: string, error<i>: int16 (0 ok, 1 no such resource),
     role<i>: string (SETROLE: the role *before* the change; STATUS: the role),
     STATUS only: provname<i>, localpath<i>, remoteaddr<i>, [sourceaddr<i>],
                  replication<i>, checksum<i>, compression<i>: string,
                  workerpid<i>: int32,
                  + every field the worker returned to CONTROL_STATUS, suffixed <i>}

parent -> worker, on the ``ctrl`` socketpair (docs/architecture.md)::

    {cmd: uint8 10 CONTROL_STATUS}   -> {error: int16 0, status: string, dirty: uint64, ...}
    {cmd: uint8 11 CONTROL_RELOAD, remoteaddr, sourceaddr: string, replication,
     checksum, compression, timeout: int32, exec: string, metaflush: int32}
                                     -> {error: int16}

worker -> parent, on the ``event`` socketpair::

    {event: uint8 1..6}              -> {error: int16 0} once the hook is launched

primary worker -> parent, on the ``conn`` socketpair::

    {cmd: uint8 1}                   -> {error: int16 errno} (+ the connected
                                        descriptor as SCM_RIGHTS when error is 0)

Rules: builders never fail on valid input; parsers raise
:class:`ControlRequestError` (server side, carries the control error to
answer with) or :class:`~pyhast.errors.ProtocolError` (anything else) and
nothing else.  Integer status fields are read whatever integer type the
sender used, so a worker may widen a counter without breaking hastctl.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Final

from pyhast.enums import ControlCmd, ControlError, Event, Role
from pyhast.errors import NVError, ProtocolError
from pyhast.wire.nv import NV, NVType, NVValue

__all__ = [
    "CONN_CONNECT",
    "CONTROL_RELOAD",
    "CONTROL_STATUS",
    "WORKER_INT_FIELDS",
    "WORKER_STR_FIELDS",
    "ControlReply",
    "ControlRequest",
    "ControlRequestError",
    "ReloadRequest",
    "ResourceStatus",
    "RoleResult",
    "WorkerStatus",
    "add_value",
    "conn_reply",
    "conn_request",
    "copy_fields",
    "error_reply",
    "event_ack",
    "event_message",
    "parse_conn_reply",
    "parse_conn_request",
    "parse_error",
    "parse_event",
    "parse_event_ack",
    "parse_reply",
    "parse_worker_cmd",
    "worker_status_request",
]

#: parent -> worker: report status (FreeBSD's CONTROL_STATUS).
CONTROL_STATUS: Final = 10
#: parent -> worker: apply changed settings (FreeBSD's CONTROL_RELOAD).
CONTROL_RELOAD: Final = 11
#: primary worker -> parent: open a connection to the remote node.
CONN_CONNECT: Final = 1

#: "all" in resource0 selects every configured resource.
ALL: Final = "all"


# --------------------------------------------------------------------------
# Generic helpers


def add_value(nv: NV, name: str, type_: NVType, value: NVValue) -> None:
    """Append ``value`` as an element of ``type_`` (the inverse of iterating an NV)."""
    if type_ is NVType.STRING:
        if not isinstance(value, str):
            raise TypeError(f"Field {name!r} must be a string.")
        nv.add_string(name, value)
    elif type_ is NVType.UINT8_ARRAY:
        if not isinstance(value, bytes | bytearray):
            raise TypeError(f"Field {name!r} must be bytes.")
        nv.add_uint8_array(name, value)
    elif type_.is_array:
        if not isinstance(value, tuple):
            raise TypeError(f"Field {name!r} must be a tuple of integers.")
        nv.add_array(name, type_, value)
    else:
        if not isinstance(value, int):
            raise TypeError(f"Field {name!r} must be an integer.")
        _SCALAR_ADDERS[type_](nv, name, value)


_SCALAR_ADDERS: Final[dict[NVType, Callable[[NV, str, int], None]]] = {
    NVType.INT8: NV.add_int8,
    NVType.UINT8: NV.add_uint8,
    NVType.INT16: NV.add_int16,
    NVType.UINT16: NV.add_uint16,
    NVType.INT32: NV.add_int32,
    NVType.UINT32: NV.add_uint32,
    NVType.INT64: NV.add_int64,
    NVType.UINT64: NV.add_uint64,
}


def copy_fields(dst: NV, src: NV, *, suffix: str = "", skip: Iterable[str] = ()) -> None:
    """Append every field of ``src`` (types kept) to ``dst`` as ``<name><suffix>``.

    Used by the parent to pass a worker's status reply on to hastctl; fields
    in ``skip`` (and repeated names) are left out.
    """
    skipped = set(skip)
    for name, type_, value in src:
        if name in skipped:
            continue
        skipped.add(name)
        add_value(dst, name + suffix, type_, value)


_SCALAR_GETTERS: Final[dict[NVType, Callable[[NV, str], int]]] = {
    NVType.INT8: NV.get_int8,
    NVType.UINT8: NV.get_uint8,
    NVType.INT16: NV.get_int16,
    NVType.UINT16: NV.get_uint16,
    NVType.INT32: NV.get_int32,
    NVType.UINT32: NV.get_uint32,
    NVType.INT64: NV.get_int64,
    NVType.UINT64: NV.get_uint64,
}


def _get_int(nv: NV, name: str, default: int | None = None) -> int | None:
    """An integer field of any integer type, or ``default`` when absent."""
    type_ = nv.type_of(name)
    if type_ is None:
        return default
    getter = _SCALAR_GETTERS.get(type_)
    if getter is None:
        raise NVError(f"Field {name!r} is {type_.label}, expected an integer.")
    return getter(nv, name)


def _get_str(nv: NV, name: str) -> str | None:
    return nv.get_string(name, default=None)


def error_reply(error: int) -> NV:
    """``{error: int16}``: an ack, a worker's reply, or a request-level control error."""
    nv = NV()
    nv.add_int16("error", error)
    return nv


def parse_error(nv: NV) -> int:
    """The ``error`` field (0 when absent, as FreeBSD's getter would give)."""
    try:
        return nv.get_int16("error", default=0)
    except NVError as exc:
        raise ProtocolError(f"Invalid reply: {exc}") from exc


# --------------------------------------------------------------------------
# hastctl -> hastd


class ControlRequestError(ProtocolError):
    """A control request hastd refuses as a whole; reply ``{error: code}``."""

    def __init__(self, message: str, code: ControlError) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class ControlRequest:
    """One hastctl request: set the role of, or get the status of, some resources.

    ``resources`` empty or ``("all",)`` means every resource.  ``role`` is
    set only for SETROLE.
    """

    cmd: ControlCmd
    resources: tuple[str, ...]
    role: Role | None = None
    #: pyhast: leave primary even while the device is held open (``force: uint8``).
    force: bool = False

    @classmethod
    def set_role(
        cls, role: Role, resources: Iterable[str], *, force: bool = False
    ) -> ControlRequest:
        return cls(ControlCmd.SETROLE, tuple(resources), role, force)

    @classmethod
    def status(cls, resources: Iterable[str] = ()) -> ControlRequest:
        return cls(ControlCmd.STATUS, tuple(resources))

    @property
    def all(self) -> bool:
        """True when the request names every resource (``resource0`` is "all")."""
        return not self.resources or self.resources[0] == ALL

    def to_nv(self) -> NV:
        """The request as hastctl sends it (an empty selection is sent as "all")."""
        nv = NV()
        nv.add_uint8("cmd", int(self.cmd))
        if self.cmd is ControlCmd.SETROLE:
            if self.role is None:
                raise ValueError("A set-role request needs a role.")
            nv.add_uint8("role", int(self.role))
            if self.force:
                nv.add_uint8("force", 1)
        for i, name in enumerate(self.resources or (ALL,)):
            nv.add_string(f"resource{i}", name)
        return nv

    @classmethod
    def from_nv(cls, nv: NV) -> ControlRequest:
        """Validate a received request.

        Raises :class:`ControlRequestError` with ``INVALID_REQUEST`` (no or bad
        ``cmd``, no ``resource0``, bad role) or ``UNIMPLEMENTED`` (unknown
        command).
        """
        try:
            raw_cmd = nv.get_uint8("cmd", default=0)
            if raw_cmd == 0:
                raise ControlRequestError(
                    "Control header is missing 'cmd' field.", ControlError.INVALID_REQUEST
                )
            names: list[str] = []
            while True:
                name = nv.get_string(f"resource{len(names)}", default=None)
                if name is None:
                    break
                names.append(name)
            if not names:
                raise ControlRequestError(
                    "Control header is missing 'resource0' field.", ControlError.INVALID_REQUEST
                )
            try:
                cmd = ControlCmd(raw_cmd)
            except ValueError:
                cmd = ControlCmd.UNKNOWN
            if cmd is ControlCmd.UNKNOWN:
                raise ControlRequestError(
                    f"Invalid command received ({raw_cmd}).", ControlError.UNIMPLEMENTED
                )
            role: Role | None = None
            if cmd is ControlCmd.SETROLE:
                raw_role = nv.get_uint8("role", default=0)
                if raw_role not in (Role.INIT, Role.PRIMARY, Role.SECONDARY):
                    raise ControlRequestError(
                        f"Invalid role received ({raw_role}).", ControlError.INVALID_REQUEST
                    )
                role = Role(raw_role)
            force = nv.get_uint8("force", default=0) != 0
        except NVError as exc:
            raise ControlRequestError(
                f"Invalid control header: {exc}", ControlError.INVALID_REQUEST
            ) from exc
        return cls(cmd, tuple(names), role, force)


# --------------------------------------------------------------------------
# hastd -> hastctl

#: Worker status fields that are strings.
WORKER_STR_FIELDS: Final = ("status", "nbd_uri", "devpath", "syncsrc")
#: Worker status fields that are integers, in the order ``hastctl list`` uses them.
WORKER_INT_FIELDS: Final = (
    "dirty",
    "extentsize",
    "keepdirty",
    "stat_read",
    "stat_write",
    "stat_delete",
    "stat_flush",
    "stat_activemap_update",
    "stat_read_error",
    "stat_write_error",
    "stat_delete_error",
    "stat_flush_error",
    "idle_queue_size",
    "local_queue_size",
    "send_queue_size",
    "recv_queue_size",
    "done_queue_size",
    "sync_left",
    "sync_rate",
    "localcnt",
    "remotecnt",
    "ready",
)

_WORKER_UINT32: Final = frozenset({"extentsize", "keepdirty"})
_WORKER_UINT8: Final = frozenset({"ready"})


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    """What a running worker reports to CONTROL_STATUS (spec 2.3 + pyhast's fields).

    ``status`` is "complete" or "degraded"; the integer fields are None when
    the worker did not send them.  ``nbd_uri`` (primary) says where the
    device is served; ``ready`` is 1 once the worker serves I/O.
    """

    status: str
    dirty: int | None = None
    extentsize: int | None = None
    keepdirty: int | None = None
    stat_read: int | None = None
    stat_write: int | None = None
    stat_delete: int | None = None
    stat_flush: int | None = None
    stat_activemap_update: int | None = None
    stat_read_error: int | None = None
    stat_write_error: int | None = None
    stat_delete_error: int | None = None
    stat_flush_error: int | None = None
    idle_queue_size: int | None = None
    local_queue_size: int | None = None
    send_queue_size: int | None = None
    recv_queue_size: int | None = None
    done_queue_size: int | None = None
    nbd_uri: str | None = None
    devpath: str | None = None
    syncsrc: str | None = None
    sync_left: int | None = None
    sync_rate: int | None = None
    localcnt: int | None = None
    remotecnt: int | None = None
    ready: int | None = None

    @property
    def serving(self) -> bool:
        """True once the worker says it serves I/O (``ready`` or an ``nbd_uri``).

        A primary reports ``nbd_uri`` only once its start-up is over (the
        device file created, or its creation failed and was logged).
        """
        return bool(self.ready) or bool(self.nbd_uri)

    def add_to(self, nv: NV, suffix: str = "") -> None:
        """Append the fields that are set (worker reply: ``suffix=""``)."""
        nv.add_string("status" + suffix, self.status)
        for name in WORKER_INT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if name in _WORKER_UINT8:
                nv.add_uint8(name + suffix, value)
            elif name in _WORKER_UINT32:
                nv.add_uint32(name + suffix, value)
            else:
                nv.add_uint64(name + suffix, value)
        for name in WORKER_STR_FIELDS[1:]:
            value = getattr(self, name)
            if value is not None:
                nv.add_string(name + suffix, value)

    def to_nv(self) -> NV:
        """The worker's reply to CONTROL_STATUS, ``error: int16 0`` included."""
        nv = error_reply(0)
        self.add_to(nv)
        return nv

    @classmethod
    def from_nv(cls, nv: NV, suffix: str = "") -> WorkerStatus | None:
        """Parse the fields (None when there is no ``status`` field: no worker)."""
        try:
            status = _get_str(nv, "status" + suffix)
            if status is None:
                return None
            ints = {name: _get_int(nv, name + suffix) for name in WORKER_INT_FIELDS}
            return cls(
                status=status,
                nbd_uri=_get_str(nv, "nbd_uri" + suffix),
                devpath=_get_str(nv, "devpath" + suffix),
                syncsrc=_get_str(nv, "syncsrc" + suffix),
                **ints,
            )
        except NVError as exc:
            raise ProtocolError(f"Invalid worker status: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class RoleResult:
    """One resource of a SETROLE reply; ``role`` is the role before the change."""

    name: str
    error: int = 0
    role: str | None = None
    #: pyhast: why the change was refused, as a sentence (``errmsg<i>``).
    errmsg: str | None = None

    def add_to(self, nv: NV, i: int) -> None:
        nv.add_string(f"resource{i}", self.name)
        nv.add_int16(f"error{i}", self.error)
        if self.role is not None:
            nv.add_string(f"role{i}", self.role)
        if self.errmsg is not None:
            nv.add_string(f"errmsg{i}", self.errmsg)

    @classmethod
    def from_nv(cls, nv: NV, i: int) -> RoleResult | None:
        name = _get_str(nv, f"resource{i}")
        if name is None:
            return None
        return cls(
            name,
            nv.get_int16(f"error{i}", default=0),
            _get_str(nv, f"role{i}"),
            _get_str(nv, f"errmsg{i}"),
        )


@dataclasses.dataclass(frozen=True)
class ResourceStatus:
    """One resource of a STATUS reply.

    With ``error`` non-zero only ``name`` is meaningful.  ``worker`` is None
    when no worker runs (or it did not answer in time).
    """

    name: str
    error: int = 0
    provname: str = ""
    localpath: str = ""
    remoteaddr: str = ""
    sourceaddr: str | None = None
    replication: str = ""
    checksum: str = ""
    compression: str = ""
    role: str = ""
    workerpid: int = 0
    worker: WorkerStatus | None = None

    def add_to(self, nv: NV, i: int) -> None:
        """Append this resource as entry ``i`` (worker fields included when set)."""
        nv.add_string(f"resource{i}", self.name)
        nv.add_int16(f"error{i}", self.error)
        if self.error:
            return
        nv.add_string(f"provname{i}", self.provname)
        nv.add_string(f"localpath{i}", self.localpath)
        nv.add_string(f"remoteaddr{i}", self.remoteaddr)
        if self.sourceaddr:
            nv.add_string(f"sourceaddr{i}", self.sourceaddr)
        nv.add_string(f"replication{i}", self.replication)
        nv.add_string(f"checksum{i}", self.checksum)
        nv.add_string(f"compression{i}", self.compression)
        nv.add_string(f"role{i}", self.role)
        nv.add_int32(f"workerpid{i}", self.workerpid)
        if self.worker is not None:
            self.worker.add_to(nv, str(i))

    @classmethod
    def from_nv(cls, nv: NV, i: int) -> ResourceStatus | None:
        """Entry ``i`` of a reply, or None after the last entry."""
        name = _get_str(nv, f"resource{i}")
        if name is None:
            return None
        error = nv.get_int16(f"error{i}", default=0)
        if error:
            return cls(name, error)
        return cls(
            name=name,
            provname=nv.get_string(f"provname{i}", default=""),
            localpath=nv.get_string(f"localpath{i}", default=""),
            remoteaddr=nv.get_string(f"remoteaddr{i}", default=""),
            sourceaddr=_get_str(nv, f"sourceaddr{i}"),
            replication=nv.get_string(f"replication{i}", default=""),
            checksum=nv.get_string(f"checksum{i}", default=""),
            compression=nv.get_string(f"compression{i}", default=""),
            role=nv.get_string(f"role{i}", default=""),
            workerpid=_get_int(nv, f"workerpid{i}", 0) or 0,
            worker=WorkerStatus.from_nv(nv, str(i)),
        )

    def to_json(self) -> dict[str, object]:
        """A JSON-ready mapping with typed values (None for what is unknown)."""
        out: dict[str, object] = {"name": self.name, "error": self.error}
        if self.error:
            return out
        out.update(
            role=self.role,
            status=None if self.worker is None else self.worker.status,
            provname=self.provname,
            localpath=self.localpath,
            remoteaddr=self.remoteaddr,
            sourceaddr=self.sourceaddr,
            replication=self.replication,
            checksum=self.checksum,
            compression=self.compression,
            workerpid=self.workerpid,
        )
        worker = self.worker
        for field in WORKER_INT_FIELDS:
            out[field] = None if worker is None else getattr(worker, field)
        for field in WORKER_STR_FIELDS[1:]:
            out[field] = None if worker is None else getattr(worker, field)
        return out


@dataclasses.dataclass(frozen=True)
class ControlReply:
    """hastd's reply as hastctl reads it.

    ``error`` is the request-level error (0: none); ``roles`` is filled for
    SETROLE, ``statuses`` for STATUS.
    """

    error: int = 0
    roles: tuple[RoleResult, ...] = ()
    statuses: tuple[ResourceStatus, ...] = ()

    @property
    def first_error(self) -> int:
        """The first per-resource error number (hastctl's exit code), 0 if none."""
        errors = [r.error for r in self.roles] + [s.error for s in self.statuses]
        return next((e for e in errors if e), 0)


def parse_reply(nv: NV, cmd: ControlCmd) -> ControlReply:
    """Read hastd's reply to a ``cmd`` request (ProtocolError if it is malformed)."""
    try:
        error = nv.get_int16("error", default=0)
        if error:
            return ControlReply(error=error)
        if cmd is ControlCmd.SETROLE:
            roles: list[RoleResult] = []
            while (entry := RoleResult.from_nv(nv, len(roles))) is not None:
                roles.append(entry)
            return ControlReply(roles=tuple(roles))
        statuses: list[ResourceStatus] = []
        while (status := ResourceStatus.from_nv(nv, len(statuses))) is not None:
            statuses.append(status)
        return ControlReply(statuses=tuple(statuses))
    except NVError as exc:
        raise ProtocolError(f"Invalid reply from hastd: {exc}") from exc


# --------------------------------------------------------------------------
# parent -> worker (ctrl)


def worker_status_request() -> NV:
    """``{cmd: uint8 CONTROL_STATUS}``."""
    nv = NV()
    nv.add_uint8("cmd", CONTROL_STATUS)
    return nv


def parse_worker_cmd(nv: NV) -> int:
    """The ``cmd`` of a ctrl message (0 when missing), for the worker."""
    try:
        return nv.get_uint8("cmd", default=0)
    except NVError as exc:
        raise ProtocolError(f"Invalid control message: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class ReloadRequest:
    """CONTROL_RELOAD: the settings a running primary applies without restart.

    ``sourceaddr`` and ``exec`` are "" when not configured.  Enumerations
    travel as their numbers (Replication, Checksum, Compression);
    ``metaflush`` is 0 or 1.
    """

    remoteaddr: str
    sourceaddr: str
    replication: int
    checksum: int
    compression: int
    timeout: int
    exec: str
    metaflush: int

    def to_nv(self) -> NV:
        nv = NV()
        nv.add_uint8("cmd", CONTROL_RELOAD)
        nv.add_string("remoteaddr", self.remoteaddr)
        nv.add_string("sourceaddr", self.sourceaddr)
        nv.add_int32("replication", self.replication)
        nv.add_int32("checksum", self.checksum)
        nv.add_int32("compression", self.compression)
        nv.add_int32("timeout", self.timeout)
        nv.add_string("exec", self.exec)
        nv.add_int32("metaflush", self.metaflush)
        return nv

    @classmethod
    def from_nv(cls, nv: NV) -> ReloadRequest:
        try:
            return cls(
                remoteaddr=nv.get_string("remoteaddr"),
                sourceaddr=nv.get_string("sourceaddr", default=""),
                replication=nv.get_int32("replication"),
                checksum=nv.get_int32("checksum"),
                compression=nv.get_int32("compression"),
                timeout=nv.get_int32("timeout"),
                exec=nv.get_string("exec", default=""),
                metaflush=nv.get_int32("metaflush"),
            )
        except NVError as exc:
            raise ProtocolError(f"Invalid reload message: {exc}") from exc


# --------------------------------------------------------------------------
# worker -> parent (event, conn)


def event_message(event: Event) -> NV:
    """``{event: uint8}``, sent by a worker."""
    nv = NV()
    nv.add_uint8("event", int(event))
    return nv


def parse_event(nv: NV) -> Event:
    """The event of a worker's message (ProtocolError if missing or unknown)."""
    try:
        raw = nv.get_uint8("event")
    except NVError as exc:
        raise ProtocolError(f"Invalid event message: {exc}") from exc
    try:
        event = Event(raw)
    except ValueError:
        raise ProtocolError(f"Unknown event {raw}.") from None
    if event is Event.NONE:
        raise ProtocolError("Unknown event 0.")
    return event


def event_ack(error: int = 0) -> NV:
    """The parent's answer to an event, once the hook is launched."""
    return error_reply(error)


def parse_event_ack(nv: NV) -> int:
    return parse_error(nv)


def conn_request() -> NV:
    """``{cmd: uint8 1}``: a primary worker asks for a connection to its remote."""
    nv = NV()
    nv.add_uint8("cmd", CONN_CONNECT)
    return nv


def parse_conn_request(nv: NV) -> None:
    """Check a conn request (ProtocolError unless it is ``{cmd: 1}``)."""
    try:
        cmd = nv.get_uint8("cmd")
    except NVError as exc:
        raise ProtocolError(f"Invalid connection request: {exc}") from exc
    if cmd != CONN_CONNECT:
        raise ProtocolError(f"Unknown connection request command {cmd}.")


def conn_reply(error: int) -> NV:
    """``{error: int16 errno}``; the descriptor travels with it when error is 0."""
    return error_reply(error)


def parse_conn_reply(nv: NV) -> int:
    return parse_error(nv)
