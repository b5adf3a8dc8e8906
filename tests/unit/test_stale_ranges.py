"""StaleRanges against a model: a plain set of stale bytes."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from pyhast.disk.stale import StaleRanges

SPAN = 64
ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove"]),
        st.integers(0, SPAN - 1),
        st.integers(0, 20),
    ),
    max_size=30,
)


def model_of(r: StaleRanges) -> set[int]:
    out: set[int] = set()
    for off, length in r:
        out.update(range(off, off + length))
    return out


@settings(max_examples=400, deadline=None)
@given(ops, st.integers(0, SPAN - 1), st.integers(1, 20))
def test_matches_a_set_of_bytes(steps: list[tuple[str, int, int]], qo: int, ql: int) -> None:
    r = StaleRanges()
    model: set[int] = set()
    for op, off, length in steps:
        if op == "add":
            r.add(off, length)
            model.update(range(off, off + length))
        else:
            r.remove(off, length)
            model.difference_update(range(off, off + length))
        assert model_of(r) == model
        # canonical: sorted, disjoint, never adjacent, never empty
        pieces = list(r)
        assert all(length > 0 for _, length in pieces)
        assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(pieces))
    assert r.overlaps(qo, ql) == bool(model & set(range(qo, qo + ql)))
    cut = list(r.split(qo, ql))
    assert sum(length for _, length, _ in cut) == ql
    pos = qo
    for off, length, stale in cut:
        assert off == pos and length > 0
        assert all((b in model) == stale for b in range(off, off + length))
        pos += length
    assert r.nbytes == len(model)
    assert r.extents(8) == {b // 8 for b in model}
    assert StaleRanges.from_array(r.to_array()) == r


def test_persisted_form_is_offset_length_pairs() -> None:
    r = StaleRanges([(4096, 4096), (0, 512), (8192, 512)])
    assert r.to_array() == (0, 512, 4096, 4608)
    try:
        StaleRanges.from_array((1, 2, 3))
    except ValueError:
        pass
    else:
        raise AssertionError("odd count accepted")
