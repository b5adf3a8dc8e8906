"""The outputs: the table on stdout, results.md and chart.png."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import parse
from .parse import MiB


def _cell(wl: parse.Workload, med: Mapping[str, Any] | None, ratio: float | None) -> str:
    if not med:
        return "n/a"
    if wl.metric == "bw_bytes":
        absolute = parse.fmt_rate(med.get("bw_bytes"))
    elif wl.metric == "iops":
        iops = med.get("iops")
        absolute = "n/a" if iops is None else f"{iops / 1000:.1f}k IOPS"
    else:
        p50, p99 = med.get("p50_us"), med.get("p99_us")
        absolute = "n/a" if p50 is None or p99 is None else f"p50 {p50:.0f} us, p99 {p99:.0f} us"
    return f"{parse.fmt_ratio(ratio)} ({absolute})"


def table_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (ratios to nbdkit, absolute numbers)."""
    medians = results["medians"]
    ratios = results["ratios"]
    header = ["server", *[w.label for w in parse.WORKLOADS], "RSS QD32 (all runs, HWM)"]
    rows = []
    for row in parse.ROWS:
        if row not in medians:
            continue
        cells = [parse.ROW_LABELS[row]]
        for wl in parse.WORKLOADS:
            cells.append(_cell(wl, medians[row].get(wl.key), ratios[row].get(wl.key)))
        cells.append(_rss_cell(results, row))
        rows.append(cells)
    return header, rows


def _mib(v: float | None) -> str:
    return "n/a" if not v else f"{v / MiB:.0f}"


def _rss_cell(results: Mapping[str, Any], row: str) -> str:
    qd32 = results.get("rss_max", {}).get(row)
    allw = results.get("rss_max_all_workloads", {}).get(row)
    hwm = results.get("vmhwm_end", {}).get(row)
    return f"{_mib(qd32)} MiB ({_mib(allw)}, {_mib(hwm)})"


def cpu_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """CPU microseconds per I/O: server under test / secondary worker."""
    medians = results["medians"]
    header = ["server: CPU us/op (primary / secondary)", *[w.label for w in parse.WORKLOADS]]
    rows = []
    for row in parse.ROWS:
        if row not in medians:
            continue
        cells = [parse.ROW_LABELS[row]]
        for wl in parse.WORKLOADS:
            med = medians[row].get(wl.key) or {}
            srv, peer = med.get("server_cpu_us_per_op"), med.get("peer_cpu_us_per_op")
            cell = "n/a" if srv is None else f"{srv:.0f}"
            if peer is not None:
                cell += f" / {peer:.0f}"
            cells.append(cell)
        rows.append(cells)
    return header, rows


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def extra_lines(results: Mapping[str, Any]) -> list[str]:
    out = []
    rs = results.get("resync") or {}
    if rs.get("skipped"):
        out.append(f"resync: skipped ({rs['skipped']})")
    elif rs:
        out.append(
            f"resync of {rs['bytes'] / MiB:.0f} MiB dirty: {parse.fmt_rate(rs.get('resync_bps'))}"
            f" vs raw copy file->TCP->file {parse.fmt_rate(rs.get('rawcopy_bps'))}"
            f" = {parse.fmt_ratio(rs.get('ratio'))}"
            f" (hastd's own figure: {parse.fmt_rate(rs.get('logged_bps'))})"
        )
    fu = results.get("fuse") or {}
    if fu.get("skipped"):
        base = fu.get("loop_plain")
        extra = "" if not base else f"; loop on a plain file: {parse.fmt_rate(base['bw_bytes'])}"
        out.append(f"/dev/hast + loop seq write: skipped ({fu['skipped']}){extra}")
    elif fu:
        out.append(
            f"seq write 1M QD16 via /dev/hast/<name> + loop: "
            f"{parse.fmt_rate(fu['loop_fuse']['bw_bytes'])} vs loop on a plain file "
            f"{parse.fmt_rate(fu['loop_plain']['bw_bytes'])} = {parse.fmt_ratio(fu.get('ratio'))}"
        )
    return out


def target_lines(results: Mapping[str, Any]) -> list[str]:
    out = []
    for t in results["targets"]:
        line = f"{t['id']} {parse.verdict(t['met']):7} {t['shown']:>9}  {t['text']}"
        if t["detail"]:
            line += f"  [{t['detail']}]"
        out.append(line)
    return out


def render_text(results: Mapping[str, Any]) -> str:
    lines = _text_table(*table_rows(results))
    lines.append("")
    lines += _text_table(*cpu_rows(results))
    lines.append("")
    lines += extra_lines(results)
    lines.append("")
    lines.append("targets:")
    lines += ["  " + t for t in target_lines(results)]
    return "\n".join(lines) + "\n"


