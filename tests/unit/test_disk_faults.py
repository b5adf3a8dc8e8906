"""pyhast.disk.faults: rules from a control file switch provider I/O faults at run time."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyhast.disk.faults import FAULTS_ENV, parse_rules, write_rules
from pyhast.disk.provider import Provider

KiB = 1024
SIZE = 1024 * KiB


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "r0-nodeb.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


@pytest.fixture
def control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "faults.json"
    monkeypatch.setenv(FAULTS_ENV, str(path))
    return path


@pytest.fixture
def prov(disk: Path, control: Path) -> Iterator[Provider]:
    with Provider.open(str(disk)) as p:
        yield p


def rules(control: Path, *rules: dict[str, Any], seed: int | None = None) -> None:
    write_rules(control, rules, seed=seed)


def on_disk(disk: Path, offset: int, length: int) -> bytes:
    with disk.open("rb") as f:
        return os.pread(f.fileno(), length, offset)


def test_unset_wraps_nothing(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    with Provider.open(str(disk)) as p:
        for name in ("pread", "pread_into", "preadv", "pwrite", "pwritev", "flush", "delete"):
            assert name not in vars(p), name
        p.pwrite(b"x" * 512, 0)
        assert p.pread(512, 0) == b"x" * 512


def test_no_control_file_means_no_faults(prov: Provider, control: Path) -> None:
    assert not control.exists()
    prov.pwrite(b"a" * 4096, 8192)
    assert prov.pread(4096, 8192) == b"a" * 4096
    prov.flush()
    prov.delete(0, 4096)


def test_eio_on_writes_in_a_range_only(prov: Provider, control: Path, disk: Path) -> None:
    rules(control, {"op": "write", "offset": 64 * KiB, "length": 4 * KiB, "errno": "EIO"})
    with pytest.raises(OSError) as exc:
        prov.pwrite(b"b" * 8192, 62 * KiB)  # overlaps the range's start
    assert exc.value.errno == errno.EIO
    assert on_disk(disk, 62 * KiB, 8192) == bytes(8192)  # nothing landed
    with pytest.raises(OSError):
        prov.pwritev([b"c" * 512, b"d" * 512], 68 * KiB - 512)  # overlaps its end
    prov.pwrite(b"e" * 4096, 68 * KiB)  # just after: fine
    prov.pwrite(b"f" * 4096, 60 * KiB)  # just before: fine
    assert prov.pread(4096, 64 * KiB) == bytes(4096)  # reads are not affected


def test_enospc_and_short_write(prov: Provider, control: Path, disk: Path) -> None:
    rules(control, {"op": "write", "offset": 16 * KiB, "errno": "ENOSPC", "short": True})
    # A request that starts before the range: the part before it lands.
    with pytest.raises(OSError) as exc:
        prov.pwrite(b"g" * 8192, 12 * KiB)
    assert exc.value.errno == errno.ENOSPC
    assert on_disk(disk, 12 * KiB, 8192) == b"g" * 4096 + bytes(4096)
    # One inside the range: the first half lands.
    with pytest.raises(OSError):
        prov.pwritev([b"h" * 4096, b"i" * 4096], 32 * KiB)
    assert on_disk(disk, 32 * KiB, 8192) == b"h" * 4096 + bytes(4096)
    # An explicit byte count, default errno EIO.
    rules(control, {"op": "write", "short": 1000})
    with pytest.raises(OSError) as exc:
        prov.pwrite(b"j" * 4096, 64 * KiB)
    assert exc.value.errno == errno.EIO
    assert on_disk(disk, 64 * KiB, 4096) == b"j" * 1000 + bytes(3096)


def test_read_faults_on_every_read_method(prov: Provider, control: Path) -> None:
    prov.pwrite(b"k" * 4096, 0)
    rules(control, {"op": "read", "errno": 5, "offset": 0, "length": 512})
    with pytest.raises(OSError):
        prov.pread(4096, 0)
    with pytest.raises(OSError):
        prov.pread_into(bytearray(512), 0)
    with pytest.raises(OSError):
        prov.preadv([bytearray(256), bytearray(256)], 0)
    assert prov.pread(512, 512) == b"k" * 512
    prov.pwrite(b"l" * 512, 0)  # writes are not affected


def test_flush_and_delete_faults(prov: Provider, control: Path) -> None:
    rules(control, {"op": ["flush", "delete"], "offset": 10**9, "errno": "EIO"})
    with pytest.raises(OSError):
        prov.flush()  # a flush matches whatever the range
    prov.delete(0, 4096)  # outside the range
    with pytest.raises(OSError):
        prov.delete(0, 2 * 10**9)
    assert prov.flush_supported  # an injected EIO is not "unsupported"


def test_count_limits_the_hits(prov: Provider, control: Path) -> None:
    rules(control, {"op": "write", "errno": "EIO", "count": 2})
    for _ in range(2):
        with pytest.raises(OSError):
            prov.pwrite(b"m" * 512, 0)
    prov.pwrite(b"m" * 512, 0)
    # A reload starts the budget again.
    rules(control, {"op": "write", "errno": "EIO", "count": 1})
    with pytest.raises(OSError):
        prov.pwrite(b"m" * 512, 0)
    prov.pwrite(b"m" * 512, 0)


def test_rate_is_reproducible_with_a_seed(disk: Path, control: Path) -> None:
    rules(control, {"op": "read", "errno": "EIO", "rate": 0.25}, seed=7)

    def failures() -> list[int]:
        out = []
        with Provider.open(str(disk)) as p:
            for i in range(400):
                try:
                    p.pread(512, 0)
                except OSError:
                    out.append(i)
        return out

    first = failures()
    assert 50 < len(first) < 150
    assert failures() == first


def test_delay_only(prov: Provider, control: Path) -> None:
    rules(control, {"op": "write", "delay_ms": 80})
    start = time.monotonic()
    prov.pwrite(b"n" * 512, 0)
    assert time.monotonic() - start >= 0.075
    assert prov.pread(512, 0) == b"n" * 512
    start = time.monotonic()
    prov.pread(512, 0)
    assert time.monotonic() - start < 0.075


def test_path_filter_selects_the_provider(tmp_path: Path, control: Path) -> None:
    paths = []
    for name in ("r0-nodea.img", "r0-nodeb.img"):
        p = tmp_path / name
        p.write_bytes(bytes(64 * KiB))
        paths.append(p)
    rules(control, {"op": "write", "path": "-nodeb.", "errno": "EIO"})
    with Provider.open(str(paths[0])) as a, Provider.open(str(paths[1])) as b:
        a.pwrite(b"o" * 512, 0)
        with pytest.raises(OSError):
            b.pwrite(b"o" * 512, 0)


def test_switching_at_run_time(
    prov: Provider, control: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules(control, {"op": "write", "errno": "EIO"})
    with pytest.raises(OSError):
        prov.pwrite(b"p" * 512, 0)
    rules(control)  # no rules: healed at once (the rename gives a new inode)
    prov.pwrite(b"p" * 512, 0)
    rules(control, {"op": "write", "errno": "ENOSPC"})
    with pytest.raises(OSError) as exc:
        prov.pwrite(b"p" * 512, 0)
    assert exc.value.errno == errno.ENOSPC
    # A broken file is reported once and the previous rules stay.
    with caplog.at_level(logging.WARNING, logger="pyhast.disk.faults"):
        control.write_text("{not json")
        for _ in range(3):
            with pytest.raises(OSError):
                prov.pwrite(b"p" * 512, 0)
    assert sum("ignored" in r.getMessage() for r in caplog.records) == 1
    control.unlink()
    prov.pwrite(b"p" * 512, 0)


def test_first_hit_of_a_rule_is_logged_once(
    prov: Provider, control: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules(control, {"op": "write", "errno": "EIO", "offset": 0, "length": 512})
    with caplog.at_level(logging.WARNING, logger="pyhast.disk.faults"):
        for _ in range(5):
            with pytest.raises(OSError):
                prov.pwrite(b"q" * 512, 0)
    hits = [r.getMessage() for r in caplog.records if "hits" in r.getMessage()]
    assert len(hits) == 1
    assert "write of 512 bytes at offset 0" in hits[0] and "EIO" in hits[0]


def test_local_component_sees_the_faults(disk: Path, control: Path) -> None:
    """The worker's LocalComponent opens its provider through Provider.open."""
    from pyhast.disk.metadata import metadata_create
    from pyhast.log import ResourceAdapter
    from pyhast.worker.local import LocalComponent

    with Provider.open(str(disk)) as p:
        metadata_create(p, "r0", extentsize=64 * KiB, keepdirty=4)
    adapter = ResourceAdapter(logging.getLogger("pyhast.test"), "r0", "primary")
    local = LocalComponent.open(str(disk), "r0", metaflush=False, log=adapter)
    try:
        rules(
            control,
            {"op": "write", "offset": local.localoff + 4096, "length": 4096, "errno": "EIO"},
        )
        local.write(0, b"r" * 4096)
        with pytest.raises(OSError):
            local.write(4096, b"r" * 4096)
    finally:
        local.close()


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"rules": {}},
        {"rules": [{"op": "sing"}]},
        {"rules": [{"errno": "ENOTANERRNO"}]},
        {"rules": [{"rate": 2}]},
        {"rules": [{"offset": -1}]},
        {"rules": [{"short": "yes"}]},
        {"rules": [{"colour": "red"}]},
        {"seed": "x"},
    ],
)
def test_malformed_control_files(doc: object) -> None:
    with pytest.raises(ValueError):
        parse_rules(doc)


def test_write_rules_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    write_rules(path, [{"op": "read", "errno": "EIO"}], seed=3)
    doc = json.loads(path.read_text())
    assert doc == {"rules": [{"op": "read", "errno": "EIO"}], "seed": 3}
    (rule,), seed = parse_rules(doc)
    assert rule.ops == {"read"} and rule.errno == errno.EIO and seed == 3
    with pytest.raises(ValueError):
        write_rules(path, [{"op": "nope"}])
    assert json.loads(path.read_text()) == doc  # the old file stays
