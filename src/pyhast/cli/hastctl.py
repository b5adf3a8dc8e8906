"""hastctl: the administrator's command (spec section 2).

One module per subcommand (``cmd_<name>.py``) with ``configure(parser)`` and
``run(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from pyhast.cli import cmd_create, cmd_dump, cmd_list, cmd_role, cmd_status
from pyhast.cli.common import HastctlParser, add_common_options
from pyhast.errors import ExitCode
from pyhast.log import setup_logging

SUBCOMMANDS: dict[str, tuple[ModuleType, str]] = {
    "create": (cmd_create, "initialise the metadata of local components"),
    "dump": (cmd_dump, "print the on-disk metadata of local components"),
    "role": (cmd_role, "change the role of resources"),
    "list": (cmd_list, "show the configuration and state of resources, verbosely"),
    "status": (cmd_status, "show the state of resources, one line each"),
}


def build_parser() -> HastctlParser:
    parser = HastctlParser(prog="hastctl", description="Control the HAST daemon.")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=HastctlParser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_common_options(p)
        module.configure(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_usage(sys.stderr)
        return ExitCode.USAGE
    setup_logging(args.debug, foreground=True)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
