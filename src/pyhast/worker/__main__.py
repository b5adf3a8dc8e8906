"""Entry point of a worker process: ``python -m pyhast.worker ...``.

Started by the hastd parent only (see docs/architecture.md for the contract).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from pyhast.daemon.resource_json import resource_from_json
from pyhast.defaults import HAST_DEVDIR
from pyhast.enums import Role
from pyhast.errors import ExitCode, HastError
from pyhast.log import ResourceAdapter, setup_logging
from pyhast.worker.allocator import tune_allocator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hastd-worker")
    p.add_argument("--role", required=True, choices=["primary", "secondary"])
    p.add_argument("--resource", required=True, help="resolved resource configuration (JSON)")
    p.add_argument("--node", default="")
    p.add_argument("--debug", type=int, default=0)
    p.add_argument("--foreground", action="store_true")
    p.add_argument("--ctrl-fd", type=int, required=True)
    p.add_argument("--event-fd", type=int, required=True)
    p.add_argument("--conn-fd", type=int)
    p.add_argument("--in-fd", type=int)
    p.add_argument("--out-fd", type=int)
    p.add_argument("--handshake", default="")
    p.add_argument("--version", type=int, default=2)
    p.add_argument("--rundir", default="/var/run/hast")
    p.add_argument("--devdir", default=HAST_DEVDIR)
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    from pyhast.worker.parent_link import ParentLink

    res = resource_from_json(args.resource)
    role = Role.from_label(args.role)
    log = ResourceAdapter(logging.getLogger("pyhast.worker"), res.name, role.label)
    try:
        from setproctitle import setproctitle

        setproctitle(f"hastd: {res.name} ({role.label})")
    except ImportError:  # pragma: no cover
        pass
    parent = await ParentLink.open(
        args.ctrl_fd, args.event_fd, args.conn_fd if role is Role.PRIMARY else None
    )
    try:
        if role is Role.PRIMARY:
            from pyhast.worker.primary_main import PrimaryWorker

            return await PrimaryWorker(
                res, parent, rundir=args.rundir, devdir=args.devdir, log=log
            ).run()
        from pyhast.worker.secondary_main import run_secondary

        if args.in_fd is None or args.out_fd is None:
            log.error("A secondary worker needs --in-fd and --out-fd.")
            return int(ExitCode.USAGE)
        return await run_secondary(
            res,
            parent,
            in_fd=args.in_fd,
            out_fd=args.out_fd,
            handshake=bytes.fromhex(args.handshake),
            version=args.version,
            log=log,
        )
    except HastError as exc:
        log.error("%s", exc)
        return int(exc.exit_code)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.debug, foreground=args.foreground, program=args.node)
    tune_allocator()
    profile = os.environ.get("PYHAST_PROFILE")
    try:
        if profile:
            # Developer aid: cProfile the whole worker, stats written at exit.
            import cProfile

            prof = cProfile.Profile()
            try:
                return prof.runcall(asyncio.run, amain(args))
            finally:
                prof.dump_stats(f"{profile}.{args.role}.{os.getpid()}")
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
