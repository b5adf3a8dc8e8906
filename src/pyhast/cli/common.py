"""What every hastctl subcommand shares: options, config loading, exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from pyhast.config import HastConfig, ResourceConfig, load_config
from pyhast.defaults import HAST_CONFIG
from pyhast.errors import ConfigError, ExitCode
from pyhast.node import NodeIdentity

log = logging.getLogger("pyhast.hastctl")


class UsageError(Exception):
    """Bad command line; hastctl prints the usage and exits 64."""


class HastctlParser(argparse.ArgumentParser):
    """An ArgumentParser that exits with EX_USAGE (64) instead of 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: {message}\n")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """-c config, -d (repeatable), --node NAME."""
    parser.add_argument(
        "-c", dest="config", default=HAST_CONFIG, metavar="config", help="configuration file"
    )
    parser.add_argument(
        "-d", dest="debug", action="count", default=0, help="more debugging output (repeatable)"
    )
    parser.add_argument(
        "--node",
        default=None,
        metavar="NAME",
        help="this node's name in hast.conf (default: $HAST_NODE, else the host's identity)",
    )


def load(args: argparse.Namespace) -> HastConfig:
    """Parse the whole configuration, exiting 78 (or 72) on error, as hastctl does."""
    try:
        return load_config(args.config, NodeIdentity.current(args.node))
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)


def select_resources(
    cfg: HastConfig, names: Sequence[str], *, all_when_empty: bool
) -> tuple[list[ResourceConfig], list[str]]:
    """Resolve ``all`` / names to configured resources; returns (found, unknown)."""
    if (not names and all_when_empty) or list(names) == ["all"]:
        return list(cfg.resources.values()), []
    found: list[ResourceConfig] = []
    unknown: list[str] = []
    for name in names:
        res = cfg.resources.get(name)
        if res is None:
            unknown.append(name)
        else:
            found.append(res)
    return found, unknown
