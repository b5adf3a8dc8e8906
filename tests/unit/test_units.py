"""Tests of pyhast.disk.units (FreeBSD humanize_number / expand_number)."""

from __future__ import annotations

import ctypes
import random
from collections.abc import Callable

import pytest

from pyhast.disk.units import _humanize, expand_number, humanize_number

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (0, "0B"),
        (1, "1B"),
        (512, "512B"),
        (999, "999B"),
        (1000, "1.0KB"),  # four characters at most: 1000 does not fit
        (1023, "1.0KB"),
        (1024, "1.0KB"),
        (1536, "1.5KB"),
        (4096, "4.0KB"),
        (9 * KiB + 972, "9.9KB"),
        (9 * KiB + 973, "10KB"),  # divisordeccut: 9.95 rounds to 10
        (10 * KiB, "10KB"),
        (999 * KiB, "999KB"),
        (1000 * KiB, "1.0MB"),
        (2 * MiB, "2.0MB"),  # hastctl: extentsize: 2097152 (2.0MB)
        (256 * MiB, "256MB"),
        (256 * MiB - 4096 - 512, "256MB"),
        (1000 * 1000 * 1000, "954MB"),
        (GiB, "1.0GB"),
        (20 * GiB, "20GB"),
        (TiB, "1.0TB"),
        (1 << 50, "1.0PB"),
        (1 << 60, "1.0EB"),
        ((1 << 63) - 1, "8.0EB"),
        (-1, "-1B"),
        (-100, "0.1KB"),  # FreeBSD prints sign * 0: the sign is lost
    ],
)
def test_humanize_number(number: int, text: str) -> None:
    assert humanize_number(number) == text


def test_humanize_number_range() -> None:
    for bad in (1 << 63, -(1 << 63)):
        with pytest.raises(ValueError):
            humanize_number(bad)


def _libbsd_humanize() -> Callable[[int, int, str, int], str]:
    try:
        lib = ctypes.CDLL("libbsd.so.0")
    except OSError:
        pytest.skip("libbsd is not installed")
    func = lib.humanize_number
    func.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_int64,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    func.restype = ctypes.c_int

    def call(buflen: int, number: int, suffix: str, flags: int) -> str:
        buf = ctypes.create_string_buffer(buflen)
        func(buf, buflen, number, suffix.encode(), 0x20, flags)  # HN_AUTOSCALE
        return buf.value.decode()

    return call


def test_humanize_matches_libbsd() -> None:
    reference = _libbsd_humanize()
    rng = random.Random(1234)
    values = set(range(-1100, 1100))
    for k in range(63):
        for delta in (-1, 0, 1):
            values |= {(1 << k) + delta, -(1 << k) - delta}
        values |= {973 << (10 * (k % 7)), (9 * 1024 + 972) << (10 * (k % 6))}
    values |= {rng.randrange(-(1 << 63) + 1, 1 << 63) for _ in range(3000)}
    values = {v for v in values if abs(v) < 1 << 63}
    for flags in (0x03, 0x01, 0x02, 0x06, 0x07, 0x0B):
        for buflen, suffix in ((5, ""), (6, "B"), (8, "")):
            for value in values:
                assert _humanize(buflen, value, suffix, flags) == reference(
                    buflen, value, suffix, flags
                ), (flags, buflen, value)


def test_humanize_other_flags() -> None:
    # The general port also covers the flags other FreeBSD tools use.
    hn_b, hn_decimal, hn_nospace, hn_1000 = 0x04, 0x01, 0x02, 0x08
    assert _humanize(5, 512, "", hn_b | hn_nospace) == "512B"
    assert _humanize(5, 2 * MiB, "", hn_b | hn_nospace | hn_decimal) == "2.0M"
    assert _humanize(6, 1536, "B", hn_decimal) == "1.5 K"  # truncated like snprintf
    assert _humanize(7, 1500, "B", hn_decimal | hn_1000) == "1.5 kB"
    with pytest.raises(ValueError):
        _humanize(2, 1, "", 0)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("1", 1),
        ("4096", 4096),
        ("010", 10),  # decimal (FreeBSD would read octal)
        ("1b", 1),
        ("7B", 7),
        ("1k", KiB),
        ("1K", KiB),
        ("2m", 2 * MiB),
        ("2M", 2 * MiB),
        ("3g", 3 * GiB),
        ("4T", 4 * TiB),
        ("1p", 1 << 50),
        ("7E", 7 << 60),
        ("9223372036854775807", (1 << 63) - 1),
        ("8191p", 8191 << 50),
    ],
)
def test_expand_number(text: str, value: int) -> None:
    assert expand_number(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        " 1",
        "1 ",
        "+1",
        "-1",
        "k",
        "1x",
        "1kb",
        "1.5M",
        "0x10",
        "1k2",
        "١٢",  # non-ASCII digits
        "8E",  # 2**63: too large for int64
        "9223372036854775808",
        "8192p",
        "99999999999999999999999",
    ],
)
def test_expand_number_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        expand_number(text)
