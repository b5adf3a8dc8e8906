"""``hastctl status [--json] [all | name ...]``: one line per resource (spec 2.4).

Layout, exactly FreeBSD's::

    Name	Status	 Role		Components
    vol0	complete primary        /dev/ada1	192.0.2.12

The status is padded to 9 characters ("-" when no worker runs), the role to
15, then the local path, a tab and the remote address.  A per-resource error
prints ``ERR<n>``.  ``--json`` prints ``{"resources": [...]}`` instead (see
:meth:`~pyhast.wire.control.ResourceStatus.to_json`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

from pyhast.cli.common import load
from pyhast.cli.control_client import ControlClientError, request
from pyhast.errors import ExitCode
from pyhast.wire.control import ControlReply, ControlRequest, ResourceStatus

log = logging.getLogger("pyhast.hastctl")

HEADER = "Name\tStatus\t Role\t\tComponents\n"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("names", nargs="*", metavar="name")


def render(statuses: Sequence[ResourceStatus]) -> str:
    """The terse table (no header when there is nothing to show)."""
    if not statuses:
        return ""
    lines = [HEADER]
    for st in statuses:
        if st.error:
            lines.append(f"{st.name}\tERR{st.error}\n")
            continue
        status = st.worker.status if st.worker is not None else "-"
        lines.append(f"{st.name}\t{status:<9}{st.role:<15}{st.localpath}\t{st.remoteaddr}\n")
    return "".join(lines)


def render_json(statuses: Sequence[ResourceStatus]) -> str:
    """``{"resources": [...]}`` with typed values, one JSON document."""
    return json.dumps({"resources": [st.to_json() for st in statuses]}, indent=2) + "\n"


def query(args: argparse.Namespace) -> ControlReply | int:
    """Ask hastd for the status of ``args.names``; an int is an exit code."""
    cfg = load(args)
    try:
        reply = request(cfg.control, ControlRequest.status(args.names))
    except ControlClientError as exc:
        log.error("%s", exc)
        return int(exc.exit_code)
    if reply.error:
        log.error("Error %d received from hastd.", reply.error)
        return int(ExitCode.SOFTWARE)
    return reply


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    reply = query(args)
    if isinstance(reply, int):
        return reply
    out.write(render_json(reply.statuses) if args.json else render(reply.statuses))
    out.flush()
    return reply.first_error
