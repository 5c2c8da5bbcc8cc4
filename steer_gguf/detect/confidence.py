"""How far a risk-difference table can be trusted: per-expert bootstrap intervals, a
permutation null, split-half stability and the verdict built from them (design.md,
"Detection you can trust").

Everything here works on per-pair counts. The pair, not the token, is the unit of
resampling: the tokens of one reply route alike, so treating them as independent draws
would make every interval too narrow. All of it is a few matrix products over the pairs,
so it costs seconds beside the minutes of prefill that produced the counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SteerError

# the verdict's thresholds (design.md; docs/detection.md has the measurements behind them)
NULL_QUANTILE = 0.99        # an expert is "beyond the null" above this quantile of its layer's null max
SIGNAL_P = 0.01             # any signal: the table-wide max |risk_diff| beats the null's at this level
STRONG_MIN_EFFECT = 0.5     # strong: the largest |risk_diff| at least this (bundled natural model: 0.10-0.25,
#                             no profile beat random experts; demo 1.0 and SteerMoE's real models ~0.7 steer)
STRONG_MIN_REPRODUCE = 0.75  # ... and the cited top-N coming back at least this share across halves
DEFAULT_BOOTSTRAP = 1000
DEFAULT_PERMUTATIONS = 1000
DEFAULT_SPLITS = 20
_CHUNK = 256  # resamples per matrix product: bounds memory at _CHUNK x (layers x experts) floats


@dataclass(eq=False)
class PairCounts:
    """counts[i, b]: int [n_layers, n_expert], how many of pair i's behavior-(b+1) target
    tokens selected each expert in each layer; tokens[i, b]: how many target tokens that was.
    Summed over pairs this is exactly the detection table's a1 / a2 and their totals."""
    counts: np.ndarray   # int [P, 2, L, E]
    tokens: np.ndarray   # int [P, 2]
    layers: list[int]

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts)
        self.tokens = np.asarray(self.tokens, dtype=np.int64)
        if self.counts.ndim != 4 or self.counts.shape[1] != 2 or self.tokens.shape != (self.counts.shape[0], 2):
            raise ValueError(f"per-pair counts must be [P, 2, L, E] with tokens [P, 2], got {self.counts.shape} "
                             f"and {self.tokens.shape}")
        if self.counts.shape[2] != len(self.layers):
            raise ValueError(f"per-pair counts have {self.counts.shape[2]} layers but {len(self.layers)} were named")

    @property
    def n_pairs(self) -> int:
        return self.counts.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.counts.shape[2], self.counts.shape[3]

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Float matrices [P, L*E] (layer-major) for both behaviors and their token counts [P]:
        BLAS multiplies floats, not integers."""
        p = self.n_pairs
        c = self.counts.reshape(p, 2, -1).astype(np.float64)
        t = self.tokens.astype(np.float64)
        return c[:, 0], c[:, 1], t[:, 0], t[:, 1]

    def totals(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(counts_1, counts_2, n_tokens_1, n_tokens_2): what DetectionTable.from_counts takes."""
        s = self.counts.sum(axis=0, dtype=np.int64)
        return s[0], s[1], int(self.tokens[:, 0].sum()), int(self.tokens[:, 1].sum())


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape))
    np.divide(num, den, out=out, where=den > 0)
    return out


