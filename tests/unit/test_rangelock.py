"""Tests of pyhast.disk.rangelock."""

from __future__ import annotations

import pytest

from pyhast.disk.rangelock import RangeLocks


def test_empty() -> None:
    locks = RangeLocks()
    assert len(locks) == 0
    assert not locks.islocked(0, 1 << 40)


def test_overlap_rules() -> None:
    locks = RangeLocks()
    locks.lock(4096, 4096)  # [4096, 8192)
    assert locks.islocked(4096, 4096)
    assert locks.islocked(0, 4097)  # touches the first byte
    assert locks.islocked(8191, 1)  # the last byte
    assert locks.islocked(5000, 10)  # inside
    assert locks.islocked(0, 1 << 20)  # covering
    assert not locks.islocked(0, 4096)  # ends right before
    assert not locks.islocked(8192, 4096)  # starts right after


def test_overlapping_and_duplicate_locks() -> None:
    # Regular writes never exclude each other: the same range may be held twice.
    locks = RangeLocks()
    locks.lock(0, 4096)
    locks.lock(0, 4096)
    locks.lock(2048, 4096)
    assert len(locks) == 3
    locks.unlock(0, 4096)
    assert locks.islocked(0, 1)
    locks.unlock(0, 4096)
    assert not locks.islocked(0, 2048)
    assert locks.islocked(2048, 1)
    locks.unlock(2048, 4096)
    assert len(locks) == 0
    assert not locks.islocked(0, 1 << 20)


def test_unlock_requires_exact_match() -> None:
    locks = RangeLocks()
    locks.lock(0, 8192)
    for offset, length in [(0, 4096), (4096, 4096), (0, 8193), (1, 8192)]:
        with pytest.raises(ValueError, match="not locked"):
            locks.unlock(offset, length)
    assert len(locks) == 1
    locks.unlock(0, 8192)
    with pytest.raises(ValueError):
        locks.unlock(0, 8192)


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, 0), (0, -1)])
def test_invalid_ranges(offset: int, length: int) -> None:
    locks = RangeLocks()
    with pytest.raises(ValueError):
        locks.lock(offset, length)
    with pytest.raises(ValueError):
        locks.islocked(offset, length)
    assert len(locks) == 0


def test_two_instances_sync_versus_regular() -> None:
    # How the primary uses it: sync waits for regular writes and vice versa.
    regular, sync = RangeLocks(), RangeLocks()
    regular.lock(1 << 20, 65536)
    assert sync.islocked(1 << 20, 1 << 20) is False
    assert regular.islocked(1 << 20, 1 << 20)  # the sync chunk must wait
    regular.unlock(1 << 20, 65536)
    sync.lock(1 << 20, 1 << 20)
    assert sync.islocked((1 << 20) + 4096, 4096)  # a regular write must wait
    assert not sync.islocked(0, 4096)
    assert "1048576" in repr(sync)
