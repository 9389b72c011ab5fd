"""Property tests of the chunk-owned writing and the segment split (pure, in memory)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from datavalue.embeddings._plan import _split
from datavalue.embeddings._stream import _ChunkWriter, _write_pieces


class _Logged:
    """A numpy array that logs the row ranges written to it."""

    def __init__(self, shape):
        self.a = np.zeros(shape)
        self.dtype, self.shape, self.log = self.a.dtype, shape, []

    def __setitem__(self, sl, value):
        self.log.append((sl.start, sl.stop))
        self.a[sl] = value

    def __getitem__(self, sl):
        return self.a[sl]


@st.composite
def layouts(draw):
    steps = draw(
        st.lists(st.integers(0, 7), min_size=1, max_size=25)
    )  # rows per step (empty steps too)
    ptr = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
    return ptr, draw(st.integers(1, 8)), draw(st.integers(1, 9))


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_segments_write_every_row_once_and_only_own_chunks(layout):
    ptr, K, chunk = layout
    T, R = len(ptr) - 1, int(ptr[-1])
    bounds = _split(ptr, 0, T, K)
    assert bounds[0][0] == 0 and bounds[-1][1] == T and len(bounds) == min(K, T)
    assert all(lo < hi for lo, hi in bounds) and all(
        a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False)
    )
    want = np.arange(R * 2, dtype=np.float64).reshape(R, 2) + 1.0
    out = [_Logged((R, 2)), _Logged((R, 2))]
    pieces = []
    for lo, hi in bounds:  # each segment streams its steps backward, like _scan
        r_lo, r_hi = int(ptr[lo]), int(ptr[hi])
        w = _ChunkWriter(out, r_lo, r_hi, R, chunk)
        for t in range(hi - 1, lo - 1, -1):
            r0, r1 = int(ptr[t]), int(ptr[t + 1])
            w.put(r0, [want[r0:r1], -want[r0:r1]])
        pieces.extend(w.close())
        for s0, s1 in out[0].log:  # whole chunks, inside the segment's rows
            assert s0 % chunk == 0 and (s1 == R or s1 % chunk == 0) and r_lo <= s0 and s1 <= r_hi
        out[0].log.clear()
    _write_pieces(out, pieces, chunk)
    written = sorted(out[0].log)
    assert len(written) == len(
        {s0 // chunk for s0, _ in written}
    )  # the driver writes each shared chunk once
    np.testing.assert_array_equal(out[0].a, want)
    np.testing.assert_array_equal(out[1].a, -want)
