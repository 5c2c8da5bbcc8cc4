"""The benchmark harness's statistics (benchmarks/harness.py), on synthetic data: no model, and
nothing that depends on how fast or how busy the machine is."""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import harness  # noqa: E402
from harness import CANNOT_TELL, MEETS, MISSES, Figure, LoadSample, Target  # noqa: E402


def test_every_round_runs_each_configuration_once_in_a_changing_order():
    rng = np.random.default_rng(0)
    names = ["plain", "noop", "graph", "hook"]
    orders = [harness.round_order(names, rng) for _ in range(40)]
    assert all(sorted(o) == sorted(names) for o in orders)
    # shuffled: every configuration runs first in some round, and the orders are not all one
    assert {o[0] for o in orders} == set(names)
    assert len({tuple(o) for o in orders}) > 10


def test_run_interleaves_and_discards_warmup():
    calls: list[str] = []

    def config(name):
        def run():
            calls.append(name)
            return {"t": 1.0}
        return run

    out = harness.run_interleaved({"a": config("a"), "b": config("b")}, [Figure("a/b", "t", "a", "b")],
                                  min_rounds=20, max_rounds=30, warmup_rounds=2, log=lambda s: None)
    assert len(calls) == 2 * (2 + out["rounds"])
    # never all of a then all of b: each pair of calls is one round holding both
    assert all(sorted(calls[i:i + 2]) == ["a", "b"] for i in range(0, len(calls), 2))
    assert out["rounds"] == 20 and out["stopped_by"] == "width"  # identical rates: zero width at once
    assert len(out["rates"]["a"]["t"]) == out["rounds"]  # warm-up not recorded


def test_rounds_are_added_until_the_interval_is_narrow_enough():
    rng = np.random.default_rng(3)

    def noisy():
        return {"t": float(rng.normal(1.0, 0.05))}

    out = harness.run_interleaved({"a": noisy, "b": noisy}, [Figure("a/b", "t", "a", "b")], min_rounds=20,
                                  max_rounds=400, target_width=0.04, log=lambda s: None)
    assert 20 < out["rounds"] < 400 and out["stopped_by"] == "width"
    assert out["figures"]["a/b"]["width"] <= 0.04
    capped = harness.run_interleaved({"a": noisy, "b": noisy}, [Figure("a/b", "t", "a", "b")], min_rounds=20,
                                     max_rounds=25, target_width=0.001, log=lambda s: None)
    assert capped["rounds"] == 25 and capped["stopped_by"] == "max_rounds"


def test_paired_ratio_median():
    num, den = [2.0, 3.0, 10.0], [1.0, 3.0, 4.0]
    assert harness.paired_ratios(num, den).tolist() == [2.0, 1.0, 2.5]
    med, lo, hi = harness.median_ci(harness.paired_ratios(num, den))
    assert med == 2.0 and lo <= med <= hi
    # pairing matters: the median of ratios, not the ratio of medians (3/3 = 1 here)
    assert med != np.median(num) / np.median(den)
    with pytest.raises(ValueError):
        harness.paired_ratios([1.0], [1.0, 2.0])


def test_bootstrap_is_seeded():
    x = np.random.default_rng(1).normal(1, 0.1, 50)
    assert harness.median_ci(x, seed=7) == harness.median_ci(x, seed=7)


def test_bootstrap_interval_covers_the_true_median_about_95_percent_of_the_time():
    # paired ratios around a true median of 0.99, heavy-ish noise as on a busy machine
    rng = np.random.default_rng(2026)
    trials, n, hits = 300, 40, 0
    for i in range(trials):
        x = 0.99 + rng.standard_t(5, n) * 0.02
        _, lo, hi = harness.median_ci(x, n_boot=1000, seed=i)
        hits += lo <= 0.99 <= hi
    # percentile bootstrap of a median is somewhat conservative or liberal at n=40; 95% nominal
    assert 0.88 <= hits / trials <= 0.995


def test_interval_narrows_with_more_rounds():
    rng = np.random.default_rng(5)
    widths = []
    for n in (20, 80, 320):
        _, lo, hi = harness.median_ci(rng.normal(1, 0.05, n))
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


@pytest.mark.parametrize("lo,hi,want", [
    (0.992, 1.01, MEETS),          # all of it above 0.99
    (0.95, 0.985, MISSES),         # all of it below
    (0.98, 1.00, CANNOT_TELL),     # spans the target
])
def test_verdicts_at_least(lo, hi, want):
    assert Target(low=0.99).verdict(lo, hi) == want


