"""SIGHUP reload decisions (spec 3.5), as pure functions.

The parent re-reads the configuration (non-fatally) and hands the old and new
:class:`~pyhast.config.HastConfig` plus the current roles to
:func:`plan_reload`; the resulting :class:`ReloadPlan` says what to do, and
the parent does it.  The rules:

* a new control address -> open the new control socket (then close the old);
* listen addresses are diffed: kept ones stay open, new ones are opened,
  removed ones are closed;
* a resource gone from the file -> role init, then dropped;
* a new resource -> appears in role init;
* provider name or local path changed -> full restart (role init, then the
  previous role), whatever the role;
* any change of remote, source, replication, checksum, compression, timeout,
  exec or metaflush -> restart when the role is init or secondary, and a
  CONTROL_RELOAD message to the running worker when it is primary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from pyhast.config import HastConfig, ResourceConfig
from pyhast.enums import Role
from pyhast.wire.control import ReloadRequest

__all__ = ["ReloadPlan", "needs_reload", "needs_restart", "plan_reload", "reload_request"]

#: Settings a running primary can take without a restart.
RELOADABLE = (
    "remoteaddr",
    "sourceaddr",
    "replication",
    "checksum",
    "compression",
    "timeout",
    "exec",
    "metaflush",
)


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """What a reload must do; every tuple is in configuration order."""

    control_changed: bool = False
    listen_add: tuple[str, ...] = ()
    listen_remove: tuple[str, ...] = ()
    #: Resources to set to init and drop.
    removed: tuple[str, ...] = ()
    #: Resources that appear (role init).
    added: tuple[str, ...] = ()
    #: Resources to restart: init, swap the configuration, previous role.
    restart: tuple[str, ...] = ()
    #: Primary resources whose worker gets a CONTROL_RELOAD.
    reload: tuple[str, ...] = ()


def _differs(old: ResourceConfig, new: ResourceConfig, fields: tuple[str, ...]) -> bool:
    return any(getattr(old, f) != getattr(new, f) for f in fields)


def needs_restart(old: ResourceConfig, new: ResourceConfig, role: Role) -> bool:
    """True if the resource must go through init and back to ``role``."""
    if _differs(old, new, ("provname", "localpath")):
        return True
    return role is not Role.PRIMARY and _differs(old, new, RELOADABLE)


def needs_reload(old: ResourceConfig, new: ResourceConfig, role: Role) -> bool:
    """True if a running primary must be sent the new settings."""
    return (
        role is Role.PRIMARY
        and not needs_restart(old, new, role)
        and _differs(old, new, RELOADABLE)
    )


def plan_reload(old: HastConfig, new: HastConfig, roles: Mapping[str, Role]) -> ReloadPlan:
    """Compare two configurations; ``roles`` gives each current resource's role."""
    removed = tuple(name for name in old.resources if name not in new.resources)
    added = tuple(name for name in new.resources if name not in old.resources)
    restart: list[str] = []
    reload: list[str] = []
    for name, new_res in new.resources.items():
        old_res = old.resources.get(name)
        if old_res is None or old_res == new_res:
            continue
        role = roles.get(name, Role.INIT)
        if needs_restart(old_res, new_res, role):
            restart.append(name)
        elif needs_reload(old_res, new_res, role):
            reload.append(name)
    return ReloadPlan(
        control_changed=old.control != new.control,
        listen_add=tuple(a for a in new.listen if a not in old.listen),
        listen_remove=tuple(a for a in old.listen if a not in new.listen),
        removed=removed,
        added=added,
        restart=tuple(restart),
        reload=tuple(reload),
    )


def reload_request(res: ResourceConfig) -> ReloadRequest:
    """The CONTROL_RELOAD message carrying ``res``'s reloadable settings."""
    return ReloadRequest(
        remoteaddr=res.remoteaddr,
        sourceaddr=res.sourceaddr or "",
        replication=int(res.replication),
        checksum=int(res.checksum),
        compression=int(res.compression),
        timeout=res.timeout,
        exec=res.exec,
        metaflush=int(res.metaflush),
    )
