"""Unit tests of pyhast.disk.activemap (spec section 5)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyhast.defaults import HAST_EXTENTSIZE, HAST_KEEPDIRTY, MAXPHYS, METADATA_SIZE
from pyhast.disk.activemap import Activemap, SyncChunk

MiB = 1024 * 1024
EXT = HAST_EXTENTSIZE  # 2 MiB


def bits(image: bytes) -> set[int]:
    """Set extents of an LSB-first bitmap."""
    return {i * 8 + b for i, byte in enumerate(image) for b in range(8) if byte >> b & 1}


def make(nextents: int = 16, keepdirty: int = HAST_KEEPDIRTY, **kw: int) -> Activemap:
    return Activemap(nextents * EXT, EXT, keepdirty, 512, **kw)


def walk(am: Activemap) -> Iterator[SyncChunk]:
    while (chunk := am.sync_offset()) is not None:
        yield chunk


# -- geometry -----------------------------------------------------------------


def test_geometry_default_sizes() -> None:
    am = Activemap(1024 * MiB, EXT, 64, 512)
    assert am.nextents == 512
    assert am.mapsize == 512  # 64 bytes rounded up to one sector
    assert am.extentsize == EXT and am.sectorsize == 512 and am.keepdirty == 64
    assert am.mediasize == 1024 * MiB
    assert am.maxphys == MAXPHYS
    assert len(am.bitmap()) == am.mapsize
    assert am.bitmap() == bytes(512)
    assert am.ndirty == 0 and am.nsync == 0


def test_geometry_short_last_extent() -> None:
    am = Activemap(5 * MiB + 512, EXT, 64, 512)
    assert am.nextents == 3
    assert [am.extent_offset(e) for e in range(3)] == [0, EXT, 2 * EXT]
    assert [am.extent_length(e) for e in range(3)] == [EXT, EXT, MiB + 512]
    assert am.offset_to_extent(0) == 0
    assert am.offset_to_extent(EXT - 1) == 0
    assert am.offset_to_extent(EXT) == 1
    assert am.offset_to_extent(5 * MiB + 511) == 2
    for bad in (-1, 5 * MiB + 512):
        with pytest.raises(ValueError):
            am.offset_to_extent(bad)
    for bad in (-1, 3):
        with pytest.raises(ValueError):
            am.extent_offset(bad)
        with pytest.raises(ValueError):
            am.extent_length(bad)


@pytest.mark.parametrize(
    ("mediasize", "extentsize", "sectorsize", "expected"),
    [
        (1, EXT, 512, 512),
        (EXT, EXT, 512, 512),
        (512 * 8 * EXT, EXT, 512, 512),  # 4096 extents = exactly one sector
        (512 * 8 * EXT + 1, EXT, 512, 1024),
        (1 << 40, EXT, 512, 65536),  # 1 TiB: 524288 extents
        (1 << 40, EXT, 4096, 65536),
        (100 * MiB, 4096, 4096, 4096),  # 25600 extents, 3200 bytes
    ],
)
def test_ondisk_size(mediasize: int, extentsize: int, sectorsize: int, expected: int) -> None:
    assert Activemap.ondisk_size(mediasize, extentsize, sectorsize) == expected
    assert Activemap(mediasize, extentsize, 1, sectorsize).mapsize == expected


def test_ondisk_size_as_hastctl_create() -> None:
    # create: mapsize from (mediasize - 4096); datasize = mediasize - 4096 - mapsize.
    mediasize = 256 * MiB
    mapsize = Activemap.ondisk_size(mediasize - METADATA_SIZE, EXT, 512)
    assert mapsize == 512
    datasize = mediasize - METADATA_SIZE - mapsize
    am = Activemap(datasize, EXT, 64, 512)
    assert am.mapsize == mapsize
    assert am.nextents == 128


@pytest.mark.parametrize(
    ("mediasize", "extentsize", "keepdirty", "sectorsize"),
    [
        (0, EXT, 64, 512),
        (-1, EXT, 64, 512),
        (MiB, 3 * MiB, 64, 512),  # not a power of two
        (MiB, 1536, 64, 512),  # multiple of the sector size, not a power of two
        (MiB, 256, 64, 512),  # smaller than a sector
        (MiB, 0, 64, 512),
        (MiB, EXT, 0, 512),
        (MiB, EXT, 64, 0),
        (MiB, EXT, 64, 520),
    ],
)
def test_invalid_geometry(mediasize: int, extentsize: int, keepdirty: int, sectorsize: int) -> None:
    with pytest.raises(ValueError):
        Activemap(mediasize, extentsize, keepdirty, sectorsize)


def test_invalid_geometry_ondisk_size() -> None:
    with pytest.raises(ValueError):
        Activemap.ondisk_size(MiB, 3 * MiB, 512)
    with pytest.raises(ValueError):
        Activemap.ondisk_size(0, EXT, 512)
    with pytest.raises(ValueError):
        Activemap(MiB, EXT, 64, 512, maxphys=0)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 512), (0, 0), (0, -512), (16 * EXT - 511, 512), (16 * EXT, 1), (0, 16 * EXT + 1)],
)
def test_range_checks(offset: int, length: int) -> None:
    am = make()
    for call in (am.write_start, am.write_complete, am.need_sync, am.is_dirty, am.in_syncmap):
        with pytest.raises(ValueError):
            call(offset, length)
    am._check_invariants()
    assert am.ndirty == 0


# -- regular writes -----------------------------------------------------------


def test_write_ahead_bit_before_dispatch() -> None:
    am = make()
    assert am.write_start(3 * EXT + 4096, 4096) is True
    # The image the caller writes *before* dispatching already has the bit.
    assert bits(am.bitmap()) == {3}
    assert am.ndirty == 1
    assert am.is_dirty(3 * EXT, 1)
    assert not am.is_dirty(2 * EXT, EXT)
    assert not am.in_syncmap(3 * EXT, 1)
    # Completion: the extent is in the keepdirty list, the image keeps it.
    assert am.write_complete(3 * EXT + 4096, 4096) is False
    assert am.ndirty == 0
    assert bits(am.bitmap()) == {3}
    assert not am.is_dirty(3 * EXT, EXT)
    am._check_invariants()


def test_bit_order_lsb_first() -> None:
    am = make(nextents=20)
    am.write_start(9 * EXT, 1)
    am.write_start(0, 1)
    am.write_start(15 * EXT, 1)
    image = am.bitmap()
    assert image[0] == 0x01
    assert image[1] == 0x02 | 0x80
    assert image[2:] == bytes(len(image) - 2)


def test_second_write_same_extent_needs_no_bitmap_write() -> None:
    am = make()
    assert am.write_start(0, 4096) is True
    assert am.write_start(8192, 4096) is False  # in flight, same extent
    assert am.write_complete(0, 4096) is False
    assert am.write_complete(8192, 4096) is False
    assert am.write_start(0, 4096) is False  # in keepdirty, clean
    am.write_complete(0, 4096)
    am._check_invariants()


def test_write_spanning_extents() -> None:
    am = make()
    assert am.write_start(EXT - 512, 2 * EXT + 1024) is True  # extents 0..3
    assert bits(am.bitmap()) == {0, 1, 2, 3}
    assert am.ndirty == 4
    assert am.write_start(EXT, 512) is False
    am.write_complete(EXT - 512, 2 * EXT + 1024)
    assert am.ndirty == 1
    am.write_complete(EXT, 512)
    assert am.ndirty == 0
    am._check_invariants()


def test_pending_counters() -> None:
    am = make()
    for _ in range(3):
        am.write_start(0, 512)
    am.write_complete(0, 512)
    am.write_complete(0, 512)
    assert am.is_dirty(0, 512)
    am.write_complete(0, 512)
    assert not am.is_dirty(0, 512)
    with pytest.raises(ValueError, match="No write is pending on extent 0"):
        am.write_complete(0, 512)
    am._check_invariants()


def test_write_complete_without_start_changes_nothing() -> None:
    am = make()
    am.write_start(0, 512)
    before = am.bitmap()
    # Extent 0 pending, extent 1 not: the call fails as a whole.
    with pytest.raises(ValueError, match="extent 1"):
        am.write_complete(EXT - 512, 1024)
    assert am.bitmap() == before
    assert am.is_dirty(0, 1)
    am.write_complete(0, 512)
    am._check_invariants()


def test_keepdirty_eviction_65_extents() -> None:
    am = make(nextents=100)
    for ext in range(64):
        assert am.write_start(ext * EXT, 4096) is True
    assert bits(am.bitmap()) == set(range(64))
    # The 65th distinct extent evicts the least recently used one (extent 0).
    assert am.write_start(64 * EXT, 4096) is True
    # Extent 0 still has a write in flight: it stays in the image...
    assert bits(am.bitmap()) == set(range(65))
    # ...until that write completes, which asks for a (lazy) rewrite.
    assert am.write_complete(0, 4096) is True
    assert bits(am.bitmap()) == set(range(1, 65))
    # The others are still in the MRU list: completion needs no rewrite.
    for ext in range(1, 65):
        assert am.write_complete(ext * EXT, 4096) is False
    assert bits(am.bitmap()) == set(range(1, 65))
    assert am.ndirty == 0
    am._check_invariants()


def test_keepdirty_eviction_of_clean_extent_is_lazy() -> None:
    am = make(nextents=100, keepdirty=4)
    for ext in range(4):
        am.write_start(ext * EXT, 1)
        am.write_complete(ext * EXT, 1)
    assert bits(am.bitmap()) == {0, 1, 2, 3}
    assert am.write_start(4 * EXT, 1) is True
    assert bits(am.bitmap()) == {1, 2, 3, 4}
    am.write_complete(4 * EXT, 1)


def test_keepdirty_is_mru() -> None:
    am = make(nextents=100, keepdirty=4)
    for ext in range(4):
        am.write_start(ext * EXT, 1)
        am.write_complete(ext * EXT, 1)
    # Touch extent 0 again: extent 1 becomes the least recently used one.
    assert am.write_start(0, 1) is False
    am.write_complete(0, 1)
    am.write_start(10 * EXT, 1)
    am.write_complete(10 * EXT, 1)
    assert bits(am.bitmap()) == {0, 2, 3, 10}


def test_keepdirty_one_with_multi_extent_write() -> None:
    am = make(nextents=8, keepdirty=1)
    assert am.write_start(0, 3 * EXT) is True
    assert bits(am.bitmap()) == {0, 1, 2}
    assert am.write_complete(0, 3 * EXT) is True  # 0 and 1 were evicted
    assert bits(am.bitmap()) == {2}
    am._check_invariants()


# -- need_sync ----------------------------------------------------------------


def test_need_sync_clean_extent() -> None:
    am = make()
    assert am.need_sync(5 * EXT, 4096) is True
    assert bits(am.bitmap()) == {5}
    assert am.in_syncmap(5 * EXT, 1) and am.is_dirty(5 * EXT, 1)
    assert am.nsync == 1 and am.ndirty == 1
    assert am.need_sync(5 * EXT + 8192, 4096) is False  # already marked
    assert am.nsync == 1
    am._check_invariants()


def test_need_sync_before_write_complete_keeps_extent_dirty() -> None:
    # Degraded mode / failed remote write: the extent stays dirty after the
    # local write completes (FreeBSD: counter += ext2reqs).
    am = make()
    assert am.write_start(2 * EXT, 4096) is True
    assert am.need_sync(2 * EXT, 4096) is False  # image already has the bit
    assert am.write_complete(2 * EXT, 4096) is False
    assert am.is_dirty(2 * EXT, 1) and am.in_syncmap(2 * EXT, 1)
    assert bits(am.bitmap()) == {2}
    assert am.ndirty == 1
    am._check_invariants()


def test_need_sync_in_keepdirty_needs_no_write() -> None:
    am = make()
    am.write_start(0, 1)
    am.write_complete(0, 1)
    assert am.need_sync(0, 1) is False  # the image already has extent 0
    assert am.nsync == 1


def test_write_to_syncmap_extent_needs_no_bitmap_write() -> None:
    # Deviation from FreeBSD: the extent is already in the image.
    am = make()
    am.need_sync(4 * EXT, 1)
    assert am.write_start(4 * EXT, 1) is False
    assert am.write_complete(4 * EXT, 1) is False
    assert am.in_syncmap(4 * EXT, 1)
    am._check_invariants()


def test_need_sync_range_spanning_extents() -> None:
    am = make()
    assert am.need_sync(EXT + 1, 2 * EXT) is True
    assert bits(am.bitmap()) == {1, 2, 3}
    assert am.in_syncmap(0, EXT + 2) and not am.in_syncmap(0, EXT)
    assert am.nsync == 3


# -- synchronisation walk -----------------------------------------------------


def test_sync_walk_chunks_and_short_last_extent() -> None:
    am = Activemap(5 * MiB + 512, EXT, 64, 512)  # 3 extents, last 1 MiB + 512
    am.need_sync(0, 1)
    am.need_sync(2 * EXT, 1)
    am.sync_rewind()
    chunks = list(walk(am))
    assert chunks == [
        SyncChunk(-1, 0, MiB),
        SyncChunk(0, MiB, MiB),
        SyncChunk(-1, 4 * MiB, MiB),
        SyncChunk(2, 5 * MiB, 512),
    ]
    # Nothing completed: the extents stay marked and the pass is over.
    assert am.sync_offset() is None
    assert am.nsync == 2


def test_sync_walk_complete() -> None:
    am = make(nextents=8)
    am.need_sync(6 * EXT, 1)
    am.need_sync(1 * EXT, 1)
    am.need_sync(3 * EXT, 1)
    am.sync_rewind()
    done = []
    for chunk in walk(am):
        assert chunk.length == MAXPHYS
        assert am.in_syncmap(chunk.offset, chunk.length)
        if chunk.syncext != -1:
            assert chunk.offset + chunk.length == am.extent_offset(chunk.syncext) + EXT
            assert am.extent_complete(chunk.syncext) is True
            done.append(chunk.syncext)
    assert done == [1, 3, 6]
    assert am.nsync == 0 and am.ndirty == 0
    assert am.bitmap() == bytes(am.mapsize)
    assert am.sync_offset() is None  # stays over until the next rewind
    am._check_invariants()


def test_sync_extent_smaller_than_maxphys() -> None:
    am = Activemap(10 * 65536 + 4096, 65536, 64, 4096)  # 11 extents, last is 4 KiB
    am.set_all()
    chunks = []
    for chunk in walk(am):
        chunks.append(chunk)
        am.extent_complete(chunk.syncext)
    assert [c.syncext for c in chunks] == list(range(11))
    assert [c.length for c in chunks] == [65536] * 10 + [4096]
    assert am.nsync == 0


def test_sync_extent_complete_with_writes_in_flight() -> None:
    am = make()
    am.write_start(0, 4096)
    am.need_sync(0, 4096)
    am.sync_rewind()
    am.sync_offset()
    chunk = am.sync_offset()
    assert chunk is not None and chunk.syncext == 0
    assert am.extent_complete(0) is False
    assert not am.in_syncmap(0, 1)
    assert am.is_dirty(0, 1)  # the regular write is still pending
    am.write_complete(0, 4096)
    assert am.ndirty == 0
    am._check_invariants()


def test_sync_extent_complete_returns_true_only_when_image_loses_bit() -> None:
    am = make(nextents=4)
    am.write_start(0, 1)
    am.write_complete(0, 1)  # extent 0 in keepdirty
    am.need_sync(0, 2 * EXT)
    am.sync_rewind()
    results = {}
    for chunk in walk(am):
        if chunk.syncext != -1:
            results[chunk.syncext] = am.extent_complete(chunk.syncext)
    assert results == {0: False, 1: True}
    assert bits(am.bitmap()) == {0}


def test_sync_failed_chunk_keeps_extent_and_retries_after_rewind() -> None:
    am = make(nextents=4)
    am.need_sync(0, 3 * EXT)
    am.sync_rewind()
    seen = []
    for chunk in walk(am):
        seen.append(chunk.offset)
        # The first chunk of extent 1 "fails": do not complete extent 1.
        if chunk.syncext not in (-1, 1):
            am.extent_complete(chunk.syncext)
    assert seen == [0, MiB, EXT, EXT + MiB, 2 * EXT, 2 * EXT + MiB]
    assert am.nsync == 1 and am.in_syncmap(EXT, 1)
    assert bits(am.bitmap()) == {1}
    am.sync_rewind()
    again = list(walk(am))
    assert again == [SyncChunk(-1, EXT, MiB), SyncChunk(1, EXT + MiB, MiB)]
    am.extent_complete(1)
    assert am.nsync == 0
    am._check_invariants()


def test_need_sync_on_extent_being_copied_copies_it_again() -> None:
    am = make(nextents=4)
    am.need_sync(EXT, 2 * EXT)  # extents 1, 2
    am.sync_rewind()
    assert am.sync_offset() == SyncChunk(-1, EXT, MiB)
    # A remote write to the first half of extent 1 fails after that half was copied.
    am.write_start(EXT, 4096)
    assert am.need_sync(EXT, 4096) is False
    am.write_complete(EXT, 4096)
    assert am.sync_offset() == SyncChunk(1, EXT + MiB, MiB)
    assert am.extent_complete(1) is False  # still to be copied
    assert am.in_syncmap(EXT, 1)
    rest = []
    for chunk in walk(am):
        rest.append(chunk)
        if chunk.syncext != -1:
            am.extent_complete(chunk.syncext)
    # Extent 2, then extent 1 again from its start (same pass).
    assert rest == [
        SyncChunk(-1, 2 * EXT, MiB),
        SyncChunk(2, 2 * EXT + MiB, MiB),
        SyncChunk(-1, EXT, MiB),
        SyncChunk(1, EXT + MiB, MiB),
    ]
    assert am.nsync == 0
    am._check_invariants()


def test_need_sync_behind_cursor_is_picked_up_in_same_pass() -> None:
    am = make(nextents=8)
    am.need_sync(5 * EXT, 1)
    am.sync_rewind()
    chunks = []
    while (chunk := am.sync_offset()) is not None:
        chunks.append(chunk.offset)
        if chunk.syncext != -1:
            am.extent_complete(chunk.syncext)
            if chunk.syncext == 5:
                am.need_sync(EXT, 1)  # behind the cursor
    assert chunks == [5 * EXT, 5 * EXT + MiB, EXT, EXT + MiB]
    assert am.nsync == 0


def test_need_sync_ahead_of_cursor_does_not_copy_twice() -> None:
    am = make(nextents=8)
    am.need_sync(EXT, 1)
    am.need_sync(5 * EXT, 1)
    am.sync_rewind()
    am.sync_offset()
    am.need_sync(5 * EXT, 1)  # not started yet: it will be copied entirely later
    ends = []
    for chunk in walk(am):
        if chunk.syncext != -1:
            ends.append(chunk.syncext)
            assert am.extent_complete(chunk.syncext) is True
    assert ends == [1, 5]
    assert am.nsync == 0


def test_rewind_restarts_interrupted_extent() -> None:
    am = make(nextents=4)
    am.need_sync(0, EXT)
    am.sync_rewind()
    assert am.sync_offset() == SyncChunk(-1, 0, MiB)
    am.need_sync(0, 1)  # marked for resync...
    am.sync_rewind()  # ...but a rewind copies it from the start anyway
    assert list(walk(am)) == [SyncChunk(-1, 0, MiB), SyncChunk(0, MiB, MiB)]
    assert am.extent_complete(0) is True
    assert am.nsync == 0


def test_sync_offset_without_work() -> None:
    am = make()
    assert am.sync_offset() is None
    am.sync_rewind()
    assert am.sync_offset() is None
    am.need_sync(0, 1)
    assert am.sync_offset() is None  # not rewound yet (FreeBSD: syncoff -2)
    am.sync_rewind()
    assert am.sync_offset() == SyncChunk(-1, 0, MiB)


def test_extent_complete_errors() -> None:
    am = make()
    with pytest.raises(ValueError, match="not marked"):
        am.extent_complete(0)
    with pytest.raises(ValueError):
        am.extent_complete(16)
    with pytest.raises(ValueError):
        am.extent_complete(-1)


def test_sync_walk_large_sparse_map() -> None:
    am = Activemap(1 << 40, EXT, 64, 512)
    marked = [3, 70_000, 524_287]
    for ext in marked:
        am.need_sync(ext * EXT, 1)
    am.sync_rewind()
    ends = [c.syncext for c in walk(am) if c.syncext != -1]
    assert ends == marked


# -- merge / load / set_all / clear_all ----------------------------------------


def test_merge() -> None:
    am = make(nextents=20)
    am.need_sync(0, 1)
    peer = bytearray(am.mapsize)
    peer[0] = 0b0000_0101  # extents 0 and 2
    peer[2] = 0b0001_0000  # extent 20 is beyond nextents: ignored
    peer[1] = 0b0000_1000  # extent 11
    assert am.merge(bytes(peer)) is True
    assert bits(am.bitmap()) == {0, 2, 11}
    assert am.nsync == 3
    assert am.merge(bytes(peer)) is False  # nothing new
    assert am.merge(bytes(am.mapsize)) is False
    ends = [c.syncext for c in walk(am) if c.syncext != -1]  # merge rewinds
    assert ends == [0, 2, 11]
    am._check_invariants()


def test_merge_keeps_pending_writes() -> None:
    # FreeBSD's activemap_merge overwrites the counter; we must not lose the write.
    am = make()
    am.write_start(0, 4096)
    assert am.merge(b"\x01\x00") is False  # extent 0 already in the image
    for chunk in walk(am):
        if chunk.syncext != -1:
            am.extent_complete(chunk.syncext)
    assert am.is_dirty(0, 1) and not am.in_syncmap(0, 1)
    am.write_complete(0, 4096)
    assert am.ndirty == 0
    am._check_invariants()


def test_merge_and_load_reject_short_bitmap() -> None:
    am = make(nextents=20)  # needs 3 bytes
    with pytest.raises(ValueError, match="too short"):
        am.merge(b"\xff\xff")
    with pytest.raises(ValueError, match="too short"):
        am.load(b"\xff\xff")
    am.merge(b"\x00\x00\x00")  # exact, unpadded size is enough


def test_load() -> None:
    am = make(nextents=20)
    am.write_start(19 * EXT, 1)
    am.write_complete(19 * EXT, 1)  # in keepdirty: forgotten by load
    image = bytearray(am.mapsize)
    image[0] = 0x81
    image[2] = 0xFF  # only extents 16..19 exist
    am.load(image)
    assert bits(am.bitmap()) == {0, 7, 16, 17, 18, 19}
    assert am.ndirty == 6 and am.nsync == 6
    assert [c.syncext for c in walk(am) if c.syncext != -1] == [0, 7, 16, 17, 18, 19]
    am._check_invariants()


def test_load_with_pending_writes_is_refused() -> None:
    am = make()
    am.write_start(0, 1)
    with pytest.raises(ValueError, match="pending"):
        am.load(bytes(am.mapsize))


def test_bitmap_round_trip_through_load() -> None:
    am = make(nextents=40)
    am.write_start(3 * EXT, 1)
    am.need_sync(17 * EXT, 1)
    image = am.bitmap()
    fresh = make(nextents=40)
    fresh.load(image)
    assert fresh.bitmap() == image
    assert fresh.nsync == 2


def test_set_all_and_clear_all() -> None:
    am = Activemap(5 * MiB + 512, EXT, 64, 512)
    am.write_start(0, 1)
    assert am.set_all() is True
    assert bits(am.bitmap()) == {0, 1, 2}
    assert am.nsync == 3 and am.ndirty == 3
    assert am.set_all() is False
    assert am.clear_all() is True
    assert am.nsync == 0
    assert bits(am.bitmap()) == {0}  # the pending write stays tracked
    assert am.sync_offset() is None
    assert am.clear_all() is False
    am.write_complete(0, 1)
    assert am.bitmap() == bytes(am.mapsize)
    am._check_invariants()


def test_clear_all_ends_walk() -> None:
    am = make()
    am.set_all()
    assert am.sync_offset() is not None
    am.clear_all()
    assert am.sync_offset() is None
    am.sync_rewind()
    assert am.sync_offset() is None


def test_repr() -> None:
    assert "nextents=16" in repr(make())
