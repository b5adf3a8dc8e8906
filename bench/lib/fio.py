"""fio command lines: the nbd engine for the servers, libaio for loop devices."""

from __future__ import annotations

from typing import Any

from . import parse
from .procs import Procs

#: Seconds fio may take beyond its own runtime (start-up, connect, teardown).
SLACK = 90.0


def common(name: str, wl: parse.Workload, size: int) -> list[str]:
    return [
        "fio",
        f"--name={name}",
        f"--rw={wl.rw}",
        f"--bs={wl.bs}",
        f"--iodepth={wl.iodepth}",
        f"--size={size}",
        "--numjobs=1",
        "--group_reporting",
        "--lat_percentiles=1",
        "--output-format=json",
    ]


def nbd_argv(uri: str, wl: parse.Workload, size: int, runtime: float | None) -> list[str]:
    """fio with its nbd engine on ``uri``; time-based when ``runtime`` is given,
    else one pass over ``size`` bytes."""
    argv = [*common(wl.key, wl, size), "--ioengine=nbd", f"--uri={uri}"]
    if runtime is not None:
        argv += ["--time_based", f"--runtime={runtime:g}s"]
    return argv


def blockdev_argv(dev: str, wl: parse.Workload, size: int, runtime: float) -> list[str]:
    """fio with libaio, O_DIRECT, on a block device (a loop device)."""
    return [
        *common(wl.key, wl, size),
        "--ioengine=libaio",
        "--direct=1",
        f"--filename={dev}",
        "--time_based",
        f"--runtime={runtime:g}s",
    ]


def run(
    procs: Procs, argv: list[str], *, cpu: int | None, runtime: float | None, timeout: float = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run fio (bounded); (summary, raw JSON document)."""
    limit = timeout or ((runtime or 0) + SLACK)
    res = procs.run(argv, cpu=cpu, timeout=limit)
    doc = parse.extract_json(res.stdout)
    return parse.fio_summary(doc), doc


def version(procs: Procs) -> str:
    return procs.run(["fio", "--version"], timeout=30).stdout.strip()
