"""The graph recorder's rows of a layer that routes twice (grovemoe: build_moe_ffn called twice
on one router's logits), back to one row per token: pure numpy."""
from __future__ import annotations

import numpy as np

from ..errors import SteerError


def undouble(experts: np.ndarray, weights: np.ndarray | None, index: np.ndarray,
             layer: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Rows of one layer as recorded over any number of decodes: every micro-batch's rows come
    as two chunks in a row, one per routing, with the same batch indices (distinct within a
    chunk). Keep the first; hold the second to the same experts: both select from the same
    steered logits, so a profile governs both."""
    keep: list[np.ndarray] = []
    p, n = 0, len(index)
    while p < n:
        hits = np.flatnonzero(index[p + 1:] == index[p])
        if not hits.size:
            raise SteerError(f"routing recorder: layer {layer} should route twice per token, but a row "
                             f"(batch index {int(index[p])}) was routed once")
        q = p + 1 + int(hits[0])
        size = q - p
        if not np.array_equal(index[p:q], index[q:q + size]):
            raise SteerError(f"routing recorder: layer {layer}'s two routings covered different tokens")
        if not np.array_equal(np.sort(experts[p:q], -1), np.sort(experts[q:q + size], -1)):
            raise SteerError(f"routing recorder: layer {layer} routes twice and the two selections differ")
        keep.append(np.arange(p, q))
        p = q + size
    idx = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    return experts[idx], None if weights is None else weights[idx], index[idx]
