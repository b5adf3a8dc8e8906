"""hastd: the parent process (spec 3.1, 3.2, 3.5).

``hastd [-dFh] [-c config] [-P pidfile] [--node NAME] [--rundir DIR] [--devdir DIR]``

Start-up, in FreeBSD's order:

1. parse the configuration (fatal: exit 78, or 72 when unreadable);
2. open and lock the pidfile, mode 0600 (another hastd holds it: "Another
   hastd is already running, pidfile: X, pid: N.", exit 75; any other
   problem is only a warning).  In the foreground (``-F``) there is no
   pidfile unless ``-P`` names one;
3. bind the control socket (UNIX, 0600) and every listen socket (exit 71);
4. unless ``-F``: daemonise (double fork, setsid, chdir /, stdio to
   /dev/null) and log to syslog from then on;
5. write the pidfile, log "Started successfully, running protocol version
   2." and run the asyncio main loop.

Signals (``loop.add_signal_handler``): SIGHUP reloads the configuration;
SIGINT/SIGTERM send SIGTERM to every worker, wait for them (bounded), remove
the control socket and the pidfile and exit 0; SIGCHLD reaps children (a
one-second tick does too, as a safety net, and checks long-running hooks
every five seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from pyhast.config import HastConfig, load_config
from pyhast.daemon.control import ControlServer
from pyhast.daemon.hooks import HookRunner
from pyhast.daemon.listen import Listener
from pyhast.daemon.pidfile import Pidfile, PidfileLocked
from pyhast.daemon.reload import plan_reload, reload_request
from pyhast.daemon.supervisor import STOP_TIMEOUT, Supervisor
from pyhast.defaults import HAST_CONFIG, HAST_DEVDIR, HAST_PROTO_VERSION
from pyhast.errors import ConfigError, ExitCode
from pyhast.log import errno_text, setup_logging
from pyhast.node import NodeIdentity

__all__ = ["Daemon", "main"]

log = logging.getLogger("pyhast.hastd")

#: Default directory for the primaries' NBD sockets.
DEFAULT_RUNDIR = "/var/run/hast"
#: Seconds between two checks of running hooks.
HOOK_CHECK_INTERVAL = 5.0
#: Seconds between two safety-net reaps.
REAP_INTERVAL = 1.0


class _Parser(argparse.ArgumentParser):
    """Usage errors (and -h) exit with EX_USAGE, as hastd's usage() does."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hastd",
        usage=(
            "%(prog)s [-dFh] [-c config] [-P pidfile] [--node NAME] [--rundir DIR] [--devdir DIR]"
        ),
        add_help=False,
    )
    parser.add_argument("-c", dest="config", default=HAST_CONFIG, metavar="config")
    parser.add_argument("-d", dest="debug", action="count", default=0)
    parser.add_argument("-F", dest="foreground", action="store_true")
    parser.add_argument("-h", dest="help", action="store_true")
    parser.add_argument("-P", dest="pidfile", default=None, metavar="pidfile")
    parser.add_argument("--node", default=None, metavar="NAME")
    parser.add_argument("--rundir", default=DEFAULT_RUNDIR, metavar="DIR")
    parser.add_argument(
        "--devdir",
        default=HAST_DEVDIR,
        metavar="DIR",
        help="where a primary's device file appears (default /dev/hast)",
    )
    return parser


