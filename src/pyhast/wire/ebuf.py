"""Ebuf: a byte buffer that grows at both ends (FreeBSD hastd's ebuf.c).

An nv list is encoded into an Ebuf with :meth:`Ebuf.add_tail`; the 5-byte
frame header is then put in front of it with :meth:`Ebuf.add_head`, into the
headroom reserved at allocation time, so the encoded nv bytes are never
moved.  :meth:`Ebuf.data` returns a memoryview of the live window that can be
handed to ``sendmsg``/``writelines`` as is.

Layout of the backing bytearray::

    0            _start               _end                 len(_buf)
    | headroom   | live data (size)   | tailroom           |

Growth never resizes the bytearray in place: a bigger one is allocated and
the live window copied into it.  Memoryviews returned earlier by
:meth:`data` therefore stay valid (they keep showing the old window) and
never block growth with ``BufferError``.  Writes that fit in the current
head- or tailroom are done in place, so do not keep such a view across an
``add_*`` call if you rely on it being a snapshot.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_HEADROOM", "Ebuf"]

#: Headroom reserved in front of the data by default (frame header is 5 bytes).
DEFAULT_HEADROOM: Final = 64
_MIN_TAILROOM: Final = 256

_Bytes = bytes | bytearray | memoryview


def _nbytes(data: _Bytes) -> tuple[_Bytes, int]:
    if isinstance(data, memoryview):
        if data.ndim != 1 or data.itemsize != 1:
            data = data.cast("B")
        return data, data.nbytes
    return data, len(data)


class Ebuf:
    """A bytearray-backed buffer with headroom, growable at head and tail."""

    __slots__ = ("_buf", "_end", "_start")

    def __init__(self, capacity: int = 0, *, headroom: int = DEFAULT_HEADROOM) -> None:
        """Reserve ``headroom`` bytes in front and ``capacity`` bytes of tailroom."""
        if capacity < 0 or headroom < 0:
            raise ValueError("Ebuf capacity and headroom must be >= 0.")
        self._buf = bytearray(headroom + capacity)
        self._start = headroom
        self._end = headroom

    def _regrow(self, head: int, tail: int) -> None:
        """Reallocate with at least ``head`` bytes of headroom and ``tail`` of tailroom."""
        size = self._end - self._start
        new = bytearray(head + size + tail)
        new[head : head + size] = memoryview(self._buf)[self._start : self._end]
        self._buf = new
        self._start = head
        self._end = head + size

    def add_tail(self, data: _Bytes) -> None:
        """Append ``data`` after the live window."""
        data, n = _nbytes(data)
        end = self._end
        if end + n > len(self._buf):
            size = end - self._start
            self._regrow(self._start, max(n, size, _MIN_TAILROOM))
            end = self._end
        self._buf[end : end + n] = data
        self._end = end + n

    def add_head(self, data: _Bytes) -> None:
        """Prepend ``data`` in front of the live window (in the headroom if it fits)."""
        data, n = _nbytes(data)
        start = self._start
        if n > start:
            size = self._end - start
            self._regrow(max(n, start, size, DEFAULT_HEADROOM), len(self._buf) - self._end)
            start = self._start
        self._buf[start - n : start] = data
        self._start = start - n

    def del_head(self, n: int) -> None:
        """Drop ``n`` bytes from the front (they become headroom)."""
        if not 0 <= n <= self._end - self._start:
            raise ValueError(f"Cannot delete {n} bytes from an Ebuf of {self.size()}.")
        self._start += n

    def del_tail(self, n: int) -> None:
        """Drop ``n`` bytes from the end (they become tailroom)."""
        if not 0 <= n <= self._end - self._start:
            raise ValueError(f"Cannot delete {n} bytes from an Ebuf of {self.size()}.")
        self._end -= n

    def data(self) -> memoryview:
        """A view of the live window (no copy)."""
        return memoryview(self._buf)[self._start : self._end]

    def size(self) -> int:
        """Number of live bytes."""
        return self._end - self._start

    def headroom(self) -> int:
        """Bytes that :meth:`add_head` can use without reallocating."""
        return self._start

    def __len__(self) -> int:
        return self._end - self._start

    def __bytes__(self) -> bytes:
        return bytes(memoryview(self._buf)[self._start : self._end])

    def __repr__(self) -> str:
        return f"Ebuf(size={self.size()}, headroom={self._start})"
