"""``hastctl create [-a align] [-e extentsize] [-k keepdirty] [-m mediasize] name ...`` (spec 2.1).

``-a`` is ours: the data area starts at a multiple of ``align`` bytes (default
4096; ``-a 512`` reproduces FreeBSD's layout on 512-byte sectors, for a pair
whose other node was created by FreeBSD's hastctl: datasize must match).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from pyhast.cli.common import load, select_resources
from pyhast.defaults import HAST_DATA_ALIGN
from pyhast.disk.metadata import CreateError, metadata_create
from pyhast.disk.provider import Provider
from pyhast.disk.units import expand_number
from pyhast.errors import ExitCode, HastError

log = logging.getLogger("pyhast.hastctl")


def size_option(what: str) -> Callable[[str], int]:
    """argparse type for k/M/G/T sizes; a bad value is a usage error."""

    def parse(text: str) -> int:
        try:
            value = expand_number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"Invalid {what}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"Invalid {what}")
        return value

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-a", dest="align", type=size_option("alignment"), default=HAST_DATA_ALIGN)
    parser.add_argument("-e", dest="extentsize", type=size_option("extentsize"), default=0)
    parser.add_argument("-k", dest="keepdirty", type=size_option("keepdirty"), default=0)
    parser.add_argument("-m", dest="mediasize", type=size_option("mediasize"), default=0)
    parser.add_argument("names", nargs="+", metavar="name")


def run(args: argparse.Namespace) -> int:
    """Initialise each named resource; the first error's exit code wins."""
    cfg = load(args)
    found, unknown = select_resources(cfg, args.names, all_when_empty=False)
    ec = 0
    for name in unknown:
        log.error("Unknown resource %s.", name)
        ec = ec or ExitCode.DATAERR
    for res in found:
        try:
            with Provider.open(res.localpath) as provider:
                md = metadata_create(
                    provider,
                    res.name,
                    mediasize=args.mediasize,
                    extentsize=args.extentsize,
                    keepdirty=args.keepdirty,
                    align=args.align,
                )
        except CreateError as exc:
            log.error("[%s] %s", res.name, exc)
            ec = ec or exc.exit_code
            continue
        except HastError as exc:
            log.error("[%s] %s", res.name, exc)
            ec = ec or ExitCode.NOINPUT
            continue
        except OSError as exc:
            log.error("[%s] Unable to open %s: %s.", res.name, res.localpath, exc.strerror)
            ec = ec or ExitCode.NOINPUT
            continue
        log.debug(
            "[%s] Created: datasize %d, extentsize %d, keepdirty %d, localoff %d.",
            res.name,
            md.datasize,
            md.extentsize,
            md.keepdirty,
            md.localoff,
        )
    return int(ec)