def weighted_risk_diff(w: np.ndarray, c1: np.ndarray, c2: np.ndarray, n1: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """Risk differences [R, L*E] of R reweightings w [R, P] of the pairs: a bootstrap resample
    is a weight of how often each pair was drawn, a half is a 0/1 weight."""
    return _ratio(w @ c1, (w @ n1)[:, None]) - _ratio(w @ c2, (w @ n2)[:, None])


def _check_count(name: str, n: int, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
        raise SteerError(f"{name}: must be an integer >= {minimum}, got {n!r}")
    return int(n)


# ---- 1. intervals -------------------------------------------------------------------------------
@dataclass(eq=False)
class Intervals:
    """Per (layer, expert), layer-major: the 95% percentile interval of the statistic over
    bootstrap resamples of the pairs, and `conf`, the share of resamples whose statistic has
    the sign of the point estimate (0 where the estimate is 0)."""
    lo: np.ndarray
    hi: np.ndarray
    conf: np.ndarray
    resamples: int


def bootstrap_weights(n_pairs: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n_pairs]: how often each pair is drawn in each resample (with replacement)."""
    idx = rng.integers(0, n_pairs, size=(resamples, n_pairs))
    flat = (np.arange(resamples)[:, None] * n_pairs + idx).reshape(-1)
    return np.bincount(flat, minlength=resamples * n_pairs).reshape(resamples, n_pairs).astype(np.float64)


def percentile_intervals(stat_of, point: np.ndarray, n_pairs: int, resamples: int, seed: int,
                         level: float = 0.95) -> Intervals:
    """stat_of(weights [r, P]) -> [r, M]; resampled in chunks so memory stays bounded."""
    resamples = _check_count("bootstrap", resamples)
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, point.size))
    for start in range(0, resamples, _CHUNK):
        stop = min(resamples, start + _CHUNK)
        draws[start:stop] = stat_of(bootstrap_weights(n_pairs, stop - start, rng))
    a = (1 - level) / 2
    lo, hi = np.quantile(draws, [a, 1 - a], axis=0)
    sign = np.sign(point)
    conf = np.where(sign == 0, 0.0, (np.sign(draws) == sign).mean(axis=0))
    return Intervals(lo, hi, conf, resamples)


def risk_diff_intervals(pc: PairCounts, resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Intervals:
    c1, c2, n1, n2 = pc.flat()
    one = np.ones((1, pc.n_pairs))
    point = weighted_risk_diff(one, c1, c2, n1, n2)[0]
    return percentile_intervals(lambda w: weighted_risk_diff(w, c1, c2, n1, n2), point, pc.n_pairs, resamples, seed)


def mean_intervals(per_pair: np.ndarray, resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Intervals:
    """Intervals of column means of per_pair [P, M] (a causal effect: the mean over pairs of
    the change of each pair's margin). NaN columns (not measured) stay NaN."""
    x = np.asarray(per_pair, dtype=np.float64)
    p = x.shape[0]
    measured = ~np.isnan(x).any(axis=0)
    xm = x[:, measured]
    point = xm.mean(axis=0)
    iv = percentile_intervals(lambda w: (w @ xm) / p, point, p, resamples, seed)
    out = [np.full(x.shape[1], np.nan) for _ in range(3)]
    for o, v in zip(out, (iv.lo, iv.hi, iv.conf)):
        o[measured] = v
    return Intervals(*out, resamples)


# ---- 2. permutation null ------------------------------------------------------------------------
@dataclass
class NullTest:
    """The permutation null of the per-layer maximum |risk_diff|: what the largest difference
    of each layer looks like when behavior labels mean nothing (each pair's two sides swapped
    at random). threshold[l] is its NULL_QUANTILE quantile; `beyond` counts experts above
    their layer's threshold; p is the chance, under the null, of a table-wide maximum at
    least the observed one (with the +1 that keeps a permutation p-value valid)."""
    permutations: int
    threshold: np.ndarray      # [L]
    null_median: np.ndarray    # [L]
    observed_max: np.ndarray   # [L]
    beyond: int
    beyond_mask: np.ndarray    # [L*E] layer-major
    p: float


def permutation_null(pc: PairCounts, permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> NullTest:
    permutations = _check_count("permutations", permutations)
    n_layers, n_expert = pc.shape
    c1, c2, n1, n2 = pc.flat()
    rng = np.random.default_rng(seed)
    null_max = np.empty((permutations, n_layers))
    for start in range(0, permutations, _CHUNK):
        r = min(permutations, start + _CHUNK) - start
        s = rng.integers(0, 2, size=(r, pc.n_pairs)).astype(np.float64)  # 1: this pair's sides swapped
        a1 = (1 - s) @ c1 + s @ c2
        a2 = s @ c1 + (1 - s) @ c2
        t1 = (1 - s) @ n1 + s @ n2
        t2 = s @ n1 + (1 - s) @ n2
        rd = _ratio(a1, t1[:, None]) - _ratio(a2, t2[:, None])
        null_max[start:start + r] = np.abs(rd).reshape(r, n_layers, n_expert).max(axis=2)
    obs = np.abs(weighted_risk_diff(np.ones((1, pc.n_pairs)), c1, c2, n1, n2)[0]).reshape(n_layers, n_expert)
    thr = np.quantile(null_max, NULL_QUANTILE, axis=0)
    mask = obs > thr[:, None]
    glob = null_max.max(axis=1)
    p = (1 + int((glob >= obs.max() - 1e-12).sum())) / (permutations + 1)
    return NullTest(permutations, thr, np.median(null_max, axis=0), obs.max(axis=1), int(mask.sum()),
                    mask.reshape(-1), p)


# ---- 3. split-half stability --------------------------------------------------------------------
def tune_sizes(n_expert_used: int, n_moe_layers: int) -> list[int]:
    """The profile sizes `tune` sweeps: powers of 2 up to k x MoE layers (the most a profile
    can activate), that bound included."""
    top = n_expert_used * n_moe_layers
    sizes, n = [], 1
    while n < top:
        sizes.append(n)
        n *= 2
    return sizes + [top]


def _signed(rd: np.ndarray, idx: np.ndarray) -> set[int]:
    return {int(i) + 1 if rd[i] > 0 else -(int(i) + 1) for i in idx if rd[i] != 0}


def reproduced(rd_a: np.ndarray, rd_b: np.ndarray, n: int) -> float:
    """How many of half A's top n experts (by the table's ranking) half B also puts in its top
    n, with the same sign (an expert whose sign flips did not come back), averaged over both
    directions. An expert tied in B with B's n-th counts as in B's top n: among experts of
    equal |risk_diff| the ranking's order is a convention, not a finding."""
    def one(a: np.ndarray, b: np.ndarray) -> int:
        key_a, key_b = np.round(np.abs(a), 12), np.round(np.abs(b), 12)
        top_a = np.lexsort((np.arange(a.size), -key_a))[:n]
        nth_b = np.sort(key_b)[::-1][min(n, b.size) - 1]
        in_b = np.flatnonzero((key_b >= nth_b) & (key_b > 0))
        return min(n, len(_signed(a, top_a) & _signed(b, in_b)))
    return (one(rd_a, rd_b) + one(rd_b, rd_a)) / 2


@dataclass
class Stability:
    """overlap[N]: mean over `splits` random halvings of the pairs of how many of the top N
    experts of one half come back in the top N of the other (reproduced())."""
    splits: int
    overlap: dict[int, float]


def split_half(pc: PairCounts, sizes: list[int], splits: int = DEFAULT_SPLITS, seed: int = 0) -> Stability:
    splits = _check_count("splits", splits)
    if pc.n_pairs < 2:
        raise SteerError(f"split-half stability needs at least 2 pairs, got {pc.n_pairs}")
    c1, c2, n1, n2 = pc.flat()
    rng = np.random.default_rng(seed)
    w = np.zeros((2 * splits, pc.n_pairs))
    half = pc.n_pairs // 2
    for s in range(splits):
        perm = rng.permutation(pc.n_pairs)
        w[2 * s, perm[:half]] = 1.0
        w[2 * s + 1, perm[half:2 * half]] = 1.0  # an odd pair out sits in neither half
    rd = weighted_risk_diff(w, c1, c2, n1, n2)
    overlap = {}
    for n in sizes:
        overlap[int(n)] = float(np.mean([reproduced(rd[2 * s], rd[2 * s + 1], n) for s in range(splits)]))
    return Stability(splits, overlap)


def _min_pairs() -> int:
    p = 1
    while 2.0 ** (1 - p) >= SIGNAL_P:
        p += 1
    return p


# ---- 4. the verdict -----------------------------------------------------------------------------
@dataclass
class Trust:
    """Everything `detect` reports about how far its table can be trusted."""
    intervals: Intervals
    null: NullTest
    stability: Stability
    max_abs: float
    seed: int
    n_pairs: int

    @property
    def cited_size(self) -> int:
        """The top-N the verdict quotes: the largest size tune sweeps that the experts beyond
        the null fill (the smallest size when none is beyond)."""
        sizes = sorted(self.stability.overlap)
        fit = [n for n in sizes if n <= self.null.beyond]
        return fit[-1] if fit else sizes[0]

    def _shortfalls(self) -> list[str]:
        """Why the signal is not strong (empty: it is)."""
        n = self.cited_size
        out = []
        if self.max_abs < STRONG_MIN_EFFECT:
            out.append(f"max |risk_diff| {self.max_abs:.2f} < {STRONG_MIN_EFFECT}")
        if self.stability.overlap[n] / n < STRONG_MIN_REPRODUCE:
            out.append(f"top-{n} reproduce under {STRONG_MIN_REPRODUCE:.0%} across halves")
        return out

    @property
    def level(self) -> str:
        """strong, weak (real but small or unstable) or none (not beyond the null)."""
        if self.null.p >= SIGNAL_P:
            return "none"
        return "weak" if self._shortfalls() else "strong"

    @property
    def verdict(self) -> str:
        n = self.cited_size
        facts = (f"{self.null.beyond} experts beyond the null (p {self.null.p:.2g}), max |risk_diff| "
                 f"{self.max_abs:.2f}, top-{n} reproduce {self.stability.overlap[n]:.1f}/{n} across halves")
        if self.level == "strong":
            return f"strong signal: {facts}"
        if self.level == "weak":
            return (f"weak signal: {facts}; {'; '.join(self._shortfalls())}: routing differs, but tables like this "
                    f"did not beat random experts; measure with eval --controls")
        few = ""
        if 2.0 ** (1 - self.n_pairs) >= SIGNAL_P:
            # swapping every pair's sides gives the same |risk_diff|: 2^(P-1) distinct nulls at most
            few = f" ({self.n_pairs} pairs cannot reach p < {SIGNAL_P}: use at least {_min_pairs()})"
        return (f"no signal beyond noise: {facts}{few}; steering from this table is unlikely to beat random "
                f"experts; measure with eval --controls")

    def to_meta(self) -> dict[str, Any]:
        """What the table's metadata line records (JSON)."""
        r = lambda a: [round(float(x), 4) for x in a]  # noqa: E731
        return {"verdict": self.verdict, "level": self.level, "seed": self.seed,
                "bootstrap": self.intervals.resamples, "max_abs_risk_diff": round(self.max_abs, 6),
                "null": {"permutations": self.null.permutations, "quantile": NULL_QUANTILE,
                         "threshold": r(self.null.threshold), "median": r(self.null.null_median),
                         "observed_max": r(self.null.observed_max), "beyond": self.null.beyond,
                         "p": round(self.null.p, 6)},
                "stability": {"splits": self.stability.splits,
                              "overlap": {str(k): round(v, 3) for k, v in self.stability.overlap.items()}}}


def assess(pc: PairCounts, n_expert_used: int, bootstrap: int = DEFAULT_BOOTSTRAP,
           permutations: int = DEFAULT_PERMUTATIONS, splits: int = DEFAULT_SPLITS, seed: int = 0) -> Trust:
    """Intervals, null, stability and the verdict of one detection's per-pair counts. Each part
    draws from its own seeded stream, so changing one count leaves the others' draws alone."""
    iv = risk_diff_intervals(pc, bootstrap, seed)
    null = permutation_null(pc, permutations, seed + 1)
    sizes = tune_sizes(n_expert_used, pc.shape[0])
    # one pair cannot be halved: nothing reproduced (and its null cannot reach SIGNAL_P either)
    stab = split_half(pc, sizes, splits, seed + 2) if pc.n_pairs >= 2 else Stability(0, {n: 0.0 for n in sizes})
    c1, c2, n1, n2 = pc.totals()
    max_abs = float(np.abs(_ratio(c1, np.float64(n1)) - _ratio(c2, np.float64(n2))).max()) if c1.size else 0.0
    return Trust(iv, null, stab, max_abs, seed, pc.n_pairs)

