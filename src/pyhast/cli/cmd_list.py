"""``hastctl list [--json] [all | name ...]``: the verbose block (spec 2.4).

Per resource::

    <name>:
      role: <role>
      provname: <provname>
      localpath: <path>
      extentsize: <n> (<human>)
      keepdirty: <n>
      remoteaddr: <addr>
      sourceaddr: <addr>                  only if configured
      replication: <mode>
      status: complete|degraded           only while a worker runs
      workerpid: <pid>                    only if non-zero
      dirty: <bytes> (<human>)
      nbd: <uri>                          pyhast: where the primary serves the device
      device: <path>                      pyhast: the device file (/dev/hast/<name>)
      synchronization: <n> bytes left, <rate>/s    pyhast: only while syncing
      statistics:
        reads: N
        ...
        local errors: read: N, write: N, delete: N, flush: N
        queues: local: N, send: N, recv: N, done: N, idle: N

A per-resource error prints ``  error: <n>`` under the name.  Numbers the
worker did not send (or all of them when no worker runs) print as 0, as
FreeBSD's getters give.  ``--json`` prints the same document as ``hastctl
status --json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from pyhast.cli.cmd_status import query, render_json
from pyhast.disk.units import humanize_number
from pyhast.wire.control import ResourceStatus, WorkerStatus


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("names", nargs="*", metavar="name")


def _n(worker: WorkerStatus | None, field: str) -> int:
    if worker is None:
        return 0
    value = getattr(worker, field)
    return 0 if value is None else int(value)


def render_one(st: ResourceStatus) -> str:
    """The block of one resource."""
    if st.error:
        return f"{st.name}:\n  error: {st.error}\n"
    w = st.worker
    extentsize = _n(w, "extentsize")
    dirty = _n(w, "dirty")
    lines = [
        f"{st.name}:",
        f"  role: {st.role}",
        f"  provname: {st.provname}",
        f"  localpath: {st.localpath}",
        f"  extentsize: {extentsize} ({humanize_number(extentsize)})",
        f"  keepdirty: {_n(w, 'keepdirty')}",
        f"  remoteaddr: {st.remoteaddr}",
    ]
    if st.sourceaddr:
        lines.append(f"  sourceaddr: {st.sourceaddr}")
    lines.append(f"  replication: {st.replication}")
    if w is not None:
        lines.append(f"  status: {w.status}")
    if st.workerpid:
        lines.append(f"  workerpid: {st.workerpid}")
    lines.append(f"  dirty: {dirty} ({humanize_number(dirty)})")
    if w is not None and w.nbd_uri:
        lines.append(f"  nbd: {w.nbd_uri}")
    if w is not None and w.devpath:
        lines.append(f"  device: {w.devpath}")
    if w is not None and w.sync_left:
        rate = _n(w, "sync_rate")
        lines.append(f"  synchronization: {w.sync_left} bytes left, {humanize_number(rate)}/s")
    lines += [
        "  statistics:",
        f"    reads: {_n(w, 'stat_read')}",
        f"    writes: {_n(w, 'stat_write')}",
        f"    deletes: {_n(w, 'stat_delete')}",
        f"    flushes: {_n(w, 'stat_flush')}",
        f"    activemap updates: {_n(w, 'stat_activemap_update')}",
        f"    local errors: read: {_n(w, 'stat_read_error')}, "
        f"write: {_n(w, 'stat_write_error')}, "
        f"delete: {_n(w, 'stat_delete_error')}, "
        f"flush: {_n(w, 'stat_flush_error')}",
        f"    queues: local: {_n(w, 'local_queue_size')}, "
        f"send: {_n(w, 'send_queue_size')}, "
        f"recv: {_n(w, 'recv_queue_size')}, "
        f"done: {_n(w, 'done_queue_size')}, "
        f"idle: {_n(w, 'idle_queue_size')}",
    ]
    return "\n".join(lines) + "\n"


def render(statuses: Sequence[ResourceStatus]) -> str:
    """Every resource's block, in reply order."""
    return "".join(render_one(st) for st in statuses)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    reply = query(args)
    if isinstance(reply, int):
        return reply
    out.write(render_json(reply.statuses) if args.json else render(reply.statuses))
    out.flush()
    return reply.first_error
