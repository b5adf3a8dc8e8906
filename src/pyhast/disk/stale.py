"""Byte ranges whose local copy is stale: a set of disjoint intervals.

When a local write fails and the secondary's succeeds, only the secondary
holds what was acknowledged for that range; until it is copied back the
primary reads it from the peer.  FreeBSD keeps no such record.  Tracking
whole extents (as pyhast first did) is wrong: other blocks of the extent may
meanwhile hold acknowledged data that only the primary has (a memsync or
async write whose remote outcome turned out unknown), and copying the whole
extent back from the peer would lose them.  So the record is kept per byte
range, and the synchroniser copies exactly these ranges from the peer and the
rest of the extent the other way.

Pure bookkeeping: no I/O.  Intervals are half-open ``[start, end)``, kept
sorted, disjoint and never adjacent (adjacent ones are merged).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator


class StaleRanges:
    """A set of byte ranges (see the module docstring)."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for offset, length in ranges:
            self.add(offset, length)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        """Number of disjoint intervals."""
        return len(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of every interval, in order."""
        for s, e in zip(self._starts, self._ends, strict=True):
            yield s, e - s

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StaleRanges):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    def __repr__(self) -> str:
        return f"StaleRanges({list(self)!r})"

    @property
    def nbytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def add(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset + length)`` stale."""
        if length <= 0:
            return
        start, end = offset, offset + length
        starts, ends = self._starts, self._ends
        # First interval that ends at or after start (touching merges).
        i = bisect.bisect_left(ends, start)
        j = i
        while j < len(starts) and starts[j] <= end:
            start = min(start, starts[j])
            end = max(end, ends[j])
            j += 1
        starts[i:j] = [start]
        ends[i:j] = [end]

    def remove(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset + length)`` up to date."""
        if length <= 0 or not self._starts:
            return
        start, end = offset, offset + length
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, start)
        j = i
        new_starts: list[int] = []
        new_ends: list[int] = []
        while j < len(starts) and starts[j] < end:
            if starts[j] < start:
                new_starts.append(starts[j])
                new_ends.append(start)
            if ends[j] > end:
                new_starts.append(end)
                new_ends.append(ends[j])
            j += 1
        starts[i:j] = new_starts
        ends[i:j] = new_ends

    def overlaps(self, offset: int, length: int) -> bool:
        """True if any byte of ``[offset, offset + length)`` is stale."""
        if not self._starts or length <= 0:
            return False
        i = bisect.bisect_right(self._ends, offset)
        return i < len(self._starts) and self._starts[i] < offset + length

    def split(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Cut ``[offset, offset + length)`` into ``(offset, length, stale)`` pieces."""
        pos, end = offset, offset + length
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, pos)
        while pos < end:
            if i < len(starts) and starts[i] <= pos:
                stop = min(ends[i], end)
                yield pos, stop - pos, True
                i += 1
            else:
                stop = min(starts[i], end) if i < len(starts) else end
                yield pos, stop - pos, False
            pos = stop

    def extents(self, extentsize: int) -> set[int]:
        """Indices of the extents that hold stale bytes."""
        out: set[int] = set()
        for s, e in zip(self._starts, self._ends, strict=True):
            out.update(range(s // extentsize, (e - 1) // extentsize + 1))
        return out

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()

    # -- persistence (the metadata block's ``localstale`` uint64 array) ----------

    def to_array(self) -> tuple[int, ...]:
        """Flattened ``offset, length`` pairs."""
        out: list[int] = []
        for s, e in zip(self._starts, self._ends, strict=True):
            out += (s, e - s)
        return tuple(out)

    @classmethod
    def from_array(cls, values: Iterable[int]) -> StaleRanges:
        """Inverse of :meth:`to_array` (ValueError on an odd count)."""
        vals = list(values)
        if len(vals) % 2:
            raise ValueError("localstale must hold offset, length pairs")
        return cls(zip(vals[0::2], vals[1::2], strict=True))