def render_markdown(results: Mapping[str, Any]) -> str:
    header, rows = table_rows(results)
    m = results["machine"]
    cfg = results["config"]
    lines = [
        "# pyhast benchmark",
        "",
        f"{m['date']} on {m['cpu_model']} ({m['nproc']} CPUs), kernel {m['kernel']}, "
        f"Python {m['python']}, {m['fio']}, {m['nbdkit']}.",
        f"Mode: {'quick' if cfg['quick'] else 'full'}; backing files {cfg['size'] / MiB:.0f} MiB "
        f"(fio range {cfg['fio_size'] / MiB:.0f} MiB); warm-up {cfg['warmup']:g} s, then "
        f"{cfg['reps']} x {cfg['runtime']:g} s per workload and server (median).  "
        "fio and the server under test on CPU 0, the secondary on CPU 1.",
        "",
        "Ratios are to nbdkit's file plugin, higher is better (QD1: nbdkit p50 / row p50). "
        "RSS: the server's VmRSS sampled during the QD32 runs (in brackets: max over every "
        "run, and VmHWM at the end).",
        "",
        *_md_table(header, rows),
        "",
        "CPU time (user+system) per I/O of the server under test and of the secondary "
        "worker, from /proc/<pid>/stat around each run (less sensitive to the noise than "
        "throughput):",
        "",
        *_md_table(*cpu_rows(results)),
        "",
    ]
    lines += [f"* {x}" for x in extra_lines(results)]
    lines += ["", "## Targets", "", "| id | verdict | value | target | detail |"]
    lines.append("|---|---|---|---|---|")
    for t in results["targets"]:
        lines.append(
            f"| {t['id']} | {parse.verdict(t['met'])} | {t['shown']} | {t['text']} | "
            f"{t['detail']} |"
        )
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"* {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def chart(results: Mapping[str, Any], path: Path) -> None:
    """Grouped bars of the ratios with the targets drawn, resync and P3 beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = results["ratios"]
    rows = [r for r in parse.ROWS if r in ratios]
    fig, axes = plt.subplots(
        1, 3, figsize=(15, 5), gridspec_kw={"width_ratios": [5, 1.2, 1.8]}, layout="constrained"
    )
    ax = axes[0]
    n = len(rows)
    width = 0.8 / max(n, 1)
    for i, row in enumerate(rows):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(parse.WORKLOADS))]
        ys = [ratios[row].get(w.key) or 0.0 for w in parse.WORKLOADS]
        bars = ax.bar(xs, ys, width, label=parse.ROW_LABELS[row])
        ax.bar_label(bars, labels=[f"{y:.2f}" if y else "" for y in ys], fontsize=7)
    by_wl = {t.workload: t for t in parse.TARGETS if t.kind == "ratio" and t.row in rows}
    for j, wl in enumerate(parse.WORKLOADS):
        t = by_wl.get(wl.key)
        if t is None:
            continue
        ax.hlines(t.threshold, j - 0.45, j + 0.45, colors="red", linestyles="dashed")
        ax.annotate(
            f"{t.id} {t.row} >= {t.threshold:g}x",
            (j - 0.45, t.threshold),
            textcoords="offset points",
            xytext=(0, 3),
            color="red",
            fontsize=8,
        )
    ax.set_xticks(range(len(parse.WORKLOADS)), [w.label for w in parse.WORKLOADS])
    ax.set_ylabel("ratio to nbdkit (higher is better; QD1: p50 latency ratio)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.set_title("NBD front door vs nbdkit file plugin")

    ax = axes[1]
    rs = results.get("resync") or {}
    r = rs.get("ratio")
    ax.bar(["resync"], [r or 0.0], color="tab:purple")
    if r:
        ax.annotate(f"{r:.2f}", (0, r), ha="center", xytext=(0, 3), textcoords="offset points")
    ax.axhline(0.8, color="red", linestyle="dashed")
    ax.annotate(
        "P4 >= 0.8x",
        (-0.4, 0.8),
        xytext=(0, 3),
        textcoords="offset points",
        color="red",
        fontsize=8,
    )
    ax.set_title("resync / raw copy")
    ax.set_ylim(0, max(1.1, (r or 0) * 1.15))

    ax = axes[2]
    med = results["medians"]
    base = med.get(parse.UNREPLICATED, {}).get("randwrite_4k_qd1", {}).get("p50_us")
    modes = [m for m in ("fullsync", "memsync", "async") if m in med]
    deltas = []
    for m in modes:
        p50 = med[m].get("randwrite_4k_qd1", {}).get("p50_us")
        deltas.append(0.0 if p50 is None or base is None else p50 - base)
    bars = ax.bar(modes, deltas, color="tab:orange")
    ax.bar_label(bars, labels=[f"{d:+.0f}" for d in deltas], fontsize=8)
    ax.axhline(100.0, color="red", linestyle="dashed")
    ax.annotate(
        "P3 memsync <= +100 us",
        (-0.4, 100.0),
        xytext=(0, 3),
        textcoords="offset points",
        color="red",
        fontsize=8,
    )
    ax.set_ylabel("QD1 4k write p50 minus unreplicated p50 (us)")
    ax.set_title("replication latency cost")
    fig.suptitle(
        f"pyhast bench ({'quick' if results['config']['quick'] else 'full'}, "
        f"{results['machine']['date']}); noisy shared machine"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