def test_verdicts_in_a_band():
    band = Target(0.98, 1.02)  # top-k within 2% of stock llama.cpp
    assert band.verdict(0.99, 1.01) == MEETS
    assert band.verdict(1.03, 1.05) == MISSES and band.verdict(0.9, 0.97) == MISSES
    assert band.verdict(0.97, 1.0) == CANNOT_TELL and band.verdict(0.9, 1.1) == CANNOT_TELL
    assert Target(high=1.1).verdict(1.0, 1.05) == MEETS and str(band) == "in [0.98, 1.02]"


def test_figure_carries_verdict_and_load():
    out = harness.run_interleaved({"a": lambda: {"t": 0.5}, "b": lambda: {"t": 1.0}},
                                  [Figure("a/b", "t", "a", "b", Target(low=0.99))], log=lambda s: None)
    fig = out["figures"]["a/b"]
    assert fig["ratio"] == 0.5 and fig["verdict"] == MISSES and fig["target"] == ">= 0.99"
    assert set(fig["load"]) == {"other_cores", "steal_cores", "quiet"}
    assert "misses" in harness.format_figure("a/b", fig)


PROC_STAT = """cpu  {user} 0 {system} {idle} 5 0 {softirq} {steal} 0 0
cpu0 1 2 3 4 5 6 7 8 9 10
intr 12345
"""


def self_stat(utime: int, stime: int, cutime: int = 0) -> str:
    # the command name may hold spaces and parentheses; fields are counted from the last ')'
    head = "4242 (python (bench) x) R 1 2 3 4 5 6 7 8 9 10"
    return f"{head} {utime} {stime} {cutime} 0 20 0 3 0 100"


def test_proc_stat_parsing():
    s = harness.parse_proc_stat(PROC_STAT.format(user=100, system=50, idle=1000, softirq=10, steal=7))
    assert s == {"busy": 160, "idle": 1005, "steal": 7}
    assert harness.parse_self_stat(self_stat(30, 20, 5)) == 55
    with pytest.raises(ValueError):
        harness.parse_proc_stat("intr 1\n")


def test_load_excludes_our_own_cpu_time():
    a = LoadSample(wall=0.0, busy=1000, steal=0, own=500)
    # over 2 s at 100 Hz: the machine was busy 300 jiffies (1.5 cores), 200 of them ours
    b = LoadSample(wall=2.0, busy=1300, steal=10, own=700)
    load = harness.load_between(a, b, hz=100)
    assert load["other_cores"] == pytest.approx(0.5) and load["own_cores"] == pytest.approx(1.0)
    assert load["steal_cores"] == pytest.approx(0.05) and load["quiet"] is False
    quiet = harness.load_between(a, LoadSample(2.0, 1205, 0, 700), hz=100)
    assert quiet["other_cores"] == pytest.approx(0.025) and quiet["quiet"] is True
    # counters ticking apart never give negative load; no /proc gives unknown, not quiet
    assert harness.load_between(a, LoadSample(2.0, 1100, 0, 700), hz=100)["other_cores"] == 0.0
    assert harness.load_between(None, b, hz=100)["quiet"] is None


def test_load_meter_reads_files(tmp_path):
    stat, me = tmp_path / "stat", tmp_path / "self"
    stat.write_text(PROC_STAT.format(user=100, system=0, idle=0, softirq=0, steal=0))
    me.write_text(self_stat(10, 0))
    meter = harness.LoadMeter(str(stat), str(me), hz=100)
    a = meter.sample()
    stat.write_text(PROC_STAT.format(user=200, system=0, idle=0, softirq=0, steal=0))
    me.write_text(self_stat(60, 0))
    b = meter.sample()
    assert (b.busy - a.busy, b.own - a.own) == (100, 50)
    assert harness.LoadMeter(str(tmp_path / "missing"), str(me)).sample() is None


def test_agreement_of_repeated_runs():
    def run(lo, hi, quiet=True):
        return {"figures": {"f": {"ci95": [lo, hi], "load": {"quiet": quiet, "other_cores": 0.01}}}}

    ok = harness.agreement([run(0.99, 1.005), run(0.995, 1.01), run(0.992, 1.0)], "f", 0.02)
    assert ok["overlap"] and ok["narrow"] and ok["quiet"] == [True] * 3
    apart = harness.agreement([run(0.95, 0.97), run(0.98, 1.03)], "f", 0.02)
    assert not apart["overlap"] and not apart["narrow"]


def test_time_cap_ends_a_run_even_before_min_rounds():
    out = harness.run_interleaved({"a": lambda: {"t": 1.0}, "b": lambda: {"t": 1.0}}, [Figure("a/b", "t", "a", "b")],
                                  min_rounds=20, max_seconds=0.0, log=lambda s: None)
    assert out["rounds"] == 1 and out["stopped_by"] == "max_seconds" and out["figures"]["a/b"]["n"] == 1
