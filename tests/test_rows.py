"""The graph recorder's rows of a layer that routes twice (grovemoe), back to one per token,
across micro-batches, decodes and the last layer's output-only rows."""
from __future__ import annotations

import numpy as np
import pytest

from steer_gguf.engine.rows import undouble
from steer_gguf.errors import SteerError


def _doubled(rows: np.ndarray, index: np.ndarray, chunks: list[int]):
    """What the recorder sees: each chunk's rows, then the same experts again (listed in
    another order within a row: the second call's top-k may order them differently)."""
    e, i, pos = [], [], 0
    for n in chunks:
        e += [rows[pos:pos + n], rows[pos:pos + n][:, ::-1]]
        i += [index[pos:pos + n]] * 2
        pos += n
    return np.concatenate(e), np.concatenate(i)


def test_every_row_once_across_micro_batches_and_decodes():
    experts = np.arange(9 * 2, dtype=np.int32).reshape(9, 2)
    # decode 1: 7 tokens in micro-batches of 3 (3+3+1); decode 2: one token; decode 3: one token
    index = np.array([0, 1, 2, 3, 4, 5, 6, 0, 0])
    e, i = _doubled(experts, index, [3, 3, 1, 1, 1])
    w = e.astype(np.float32) / 10
    got_e, got_w, got_i = undouble(e, w, i, 0)
    np.testing.assert_array_equal(got_e, experts)
    np.testing.assert_array_equal(got_i, index)
    np.testing.assert_array_equal(got_w, experts.astype(np.float32) / 10)  # the first routing's weights
    last = experts[[1, 4]]  # the last layer: output rows only, by their batch index
    e, i = _doubled(last, np.array([1, 4]), [1, 1])
    np.testing.assert_array_equal(undouble(e, None, i, 3)[0], last)


def test_what_does_not_pair_up_is_an_error():
    e = np.array([[0, 1], [2, 3]], np.int32)
    with pytest.raises(SteerError, match="layer 4 routes twice and the two selections differ"):
        undouble(e, None, np.array([0, 0]), 4)
    with pytest.raises(SteerError, match="layer 2 should route twice per token"):
        undouble(e, None, np.array([0, 1]), 2)
    with pytest.raises(SteerError, match="two routings covered different tokens"):
        undouble(np.zeros((4, 2), np.int32), None, np.array([0, 1, 0, 2]), 1)
