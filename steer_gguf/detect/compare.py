"""Agreement between two detection tables of one model: two quantizations, two pair sets, or
SteerMoE's count table against ours (`steer-gguf detect compare A.csv B.csv`).

The tables are aligned by (layer, expert) and compared on risk_diff, which every table has
(computed from the counts): a SteerMoE count CSV (layer, expert, a1, a2, d1, d2 in any order)
compares as it is. Significance (an expert's 95% interval excludes 0) needs the interval
columns `detect` writes. A causal table's effects are not compared, its counts are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SteerError
from .confidence import reproduced, tune_sizes
from .risk import DetectionTable

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)  # when a table does not say its model's k


def rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (what Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(x.size)
    # each run of equal values [start, stop) gets the mean of ranks start+1..stop
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    stops = np.r_[starts[1:], xs.size]
    ranks[order] = np.repeat((starts + stops + 1) / 2.0, stops - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation; NaN when either side is constant."""
    ra, rb = rank_average(np.asarray(a, float)), rank_average(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def layer_major(t: DetectionTable, col: np.ndarray) -> np.ndarray:
    """A column of a (ranking-ordered) table, reordered by (layer, expert)."""
    return col[np.lexsort((t.expert, t.layer))]


def significant(t: DetectionTable) -> np.ndarray | None:
    """Layer-major: the expert's risk_diff 95% interval excludes 0 (None: no intervals)."""
    if t.rd_lo is None or np.isnan(t.rd_lo).all():
        return None
    return layer_major(t, np.nan_to_num(t.rd_lo, nan=0.0) > 0) | layer_major(t, np.nan_to_num(t.rd_hi, nan=0.0) < 0)


@dataclass
class Disagreement:
    layer: int
    expert: int
    a: float
    b: float


@dataclass
class Comparison:
    names: tuple[str, str]
    spearman: float
    overlap: dict[int, float]            # N -> how many of the top N come back (reproduced())
    both_significant: int | None         # None: a table lacks intervals
    sign_agree: int | None
    only_one_significant: int | None
    disagreements: list[Disagreement]
    a: np.ndarray                        # layer-major statistics, for the picture
    b: np.ndarray
    sig_a: np.ndarray | None
    sig_b: np.ndarray | None

    def lines(self) -> list[str]:
        a, b = self.names
        out = [f"{a} vs {b}: {self.a.size} experts",
               f"rank correlation (Spearman) of risk_diff: {self.spearman:+.3f}",
               "top-N overlap (same sign): " + ", ".join(f"top-{n} {v:g}/{n}" for n, v in self.overlap.items())]
        if self.both_significant is None:
            out.append("sign agreement: needs interval columns in both tables (detect writes them)")
        else:
            out.append(f"sign agreement among the {self.both_significant} experts significant in both: "
                       f"{self.sign_agree}/{self.both_significant}; significant in only one: "
                       f"{self.only_one_significant}")
        out.append("largest disagreements:" if self.disagreements else "largest disagreements: none (equal tables)")
        out += [f"  layer {d.layer:3d} expert {d.expert:4d}: {d.a:+.4f} vs {d.b:+.4f}" for d in self.disagreements]
        return out


def check_same_model(a: DetectionTable, b: DetectionTable, name_a: str, name_b: str) -> None:
    if a.layers != b.layers or a.n_expert != b.n_expert:
        raise SteerError(f"{name_b}: {len(b.layers)} layers x {b.n_expert} experts, but {name_a} has "
                         f"{len(a.layers)} x {a.n_expert}: tables of different model shapes cannot be compared")
    fa, fb = a.meta.get("fingerprint"), b.meta.get("fingerprint")
    if fa and fb and fa != fb:
        # the fingerprint is the same at every quantization (design.md): a difference is another model
        raise SteerError(f"{name_b}: detected on another model than {name_a} (fingerprint {fb} vs {fa})")
    ka, kb = a.meta.get("n_expert_used"), b.meta.get("n_expert_used")
    if ka is not None and kb is not None and ka != kb:
        raise SteerError(f"{name_b}: made with k={kb} experts per token but {name_a} with k={ka}")


def compare(a: DetectionTable, b: DetectionTable, name_a: str = "A", name_b: str = "B",
            sizes: list[int] | None = None, n_disagree: int = 5) -> Comparison:
    check_same_model(a, b, name_a, name_b)
    if sizes is None:
        k = a.meta.get("n_expert_used") or b.meta.get("n_expert_used")
        sizes = tune_sizes(int(k), len(a.layers)) if k else [n for n in DEFAULT_SIZES if n <= len(a)]
    sa, sb = layer_major(a, a.risk_diff), layer_major(b, b.risk_diff)
    overlap = {int(n): reproduced(sa, sb, int(n)) for n in sizes}
    sig_a, sig_b = significant(a), significant(b)
    both = agree = only = None
    if sig_a is not None and sig_b is not None:
        m = sig_a & sig_b
        both, agree = int(m.sum()), int((np.sign(sa[m]) == np.sign(sb[m])).sum())
        only = int((sig_a ^ sig_b).sum())
    layer, expert = layer_major(a, a.layer), layer_major(a, a.expert)
    gap = np.abs(sa - sb)
    worst = [i for i in np.lexsort((expert, layer, -np.round(gap, 12)))[:n_disagree] if gap[i] > 0]
    dis = [Disagreement(int(layer[i]), int(expert[i]), float(sa[i]), float(sb[i])) for i in worst]
    return Comparison((name_a, name_b), spearman(sa, sb), overlap, both, agree, only, dis, sa, sb, sig_a, sig_b)
