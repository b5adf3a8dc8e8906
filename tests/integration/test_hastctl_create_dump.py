"""hastctl create and dump on real files and loop devices (spec 2.1, 2.2)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.hastctl import hastctl

MiB = 1024 * 1024

CONF = """\
resource r0 {{
        on nodea {{
                local {local}
                remote 127.0.0.2
        }}
        on nodeb {{
                local /nonexistent/r0
                remote 127.0.0.1
        }}
}}
resource r1 {{
        on nodea {{
                local {missing}
                remote 127.0.0.2
        }}
        on nodeb {{
                local /nonexistent/r1
                remote 127.0.0.1
        }}
}}
"""


def write_conf(tmp: Path, local: str) -> str:
    conf = tmp / "hast.conf"
    conf.write_text(CONF.format(local=local, missing=tmp / "missing.img"))
    return str(conf)


def parse_dump(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(": ")
        fields[key] = value
    return fields


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "r0.img"
    with open(path, "wb") as f:
        f.truncate(256 * MiB)
    return path


def test_create_dump_256mib_file(tmp_path: Path, image: Path) -> None:
    conf = write_conf(tmp_path, str(image))
    # Some user data that create must not touch.
    with open(image, "r+b") as f:
        f.seek(100 * MiB)
        f.write(b"user data")
    res = hastctl("create", "-c", conf, "r0", node="nodea")
    assert res.returncode == 0, res.stderr
    res = hastctl("dump", "-c", conf, "r0", node="nodea")
    assert res.returncode == 0, res.stderr
    d = parse_dump(res.stdout)
    # 128 extents of 2 MiB -> 16 bitmap bytes -> one 512-byte sector, and
    # the data area starts at the next 4 KiB boundary.
    assert d["resource"] == "r0"
    assert d["datasize"] == f"{256 * MiB - 8192} (256MB)"
    assert d["extentsize"] == "2097152 (2.0MB)"
    assert d["keepdirty"] == "64"
    assert d["localoff"] == "8192"
    assert d["resuid"] == "0"
    assert d["localcnt"] == "0"
    assert d["remotecnt"] == "0"
    assert d["prevrole"] == "init"
    with open(image, "rb") as f:
        f.seek(4096)
        assert f.read(512) == bytes(512)
        f.seek(100 * MiB)
        assert f.read(9) == b"user data"


def test_create_options_and_suffixes(tmp_path: Path, image: Path) -> None:
    conf = write_conf(tmp_path, str(image))
    res = hastctl("create", "-c", conf, "-e", "64k", "-k", "16", "-m", "128M", "r0", node="nodea")
    assert res.returncode == 0, res.stderr
    d = parse_dump(hastctl("dump", "-c", conf, node="nodea").stdout)
    # (128 MiB - 4096) / 64 KiB -> 2048 extents -> 256 bytes -> 512 rounded,
    # then the next 4 KiB boundary.
    assert d["extentsize"].startswith("65536 ")
    assert d["keepdirty"] == "16"
    assert d["localoff"] == "8192"
    assert d["datasize"].startswith(f"{128 * MiB - 8192} ")


@pytest.mark.parametrize(
    ("align", "extentsize", "localoff"),
    [
        # FreeBSD's layout: right after the bitmap, sector aligned.
        ("512", "2M", 4096 + 512),
        # 1 GiB / 64 KiB = 16384 extents -> 2048 bytes of bitmap.
        ("512", "64k", 4096 + 2048),
        ("4k", "64k", 8192),
        # A bitmap of 32 KiB (1 GiB / 4 KiB extents) then a 1 MiB boundary.
        ("1M", "4k", MiB),
    ],
)
def test_create_alignment_of_the_data_area(
    tmp_path: Path, align: str, extentsize: str, localoff: int
) -> None:
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(1024 * MiB + 4096)
    conf = write_conf(tmp_path, str(image))
    res = hastctl("create", "-c", conf, "-a", align, "-e", extentsize, "r0", node="nodea")
    assert res.returncode == 0, res.stderr
    d = parse_dump(hastctl("dump", "-c", conf, node="nodea").stdout)
    assert d["localoff"] == str(localoff)
    assert d["datasize"].startswith(f"{1024 * MiB + 4096 - localoff} ")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-e", "3000"], 65, "not multiple of sector size"),
        (["-e", "1536"], 65, "not a power of 2"),
        (["-e", "256"], 65, "less than sector size"),
        (["-m", "1G"], 65, "larger than provider"),
        (["-e", "12Q"], 64, "Invalid extentsize"),
        (["-a", "3000"], 65, "Alignment (3000) is not a power of 2"),
        (["-k", "x"], 64, "Invalid keepdirty"),
    ],
)
def test_create_rejects(
    tmp_path: Path, image: Path, args: list[str], code: int, message: str
) -> None:
    conf = write_conf(tmp_path, str(image))
    res = hastctl("create", "-c", conf, *args, "r0", node="nodea")
    assert res.returncode == code, res.stderr
    assert message in res.stderr


def test_unknown_resource_and_missing_provider(tmp_path: Path, image: Path) -> None:
    conf = write_conf(tmp_path, str(image))
    res = hastctl("create", "-c", conf, "nosuch", "r0", node="nodea")
    assert res.returncode == 65
    assert "Unknown resource nosuch." in res.stderr
    res = hastctl("create", "-c", conf, "r1", node="nodea")
    assert res.returncode == 66
    assert "missing.img" in res.stderr
    # dump all: r0 wiped (all zeros, never created) -> 66 with a sentence.
    with open(image, "r+b") as f:
        f.truncate(0)
        f.truncate(256 * MiB)
    res = hastctl("dump", "-c", conf, node="nodea")
    assert res.returncode == 66
    assert "no HAST metadata" in res.stderr


def test_config_errors(tmp_path: Path) -> None:
    res = hastctl("dump", "-c", str(tmp_path / "nope.conf"), node="nodea")
    assert res.returncode == 72
    bad = tmp_path / "bad.conf"
    bad.write_text("resource r0 {\n  bogus 1\n}\n")
    res = hastctl("dump", "-c", str(bad), node="nodea")
    assert res.returncode == 78
    assert f"{bad}:2:" in res.stderr
    res = hastctl("create", "-c", str(bad), node="nodea")
    assert res.returncode == 64


@pytest.fixture
def loopdev(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    sector = request.param
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(256 * MiB)
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--sector-size", str(sector), str(backing)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        yield dev, sector
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.root
@pytest.mark.parametrize("loopdev", [512, 4096], indirect=True)
def test_create_dump_loop_device(tmp_path: Path, loopdev: tuple[str, int]) -> None:
    dev, sector = loopdev
    conf = write_conf(tmp_path, dev)
    res = hastctl("create", "-c", conf, "r0", node="nodea")
    assert res.returncode == 0, res.stderr
    res = hastctl("dump", "-c", conf, "r0", node="nodea")
    assert res.returncode == 0, res.stderr
    d = parse_dump(res.stdout)
    # 16 bitmap bytes round up to one sector, then to the next 4 KiB.
    localoff = 8192
    assert sector in (512, 4096)
    assert d["localoff"] == str(localoff)
    assert d["datasize"].startswith(f"{256 * MiB - localoff} ")
    assert d["extentsize"] == "2097152 (2.0MB)"
    assert d["prevrole"] == "init"
