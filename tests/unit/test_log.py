"""pjdlog-style logging: levels, prefixes, errno text, syslog when daemonised."""

from __future__ import annotations

import errno
import logging
import logging.handlers

import pytest

from pyhast.log import (
    TRACE,
    ResourceAdapter,
    debug_level,
    errno_text,
    get_logger,
    setup_logging,
)


@pytest.fixture(autouse=True)
def restore() -> object:
    yield
    setup_logging(0)


def test_levels_and_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(0)
    log = ResourceAdapter(get_logger("pyhast.t"), "vol0", "primary")
    log.info("Connected to %s.", "tcp4://192.0.2.1:8457")
    log.debug("Not shown at level 0.")
    log.trace("Not shown either.")
    err = capsys.readouterr().err
    assert err == "[INFO] [vol0] (primary) Connected to tcp4://192.0.2.1:8457.\n"
    assert debug_level() == 0


@pytest.mark.parametrize(
    ("debug", "shown"), [(1, ["[DEBUG][1]"]), (2, ["[DEBUG][1]", "[DEBUG][2]"])]
)
def test_debug_levels(capsys: pytest.CaptureFixture[str], debug: int, shown: list[str]) -> None:
    setup_logging(debug)
    log = ResourceAdapter(get_logger("pyhast.t"), "vol0")
    log.debug("Lifecycle.")
    log.trace("Request.")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ")[0] for line in lines] == shown
    assert lines[0] == "[DEBUG][1] [vol0] Lifecycle."
    assert debug_level() == debug


def test_role_prefix_follows_role(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(0, program="nodea")
    log = ResourceAdapter(get_logger("pyhast.t"), "r0", "init")
    log.role = "secondary"
    log.warning("Role changed.")
    assert capsys.readouterr().err == "nodea: [WARNING] [r0] (secondary) Role changed.\n"


def test_errno_text() -> None:
    assert errno_text("Unable to open /x", errno.ENOENT) == (
        "Unable to open /x: No such file or directory."
    )
    assert errno_text("Unable to lock /x", OSError(errno.EAGAIN, "x")) == (
        "Unable to lock /x: Resource temporarily unavailable."
    )
    assert errno_text("Bad", ValueError("reason.")) == "Bad: reason."


def test_syslog_when_daemonised() -> None:
    setup_logging(1, foreground=False)
    handlers = logging.getLogger("pyhast").handlers
    assert len(handlers) == 1
    assert isinstance(handlers[0], logging.handlers.SysLogHandler)
    assert TRACE < logging.DEBUG
