"""Pure functions of the benchmark: fio output, medians, ratios, targets, log lines.

Nothing here starts a process or touches a file, so all of it is unit-tested
(``tests/unit/test_bench_parse.py``).

Conventions:

* a *summary* is what one fio run gives: ``bw_bytes`` (bytes/s), ``iops``,
  ``p50_us``/``p99_us``/``mean_us`` (completion latency, microseconds);
* *medians* is ``{row: {workload: summary-of-medians}}``;
* every *ratio* is "higher is better": throughput row/anchor for the
  throughput workloads, and anchor p50 / row p50 for the QD1 latency
  workload (so 0.5 means "twice the latency of nbdkit").
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024

#: Rows of the table, in order: the anchor first.
ANCHOR = "nbdkit"
UNREPLICATED = "none"
ROWS = (ANCHOR, UNREPLICATED, "fullsync", "memsync", "async")
ROW_LABELS = {
    ANCHOR: "nbdkit file (anchor)",
    UNREPLICATED: "pyhast remote none",
    "fullsync": "pyhast fullsync",
    "memsync": "pyhast memsync",
    "async": "pyhast async",
}


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    rw: str
    bs: str
    iodepth: int
    #: the metric the ratio is taken on: "bw_bytes", "iops" or "p50_us" (lower is better)
    metric: str


WORKLOADS = (
    Workload("seqwrite_1m_qd16", "seq write 1M QD16", "write", "1M", 16, "bw_bytes"),
    Workload("randwrite_4k_qd32", "rand write 4k QD32", "randwrite", "4k", 32, "iops"),
    Workload("randread_4k_qd32", "rand read 4k QD32", "randread", "4k", 32, "iops"),
    Workload("randwrite_4k_qd1", "rand write 4k QD1", "randwrite", "4k", 1, "p50_us"),
)
WORKLOAD_BY_KEY = {w.key: w for w in WORKLOADS}
#: Workloads during which the primary worker's RSS is sampled.
RSS_WORKLOADS = ("randwrite_4k_qd32", "randread_4k_qd32")
LOWER_IS_BETTER = frozenset({"p50_us", "p99_us", "mean_us"})

SUMMARY_METRICS = (
    "bw_bytes",
    "iops",
    "p50_us",
    "p99_us",
    "mean_us",
    "server_cpu_us_per_op",
    "peer_cpu_us_per_op",
)


class FioError(ValueError):
    """fio's output is missing, malformed or reports an error."""


# --------------------------------------------------------------------------
# fio


def extract_json(text: str) -> dict[str, Any]:
    """The JSON document in fio's output.

    fio's nbd engine prints "fio: connected to NBD server" (and other engines
    other notes) on stdout before the document, so the document is looked for
    at every line that starts with ``{``.
    """
    decoder = json.JSONDecoder()
    starts = [0] if text.startswith("{") else []
    starts += [m.start() + 1 for m in re.finditer(r"\n\{", text)]
    for start in starts:
        try:
            doc, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and "jobs" in doc:
            return doc
    raise FioError(f"no fio JSON document in the output: {text[:200]!r}")


def percentile(pcts: Mapping[str, float], q: float) -> float | None:
    """fio's percentile ``q`` from a ``{"50.000000": ns, ...}`` mapping (None: absent)."""
    for key, value in pcts.items():
        try:
            if abs(float(key) - q) < 1e-6:
                return float(value)
        except ValueError:
            continue
    return None


def _us(ns: float | None) -> float | None:
    return None if ns is None else ns / 1000.0


