"""Recorder rows of a layer that routes twice (grovemoe), back to one per token, across
micro-batches and for the last layer's output-only rows."""
from __future__ import annotations

import numpy as np
import pytest

from steer_gguf.engine.rows import concat, undouble
from steer_gguf.errors import SteerError


def _doubled(rows: np.ndarray, sizes: list[int]) -> np.ndarray:
    """What the recorder sees: each micro-batch's rows, then the same experts again (reordered
    within a row: the second call's top-k may list them in another order)."""
    out, pos = [], 0
    for n in sizes:
        out += [rows[pos:pos + n], rows[pos:pos + n][:, ::-1]]
        pos += n
    return np.concatenate(out)


def test_every_row_once_across_micro_batches():
    experts = np.arange(7 * 2, dtype=np.int32).reshape(7, 2)
    weights = experts.astype(np.float32) / 10
    outputs = [False, True, False, False, True, True, False]  # 7 tokens, micro-batches of 3: 3+3+1
    last = experts[[1, 4, 5]]
    rec = {0: (_doubled(experts, [3, 3, 1]), _doubled(weights, [3, 3, 1])),
           1: (_doubled(last, [1, 2, 0]), _doubled(last.astype(np.float32), [1, 2, 0]))}
    got = undouble(rec, outputs, 3)
    np.testing.assert_array_equal(got[0][0], experts)
    np.testing.assert_array_equal(got[0][1], weights)
    np.testing.assert_array_equal(got[1][0], last)  # the last layer: output rows only


def test_two_selections_that_differ_are_an_error():
    e = np.array([[0, 1], [2, 3]], np.int32)
    with pytest.raises(SteerError, match="layer 4 routes twice and the two selections differ"):
        undouble({4: (e, e.astype(np.float32))}, [True], 8)


def test_rows_of_single_routing_pass_through_and_recordings_join():
    e = np.array([[0, 1], [2, 3]], np.int32)
    rec = {0: (e, e.astype(np.float32))}
    assert undouble(rec, [True, True, True], 8)[0][0] is e  # not a doubled count: left alone
    joined = concat([rec, rec])
    np.testing.assert_array_equal(joined[0][0], np.concatenate([e, e]))
