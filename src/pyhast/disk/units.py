"""Size formatting and parsing as FreeBSD's libutil does it for hastctl.

:func:`humanize_number` reproduces what hastctl prints for ``%NB``: FreeBSD's
pjdlog registers the printf conversion ``%N`` as
``humanize_number(buf, 5, n, "", HN_AUTOSCALE, HN_NOSPACE | HN_DECIMAL)`` and
the format string appends a literal ``B``. So: powers of 1024, at most four
characters before the ``B``, one decimal when the scaled value is below ten::

    0 -> "0B"    999 -> "999B"    1023 -> "1.0KB"    2097152 -> "2.0MB"
    268435456 -> "256MB"    1000000000 -> "954MB"

:func:`expand_number` parses ``-e/-k/-m`` arguments of hastctl create
(``expand_number(3)``): a number with an optional unit ``k``, ``m``, ``g``,
``t``, ``p``, ``e`` (powers of 1024) or ``b`` (bytes), case-insensitive.
Differences from FreeBSD, which uses ``strtoumax(buf, &end, 0)``: only decimal
digits are accepted (FreeBSD would also take ``0x10``, read ``010`` as octal,
accept leading blanks and a sign, and ignore anything after the unit), and the
result must fit in an int64 (hastctl stores it in an ``int64_t``).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["expand_number", "humanize_number"]

_INT64_MAX: Final = (1 << 63) - 1
_MAXSCALE: Final = 6
# humanize_number flags (libutil.h).
_HN_DECIMAL: Final = 0x01
_HN_NOSPACE: Final = 0x02
_HN_B: Final = 0x04
_HN_DIVISOR_1000: Final = 0x08

_SHIFTS: Final = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_NUMBER: Final = re.compile(r"([0-9]+)([bkmgtpe]?)", re.ASCII | re.IGNORECASE)


def humanize_number(number: int) -> str:
    """Format a byte count as hastctl's ``%NB`` does (``2097152`` -> ``"2.0MB"``).

    Checked against libbsd's humanize_number (tests/unit/test_units.py).
    """
    return _humanize(5, number, "", _HN_NOSPACE | _HN_DECIMAL) + "B"


def _humanize(buflen: int, quotient: int, suffix: str, flags: int) -> str:
    """FreeBSD ``humanize_number(buf, buflen, quotient, suffix, HN_AUTOSCALE, flags)``.

    Returns what lands in the buffer (at most ``buflen - 1`` characters).
    """
    if not -_INT64_MAX <= quotient <= _INT64_MAX:  # C negates INT64_MIN: overflow
        raise ValueError(f"{quotient} is outside [-(2**63 - 1), 2**63 - 1].")
    if flags & _HN_DIVISOR_1000:
        divisor, divisordeccut = 1000, 950
        prefixes = ("", "k", "M", "G", "T", "P", "E")
    else:
        divisor, divisordeccut = 1024, 973  # ceil(.95 * 1024)
        prefixes = ("", "K", "M", "G", "T", "P", "E")
    if flags & _HN_B:
        prefixes = ("B", *prefixes[1:])
    baselen = 1
    if quotient < 0:
        sign = -1
        quotient = -quotient
        baselen += 2  # sign, digit
    else:
        sign = 1
        baselen += 1  # digit
    if flags & _HN_NOSPACE:
        sep = ""
    else:
        sep = " "
        baselen += 1
    baselen += len(suffix)
    if buflen < baselen + 1:
        raise ValueError(f"Buffer of {buflen} bytes is too small.")

    maximum = 10 ** (buflen - baselen)
    remainder = 0
    scale = 0
    # Divide until the number fits; once more if rounding below would overflow.
    while (
        quotient >= maximum
        or (quotient == maximum - 1 and (remainder >= divisordeccut or remainder >= divisor // 2))
    ) and scale < _MAXSCALE:
        remainder = quotient % divisor
        quotient //= divisor
        scale += 1

    if (
        ((quotient == 9 and remainder < divisordeccut) or quotient < 9)
        and scale > 0
        and flags & _HN_DECIMAL
    ):
        s1 = quotient + (remainder * 10 + divisor // 2) // divisor // 10
        s2 = ((remainder * 10 + divisor // 2) // divisor) % 10
        text = f"{sign * s1}.{s2}{sep}{prefixes[scale]}{suffix}"
    else:
        value = sign * (quotient + (remainder + divisor // 2) // divisor)
        text = f"{value}{sep}{prefixes[scale]}{suffix}"
    return text[: buflen - 1]  # snprintf truncation


def expand_number(text: str) -> int:
    """Parse ``"64"``, ``"2M"``, ``"1g"``... (powers of 1024) into a byte count.

    Raises ValueError for anything else (empty, blanks, sign, unknown unit,
    trailing characters) or a result above 2**63 - 1.
    """
    match = _NUMBER.fullmatch(text)
    if match is None:
        raise ValueError(f"Invalid number: {text!r}.")
    value = int(match.group(1)) << _SHIFTS[match.group(2).lower()]
    if value > _INT64_MAX:
        raise ValueError(f"Number too large: {text!r}.")
    return value
