"""The benchmark's pure functions (bench/lib/parse.py): fio output, ratios, targets.

The benchmark itself (bench/run.py) is not a test; these check what it computes
from what it measured.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from bench.lib import parse
from bench.lib.parse import MiB

# --------------------------------------------------------------------------
# fio output


def fio_doc(
    direction: str = "write",
    *,
    bw: float = 1276161,
    iops: float = 311.56,
    io_bytes: int = 3829760,
    total_ios: int = 935,
    lat_p50: int | None = 921600,
    lat_p99: int | None = 4112384,
    clat_p50: int = 905216,
    clat_p99: int = 4112384,
    error: int = 0,
) -> dict[str, Any]:
    """A fio 3.33 --output-format=json document, trimmed to what the parser reads."""
    side = {
        "io_bytes": io_bytes,
        "bw_bytes": bw,
        "iops": iops,
        "runtime": 3001,
        "total_ios": total_ios,
        "clat_ns": {
            "mean": 3191673.57,
            "percentile": {
                "1.000000": 321536,
                "50.000000": clat_p50,
                "99.000000": clat_p99,
                "99.900000": 692060160,
            },
        },
        "lat_ns": {"mean": 3205054.66},
    }
    if lat_p50 is not None:
        side["lat_ns"]["percentile"] = {"50.000000": lat_p50, "99.000000": lat_p99}
    idle = {"io_bytes": 0, "bw_bytes": 0, "iops": 0.0, "runtime": 0, "total_ios": 0}
    job = {
        "jobname": "randwrite_4k_qd1",
        "error": error,
        "read": idle,
        "write": idle,
        "trim": idle,
    }
    job[direction] = side
    return {"fio version": "fio-3.33", "jobs": [job]}


def test_extract_json_skips_the_nbd_engine_banner() -> None:
    text = "fio: connected to NBD server\n" + json.dumps(fio_doc(), indent=2) + "\n"
    assert parse.extract_json(text)["fio version"] == "fio-3.33"


def test_extract_json_plain_and_with_trailing_text() -> None:
    doc = fio_doc()
    assert parse.extract_json(json.dumps(doc))["jobs"][0]["jobname"] == "randwrite_4k_qd1"
    text = "note: {not json\n" + json.dumps(doc, indent=1) + "\nfio: done\n"
    assert parse.extract_json(text)["jobs"]


@pytest.mark.parametrize("text", ["", "fio: connected to NBD server\n", '{"no": "jobs"}\n'])
def test_extract_json_without_a_document(text: str) -> None:
    with pytest.raises(parse.FioError):
        parse.extract_json(text)


def test_summary_of_a_write_job_uses_total_latency_percentiles() -> None:
    s = parse.fio_summary(fio_doc())
    assert s["direction"] == "write"
    assert s["bw_bytes"] == 1276161
    assert s["iops"] == pytest.approx(311.56)
    assert s["total_ios"] == 935
    assert s["p50_us"] == pytest.approx(921.6)
    assert s["p99_us"] == pytest.approx(4112.384)
    assert s["mean_us"] == pytest.approx(3205.05466)


def test_summary_falls_back_to_completion_latency() -> None:
    s = parse.fio_summary(fio_doc(lat_p50=None))
    assert s["p50_us"] == pytest.approx(905.216)


def test_summary_of_a_read_job_finds_the_direction() -> None:
    s = parse.fio_summary(fio_doc("read", bw=283e6, iops=69100.0))
    assert s["direction"] == "read"
    assert s["iops"] == 69100.0


def test_summary_refuses_failed_or_empty_jobs() -> None:
    with pytest.raises(parse.FioError, match="error 5"):
        parse.fio_summary(fio_doc(error=5))
    with pytest.raises(parse.FioError):
        parse.fio_summary(fio_doc(io_bytes=0))
    with pytest.raises(parse.FioError):
        parse.fio_summary({"jobs": []})
    with pytest.raises(parse.FioError):
        parse.fio_summary(fio_doc(), direction="read")


def test_percentile_lookup() -> None:
    pcts = {"50.000000": 10.0, "99.000000": 20.0, "99.900000": 30.0}
    assert parse.percentile(pcts, 50) == 10.0
    assert parse.percentile(pcts, 99.9) == 30.0
    assert parse.percentile(pcts, 90) is None


# --------------------------------------------------------------------------
# medians and ratios


def test_median_ignores_missing_values() -> None:
    assert parse.median([3.0, None, 1.0, 2.0]) == 2.0
    assert parse.median([4.0, 1.0]) == 2.5
    assert parse.median([None]) is None


def test_aggregate_takes_the_median_of_every_metric() -> None:
    reps = [
        {"bw_bytes": 1.0, "iops": 10.0, "p50_us": 5.0, "p99_us": 9.0, "mean_us": 6.0},
        {"bw_bytes": 3.0, "iops": 30.0, "p50_us": 7.0, "p99_us": 9.5, "mean_us": 6.5},
        {"bw_bytes": 2.0, "iops": 20.0, "p50_us": 6.0, "p99_us": 99.0, "mean_us": 7.0},
    ]
    agg = parse.aggregate(reps)
    assert agg["bw_bytes"] == 2.0
    assert agg["iops"] == 20.0
    assert agg["p50_us"] == 6.0
    assert agg["p99_us"] == 9.5
    assert agg["n"] == 3
    assert agg["server_cpu_us_per_op"] is None


def test_ratio_is_higher_is_better_for_latency_too() -> None:
    assert parse.ratio_of(50.0, 100.0, "bw_bytes") == 0.5
    assert parse.ratio_of(50.0, 100.0, "iops") == 0.5
    # twice nbdkit's latency is a ratio of 0.5
    assert parse.ratio_of(200.0, 100.0, "p50_us") == 0.5
    assert parse.ratio_of(None, 100.0, "iops") is None
    assert parse.ratio_of(10.0, 0.0, "iops") is None


def full_medians() -> dict[str, dict[str, dict[str, float]]]:
    def row(bw: float, wiops: float, riops: float, p50: float) -> dict[str, dict[str, float]]:
        return {
            "seqwrite_1m_qd16": {"bw_bytes": bw},
            "randwrite_4k_qd32": {"iops": wiops},
            "randread_4k_qd32": {"iops": riops},
            "randwrite_4k_qd1": {"p50_us": p50, "p99_us": 2 * p50},
        }

    return {
        "nbdkit": row(2000 * MiB, 60000, 70000, 40.0),
        "none": row(1800 * MiB, 30000, 90000, 60.0),
        "fullsync": row(500 * MiB, 5000, 85000, 700.0),
        "memsync": row(1200 * MiB, 30000, 49000, 160.0),
        "async": row(600 * MiB, 6000, 90000, 300.0),
    }


def test_ratios_per_row_and_workload() -> None:
    r = parse.ratios(full_medians())
    assert r["nbdkit"] == {w.key: 1.0 for w in parse.WORKLOADS}
    assert r["memsync"]["seqwrite_1m_qd16"] == pytest.approx(0.6)
    assert r["memsync"]["randwrite_4k_qd32"] == pytest.approx(0.5)
    assert r["memsync"]["randread_4k_qd32"] == pytest.approx(0.7)
    assert r["memsync"]["randwrite_4k_qd1"] == pytest.approx(0.25)


def test_ratios_without_the_anchor_or_a_workload() -> None:
    m = full_medians()
    del m["nbdkit"]["randread_4k_qd32"]
    r = parse.ratios(m)
    assert r["memsync"]["randread_4k_qd32"] is None
    assert parse.ratios({"memsync": m["memsync"]})["memsync"]["seqwrite_1m_qd16"] is None


# --------------------------------------------------------------------------
# targets


def by_id(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in results}


def test_targets_met_exactly_at_their_thresholds() -> None:
    resync = {"resync_bps": 240 * MiB, "rawcopy_bps": 300 * MiB}
    rss = {"none": 30 * MiB, "memsync": 200 * MiB, "async": None}
    t = by_id(parse.evaluate_targets(full_medians(), resync, rss))
    assert [x["id"] for x in parse.evaluate_targets(full_medians())] == [
        "P1",
        "P2",
        "P3",
        "P4",
        "P5",
        "M1",
    ]
    assert t["P1"]["met"] is True and t["P1"]["value"] == pytest.approx(0.6)
    assert t["P2"]["met"] is True and t["P2"]["value"] == pytest.approx(0.5)
    # memsync p50 160 us vs unreplicated 60 us: +100 us, the limit
    assert t["P3"]["met"] is True and t["P3"]["value"] == pytest.approx(100.0)
    assert "160 us" in t["P3"]["detail"]
    assert t["P4"]["met"] is True and t["P4"]["value"] == pytest.approx(0.8)
    assert t["P5"]["met"] is True and t["P5"]["value"] == pytest.approx(0.7)
    assert t["M1"]["met"] is True and t["M1"]["value"] == 200 * MiB
    assert t["M1"]["shown"] == "200 MiB"


def test_targets_not_met_just_below() -> None:
    m = full_medians()
    m["memsync"]["seqwrite_1m_qd16"]["bw_bytes"] = 1199 * MiB
    m["memsync"]["randwrite_4k_qd32"]["iops"] = 29999
    m["memsync"]["randwrite_4k_qd1"]["p50_us"] = 160.5
    m["memsync"]["randread_4k_qd32"]["iops"] = 48999
    resync = {"resync_bps": 239 * MiB, "rawcopy_bps": 300 * MiB}
    t = by_id(parse.evaluate_targets(m, resync, {"async": 201 * MiB}))
    assert {k: v["met"] for k, v in t.items()} == {
        "P1": False,
        "P2": False,
        "P3": False,
        "P4": False,
        "P5": False,
        "M1": False,
    }
    assert parse.verdict(t["P1"]["met"]) == "NOT met"


def test_targets_without_measurements_are_not_applicable() -> None:
    t = by_id(parse.evaluate_targets({"nbdkit": full_medians()["nbdkit"]}))
    assert all(x["met"] is None and x["value"] is None for x in t.values())
    assert parse.verdict(None) == "n/a"
    assert t["P4"]["shown"] == "n/a"


# --------------------------------------------------------------------------
# hastd log, /proc


def test_parse_sync_complete_line() -> None:
    line = (
        "nodea: [INFO] [bsync] (primary) Synchronization complete. 256MB (268430848 bytes) "
        "synchronized in 0.8 s (310MB/sec)."
    )
    assert parse.parse_sync_complete(line) == (268430848, 0.8)
    assert parse.parse_sync_complete("nodea: [INFO] Synchronization started.") is None


def test_parse_vmrss_and_hwm() -> None:
    text = "Name:\thastd\nVmHWM:\t  219984 kB\nVmRSS:\t   38012 kB\nThreads:\t2\n"
    assert parse.parse_vmrss(text) == 38012 * 1024
    assert parse.parse_vmrss(text, "VmHWM") == 219984 * 1024
    assert parse.parse_vmrss("Name:\tkthreadd\n") is None


def test_parse_proc_stat_with_a_title_holding_spaces_and_parentheses() -> None:
    fields = ["S", *["0"] * 10, "250", "75", *["0"] * 30]
    text = "3866 (hastd: r (primary)) " + " ".join(fields) + "\n"
    assert parse.parse_proc_stat_cpu(text, 100) == (2.5, 0.75)


def test_cpu_per_op() -> None:
    assert parse.cpu_per_op_us(0.5, 5000) == pytest.approx(100.0)
    assert parse.cpu_per_op_us(None, 5000) is None
    assert parse.cpu_per_op_us(1.0, 0) is None


def test_formatting() -> None:
    assert parse.fmt_rate(300 * MiB) == "300 MiB/s"
    assert parse.fmt_rate(None) == "n/a"
    assert parse.fmt_ratio(0.5) == "0.50x"
