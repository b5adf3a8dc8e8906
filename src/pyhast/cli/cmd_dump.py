"""``hastctl dump [all | name ...]``: print the on-disk metadata (spec 2.2)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TextIO

from pyhast.cli.common import load, select_resources
from pyhast.disk.metadata import Metadata, metadata_read
from pyhast.disk.provider import Provider
from pyhast.disk.units import humanize_number
from pyhast.errors import ExitCode, HastError

log = logging.getLogger("pyhast.hastctl")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="name")


def render(name: str, md: Metadata) -> str:
    """FreeBSD's dump layout, one block per resource."""
    return (
        f"resource: {name}\n"
        f"    datasize: {md.datasize} ({humanize_number(md.datasize)})\n"
        f"    extentsize: {md.extentsize} ({humanize_number(md.extentsize)})\n"
        f"    keepdirty: {md.keepdirty}\n"
        f"    localoff: {md.localoff}\n"
        f"    resuid: {md.resuid}\n"
        f"    localcnt: {md.localcnt}\n"
        f"    remotecnt: {md.remotecnt}\n"
        f"    prevrole: {md.prevrole.label}\n"
    )


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Dump each resource; a resource whose metadata cannot be read exits 66."""
    cfg = load(args)
    found, unknown = select_resources(cfg, args.names, all_when_empty=True)
    ec = 0
    for name in unknown:
        log.error("Unknown resource %s.", name)
        ec = ec or ExitCode.DATAERR
    for res in found:
        try:
            with Provider.open(res.localpath, readonly=True, lock=False) as provider:
                md = metadata_read(provider, res.name)
        except HastError as exc:
            log.error("[%s] %s", res.name, exc)
            ec = ec or ExitCode.NOINPUT
            continue
        except OSError as exc:
            log.error("[%s] Unable to open %s: %s.", res.name, res.localpath, exc.strerror)
            ec = ec or ExitCode.NOINPUT
            continue
        out.write(render(res.name, md))
        out.flush()
    return int(ec)
