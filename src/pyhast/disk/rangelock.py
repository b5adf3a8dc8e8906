"""Bookkeeping of locked byte ranges (FreeBSD ``rangelock.c``).

The primary keeps two instances: one for regular writes in flight and one for
the synchronisation chunk being copied. A regular write waits while its range
overlaps a locked sync range and vice versa; regular writes never exclude each
other, so one instance may hold overlapping (even identical) ranges.

This module only records ranges. Waiting (asyncio conditions, threads) is the
caller's business, as is serialising calls. Every operation is O(number of
locks), which stays small (at most the number of requests in flight).
"""

from __future__ import annotations

__all__ = ["RangeLocks"]


class RangeLocks:
    """A multiset of locked ``[offset, offset + length)`` ranges."""

    __slots__ = ("_ranges",)

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []

    def islocked(self, offset: int, length: int) -> bool:
        """True if ``[offset, offset + length)`` overlaps any locked range."""
        _check(offset, length)
        end = offset + length
        return any(start < end and offset < start + size for start, size in self._ranges)

    def lock(self, offset: int, length: int) -> None:
        """Record ``[offset, offset + length)`` as locked (overlaps are allowed)."""
        _check(offset, length)
        self._ranges.append((offset, length))

    def unlock(self, offset: int, length: int) -> None:
        """Release one lock taken with exactly the same offset and length.

        Raises ValueError if there is none.
        """
        try:
            self._ranges.remove((offset, length))
        except ValueError:
            raise ValueError(f"Range (offset {offset}, length {length}) is not locked.") from None

    def __len__(self) -> int:
        return len(self._ranges)

    def __repr__(self) -> str:
        return f"<RangeLocks {self._ranges!r}>"


def _check(offset: int, length: int) -> None:
    if offset < 0 or length <= 0:
        raise ValueError(f"Invalid range (offset {offset}, length {length}).")