def daemonize() -> None:
    """Detach from the terminal: double fork, setsid, chdir /, stdio to /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def _set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)


class Daemon:
    """The running parent: configuration, sockets, supervisor, signals."""

    def __init__(
        self,
        *,
        cfgpath: str,
        identity: NodeIdentity,
        config: HastConfig,
        pidfile: Pidfile | None,
        pidfile_fixed: bool,
        control_sock: socket.socket,
        listen_socks: dict[str, socket.socket],
        debug: int,
        foreground: bool,
        rundir: str,
        devdir: str = "/dev/hast",
    ) -> None:
        self.cfgpath = cfgpath
        self.identity = identity
        self.config = config
        self.pidfile = pidfile
        self.pidfile_fixed = pidfile_fixed
        self.foreground = foreground
        self._control_sock = control_sock
        self._listen_socks = listen_socks
        self.hooks = HookRunner(daemonised=not foreground)
        self.supervisor = Supervisor(
            config.resources.values(),
            hooks=self.hooks,
            node=str(identity),
            debug=debug,
            foreground=foreground,
            rundir=rundir,
            devdir=devdir,
        )
        self._reload_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.control = ControlServer(self.supervisor, self.config.control, self._control_sock)
        self.control.start()
        self.listener = Listener(self.supervisor)
        for address, sock in self._listen_socks.items():
            self.listener.serve(address, sock)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGCHLD, self.supervisor.reap)
        ticker = loop.create_task(self._tick(), name="tick")
        log.info("Started successfully, running protocol version %d.", HAST_PROTO_VERSION)
        await self._stop.wait()
        log.info("Termination signal received, exiting.")
        for signo in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signo)
        self.control.close()
        self.listener.close_all()
        for task in list(self._tasks):
            task.cancel()
        await self.supervisor.shutdown(STOP_TIMEOUT)
        ticker.cancel()
        loop.remove_signal_handler(signal.SIGCHLD)
        if self.pidfile is not None:
            self.pidfile.remove()
        return 0

    async def _tick(self) -> None:
        elapsed = 0.0
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            self.supervisor.reap()
            elapsed += REAP_INTERVAL
            if elapsed >= HOOK_CHECK_INTERVAL:
                elapsed = 0.0
                self.hooks.check()

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        """Re-read the configuration and apply it (spec 3.5)."""
        async with self._reload_lock:
            try:
                await self._reload()
            except ConfigError as exc:
                log.error("%s", exc)
                log.warning("Configuration not reloaded.")
            except Exception:
                log.exception("Unexpected error while reloading the configuration.")
                log.warning("Configuration not reloaded.")

    async def _reload(self) -> None:
        log.info("Reloading configuration...")
        new = await asyncio.to_thread(load_config, self.cfgpath, self.identity)
        for warning in new.warnings:
            log.warning("%s", warning)
        old = self.config
        roles = {name: res.role for name, res in self.supervisor.resources.items()}
        plan = plan_reload(old, new, roles)
        new_control: socket.socket | None = None
        opened: dict[str, socket.socket] = {}
        try:
            if plan.control_changed:
                new_control = ControlServer.open(new.control)
            for address in plan.listen_add:
                opened[address] = Listener.open(address)
        except (OSError, ValueError) as exc:
            what = (
                new.control if new_control is None and plan.control_changed else "a listen address"
            )
            log.error("%s", errno_text(f"Unable to listen on {what}", exc))
            if new_control is not None:
                new_control.close()
            for sock in opened.values():
                sock.close()
            log.warning("Configuration not reloaded.")
            return
        if new_control is not None:
            log.info("Control socket changed from %s to %s.", old.control, new.control)
            self.control.close()
            self.control = ControlServer(self.supervisor, new.control, new_control)
            self.control.start()
        for address, sock in opened.items():
            self.listener.serve(address, sock)
            log.info("Listening on %s.", address)
        for address in plan.listen_remove:
            self.listener.close(address)
            log.info("No longer listening on %s.", address)
        self._reload_pidfile(old, new)
        self.config = new
        sup = self.supervisor
        for name in plan.removed:
            await sup.remove_resource(name)
        for name in plan.added:
            sup.add_resource(new.resources[name])
        restart = set(plan.restart)
        reload = set(plan.reload)
        for name, res_cfg in new.resources.items():
            if name in restart:
                await sup.restart_resource(res_cfg)
            elif name in reload:
                await sup.reload_resource(res_cfg, reload_request(res_cfg).to_nv())
            else:
                sup.update_config(res_cfg)
        log.info("Configuration reloaded successfully.")

    def _reload_pidfile(self, old: HastConfig, new: HastConfig) -> None:
        """A new pidfile path is honoured only when daemonised without -P."""
        if self.pidfile_fixed or self.foreground or old.pidfile == new.pidfile:
            return
        try:
            pidfile = Pidfile.open(new.pidfile)
            pidfile.write()
        except (OSError, PidfileLocked) as exc:
            log.warning("%s", errno_text(f"Unable to use the new pidfile {new.pidfile}", exc))
            return
        if self.pidfile is not None:
            self.pidfile.remove()
        self.pidfile = pidfile
        log.info("Pidfile changed from %s to %s.", old.pidfile, new.pidfile)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help:
        build_parser().print_usage(sys.stderr)
        return ExitCode.USAGE
    setup_logging(args.debug, foreground=True)
    cfgpath = os.path.realpath(args.config)
    identity = NodeIdentity.current(args.node)
    try:
        config = load_config(cfgpath, identity)
    except ConfigError as exc:
        log.error("%s", exc)
        return int(exc.exit_code)
    for warning in config.warnings:
        log.warning("%s", warning)

    pidfile: Pidfile | None = None
    pidfile_path = args.pidfile if args.pidfile is not None else config.pidfile
    if args.pidfile is not None or not args.foreground:
        pidfile_path = os.path.abspath(pidfile_path)
        try:
            pidfile = Pidfile.open(pidfile_path)
        except PidfileLocked as exc:
            log.error("%s", exc)
            return int(ExitCode.TEMPFAIL)
        except OSError as exc:
            log.warning("%s", errno_text(f"Unable to open or create pidfile {pidfile_path}", exc))

    def fail(message: str, exc: BaseException) -> int:
        log.error("%s", errno_text(message, exc))
        if pidfile is not None:
            pidfile.remove()
        return int(ExitCode.OSERR)

    try:
        control_sock = ControlServer.open(config.control)
    except (OSError, ValueError) as exc:
        return fail(f"Unable to listen on control address {config.control}", exc)
    listen_socks: dict[str, socket.socket] = {}
    for address in config.listen:
        try:
            listen_socks[address] = Listener.open(address)
        except (OSError, ValueError) as exc:
            control_sock.close()
            for sock in listen_socks.values():
                sock.close()
            return fail(f"Unable to listen on address {address}", exc)

    rundir = os.path.abspath(args.rundir)
    try:
        os.makedirs(rundir, mode=0o700, exist_ok=True)
    except OSError as exc:
        log.warning("%s", errno_text(f"Unable to create {rundir}", exc))

    if not args.foreground:
        daemonize()
        setup_logging(args.debug, foreground=False, program="hastd")
    if pidfile is not None:
        try:
            pidfile.write()
        except OSError as exc:
            log.warning("%s", errno_text(f"Unable to write pidfile {pidfile.path}", exc))
    _set_title("hastd: parent")

    async def run() -> int:
        daemon = Daemon(
            cfgpath=cfgpath,
            identity=identity,
            config=config,
            pidfile=pidfile,
            pidfile_fixed=args.pidfile is not None,
            control_sock=control_sock,
            listen_socks=listen_socks,
            debug=args.debug,
            foreground=args.foreground,
            rundir=rundir,
            devdir=os.path.abspath(args.devdir),
        )
        return await daemon.run()

    try:
        return asyncio.run(run())
    finally:
        with contextlib.suppress(OSError):
            sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
