"""RoutingTrace: which experts every token was routed to, in every MoE layer."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import SteerError
from .fileio import atomic_write


def stack_layers(per_layer: list[np.ndarray], axis: int, fill) -> np.ndarray:
    """Per-layer arrays [..., k_l] stacked along `axis`; where a profile's topk gives layers
    different k, the narrower ones are padded on the right with `fill` (-1 for experts, 0 for
    weights), so a row still lists its layer's experts first."""
    k = max((a.shape[-1] for a in per_layer), default=0)
    padded = [a if a.shape[-1] == k else
              np.concatenate([a, np.full(a.shape[:-1] + (k - a.shape[-1],), fill, a.dtype)], axis=-1)
              for a in per_layer]
    return np.stack(padded, axis=axis)


@dataclass
class RoutingTrace:
    tokens: np.ndarray            # int32 [T]
    layers: list[int]             # real layer index of each MoE layer
    # int32 [T, len(layers), k]: k the most experts per token of any layer (topk); a layer
    # with fewer has its rows padded with -1 (weights 0)
    experts: np.ndarray
    weights: np.ndarray           # float32 [T, len(layers), k]
    pieces: list[str] = field(default_factory=list)  # detokenized text of each token, if known

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def counts(self, n_expert: int, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """How often each expert was selected: int64 [len(layers), n_expert]."""
        e = self.experts if rows is None else self.experts[rows]
        out = np.zeros((len(self.layers), n_expert), dtype=np.int64)
        for j in range(len(self.layers)):
            x = e[:, j, :].reshape(-1)
            out[j] = np.bincount(x[x >= 0], minlength=n_expert)[:n_expert]
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write .json or .npz atomically (no half-written file on error)."""
        path = os.fspath(path)
        if path.endswith(".npz"):
            buf = io.BytesIO()
            np.savez_compressed(buf, tokens=self.tokens, layers=np.asarray(self.layers, dtype=np.int32),
                                experts=self.experts, weights=self.weights,
                                pieces=np.asarray(self.pieces, dtype=np.str_))
            data = buf.getvalue()
        elif path.endswith(".json"):
            data = json.dumps({
                "format": "steer-gguf.trace/1",
                "tokens": self.tokens.tolist(),
                "pieces": self.pieces,
                "layers": self.layers,
                "experts": self.experts.tolist(),
                "weights": np.round(self.weights.astype(np.float64), 6).tolist(),
            }).encode()
        else:
            raise SteerError(f"{path}: trace output must end in .json or .npz")
        atomic_write(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingTrace":
        path = os.fspath(path)
        try:
            if path.endswith(".npz"):
                with np.load(path, allow_pickle=False) as z:
                    return cls(z["tokens"], [int(x) for x in z["layers"]], z["experts"], z["weights"],
                               [str(p) for p in z["pieces"]])
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            return cls(np.asarray(d["tokens"], np.int32), list(d["layers"]), np.asarray(d["experts"], np.int32),
                       np.asarray(d["weights"], np.float32), list(d.get("pieces", [])))
        except (OSError, ValueError, KeyError) as e:
            raise SteerError(f"{path}: not a readable trace ({type(e).__name__}: {e})".splitlines()[0]) from None
