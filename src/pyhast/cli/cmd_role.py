"""``hastctl role [--wait S | --no-wait] init|primary|secondary all|name ...`` (spec 2.3, 2.4).

Prints nothing on success.  A per-resource error is reported as
``[name] Received error N from hastd.`` and the exit code is the first
per-resource error number.

pyhast addition: after a change to primary, hastctl waits (``--wait``
seconds, default 30) until each resource's worker reports that it serves
I/O (its status carries ``nbd_uri`` or ``ready``), so scripts need no sleep.
If that does not happen in time, or the resource falls back to init
meanwhile, hastctl says so and exits 75 (EX_TEMPFAIL).  ``--no-wait`` returns
as soon as hastd has accepted the change.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

from pyhast.cli.common import load
from pyhast.cli.control_client import ControlClientError, request
from pyhast.enums import Role
from pyhast.errors import ExitCode
from pyhast.wire.control import ControlRequest

log = logging.getLogger("pyhast.hastctl")

#: Default bound of the wait for a new primary, in seconds.
DEFAULT_WAIT = 30.0
#: Interval between two status requests while waiting.
POLL_INTERVAL = 0.1


def configure(parser: argparse.ArgumentParser) -> None:
    wait = parser.add_mutually_exclusive_group()
    wait.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT,
        metavar="SECONDS",
        help=f"after 'primary', wait until the device is served (default {DEFAULT_WAIT:g})",
    )
    wait.add_argument("--no-wait", dest="wait", action="store_const", const=0.0, help="do not wait")
    parser.add_argument(
        "-f",
        dest="force",
        action="store_true",
        help="leave primary even while the device is in use (its users get I/O errors)",
    )
    parser.add_argument("role", choices=("init", "primary", "secondary"))
    parser.add_argument("names", nargs="+", metavar="name", help="resource names, or 'all'")


def run(args: argparse.Namespace) -> int:
    cfg = load(args)
    role = Role.from_label(args.role)
    try:
        reply = request(cfg.control, ControlRequest.set_role(role, args.names, force=args.force))
    except ControlClientError as exc:
        log.error("%s", exc)
        return int(exc.exit_code)
    if reply.error:
        log.error("Error %d received from hastd.", reply.error)
        return int(ExitCode.SOFTWARE)
    changed: list[str] = []
    for result in reply.roles:
        if result.error:
            if result.errmsg:
                log.error("[%s] %s", result.name, result.errmsg)
            else:
                log.warning("[%s] Received error %d from hastd.", result.name, result.error)
            continue
        if result.role == role.label:
            log.debug("[%s] Role unchanged (%s).", result.name, result.role)
        else:
            log.debug("[%s] Role changed from %s to %s.", result.name, result.role, role.label)
        changed.append(result.name)
    ec = reply.first_error
    if role is Role.PRIMARY and args.wait > 0 and changed:
        waited = wait_serving(cfg.control, changed, args.wait)
        ec = ec or waited
    return ec


def wait_serving(address: str, names: Sequence[str], timeout: float) -> int:
    """Poll hastd until every resource in ``names`` is served; an exit code."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    while True:
        try:
            reply = request(address, ControlRequest.status(pending))
        except ControlClientError as exc:
            log.error("%s", exc)
            return int(exc.exit_code)
        still: list[str] = []
        for st in reply.statuses:
            if st.error:
                continue  # removed meanwhile: nothing to wait for
            if st.role != Role.PRIMARY.label:
                log.error("[%s] The resource is %s, not primary, any more.", st.name, st.role)
                return int(ExitCode.TEMPFAIL)
            if st.worker is None or not st.worker.serving:
                still.append(st.name)
        if not still:
            return 0
        pending = still
        if time.monotonic() >= deadline:
            for name in pending:
                log.error("[%s] The primary is not serving after %g seconds.", name, timeout)
            return int(ExitCode.TEMPFAIL)
        time.sleep(POLL_INTERVAL)
