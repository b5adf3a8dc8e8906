"""Logging in the manner of FreeBSD's pjdlog, built on the logging module.

* Foreground (``-F``, hastctl): lines go to stderr.  Daemonised: to syslog
  (facility daemon, ident ``hastd``).
* Debug levels: 0 shows notices and above, 1 (``-d``) adds lifecycle
  debugging, 2 (``-dd``) adds per-request tracing at the :data:`TRACE` level.
* Every line a worker writes is prefixed ``[resource] (role) `` through
  :class:`ResourceAdapter`; hastctl uses ``[resource] `` alone.
* Messages are full sentences.  :func:`errno_text` appends the reason an OS
  error gave, as pjdlog_errno does: ``"Unable to open x: No such file or
  directory."``.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import MutableMapping
from typing import Any

#: Per-request tracing, shown with -dd.
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_ROOT = "pyhast"
_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: TRACE}
_LEVEL_NAMES = {
    logging.CRITICAL: "[CRIT]",
    logging.ERROR: "[ERROR]",
    logging.WARNING: "[WARNING]",
    logging.INFO: "[INFO]",
    logging.DEBUG: "[DEBUG][1]",
    TRACE: "[DEBUG][2]",
}


class _PjdFormatter(logging.Formatter):
    """``[LEVEL] message`` on stderr, like pjdlog's std mode (``[DEBUG][2]`` for -dd).

    ``program``, when not empty, is put in front (``nodea: [INFO] ...``) so that
    two daemons sharing one terminal can be told apart.
    """

    def __init__(self, program: str, with_time: bool) -> None:
        super().__init__()
        self._program = program
        self._with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        text = f"{level} {record.getMessage()}"
        if self._program:
            text = f"{self._program}: {text}"
        if self._with_time:
            text = f"{self.formatTime(record, '%b %d %H:%M:%S')} {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(
    debug: int = 0, *, foreground: bool = True, program: str = "", with_time: bool = False
) -> None:
    """Configure the ``pyhast`` logger once per process.

    Call it early in every entry point (hastd parent, worker, hastctl).
    Calling it again replaces the handler, which is how a daemonising parent
    switches from stderr to syslog.
    """
    root = logging.getLogger(_ROOT)
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PjdFormatter(program, with_time))
    else:
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.ident = f"{program or 'hastd'}[{os.getpid()}]: "
        handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(min(debug, 2), TRACE))
    root.propagate = False


def debug_level() -> int:
    """The current debug level (0, 1 or 2), for code that prints extra detail."""
    level = logging.getLogger(_ROOT).getEffectiveLevel()
    if level <= TRACE:
        return 2
    return 1 if level <= logging.DEBUG else 0


def errno_text(message: str, error: BaseException | int) -> str:
    """Append the OS reason to a sentence: ``"Unable to x: Reason."``.

    ``message`` is given without a final full stop.
    """
    if isinstance(error, int):
        reason = os.strerror(error)
    elif isinstance(error, OSError) and error.errno is not None:
        reason = os.strerror(error.errno)
    else:
        reason = str(error).rstrip(".")
    return f"{message}: {reason}."


class ResourceAdapter(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with ``[resource] (role) ``.

    The role is read at each call, so a worker that changes role keeps one
    adapter.
    """

    def __init__(self, logger: logging.Logger, resource: str, role: str | None = None) -> None:
        super().__init__(logger, {})
        self.resource = resource
        self.role = role

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        prefix = f"[{self.resource}] "
        if self.role:
            prefix += f"({self.role}) "
        return prefix + str(msg), kwargs

    def trace(self, msg: str, *args: object) -> None:
        """Per-request tracing (-dd)."""
        self.log(TRACE, msg, *args)


def get_logger(name: str) -> logging.Logger:
    """The module logger: ``get_logger(__name__)``."""
    return logging.getLogger(name)
