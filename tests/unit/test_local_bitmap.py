"""The local component's activemap writes: write-ahead per extent, lost bits deferred.

A real provider file; the durable bitmap write is held in its thread by an
event so that the test sees what waits for it and what does not.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhast.defaults import METADATA_SIZE
from pyhast.disk.metadata import bitmap_read, metadata_create
from pyhast.disk.provider import Provider
from pyhast.log import ResourceAdapter
from pyhast.worker import local as local_mod
from pyhast.worker.local import LocalComponent

KiB = 1024
EXTENT = 64 * KiB


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalComponent]:
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(METADATA_SIZE + 8 * KiB + 64 * EXTENT)
    p = Provider.open(str(disk))
    try:
        metadata_create(p, "r0", extentsize=EXTENT, keepdirty=2)
    finally:
        p.close()
    adapter = ResourceAdapter(logging.getLogger("test"), "r0", "primary")
    comp = LocalComponent.open(str(disk), "r0", metaflush=True, log=adapter)
    yield comp
    comp.close()


def write_ahead(local: LocalComponent, e: int) -> asyncio.Future[None]:
    """What the primary does first for a write into extent ``e``, which gains its bit."""
    assert local.activemap.write_start(e * EXTENT, 4 * KiB)
    return asyncio.ensure_future(local.bitmap_flush(extents=range(e, e + 1)))


def on_disk(comp: LocalComponent) -> bytes:
    return bitmap_read(comp.provider, comp.md)[: comp.activemap.mapsize]


class HeldWrites:
    """Holds every durable bitmap write in its thread until released."""

    def __init__(self, comp: LocalComponent, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.count = 0
        real = comp.provider.pwrite_durable

        def held(data: bytes, offset: int) -> None:
            self.count += 1
            self.started.set()
            assert self.release.wait(10)
            real(data, offset)

        monkeypatch.setattr(comp.provider, "pwrite_durable", held)


async def wait_started(ev: threading.Event) -> None:
    for _ in range(200):
        if ev.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the bitmap write did not start")


def test_a_write_waits_only_for_the_bitmap_write_of_its_own_extents(
    local: LocalComponent, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldWrites(local, monkeypatch)

    async def main() -> None:
        flush = write_ahead(local, 0)
        await wait_started(held.started)
        # Another write to extent 0 added nothing but depends on that write ...
        same = asyncio.ensure_future(local.bitmap_settled(range(0, 1)))
        # ... one to an extent nobody is writing the bitmap for does not.
        await asyncio.wait_for(local.bitmap_settled(range(5, 6)), 1)
        await asyncio.sleep(0.05)
        assert not same.done() and not flush.done()
        held.release.set()
        await asyncio.wait_for(asyncio.gather(flush, same), 5)
        assert on_disk(local)[0] & 1
        # Nothing in flight: free.
        await asyncio.wait_for(local.bitmap_settled(range(0, 64)), 1)

    asyncio.run(main())
    assert held.count == 1


def test_concurrent_bitmap_writes_are_shared(
    local: LocalComponent, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldWrites(local, monkeypatch)

    async def main() -> None:
        first = write_ahead(local, 0)
        await wait_started(held.started)
        others = [write_ahead(local, e) for e in (1, 2, 3)]
        await asyncio.sleep(0)  # one pass: each asks for its write, then waits
        held.release.set()
        await asyncio.wait_for(asyncio.gather(first, *others), 5)
        assert on_disk(local)[0] & 0b1111 == 0b1111

    asyncio.run(main())
    assert held.count == 2  # the first, then one for the three that queued behind it


def test_lost_bits_are_written_later_without_a_flush(
    local: LocalComponent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_mod, "LAZY_BITMAP_DELAY", 0.2)
    durable = []
    real = local.provider.pwrite_durable
    monkeypatch.setattr(
        local.provider, "pwrite_durable", lambda d, o: (durable.append(o), real(d, o))
    )

    async def main() -> None:
        am = local.activemap
        # keepdirty 2: extents 0..2 written and completed leave 0 out of the MRU.
        for e in range(3):
            await write_ahead(local, e)
        assert on_disk(local)[0] & 0b111 == 0b111
        updates = local.stat_activemap_update
        lost = False
        for e in range(3):
            lost |= am.write_complete(e * EXTENT, 4 * KiB)
        assert lost
        local.bitmap_lost_bits()
        await asyncio.sleep(0.05)
        assert on_disk(local)[0] & 0b111 == 0b111  # not yet
        assert local.stat_activemap_update == updates
        for _ in range(100):  # due after LAZY_BITMAP_DELAY (0.2 s)
            if on_disk(local) == am.bitmap():
                break
            await asyncio.sleep(0.02)
        assert on_disk(local) == am.bitmap()
        assert on_disk(local)[0] & 1 == 0
        assert local.stat_activemap_update == updates + 1

    asyncio.run(main())
    assert len(durable) == 3  # the lost bits went out with a plain write


def test_lost_bits_ride_on_the_next_durable_write(
    local: LocalComponent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_mod, "LAZY_BITMAP_DELAY", 0.2)

    async def main() -> None:
        am = local.activemap
        for e in range(3):
            await write_ahead(local, e)
        for e in range(3):
            am.write_complete(e * EXTENT, 4 * KiB)
        local.bitmap_lost_bits()
        await write_ahead(local, 10)
        assert on_disk(local) == am.bitmap()
        updates = local.stat_activemap_update
        await asyncio.sleep(0.4)
        assert local.stat_activemap_update == updates  # nothing left to write

    asyncio.run(main())


def test_a_cancelled_bitmap_write_still_releases_who_waits_for_it(
    local: LocalComponent, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldWrites(local, monkeypatch)

    async def main() -> None:
        first = write_ahead(local, 0)
        await wait_started(held.started)
        queued = write_ahead(local, 1)
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(local.bitmap_settled(range(1, 2)))
        await asyncio.sleep(0)  # one pass: the waiter is parked on write 1
        queued.cancel()
        held.release.set()
        await asyncio.wait_for(first, 5)
        await asyncio.wait_for(waiter, 5)
        assert on_disk(local)[0] & 0b11 == 0b11

    asyncio.run(main())


def test_writes_arriving_together_share_the_bitmap_writes(
    local: LocalComponent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: a burst of writes to new extents costs one or two bitmap
    writes, not one each (the first is in flight when the others ask)."""
    from pyhast.enums import Replication
    from pyhast.worker.primary import PrimaryDevice

    held = HeldWrites(local, monkeypatch)
    log = ResourceAdapter(logging.getLogger("test"), "r0", "primary")

    async def main() -> None:
        dev = PrimaryDevice(local, replication=Replication.ASYNC, log=log)
        burst = asyncio.gather(*(dev.write(e * EXTENT, bytes(4 * KiB), False) for e in range(8)))
        await wait_started(held.started)
        # Every write of the burst set its bit and asked for its bitmap write
        # (one step, no await in between) while the first write is held.
        assert local.activemap.ndirty == 8
        held.release.set()
        await asyncio.wait_for(burst, 5)
        assert on_disk(local)[0] == 0xFF
        assert held.count <= 2, held.count

    asyncio.run(main())
