"""Stateful property test of Activemap against a simple reference model.

The model keeps, in the plainest possible way, what the spec says the map must
know: writes in flight per extent, the set of extents to synchronise and the
keepdirty MRU list. After every step it checks:

* the safety invariant: every extent with a pending write or in the syncmap is
  set in ``bitmap()`` (and, more strongly, the image is exactly
  ``pending | syncmap | keepdirty``);
* every boolean result means what it says: "gained a bit" for write_start,
  need_sync, merge and set_all; "lost a bit" for write_complete,
  extent_complete and clear_all;
* an extent only leaves the syncmap through extent_complete, and only if every
  chunk of it was handed out by the walk *after* it was last marked (a write
  that failed remotely behind the sync cursor is never lost);
* walk chunks never cross an extent boundary and never exceed maxphys.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pyhast.disk.activemap import Activemap


def _bits(image: bytes) -> set[int]:
    return {i * 8 + b for i, byte in enumerate(image) for b in range(8) if byte >> b & 1}


class ActivemapModel(RuleBasedStateMachine):
    am: Activemap

    @initialize(
        shift=st.integers(min_value=9, max_value=13),
        nfull=st.integers(min_value=0, max_value=12),
        tail=st.integers(min_value=0, max_value=3),
        keepdirty=st.integers(min_value=1, max_value=5),
        maxphys_shift=st.integers(min_value=9, max_value=12),
    )
    def setup(self, shift: int, nfull: int, tail: int, keepdirty: int, maxphys_shift: int) -> None:
        extentsize = 1 << shift
        # A short last extent when tail > 0 (in 512-byte sectors).
        mediasize = nfull * extentsize + min(tail * 512, extentsize - 512) or extentsize
        self.am = Activemap(mediasize, extentsize, keepdirty, 512, maxphys=1 << maxphys_shift)
        self.limit = keepdirty
        self.nextents = self.am.nextents
        self.pending: Counter[int] = Counter()
        self.inflight: list[tuple[int, int]] = []
        self.sync: set[int] = set()
        self.mru: list[int] = []  # least recently used first
        self.clock = 0
        self.marked_at: dict[int, int] = {}
        self.copied_at: dict[int, int] = {}  # chunk offset -> time handed out
        self.failed: set[int] = set()
        self.pass_started: dict[int, int] = {}  # extent -> time its first chunk was handed out

    # -- helpers -------------------------------------------------------------

    def extents(self, offset: int, length: int) -> range:
        es = self.am.extentsize
        return range(offset // es, (offset + length - 1) // es + 1)

    def image(self) -> set[int]:
        return _bits(self.am.bitmap())

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def mark(self, exts: range | list[int] | set[int]) -> None:
        now = self.tick()
        for ext in exts:
            self.sync.add(ext)
            self.marked_at[ext] = now

    def draw_range(self, data: st.DataObject) -> tuple[int, int]:
        """Mostly short ranges (one or two extents), sometimes anything."""
        size = self.am.mediasize
        offset = data.draw(st.integers(min_value=0, max_value=size - 1), label="offset")
        short = min(size - offset, self.am.extentsize)
        length = data.draw(
            st.integers(min_value=1, max_value=short)
            | st.integers(min_value=1, max_value=size - offset),
            label="length",
        )
        return offset, length

    # -- regular writes ------------------------------------------------------

    @rule(data=st.data())
    def write_start(self, data: st.DataObject) -> None:
        offset, length = self.draw_range(data)
        before = self.image()
        result = self.am.write_start(offset, length)
        after = self.image()
        exts = self.extents(offset, length)
        for ext in exts:
            self.pending[ext] += 1
            if ext in self.mru:
                self.mru.remove(ext)
            self.mru.append(ext)
            if len(self.mru) > self.limit:
                self.mru.pop(0)
        self.inflight.append((offset, length))
        assert result == bool(after - before)
        # Write-ahead: the image written before dispatch covers the write.
        assert set(exts) <= after

    @precondition(lambda self: self.inflight)
    @rule(data=st.data(), remote_failed=st.booleans())
    def write_complete(self, data: st.DataObject, remote_failed: bool) -> None:
        index = data.draw(st.integers(min_value=0, max_value=len(self.inflight) - 1))
        offset, length = self.inflight.pop(index)
        if remote_failed:
            self.need_sync_range(offset, length)
        before = self.image()
        result = self.am.write_complete(offset, length)
        after = self.image()
        for ext in self.extents(offset, length):
            self.pending[ext] -= 1
            if not self.pending[ext]:
                del self.pending[ext]
        assert result == bool(before - after)
        assert after <= before

    def need_sync_range(self, offset: int, length: int) -> None:
        before = self.image()
        result = self.am.need_sync(offset, length)
        after = self.image()
        self.mark(self.extents(offset, length))
        assert result == bool(after - before)
        assert before <= after

    @rule(data=st.data())
    def need_sync(self, data: st.DataObject) -> None:
        self.need_sync_range(*self.draw_range(data))

    # -- whole-map operations -------------------------------------------------

    @rule(data=st.data())
    def merge(self, data: st.DataObject) -> None:
        nbytes = (self.nextents + 7) // 8
        peer = data.draw(st.binary(min_size=nbytes, max_size=nbytes + 4), label="peer")
        before = self.image()
        result = self.am.merge(peer)
        after = self.image()
        marked = {e for e in _bits(peer) if e < self.nextents}
        self.mark(marked)
        if marked:  # merge rewinds the walk (as FreeBSD) unless the peer map is empty
            self.pass_started.clear()
        assert result == bool(after - before)

    @precondition(lambda self: not self.inflight)
    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        nbytes = (self.nextents + 7) // 8
        image = data.draw(st.binary(min_size=nbytes, max_size=nbytes), label="image")
        self.am.load(image)
        self.sync.clear()
        self.mru.clear()
        self.pass_started.clear()
        self.mark({e for e in _bits(image) if e < self.nextents})

    @rule()
    def set_all(self) -> None:
        before = self.image()
        result = self.am.set_all()
        self.mark(range(self.nextents))
        self.pass_started.clear()
        assert result == bool(self.image() - before)

    @rule()
    def clear_all(self) -> None:
        before = self.image()
        result = self.am.clear_all()
        self.sync.clear()
        self.mru.clear()
        self.pass_started.clear()
        assert result == bool(before - self.image())

    # -- synchronisation walk ---------------------------------------------------

    @rule()
    def sync_rewind(self) -> None:
        self.am.sync_rewind()
        self.pass_started.clear()

    @rule(ok=st.integers(min_value=0, max_value=4).map(bool))
    def sync_step(self, ok: bool) -> None:
        self.step(ok)

    @rule()
    def full_pass(self) -> None:
        """Without new marks or failures, one pass leaves nothing to synchronise."""
        self.sync_rewind()
        bound = self.nextents * (self.am.extentsize // self.am.maxphys + 1) + 1
        for _ in range(bound):
            if not self.step(ok=True):
                break
        else:
            raise AssertionError("the walk does not end")
        assert self.am.nsync == 0
        assert self.sync == set()

    def step(self, ok: bool) -> bool:
        """One chunk of the walk; False when the pass is over."""
        am = self.am
        chunk = am.sync_offset()
        if chunk is None:
            return False
        ext = am.offset_to_extent(chunk.offset)
        start = am.extent_offset(ext)
        end = start + am.extent_length(ext)
        assert 0 < chunk.length <= am.maxphys
        assert chunk.offset + chunk.length <= end
        assert (chunk.offset - start) % am.maxphys == 0
        assert ext in self.sync, "the walk handed out an extent that needs no sync"
        assert chunk.syncext == (ext if chunk.offset + chunk.length == end else -1)
        if chunk.offset == start:
            self.failed.discard(ext)
            if ext in self.pass_started:
                # Copied twice in one pass only if marked again since the first copy.
                assert self.marked_at[ext] > self.pass_started[ext], ext
            self.pass_started[ext] = self.clock + 1
        self.copied_at[chunk.offset] = self.tick()
        if not ok:
            self.failed.add(ext)
        if chunk.syncext == -1 or ext in self.failed:
            return True
        before = self.image()
        result = am.extent_complete(ext)
        after = self.image()
        assert result == bool(before - after)
        if not am.in_syncmap(start, 1):
            # The extent left the syncmap: every chunk was copied after its last mark.
            for off in range(start, end, am.maxphys):
                assert self.copied_at.get(off, 0) > self.marked_at[ext], (ext, off)
            self.sync.discard(ext)
        return True

    # -- invariants ----------------------------------------------------------

    @invariant()
    def image_matches_model(self) -> None:
        if not hasattr(self, "am"):
            return
        image = self.image()
        dirty = set(self.pending) | self.sync
        assert dirty <= image, "an extent with a pending write or to sync is clean on disk"
        assert image == dirty | set(self.mru)
        assert self.am.ndirty == len(dirty)
        assert self.am.nsync == len(self.sync)
        assert len(self.am.bitmap()) == self.am.mapsize
        for ext in range(self.nextents):
            off = self.am.extent_offset(ext)
            assert self.am.in_syncmap(off, 1) == (ext in self.sync)
            assert self.am.is_dirty(off, 1) == (ext in dirty)
        self.am._check_invariants()


ActivemapModel.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestActivemapModel = ActivemapModel.TestCase
