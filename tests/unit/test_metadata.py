"""The metadata block (spec 4): field names, types, padding, checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyhast.defaults import METADATA_SIZE
from pyhast.disk.metadata import (
    CreateError,
    Metadata,
    bitmap_read,
    metadata_create,
    metadata_read,
    metadata_write,
)
from pyhast.disk.provider import Provider
from pyhast.enums import Role
from pyhast.errors import ExitCode, MetadataError
from pyhast.wire.nv import NV, NVType

MiB = 1024 * 1024


@pytest.fixture
def provider(tmp_path: Path) -> Provider:
    path = tmp_path / "p.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    return Provider.open(str(path))


def test_block_layout_matches_freebsd() -> None:
    md = Metadata("r0", 1000 * 512, 65536, 64, 4608, 9, 3, 2, Role.SECONDARY)
    block = md.encode()
    assert len(block) == METADATA_SIZE
    nv = NV.decode(block)
    types = {name: t for name, t, _ in nv}
    assert types == {
        "resource": NVType.STRING,
        "datasize": NVType.UINT64,
        "extentsize": NVType.UINT32,
        "keepdirty": NVType.UINT32,
        "offset": NVType.UINT64,
        "resuid": NVType.UINT64,
        "localcnt": NVType.UINT64,
        "remotecnt": NVType.UINT64,
        "prevrole": NVType.STRING,
    }
    # The nv list ends in zero padding (a zero type byte ends the list).
    assert block[nv.encoded_size() :] == bytes(METADATA_SIZE - nv.encoded_size())
    assert Metadata.decode(block) == md


def test_create_read_write(provider: Provider) -> None:
    md = metadata_create(provider, "r0", extentsize=1 * MiB, keepdirty=8)
    # (64 MiB - 4096) / 1 MiB -> 64 extents -> 8 bytes -> one 512-byte sector,
    # and the data area starts at the next 4 KiB boundary.
    assert (md.localoff, md.datasize, md.mapsize) == (8192, 64 * MiB - 8192, 4096)
    assert bitmap_read(provider, md) == bytes(4096)
    md.resuid, md.localcnt, md.remotecnt, md.prevrole = 42, 5, 4, Role.PRIMARY
    metadata_write(provider, md)
    assert metadata_read(provider, "r0") == md
    with pytest.raises(MetadataError, match="is not part of resource other"):
        metadata_read(provider, "other")


def test_zeroed_and_garbage_blocks_refused(provider: Provider) -> None:
    with pytest.raises(MetadataError, match="no HAST metadata"):
        metadata_read(provider)
    provider.pwrite(b"\x11" * METADATA_SIZE, 0)
    with pytest.raises(MetadataError, match="invalid"):
        metadata_read(provider)


def test_geometry_checked(provider: Provider) -> None:
    md = metadata_create(provider, "r0")
    md.extentsize = 3 * 512
    metadata_write(provider, md)
    with pytest.raises(MetadataError, match="invalid extent size"):
        metadata_read(provider, "r0")
    md.extentsize = 2 * MiB
    md.datasize = 128 * MiB
    metadata_write(provider, md)
    with pytest.raises(MetadataError, match="more than the provider"):
        metadata_read(provider, "r0")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extentsize": 1536}, "not a power of 2"),
        ({"extentsize": 256}, "less than sector size"),
        ({"extentsize": 1000}, "not multiple of sector size"),
        ({"mediasize": 128 * MiB}, "larger than provider"),
    ],
)
def test_create_refusals(provider: Provider, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(CreateError, match=message) as info:
        metadata_create(provider, "r0", **kwargs)
    assert info.value.exit_code is ExitCode.DATAERR


def test_localstale_is_an_optional_extra_field() -> None:
    # offset, length pairs of stale byte ranges, kept as given
    md = Metadata("r0", 1000 * 512, 65536, 64, 4608, localstale=(4096, 512, 0, 1024))
    nv = NV.decode(md.encode())
    assert nv.get_array("localstale", NVType.UINT64_ARRAY) == (4096, 512, 0, 1024)
    assert Metadata.decode(md.encode()).localstale == (4096, 512, 0, 1024)
    # Without stale ranges the block is exactly FreeBSD's field set.
    assert "localstale" not in NV.decode(Metadata("r0", 512, 65536, 64, 4608).encode())