def fio_summary(doc: Mapping[str, Any], direction: str | None = None) -> dict[str, Any]:
    """Throughput and latency of the first job (run with one job or group_reporting).

    ``direction`` is "read" or "write"; by default the one that moved bytes.
    Latency percentiles are the total latency's when fio reported them
    (``lat_percentiles=1``), else the completion latency's.
    """
    jobs = doc.get("jobs") or []
    if not jobs:
        raise FioError("fio reported no job")
    job = jobs[0]
    if job.get("error"):
        raise FioError(f"fio job {job.get('jobname')!r} failed with error {job['error']}")
    if direction is None:
        moved = [d for d in ("read", "write") if job.get(d, {}).get("io_bytes", 0) > 0]
        if len(moved) != 1:
            raise FioError(f"cannot tell the direction of the job (moved bytes: {moved})")
        direction = moved[0]
    side = job.get(direction)
    if not side:
        raise FioError(f"fio job has no {direction!r} section")
    if side.get("io_bytes", 0) <= 0:
        raise FioError(f"fio job moved no bytes ({direction})")
    lat = side.get("lat_ns") or {}
    clat = side.get("clat_ns") or {}
    pcts = lat.get("percentile") or clat.get("percentile") or {}
    return {
        "direction": direction,
        "bw_bytes": float(side["bw_bytes"]),
        "iops": float(side["iops"]),
        "io_bytes": int(side["io_bytes"]),
        "total_ios": int(side.get("total_ios", 0)),
        "runtime_ms": int(side.get("runtime", 0)),
        "p50_us": _us(percentile(pcts, 50.0)),
        "p99_us": _us(percentile(pcts, 99.0)),
        "mean_us": _us(lat.get("mean", clat.get("mean"))),
    }


# --------------------------------------------------------------------------
# repetitions and ratios


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None when there are none)."""
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def aggregate(reps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median of every summary metric over the repetitions, and their number."""
    out: dict[str, Any] = {m: median(r.get(m) for r in reps) for m in SUMMARY_METRICS}
    out["n"] = len(reps)
    return out


def ratio_of(value: float | None, anchor: float | None, metric: str) -> float | None:
    """``value`` relative to ``anchor``, higher is better (None if either is missing)."""
    if value is None or anchor is None or value <= 0 or anchor <= 0:
        return None
    return anchor / value if metric in LOWER_IS_BETTER else value / anchor


def ratios(
    medians: Mapping[str, Mapping[str, Mapping[str, Any]]], anchor: str = ANCHOR
) -> dict[str, dict[str, float | None]]:
    """``{row: {workload: ratio to the anchor row}}`` for every row in ``medians``."""
    base = medians.get(anchor, {})
    out: dict[str, dict[str, float | None]] = {}
    for row, per_wl in medians.items():
        out[row] = {}
        for wl in WORKLOADS:
            got = per_wl.get(wl.key)
            ref = base.get(wl.key)
            out[row][wl.key] = ratio_of(
                None if got is None else got.get(wl.metric),
                None if ref is None else ref.get(wl.metric),
                wl.metric,
            )
    return out


# --------------------------------------------------------------------------
# targets


@dataclass(frozen=True)
class Target:
    id: str
    text: str
    #: "ratio" (row/workload vs nbdkit), "latency_delta", "resync" or "rss"
    kind: str
    threshold: float
    row: str = ""
    workload: str = ""


TARGETS = (
    Target(
        "P1",
        "memsync seq 1 MiB writes QD16 >= 0.6x nbdkit",
        "ratio",
        0.6,
        "memsync",
        "seqwrite_1m_qd16",
    ),
    Target(
        "P2",
        "memsync rand 4k writes QD32 >= 0.5x nbdkit",
        "ratio",
        0.5,
        "memsync",
        "randwrite_4k_qd32",
    ),
    Target(
        "P3",
        "memsync QD1 4k write p50 <= unreplicated p50 + 100 us",
        "latency_delta",
        100.0,
        "memsync",
        "randwrite_4k_qd1",
    ),
    Target("P4", "resync of dirty extents >= 0.8x raw copy (file -> TCP -> file)", "resync", 0.8),
    Target(
        "P5",
        "rand 4k reads QD32 on the primary (memsync) >= 0.7x nbdkit",
        "ratio",
        0.7,
        "memsync",
        "randread_4k_qd32",
    ),
    Target("M1", "primary worker RSS under QD32 load <= 200 MiB", "rss", 200.0 * MiB),
)


def _metric(
    medians: Mapping[str, Mapping[str, Mapping[str, Any]]], row: str, wl: str, metric: str
) -> float | None:
    value = medians.get(row, {}).get(wl, {}).get(metric)
    return None if value is None else float(value)


