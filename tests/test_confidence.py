"""Trusting a detection table: bootstrap intervals over pairs (coverage on simulated tables with
a planted effect), the permutation null, split-half stability, the verdict, and the columns and
metadata they leave in the table."""
from __future__ import annotations

import numpy as np
import pytest

from steer_gguf.detect.confidence import (PairCounts, assess, mean_intervals, permutation_null, reproduced,
                                          risk_diff_intervals, split_half, tune_sizes, weighted_risk_diff)
from steer_gguf.detect.risk import DetectionTable
from steer_gguf.errors import SteerError

# a planted effect per expert (2 layers x 8 experts): half exactly 0
DELTA = np.array([0.0, 0.0, 0.05, 0.1, 0.2, 0.3, -0.1, 0.0,
                  0.0, -0.05, 0.0, 0.15, 0.0, 0.25, -0.1, 0.0])


def simulate(rng: np.random.Generator, n_pairs: int = 100, delta: np.ndarray = DELTA,
             spread: float = 0.2) -> PairCounts:
    """Per-pair counts whose population risk difference is exactly `delta`: pair i has n_i
    target tokens per side; its routing rate is q (shared by both sides) plus, on side 1, the
    expert's delta and a pair-specific deviation of mean 0 (rates stay inside [0, 1] for
    |delta| <= 0.1 and up to +0.3, so nothing is clipped). Tokens of a pair share their rate,
    so the pair, not the token, is the independent unit."""
    m = delta.size
    n = rng.integers(20, 81, size=(n_pairs, 2))
    q = 0.3 + 0.2 * rng.beta(2, 2, size=(n_pairs, m))
    dev = spread * (2 * rng.random((n_pairs, m)) - 1)
    p1, p2 = np.clip(q + delta + dev, 0, 1), q
    c = np.stack([rng.binomial(n[:, :1], p1), rng.binomial(n[:, 1:], p2)], axis=1)
    return PairCounts(c.reshape(n_pairs, 2, 2, m // 2), n, [0, 1])


def token_level_intervals(pc: PairCounts, resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The wrong resampling unit: every token an independent draw (a parametric binomial
    bootstrap of the pooled counts)."""
    c1, c2, n1, n2 = pc.totals()
    c1, c2 = c1.reshape(-1), c2.reshape(-1)
    d = rng.binomial(n1, c1 / n1, size=(resamples, c1.size)) / n1 - rng.binomial(n2, c2 / n2,
                                                                                  size=(resamples, c2.size)) / n2
    return np.quantile(d, 0.025, axis=0), np.quantile(d, 0.975, axis=0)


def test_intervals_cover_the_planted_effect_about_95_percent():
    rng = np.random.default_rng(7)
    covered, covered_tokens, covered_point, total = 0, 0, 0, 0
    for rep in range(150):
        pc = simulate(rng)
        iv = risk_diff_intervals(pc, resamples=400, seed=rep)
        covered += int(((iv.lo <= DELTA) & (DELTA <= iv.hi)).sum())
        lo, hi = token_level_intervals(pc, 400, rng)
        covered_tokens += int(((lo <= DELTA) & (DELTA <= hi)).sum())
        point = weighted_risk_diff(np.ones((1, pc.n_pairs)), *pc.flat())[0]
        covered_point += int((np.abs(point - DELTA) < 1e-12).sum())  # "no bootstrap": a zero-width interval
        total += DELTA.size
    coverage = covered / total
    # 2400 intervals: a correct percentile bootstrap over pairs lands within ~2 points of 95%
    assert 0.925 <= coverage <= 0.975, coverage
    # the same check fails the wrong unit and no interval at all
    assert covered_tokens / total < 0.85, covered_tokens / total
    assert covered_point / total < 0.05


def test_interval_contains_the_estimate_and_is_seeded():
    pc = simulate(np.random.default_rng(1))
    iv = risk_diff_intervals(pc, 300, seed=3)
    point = weighted_risk_diff(np.ones((1, pc.n_pairs)), *pc.flat())[0]
    assert (iv.lo <= point + 1e-12).all() and (point <= iv.hi + 1e-12).all()
    assert (iv.hi > iv.lo).all()
    again = risk_diff_intervals(pc, 300, seed=3)
    assert np.array_equal(iv.lo, again.lo) and np.array_equal(iv.conf, again.conf)
    assert not np.array_equal(iv.lo, risk_diff_intervals(pc, 300, seed=4).lo)
    # the big planted effects are certain of their sign, the zero ones are not
    assert (iv.conf[np.abs(DELTA) >= 0.2] == 1.0).all()
    assert (iv.conf[DELTA == 0] < 0.999).any()


def test_more_pairs_narrow_the_interval():
    rng = np.random.default_rng(2)
    w_small = risk_diff_intervals(simulate(rng, 25), 300).hi - risk_diff_intervals(simulate(rng, 25), 300).lo
    big = risk_diff_intervals(simulate(rng, 400), 300)
    # width shrinks like 1/sqrt(pairs): 16x the pairs, about a quarter of the width
    assert np.median((big.hi - big.lo) / w_small) < 0.45


def test_mean_intervals_keep_unmeasured_columns_nan():
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.0, size=(60, 3))
    x[:, 1] = np.nan
    iv = mean_intervals(x, 500, seed=0)
    assert np.isnan(iv.lo[1]) and np.isnan(iv.hi[1]) and np.isnan(iv.conf[1])
    for j in (0, 2):
        m, se = x[:, j].mean(), x[:, j].std(ddof=1) / np.sqrt(60)
        # the percentile interval of a mean is close to mean +- 1.96 se
        assert iv.lo[j] == pytest.approx(m - 1.96 * se, abs=0.35 * se)
        assert iv.hi[j] == pytest.approx(m + 1.96 * se, abs=0.35 * se)


def test_null_finds_planted_experts_and_rarely_fires_on_noise():
    pc = simulate(np.random.default_rng(5), 200)
    null = permutation_null(pc, 400, seed=0)
    beyond = np.flatnonzero(null.beyond_mask)
    assert set(np.flatnonzero(np.abs(DELTA) >= 0.2)) <= set(beyond)
    assert not set(beyond) & set(np.flatnonzero(DELTA == 0))
    assert null.p < 0.01
    rng = np.random.default_rng(6)
    fired = sum(permutation_null(simulate(rng, 40, np.zeros(16)), 200, seed=s).p < 0.01 for s in range(60))
    assert fired <= 4  # a valid 1% test fires about 0.6 times in 60


def test_swapping_every_pair_negates_the_statistic_not_the_null():
    pc = simulate(np.random.default_rng(3))
    swapped = PairCounts(pc.counts[:, ::-1], pc.tokens[:, ::-1], pc.layers)
    a, b = risk_diff_intervals(pc, 200, 1), risk_diff_intervals(swapped, 200, 1)
    assert np.allclose(a.lo, -b.hi) and np.allclose(a.hi, -b.lo)
    na, nb = permutation_null(pc, 200, 2), permutation_null(swapped, 200, 2)
    assert np.allclose(na.threshold, nb.threshold) and na.beyond == nb.beyond


def test_reproduced_counts_signs_and_ties():
    a = np.array([0.9, -0.8, 0.1, 0.0])
    assert reproduced(a, a, 2) == 2
    assert reproduced(a, -a, 2) == 0  # same experts, flipped sign: not reproduced
    b = np.array([0.9, 0.1, -0.8, 0.0])
    assert reproduced(a, b, 2) == 1
    # t1 ties three experts for its top 2; t2's top 2 (experts 1, 2) are both among them, so
    # that direction counts 2 (without ties: 1, only the two t1 lists first); the other, 1
    t1, t2 = np.array([0.5, 0.5, 0.5, 0.1]), np.array([0.4, 0.6, 0.6, 0.1])
    assert reproduced(t1, t2, 2) == 1.5


def test_split_half_separates_signal_from_noise():
    sizes = [1, 2, 4]
    strong = split_half(simulate(np.random.default_rng(8), 200, DELTA * 2), sizes, 10, seed=0)
    noise = split_half(simulate(np.random.default_rng(8), 200, np.zeros(16)), sizes, 10, seed=0)
    assert strong.overlap[4] >= 3.5
    assert noise.overlap[4] <= 2.0
    assert tune_sizes(2, 4) == [1, 2, 4, 8] and tune_sizes(8, 48) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 384]


def test_verdict_levels():
    strong = assess(simulate(np.random.default_rng(9), 150, DELTA * 3), 2, 200, 200, 10)
    assert strong.level == "strong" and strong.verdict.startswith("strong signal:")
    weak = assess(simulate(np.random.default_rng(9), 150, DELTA / 2), 2, 200, 200, 10)
    assert weak.level == "weak" and "max |risk_diff|" in weak.verdict and "< 0.5" in weak.verdict
    none = assess(simulate(np.random.default_rng(9), 30, np.zeros(16)), 2, 200, 200, 10)
    assert none.level == "none" and none.verdict.startswith("no signal beyond noise")
    few = assess(simulate(np.random.default_rng(9), 5, DELTA * 3), 2, 200, 200, 10)
    assert few.level == "none" and "5 pairs cannot reach p < 0.01: use at least 8" in few.verdict


def test_bad_counts():
    pc = simulate(np.random.default_rng(0), 10)
    for fn, arg in ((risk_diff_intervals, 0), (permutation_null, -1)):
        with pytest.raises(SteerError, match="must be an integer >= 1"):
            fn(pc, arg)
    with pytest.raises(SteerError, match="at least 2 pairs"):
        split_half(PairCounts(pc.counts[:1], pc.tokens[:1], pc.layers), [1])
    with pytest.raises(ValueError, match=r"\[P, 2, L, E\]"):
        PairCounts(pc.counts[:, 0], pc.tokens, pc.layers)


# ---- the table's columns and metadata ------------------------------------------------------------
def trusted_table(delta=DELTA, n_pairs=60, seed=0) -> DetectionTable:
    pc = simulate(np.random.default_rng(seed), n_pairs, delta)
    t = assess(pc, 2, 300, 200, 10)
    c1, c2, n1, n2 = pc.totals()
    return DetectionTable.from_counts(c1, c2, n1, n2, pc.layers, {"pairs": n_pairs, "n_expert_used": 2,
                                                                   "trust": t.to_meta()}, intervals=t.intervals)


def test_columns_follow_the_ranking_and_round_trip(tmp_path):
    t = trusted_table()
    # the interval of each row belongs to that row's expert after sorting
    assert ((t.rd_lo <= t.risk_diff + 1e-12) & (t.risk_diff <= t.rd_hi + 1e-12)).all()
    out = tmp_path / "t.csv"
    t.to_csv(out)
    header = out.read_text().splitlines()[1]
    assert header == "layer,expert,a1,d1,a2,d2,p1,p2,risk_diff,rd_lo,rd_hi,rd_conf"
    back = DetectionTable.from_csv(out)
    assert np.allclose(back.rd_lo, t.rd_lo, atol=1e-6) and np.allclose(back.rd_conf, t.rd_conf, atol=1e-6)
    assert back.verdict == t.verdict and back.meta["trust"]["null"]["beyond"] == t.meta["trust"]["null"]["beyond"]


def test_old_tables_still_read_and_partial_groups_are_refused(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("layer,expert,a1,d1,a2,d2\n0,0,1,1,0,2\n0,1,1,1,2,0\n")
    t = DetectionTable.from_csv(old)
    assert t.rd_lo is None and not t.has_intervals and t.verdict is None
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,expert,a1,d1,a2,d2,rd_lo\n0,0,1,1,0,2,0.1\n0,1,1,1,2,0,0.2\n")
    with pytest.raises(SteerError, match=r"bad\.csv:1: .*rd_lo needs all of rd_lo, rd_hi, rd_conf"):
        DetectionTable.from_csv(bad)
    bad.write_text("layer,expert,a1,d1,a2,d2,rd_lo,rd_hi,rd_conf\n0,0,1,1,0,2,x,0.1,1\n0,1,1,1,2,0,,,\n")
    with pytest.raises(SteerError, match=r"bad\.csv:2: column 'rd_lo': 'x' is not a finite number"):
        DetectionTable.from_csv(bad)


def test_min_confidence_skips_uncertain_experts_and_warns_of_them():
    t = trusted_table(n_pairs=30, seed=4)
    free = t.make_profile(2, activate=4, deactivate=4)
    weak = t.crossing_zero(free.experts)
    assert weak, "the fixture should pick some expert whose interval crosses 0"
    for rule, lo, hi in weak:
        assert lo <= 0 <= hi
    strict = t.make_profile(2, activate=4, deactivate=0, min_confidence=0.975)
    conf = {(int(la), int(e)): c for la, e, c in zip(t.layer, t.expert, t.rd_conf)}
    assert all(conf[(r.layer, r.expert)] >= 0.975 for r in strict.experts)
    assert strict.provenance["min_confidence"] == 0.975 and strict.provenance["verdict"] == t.verdict
    with pytest.raises(SteerError, match="confidence >= 0.975"):
        t.make_profile(2, activate=8, deactivate=8, min_confidence=0.975)
    with pytest.raises(SteerError, match="0..1"):
        t.make_profile(2, activate=1, min_confidence=1.5)
    old = DetectionTable.from_counts(np.ones((1, 4), int), np.zeros((1, 4), int), 2, 2, [0])
    with pytest.raises(SteerError, match="no confidence columns"):
        old.make_profile(2, activate=1, min_confidence=0.9)
