"""Ebuf: growth at both ends, headroom, views."""

from __future__ import annotations

import pytest

from pyhast.wire.ebuf import DEFAULT_HEADROOM, Ebuf


def test_empty() -> None:
    eb = Ebuf()
    assert len(eb) == eb.size() == 0
    assert bytes(eb.data()) == b""
    assert eb.headroom() == DEFAULT_HEADROOM == 64


def test_tail_then_head_uses_headroom_without_moving_data() -> None:
    eb = Ebuf(16)
    eb.add_tail(b"nv-bytes")
    backing = eb.data().obj
    eb.add_head(b"\x02\x08\x00\x00\x00")
    assert eb.data().obj is backing  # header went into the headroom: no copy
    assert bytes(eb.data()) == b"\x02\x08\x00\x00\x00nv-bytes"
    assert eb.headroom() == DEFAULT_HEADROOM - 5


def test_tail_growth() -> None:
    eb = Ebuf(0, headroom=0)
    expected = bytearray()
    for i in range(2000):
        chunk = bytes([i % 251]) * (i % 7 + 1)
        eb.add_tail(chunk)
        expected += chunk
    assert bytes(eb) == expected
    assert eb.size() == len(expected)


def test_head_growth_beyond_headroom() -> None:
    eb = Ebuf(headroom=4)
    eb.add_tail(b"tail")
    eb.add_head(b"0123456789")  # larger than the headroom
    assert bytes(eb) == b"0123456789tail"
    expected = b"0123456789tail"
    for i in range(500):
        eb.add_head(bytes([i % 256]))
        expected = bytes([i % 256]) + expected
    assert bytes(eb) == expected


def test_del_head_and_tail() -> None:
    eb = Ebuf()
    eb.add_tail(b"hello, world")
    eb.del_head(7)
    assert bytes(eb) == b"world"
    eb.del_tail(2)
    assert bytes(eb) == b"wor"
    eb.add_head(b"<")  # deleted head bytes became headroom again
    eb.add_tail(b">")
    assert bytes(eb) == b"<wor>"
    eb.del_head(0)
    eb.del_tail(0)
    with pytest.raises(ValueError):
        eb.del_head(6)
    with pytest.raises(ValueError):
        eb.del_tail(6)
    with pytest.raises(ValueError):
        eb.del_head(-1)
    eb.del_tail(5)
    assert len(eb) == 0


def test_old_views_survive_growth() -> None:
    eb = Ebuf(4, headroom=0)
    eb.add_tail(b"abcd")
    view = eb.data()
    eb.add_tail(b"efgh" * 100)  # reallocates; must not raise BufferError
    eb.add_head(b"x" * 100)
    assert bytes(view) == b"abcd"
    assert bytes(eb).startswith(b"x" * 100 + b"abcd")


def test_bytes_like_inputs() -> None:
    eb = Ebuf()
    eb.add_tail(bytearray(b"ab"))
    eb.add_tail(memoryview(b"cd"))
    eb.add_head(memoryview(b"\x01\x00").cast("H"))  # non-byte format is taken bytewise
    assert bytes(eb) == b"\x01\x00abcd"


def test_add_own_data() -> None:
    eb = Ebuf(0, headroom=0)
    eb.add_tail(b"ab")
    eb.add_tail(eb.data())
    assert bytes(eb) == b"abab"


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        Ebuf(-1)
    with pytest.raises(ValueError):
        Ebuf(headroom=-1)


def test_repr() -> None:
    eb = Ebuf()
    eb.add_tail(b"abc")
    assert repr(eb) == "Ebuf(size=3, headroom=64)"
