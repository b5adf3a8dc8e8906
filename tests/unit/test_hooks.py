"""The exec hook runner (spec 9): argv, environment, stdio, reaping, reports."""

from __future__ import annotations

import ast
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhast.daemon.hooks import HookRunner, event_args, role_args
from pyhast.enums import Event, Role


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the pyhast loggers (which do not propagate once set up)."""
    logger = logging.getLogger("pyhast")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # each record once
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def reap_all(runner: HookRunner, timeout: float = 20.0) -> None:
    """Poll until every hook has been reaped."""
    deadline = time.monotonic() + timeout
    while runner.running:
        runner.reap()
        if not runner.running:
            return
        assert time.monotonic() < deadline, "hooks did not finish in time"
        time.sleep(0.01)


def python_hook(runner: HookRunner, code: str, *args: str) -> int:
    pid = runner.run(sys.executable, ("-c", code, *args))
    assert pid is not None
    return pid


@pytest.mark.parametrize(
    ("event", "argv"),
    [
        (Event.CONNECT, ("connect", "r0")),
        (Event.DISCONNECT, ("disconnect", "r0")),
        (Event.SYNCSTART, ("syncstart", "r0")),
        (Event.SYNCDONE, ("syncdone", "r0")),
        (Event.SYNCINTR, ("syncintr", "r0")),
        (Event.SPLITBRAIN, ("split-brain", "r0")),
    ],
)
def test_event_args(event: Event, argv: tuple[str, ...]) -> None:
    assert event_args("r0", event) == argv


def test_role_args() -> None:
    assert role_args("db", Role.INIT, Role.PRIMARY) == ("role", "db", "init", "primary")
    assert role_args("db", Role.PRIMARY, Role.SECONDARY) == ("role", "db", "primary", "secondary")


def test_argv0_is_the_basename_and_env_is_inherited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("HAST_HOOK_TEST", "inherited")
    runner = HookRunner()
    python_hook(
        runner,
        "import os, sys; open(sys.argv[1], 'w').write("
        "repr((sys.orig_argv, os.environ.get('HAST_HOOK_TEST'))))",
        str(out),
        "role",
        "r0",
        "init",
        "primary",
    )
    reap_all(runner)
    orig_argv, env = ast.literal_eval(out.read_text())
    assert orig_argv[0] == os.path.basename(sys.executable)
    assert orig_argv[-4:] == ["role", "r0", "init", "primary"]
    assert env == "inherited"


def test_descriptors_closed_and_stdio_to_devnull_when_daemonised(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r, w = os.pipe()
    os.set_inheritable(w, True)
    try:
        runner = HookRunner(daemonised=True)
        python_hook(
            runner,
            "import os, sys; open(sys.argv[1], 'w').write(repr(("
            "sorted(int(f) for f in os.listdir('/proc/self/fd')),"
            "[os.readlink(f'/proc/self/fd/{i}') for i in (0, 1, 2)])))",
            str(out),
        )
        reap_all(runner)
    finally:
        os.close(r)
        os.close(w)
    fds, stdio = ast.literal_eval(out.read_text())
    assert w not in fds
    assert stdio == ["/dev/null"] * 3


def test_success_failure_and_signal_are_logged(logs: pytest.LogCaptureFixture) -> None:
    runner = HookRunner()
    ok = python_hook(runner, "pass")
    bad = python_hook(runner, "import sys; sys.exit(3)")
    killed = python_hook(runner, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    reap_all(runner)
    messages = {r.getMessage(): r.levelno for r in logs.records}
    cmd = f"{sys.executable} -c"
    assert any(
        m.startswith(f"Hook exited gracefully (pid={ok}, cmd=[{cmd} pass])")
        and lvl == logging.DEBUG
        for m, lvl in messages.items()
    )
    failed_msg = (
        f"Hook exited ungracefully (pid={bad}, exitcode=3, cmd=[{cmd} import sys; sys.exit(3)])."
    )
    assert messages[failed_msg] == logging.ERROR
    killed_msg = (
        f"Hook was killed (pid={killed}, signal={int(signal.SIGKILL)}, "
        f"cmd=[{cmd} import os, signal; os.kill(os.getpid(), signal.SIGKILL)])."
    )
    assert messages[killed_msg] == logging.ERROR


def test_no_hook_and_missing_hook(logs: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    runner = HookRunner()
    assert runner.run("", ("role", "r0", "init", "primary")) is None
    assert not logs.records
    assert runner.run(str(tmp_path / "missing"), ("connect", "r0")) is None
    assert any("Unable to execute" in r.getMessage() for r in logs.records)
    assert runner.running == []


def test_long_running_hook_is_reported_every_interval(logs: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    runner = HookRunner(clock=lambda: now[0])
    pid = python_hook(runner, "import time; time.sleep(60)")
    try:
        runner.check()
        now[0] += 59
        runner.check()
        assert not [r for r in logs.records if "is running for" in r.getMessage()]
        now[0] += 2
        runner.check()
        now[0] += 30
        runner.check()
        now[0] += 30
        runner.check()
        reports = [r for r in logs.records if "is running for" in r.getMessage()]
        assert [r.getMessage().split(" (")[0] for r in reports] == [
            "Hook is running for 61 seconds",
            "Hook is running for 121 seconds",
        ]
        assert all(r.levelno == logging.WARNING for r in reports)
        assert f"pid={pid}" in reports[0].getMessage()
    finally:
        os.kill(pid, signal.SIGKILL)
        reap_all(runner)