def evaluate_target(
    target: Target,
    medians: Mapping[str, Mapping[str, Mapping[str, Any]]],
    resync: Mapping[str, Any] | None = None,
    rss: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """One target: its measured value, the threshold, met (None: not measured)."""
    value: float | None = None
    detail = ""
    if target.kind == "ratio":
        wl = WORKLOAD_BY_KEY[target.workload]
        value = ratio_of(
            _metric(medians, target.row, wl.key, wl.metric),
            _metric(medians, ANCHOR, wl.key, wl.metric),
            wl.metric,
        )
        met = None if value is None else value >= target.threshold
        shown = "n/a" if value is None else f"{value:.2f}x"
    elif target.kind == "latency_delta":
        mine = _metric(medians, target.row, target.workload, "p50_us")
        base = _metric(medians, UNREPLICATED, target.workload, "p50_us")
        value = None if mine is None or base is None else mine - base
        met = None if value is None else value <= target.threshold
        shown = "n/a" if value is None else f"{value:+.0f} us"
        if mine is not None and base is not None:
            detail = f"{target.row} p50 {mine:.0f} us, unreplicated p50 {base:.0f} us"
    elif target.kind == "resync":
        got = None if resync is None else resync.get("resync_bps")
        ref = None if resync is None else resync.get("rawcopy_bps")
        value = ratio_of(got, ref, "bw_bytes")
        met = None if value is None else value >= target.threshold
        shown = "n/a" if value is None else f"{value:.2f}x"
        if got and ref:
            detail = f"resync {got / MiB:.0f} MiB/s, raw copy {ref / MiB:.0f} MiB/s"
    elif target.kind == "rss":
        values = [v for v in (rss or {}).values() if v]
        value = float(max(values)) if values else None
        met = None if value is None else value <= target.threshold
        shown = "n/a" if value is None else f"{value / MiB:.0f} MiB"
        if rss:
            detail = ", ".join(
                f"{row} {v / MiB:.0f} MiB" for row, v in rss.items() if v is not None
            )
    else:
        raise ValueError(f"unknown target kind {target.kind!r}")
    return {
        "id": target.id,
        "text": target.text,
        "value": value,
        "shown": shown,
        "threshold": target.threshold,
        "met": met,
        "detail": detail,
    }


def evaluate_targets(
    medians: Mapping[str, Mapping[str, Mapping[str, Any]]],
    resync: Mapping[str, Any] | None = None,
    rss: Mapping[str, int | None] | None = None,
) -> list[dict[str, Any]]:
    return [evaluate_target(t, medians, resync, rss) for t in TARGETS]


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


# --------------------------------------------------------------------------
# hastd log lines, /proc


_SYNC_DONE = re.compile(r"Synchronization complete\..*?\((\d+) bytes\) synchronized in ([0-9.]+) s")


def parse_sync_complete(line: str) -> tuple[int, float] | None:
    """(bytes, seconds) from the primary's "Synchronization complete." line."""
    m = _SYNC_DONE.search(line)
    return None if m is None else (int(m.group(1)), float(m.group(2)))


def parse_vmrss(status_text: str, field: str = "VmRSS") -> int | None:
    """``field`` (VmRSS, VmHWM...) in bytes from /proc/<pid>/status text (None: absent)."""
    m = re.search(rf"^{re.escape(field)}:\s+(\d+)\s+kB", status_text, re.MULTILINE)
    return None if m is None else int(m.group(1)) * 1024


def parse_proc_stat_cpu(stat_text: str, clk_tck: int = 100) -> tuple[float, float]:
    """(user, system) CPU seconds of a process from the text of /proc/<pid>/stat.

    The command name (field 2) may hold spaces and parentheses (hastd's workers
    set their title), so the fields are counted after its last ")".
    """
    fields = stat_text.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return int(fields[11]) / clk_tck, int(fields[12]) / clk_tck


def cpu_per_op_us(cpu_s: float | None, ops: int) -> float | None:
    """Microseconds of CPU per I/O (None when unknown or no I/O)."""
    return None if cpu_s is None or ops <= 0 else cpu_s * 1e6 / ops


def throughput(nbytes: int | float, seconds: float) -> float | None:
    return None if seconds <= 0 else nbytes / seconds


def fmt_rate(bps: float | None) -> str:
    return "n/a" if bps is None else f"{bps / MiB:.0f} MiB/s"


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"
