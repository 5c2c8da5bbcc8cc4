"""The routing recorder's rows as the eval callback saw them, back to one row per token: pure
numpy, so the batch engine uses it without loading the native library at import."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import SteerError


def undouble(rec: dict, outputs: Sequence[bool], n_ubatch: int) -> dict:
    """The recorder's rows of one decode of len(outputs) tokens, for an architecture that routes
    twice per layer on one router's logits (ROUTES_TWICE), back to one row per token. llama.cpp
    splits the batch into consecutive micro-batches of n_ubatch tokens, and within each a layer
    records its rows twice in a row (the last layer: the output rows only)."""
    n = len(outputs)
    bounds = [(i, min(n, i + n_ubatch)) for i in range(0, n, n_ubatch)]
    every = [e - b for b, e in bounds]
    outs = [sum(outputs[b:e]) for b, e in bounds]
    fixed = {}
    for il, r in rec.items():
        rows = r[0].shape[0]
        fixed[il] = _once(r, every if rows == 2 * n else outs, il) if rows in (2 * n, 2 * sum(outs)) else r
    return fixed


def concat(parts: list[dict]) -> dict:
    """Per-layer (experts, weights) of consecutive recordings, joined in order."""
    out: dict = {}
    for p in parts:
        for il, (e, w) in p.items():
            if il in out:
                out[il] = (np.concatenate([out[il][0], e]), np.concatenate([out[il][1], w]))
            else:
                out[il] = (e, w)
    return out


def _once(rec: tuple[np.ndarray, np.ndarray], sizes: list[int], il: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first of each micro-batch's two recordings (`sizes` rows each), and hold the
    second to the same experts: it selects from the same steered logits, so a profile governs
    both."""
    experts, weights = rec
    keep, pos = [], 0
    for n in sizes:
        a, b = experts[pos:pos + n], experts[pos + n:pos + 2 * n]
        if not np.array_equal(np.sort(a, -1), np.sort(b, -1)):
            raise SteerError(f"routing recorder: layer {il} routes twice and the two selections differ")
        keep.append(np.arange(pos, pos + n))
        pos += 2 * n
    idx = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    return experts[idx], weights[idx] if weights.shape[0] == experts.shape[0] else weights
