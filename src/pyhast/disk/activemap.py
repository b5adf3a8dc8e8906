"""The activemap: HAST's map of dirty extents (FreeBSD ``activemap.c``).

Pure bookkeeping, no I/O, no locking, no logging. The caller (the primary
worker) serialises every call (FreeBSD holds ``hr_amp_lock``) and does the disk
writes that the boolean results ask for.

Model
-----
The data area (``mediasize`` bytes) is cut into ``nextents`` extents of
``extentsize`` bytes (a power of two; the last extent may be short). Per extent
we keep:

* ``pending``: number of regular writes in flight (``write_start`` done,
  ``write_complete`` not yet);
* the **syncmap** bit: the extent must be copied to (or from) the peer;
* membership of the **keepdirty** list: the ``keepdirty`` most recently written
  extents (an MRU list), kept marked on disk so that a busy extent does not
  cost two bitmap writes per write.

An extent is *dirty in memory* (FreeBSD's ``memmap``) iff ``pending > 0`` or it
is in the syncmap. The **on-disk image** returned by :meth:`Activemap.bitmap`
is ``memmap OR keepdirty``, LSB first (extent *n* is byte ``n >> 3``, bit
``1 << (n & 7)``), zero-padded to ``mapsize`` (the bitmap size rounded up to
the sector size).

Invariants (checked by ``tests/fuzz/test_activemap_model.py``)
--------------------------------------------------------------
1. Every extent with a pending write or in the syncmap is set in ``bitmap()``.
2. An extent leaves the syncmap only through :meth:`Activemap.extent_complete`
   (or :meth:`Activemap.clear_all`/:meth:`Activemap.load`): a failed or
   interrupted synchronisation never cleans an extent.
3. ``bitmap()`` never has bits set beyond ``nextents``.

Caller contract (write-ahead rule)
----------------------------------
* ``write_start``, ``need_sync``, ``merge`` and ``set_all`` return True when
  the on-disk image gained a bit. The caller must then write ``bitmap()`` at
  offset ``METADATA_SIZE`` of the provider (and flush it if ``metaflush`` is
  on) **before dispatching the data write**, and before dispatching any other
  write it has started meanwhile to the same extents (FreeBSD serialises every
  write behind it in its single ``ggate_recv`` thread). A False result only
  means "this call added nothing"; a write must still not be dispatched before
  an earlier bitmap write that was asked for one of its extents has completed.
* ``write_complete``, ``extent_complete`` and ``clear_all`` return True when
  the image lost a bit; rewriting it is lazy (it only shrinks what a crash
  would resynchronise: the worker writes it with the next bitmap write, or
  without a flush after a second).
* Remote failures: call ``need_sync`` for the write's range **before**
  ``write_complete``, so that the extent never looks clean in between.

Synchronisation walk
--------------------
``sync_rewind()`` then repeated ``sync_offset()`` yields chunks of at most
``maxphys`` bytes that never cross an extent boundary, extent by extent. A chunk
whose ``syncext`` is not -1 is the last one of extent ``syncext``: once it has
been copied successfully the caller calls ``extent_complete(syncext)``. If any
chunk of an extent failed, the caller skips ``extent_complete``: the extent stays
in the syncmap, is skipped for the rest of this pass and is retried after the
next ``sync_rewind()``. ``sync_offset()`` returns None when the pass is over;
``nsync == 0`` then means the nodes are in sync.

Deviations from FreeBSD (deliberate)
------------------------------------
* FreeBSD folds "in the syncmap" into the pending counter (``+= ext2reqs``,
  ``-= ext2reqs`` on completion) and ``activemap_merge`` *overwrites* the
  counter, losing writes in flight. Here the syncmap bit itself keeps the
  extent dirty; pending counters only count regular writes, so nothing can
  underflow.
* ``write_start`` returns True only when the image gains a bit (the extent was
  neither dirty nor in the keepdirty list); FreeBSD also returns True when an
  extent that is already dirty (e.g. in the syncmap) enters the keepdirty list,
  causing needless synchronous bitmap writes in degraded mode.
  ``need_sync``/``extent_complete`` likewise report image changes only.
* FreeBSD clears an extent from the syncmap when the walk moves past it, even if
  its chunks failed; here only ``extent_complete`` does (invariant 2).
* ``need_sync`` on the extent the walk is currently copying (or has started in
  this pass) marks it to be copied again: FreeBSD only calls ``need_sync`` while
  disconnected, but we also call it on remote write failures while connected, and
  a failed write behind the sync cursor would otherwise leave stale data on the
  peer.
* ``sync_offset`` announces ``syncext`` with the last chunk of the extent
  (call ``extent_complete`` after copying it); FreeBSD reports it on the *next*
  call, which a ``None``-when-done API could not return for the final extent.
* Bits beyond ``nextents`` in a loaded or merged bitmap are ignored.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Final, NamedTuple

from pyhast.defaults import MAXPHYS

__all__ = ["Activemap", "SyncChunk"]

_NONZERO: Final = re.compile(rb"[^\x00]")


class SyncChunk(NamedTuple):
    """One chunk of the synchronisation walk (see :meth:`Activemap.sync_offset`)."""

    #: Extent that this chunk finishes (call ``extent_complete`` after it), or -1.
    syncext: int
    #: Offset of the chunk in the data area.
    offset: int
    #: Length of the chunk (``0 < length <= maxphys``).
    length: int


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class Activemap:
    """Dirty-extent bookkeeping of one resource; see the module docstring."""

    __slots__ = (
        "_extentsize",
        "_keepdirty",
        "_keepdirty_limit",
        "_mapsize",
        "_maxphys",
        "_mediasize",
        "_nbytes",
        "_nextents",
        "_nsync",
        "_pending",
        "_pendmap",
        "_resync",
        "_sectorsize",
        "_shift",
        "_started",
        "_sync_active",
        "_sync_ext",
        "_sync_next",
        "_syncmap",
    )

    def __init__(
        self,
        mediasize: int,
        extentsize: int,
        keepdirty: int,
        sectorsize: int,
        *,
        maxphys: int = MAXPHYS,
    ) -> None:
        """Create an all-clean map covering ``mediasize`` bytes of data.

        Raises ValueError unless ``mediasize > 0``, ``sectorsize`` is a power of
        two, ``extentsize`` is a power of two ``>= sectorsize``, ``keepdirty >= 1``
        and ``maxphys > 0``.
        """
        _check_geometry(mediasize, extentsize, sectorsize)
        if keepdirty < 1:
            raise ValueError(f"keepdirty must be at least 1 (got {keepdirty}).")
        if maxphys <= 0:
            raise ValueError(f"maxphys must be positive (got {maxphys}).")
        self._mediasize = mediasize
        self._extentsize = extentsize
        self._sectorsize = sectorsize
        self._maxphys = maxphys
        self._keepdirty_limit = keepdirty
        self._shift = extentsize.bit_length() - 1
        self._nextents = (mediasize - 1) // extentsize + 1
        self._nbytes = (self._nextents + 7) >> 3
        self._mapsize = Activemap.ondisk_size(mediasize, extentsize, sectorsize)
        #: Regular writes in flight, per extent.
        self._pending = [0] * self._nextents
        #: Bit per extent: pending > 0 (kept so bitmap() needs no Python loop).
        self._pendmap = bytearray(self._nbytes)
        self._syncmap = bytearray(self._nbytes)
        self._nsync = 0
        #: MRU list, least recently used first (values unused).
        self._keepdirty: OrderedDict[int, None] = OrderedDict()
        #: Extents handed out by sync_offset() in this pass, not yet completed.
        self._started: set[int] = set()
        #: Started extents that need_sync() re-marked: copy them again.
        self._resync: set[int] = set()
        self._sync_active = False
        self._sync_ext = -1
        self._sync_next = 0

    # ------------------------------------------------------------------
    # Geometry

    @staticmethod
    def ondisk_size(mediasize: int, extentsize: int, sectorsize: int) -> int:
        """Bytes of bitmap needed for ``mediasize`` bytes of data, rounded up to
        the sector size (``activemap_calc_ondisk_size``; used by hastctl create
        with ``mediasize - METADATA_SIZE``)."""
        _check_geometry(mediasize, extentsize, sectorsize)
        nextents = (mediasize - 1) // extentsize + 1
        nbytes = (nextents + 7) >> 3
        return (nbytes + sectorsize - 1) & ~(sectorsize - 1)

    @property
    def mediasize(self) -> int:
        """Size in bytes of the data area covered by the map."""
        return self._mediasize

    @property
    def extentsize(self) -> int:
        return self._extentsize

    @property
    def sectorsize(self) -> int:
        return self._sectorsize

    @property
    def keepdirty(self) -> int:
        """Maximum length of the keepdirty MRU list."""
        return self._keepdirty_limit

    @property
    def maxphys(self) -> int:
        """Largest synchronisation chunk."""
        return self._maxphys

    @property
    def nextents(self) -> int:
        return self._nextents

    @property
    def mapsize(self) -> int:
        """Length of :meth:`bitmap`: ``ceil(nextents / 8)`` rounded up to the sector size."""
        return self._mapsize

    def offset_to_extent(self, offset: int) -> int:
        """Extent holding byte ``offset`` of the data area."""
        if not 0 <= offset < self._mediasize:
            raise ValueError(f"Offset {offset} is outside the map (mediasize {self._mediasize}).")
        return offset >> self._shift

    def extent_offset(self, extent: int) -> int:
        """Offset of the first byte of ``extent``."""
        self._check_extent(extent)
        return extent << self._shift

    def extent_length(self, extent: int) -> int:
        """Length of ``extent`` (only the last one may be shorter than extentsize)."""
        self._check_extent(extent)
        return min(self._extentsize, self._mediasize - (extent << self._shift))

    # ------------------------------------------------------------------
    # Regular writes

    def write_start(self, offset: int, length: int) -> bool:
        """Call when a write arrives, before dispatching it to any component.

        Returns True if the on-disk image gained a bit: write (and flush)
        ``bitmap()`` before dispatching the write.
        """
        if offset < 0 or length <= 0 or offset + length > self._mediasize:
            raise self._range_error(offset, length)
        shift = self._shift
        first = offset >> shift
        last = (offset + length - 1) >> shift
        pending = self._pending
        keepdirty = self._keepdirty
        if first == last and first in keepdirty:
            # Fast path (steady state): one extent, already in the MRU list.
            count = pending[first]
            pending[first] = count + 1
            if count == 0:
                self._pendmap[first >> 3] |= 1 << (first & 7)
            keepdirty.move_to_end(first)
            return False
        modified = False
        for ext in range(first, last + 1):
            count = pending[ext]
            pending[ext] = count + 1
            if count == 0:
                self._pendmap[ext >> 3] |= 1 << (ext & 7)
            if ext in keepdirty:
                keepdirty.move_to_end(ext)
                continue
            if count == 0 and not (self._syncmap[ext >> 3] >> (ext & 7)) & 1:
                modified = True
            keepdirty[ext] = None
            if len(keepdirty) > self._keepdirty_limit:
                # The evicted extent leaves the image lazily (if it is clean).
                keepdirty.popitem(last=False)
        return modified

    def write_complete(self, offset: int, length: int) -> bool:
        """Call when a write started with ``write_start(offset, length)`` is done.

        Returns True if the on-disk image lost a bit (rewrite it lazily).
        Raises ValueError (and changes nothing) if no write is pending there.
        """
        if offset < 0 or length <= 0 or offset + length > self._mediasize:
            raise self._range_error(offset, length)
        shift = self._shift
        first = offset >> shift
        last = (offset + length - 1) >> shift
        pending = self._pending
        if first == last:
            # Fast path: one extent.
            count = pending[first]
            if count > 1:
                pending[first] = count - 1
                return False
            if count == 0:
                raise ValueError(f"No write is pending on extent {first}.")
            pending[first] = 0
            self._pendmap[first >> 3] &= ~(1 << (first & 7))
            return (
                first not in self._keepdirty and not (self._syncmap[first >> 3] >> (first & 7)) & 1
            )
        for ext in range(first, last + 1):
            if pending[ext] == 0:
                raise ValueError(f"No write is pending on extent {ext}.")
        modified = False
        for ext in range(first, last + 1):
            count = pending[ext] - 1
            pending[ext] = count
            if count == 0:
                self._pendmap[ext >> 3] &= ~(1 << (ext & 7))
                if ext not in self._keepdirty and not (self._syncmap[ext >> 3] >> (ext & 7)) & 1:
                    modified = True
        return modified

    def need_sync(self, offset: int, length: int) -> bool:
        """Mark the extents of a range for synchronisation.

        Call when a write cannot reach the peer (not connected) or its remote
        outcome is a failure or unknown, before its ``write_complete``. An
        extent the current sync pass has already started copying is marked to
        be copied again. Returns True if the on-disk image gained a bit (write
        and flush ``bitmap()`` before dispatching further writes).
        """
        if offset < 0 or length <= 0 or offset + length > self._mediasize:
            raise self._range_error(offset, length)
        shift = self._shift
        modified = False
        for ext in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
            if self._mark_sync(ext):
                modified = True
        return modified

    def _mark_sync(self, ext: int) -> bool:
        syncmap = self._syncmap
        bit = 1 << (ext & 7)
        if syncmap[ext >> 3] & bit:
            if ext in self._started:
                self._resync.add(ext)
            return False
        syncmap[ext >> 3] |= bit
        self._nsync += 1
        return self._pending[ext] == 0 and ext not in self._keepdirty

    # ------------------------------------------------------------------
    # Queries

    @property
    def ndirty(self) -> int:
        """Number of extents dirty in memory (pending writes or to be synchronised)."""
        return self._memmap_int().bit_count()

    @property
    def nsync(self) -> int:
        """Number of extents in the syncmap."""
        return self._nsync

    def is_dirty(self, offset: int, length: int) -> bool:
        """True if any extent of the range has a pending write or must be synchronised."""
        if offset < 0 or length <= 0 or offset + length > self._mediasize:
            raise self._range_error(offset, length)
        shift = self._shift
        pending = self._pending
        syncmap = self._syncmap
        for ext in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
            if pending[ext] or (syncmap[ext >> 3] >> (ext & 7)) & 1:
                return True
        return False

    def in_syncmap(self, offset: int, length: int) -> bool:
        """True if any extent of the range must be synchronised (route reads per extent)."""
        if offset < 0 or length <= 0 or offset + length > self._mediasize:
            raise self._range_error(offset, length)
        shift = self._shift
        syncmap = self._syncmap
        for ext in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
            if (syncmap[ext >> 3] >> (ext & 7)) & 1:
                return True
        return False

    def bitmap(self) -> bytes:
        """The on-disk image (``memmap OR keepdirty``), ``mapsize`` bytes long."""
        out = bytearray(self._memmap_int().to_bytes(self._nbytes, "little"))
        for ext in self._keepdirty:
            out[ext >> 3] |= 1 << (ext & 7)
        out += bytes(self._mapsize - self._nbytes)
        return bytes(out)

    # ------------------------------------------------------------------
    # Whole-map operations

    def load(self, bitmap: bytes | bytearray | memoryview) -> None:
        """Start-up: take the on-disk bitmap as the set of extents to synchronise.

        ``bitmap`` must hold at least ``ceil(nextents / 8)`` bytes (extra bytes and
        bits beyond ``nextents`` are ignored). Resets the keepdirty list and the
        sync walk (rewound). Raises ValueError if writes are pending.
        """
        bits = self._peer_bits(bitmap)
        if any(self._pending):
            raise ValueError("Cannot load a bitmap while writes are pending.")
        self._syncmap[:] = bits.to_bytes(self._nbytes, "little")
        self._nsync = bits.bit_count()
        self._keepdirty.clear()
        self.sync_rewind()

    def merge(self, bitmap: bytes | bytearray | memoryview) -> bool:
        """Handshake: OR the peer's bitmap into the syncmap, then rewind the walk.

        Returns True if the on-disk image gained a bit. The caller writes and
        flushes the bitmap before synchronisation starts either way (spec 5.6).
        """
        bits = self._peer_bits(bitmap)
        if not bits:
            return False
        return self._merge_bits(bits)

    def set_all(self) -> bool:
        """Full synchronisation: every extent goes to the syncmap; rewinds the walk.

        Returns True if the on-disk image gained a bit.
        """
        return self._merge_bits((1 << self._nextents) - 1)

    def clear_all(self) -> bool:
        """Forget everything to synchronise and empty the keepdirty list.

        Pending writes stay tracked. Ends the sync walk. Returns True if the
        on-disk image lost a bit.
        """
        before = self._image_int()
        self._syncmap[:] = bytes(self._nbytes)
        self._nsync = 0
        self._keepdirty.clear()
        self._started.clear()
        self._resync.clear()
        self._sync_active = False
        self._sync_ext = -1
        return self._image_int() != before

    def _merge_bits(self, bits: int) -> bool:
        before = self._image_int()
        syncmap = int.from_bytes(self._syncmap, "little") | bits
        self._syncmap[:] = syncmap.to_bytes(self._nbytes, "little")
        self._nsync = syncmap.bit_count()
        self.sync_rewind()
        return bits & ~before != 0

    # ------------------------------------------------------------------
    # Synchronisation walk

    def sync_rewind(self) -> None:
        """Restart the walk from the first extent of the syncmap (after each connect).

        Extents whose copy was interrupted are copied again from their start.
        """
        self._started.clear()
        self._resync.clear()
        self._sync_active = self._nsync > 0
        self._sync_ext = -1
        self._sync_next = 0

    def sync_offset(self) -> SyncChunk | None:
        """Next chunk to synchronise, or None when the pass is over.

        The chunk's ``syncext`` is the extent it finishes (call
        ``extent_complete(syncext)`` once every chunk of that extent has been
        copied successfully), or -1.
        """
        if not self._sync_active:
            return None
        shift = self._shift
        ext = self._sync_ext
        if (
            ext >= 0
            and self._sync_next < min((ext + 1) << shift, self._mediasize)
            and (self._syncmap[ext >> 3] >> (ext & 7)) & 1
        ):
            offset = self._sync_next
        else:
            ext = self._find_sync(ext + 1, self._nextents)
            if ext < 0:
                ext = self._find_sync(0, self._sync_ext + 1)
            if ext < 0:
                self._sync_active = False
                self._sync_ext = -1
                return None
            offset = ext << shift
            self._sync_ext = ext
        end = min((ext + 1) << shift, self._mediasize)
        length = min(end - offset, self._maxphys)
        self._sync_next = offset + length
        self._started.add(ext)
        return SyncChunk(ext if offset + length == end else -1, offset, length)

    def extent_complete(self, extent: int) -> bool:
        """Call when every chunk of ``extent`` has been synchronised successfully.

        Clears its syncmap bit unless ``need_sync`` re-marked it meanwhile (it is
        then copied again later in this pass). Returns True if the on-disk image
        lost a bit. Raises ValueError if the extent is not in the syncmap.
        """
        self._check_extent(extent)
        bit = 1 << (extent & 7)
        if not self._syncmap[extent >> 3] & bit:
            raise ValueError(f"Extent {extent} is not marked for synchronisation.")
        self._started.discard(extent)
        if extent in self._resync:
            self._resync.discard(extent)
            return False
        self._syncmap[extent >> 3] &= ~bit
        self._nsync -= 1
        return self._pending[extent] == 0 and extent not in self._keepdirty

    def _find_sync(self, start: int, stop: int) -> int:
        """First extent in [start, stop) in the syncmap and not started, or -1."""
        syncmap = self._syncmap
        started = self._started
        ext = start
        while ext < stop:
            byte = syncmap[ext >> 3] >> (ext & 7)
            if byte:
                ext += (byte & -byte).bit_length() - 1
                if ext >= stop:
                    return -1
                if ext not in started:
                    return ext
                ext += 1
                continue
            match = _NONZERO.search(syncmap, (ext >> 3) + 1)
            if match is None:
                return -1
            ext = match.start() << 3
        return -1

    # ------------------------------------------------------------------
    # Helpers

    def _memmap_int(self) -> int:
        return int.from_bytes(self._pendmap, "little") | int.from_bytes(self._syncmap, "little")

    def _image_int(self) -> int:
        image = self._memmap_int()
        for ext in self._keepdirty:
            image |= 1 << ext
        return image

    def _peer_bits(self, bitmap: bytes | bytearray | memoryview) -> int:
        data = memoryview(bitmap).cast("B")
        if len(data) < self._nbytes:
            raise ValueError(
                f"Bitmap too short: {len(data)} bytes, {self._nbytes} needed "
                f"for {self._nextents} extents."
            )
        bits = int.from_bytes(data[: self._nbytes], "little")
        return bits & ((1 << self._nextents) - 1)

    def _check_extent(self, extent: int) -> None:
        if not 0 <= extent < self._nextents:
            raise ValueError(f"Extent {extent} is outside the map ({self._nextents} extents).")

    def _range_error(self, offset: int, length: int) -> ValueError:
        return ValueError(
            f"Range (offset {offset}, length {length}) is empty or outside the map "
            f"(mediasize {self._mediasize})."
        )

    def _check_invariants(self) -> None:
        """Assert internal consistency (tests only; O(nextents))."""
        pending = self._pending
        for ext in range(self._nextents):
            assert bool(pending[ext]) == bool((self._pendmap[ext >> 3] >> (ext & 7)) & 1), ext
            assert pending[ext] >= 0, ext
        assert self._nsync == int.from_bytes(self._syncmap, "little").bit_count()
        assert len(self._keepdirty) <= self._keepdirty_limit
        syncbits = int.from_bytes(self._syncmap, "little")
        assert self._resync <= self._started
        assert all((syncbits >> ext) & 1 for ext in self._started)
        assert self._image_int() >> self._nextents == 0
        image = int.from_bytes(self.bitmap(), "little")
        assert image & self._memmap_int() == self._memmap_int()

    def __repr__(self) -> str:
        return (
            f"<Activemap mediasize={self._mediasize} extentsize={self._extentsize} "
            f"nextents={self._nextents} ndirty={self.ndirty} nsync={self._nsync} "
            f"keepdirty={len(self._keepdirty)}/{self._keepdirty_limit}>"
        )


def _check_geometry(mediasize: int, extentsize: int, sectorsize: int) -> None:
    if mediasize <= 0:
        raise ValueError(f"Media size must be positive (got {mediasize}).")
    if not _is_pow2(sectorsize):
        raise ValueError(f"Sector size must be a power of two (got {sectorsize}).")
    if not _is_pow2(extentsize):
        raise ValueError(f"Extent size must be a power of two (got {extentsize}).")
    if extentsize < sectorsize:
        raise ValueError(f"Extent size ({extentsize}) is less than sector size ({sectorsize}).")
