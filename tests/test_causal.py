"""Causal detection (steer_gguf/detect/causal.py): effects measured on the demo model, causal tables
through CSV and `profile make`, the greedy search, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clitools import assert_one_line_error, cli
from steer_gguf.detect.causal import causal_detect, margin_under, pair_tokens
from steer_gguf.detect.datasets import load_pairs
from steer_gguf.front.demo import DEMO_MODEL
from steer_gguf.detect.risk import DetectionTable, ranking
from steer_gguf.errors import SteerError
from steer_gguf.profile import ExpertRule

# demo.gguf's designated experts, the same in every layer (its MODEL_CARD.md)
DESIGNATED = {"builtin:demo-numbers": ({0, 1}, {2, 3}), "builtin:demo-restricted": ({4, 5}, {6, 7})}
N_PAIRS = 4  # enough for the demo model's large effects, and keeps a full causal pass to seconds


@pytest.fixture(scope="module")
def llm():
    from steer_gguf.engine.steered import SteeredLlama

    m = SteeredLlama(DEMO_MODEL, n_ctx=512, n_threads=1, n_threads_batch=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def results(llm):
    return {spec: causal_detect(llm, load_pairs(spec, max_pairs=N_PAIRS)) for spec in DESIGNATED}


@pytest.mark.parametrize("spec", sorted(DESIGNATED))
def test_designated_experts_lead_every_layer(results, spec):
    """In every layer the two strongest experts by |effect| are designated ones, one of each
    style, each pushing toward its own style (behavior-1 experts positive)."""
    t = results[spec].table
    style_1, style_2 = DESIGNATED[spec]
    assert t.method == "causal" and not np.isnan(t.effect_on).any()  # every expert measured
    for layer in t.layers:
        rows = [r for r in t.top(len(t)) if r.layer == layer][:2]
        experts = {r.expert for r in rows}
        assert experts & style_1 and experts & style_2, (spec, layer, rows)
        for r in rows:
            assert (r.effect > 0) == (r.expert in style_1), (spec, layer, r)


def test_effects_are_measured_against_unsteered(llm, results):
    """effect_on is the margin with the expert forced on minus the unsteered margin."""
    spec = "builtin:demo-numbers"
    res = results[spec]
    pt = pair_tokens(llm, load_pairs(spec, max_pairs=N_PAIRS))
    r = res.table.top(1)[0]
    on = margin_under(llm, pt, [ExpertRule(r.layer, r.expert, "activate")])
    llm.set_profile(None)
    assert on - res.baseline == pytest.approx(r.effect_on, abs=1e-4)


def test_profile_rule_on_a_causal_table(results, llm):
    t = results["builtin:demo-restricted"].table
    p = t.make_profile(llm.info, activate=4, deactivate=2)
    acts = [r for r in p.experts if r.action == "activate"]
    offs = [r for r in p.experts if r.action == "deactivate"]
    on = {(int(t.layer[i]), int(t.expert[i])): t.effect_on[i] for i in range(len(t))}
    off = {(int(t.layer[i]), int(t.expert[i])): t.effect_off[i] for i in range(len(t))}
    # activations: the largest effect_on (at most k per layer); deactivations: the largest effect_off
    assert [on[(r.layer, r.expert)] for r in acts] == sorted((on[(r.layer, r.expert)] for r in acts), reverse=True)
    assert all(on[(r.layer, r.expert)] > 0 for r in acts) and all(off[(r.layer, r.expert)] > 0 for r in offs)
    best_off = max(off.values())
    assert off[(offs[0].layer, offs[0].expert)] == best_off
    assert p.provenance["method"] == "causal"
    rev = t.make_profile(llm.info, activate=4, reverse=True)
    assert all(on[(r.layer, r.expert)] < 0 for r in rev.experts)


def test_causal_table_round_trips_through_csv_and_profile_make(results, tmp_path):
    t = results["builtin:demo-numbers"].table
    path = tmp_path / "causal.csv"
    t.to_csv(path)
    back = DetectionTable.from_csv(path)
    assert back.method == "causal"
    assert [(int(a), int(b)) for a, b in zip(back.layer, back.expert)] == \
           [(int(a), int(b)) for a, b in zip(t.layer, t.expert)]
    np.testing.assert_allclose(back.effect_on, t.effect_on, atol=1e-6)
    out = tmp_path / "digits.json"
    r = cli("profile", "make", path, "--model", DEMO_MODEL, "--activate", "4", "--deactivate", "2", "-o", out)
    assert r.returncode == 0, r.stderr
    prof = json.loads(out.read_text())
    mine = t.make_profile(2, activate=4, deactivate=2)  # the same rule, by k alone
    assert [(e["layer"], e["expert"], e["action"]) for e in prof["experts"]] == \
           [(x.layer, x.expert, x.action) for x in mine.experts]
    assert prof["provenance"]["method"] == "causal"


def test_cli_candidates_and_greedy(tmp_path):
    out = tmp_path / "greedy.csv"
    r = cli("detect", DEMO_MODEL, "--pairs", "builtin:demo-restricted", "--max-pairs", "2", "-t", "1",
            "--method", "causal-greedy", "--candidates", "6", "--greedy-steps", "1", "--greedy-pool", "4", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "s per candidate" in r.stdout and "greedy toward behavior 1, step 1" in r.stdout
    t = DetectionTable.from_csv(out)
    assert t.method == "causal-greedy"
    assert int((~np.isnan(t.effect_on)).sum()) == 6  # only the candidates were measured
    # the 6 measured are the top 6 of the risk-difference ranking
    assert set(np.flatnonzero(~np.isnan(t.effect_on))) == set(ranking(t.layer, t.expert, t.risk_diff)[:6])
    steps = np.concatenate([t.greedy_on, t.greedy_off])
    assert set(np.abs(steps[steps != 0])) <= {1, 2}  # at most 1 activation + 1 deactivation per direction
    # greedy's first move toward a behavior is the best single move toward it
    for sign in (1, -1):
        first = [i for i in range(len(t)) if sign * t.greedy_on[i] == 1 or sign * t.greedy_off[i] == 1]
        if not first:
            continue
        i = first[0]
        val = t.effect_on[i] if sign * t.greedy_on[i] == 1 else t.effect_off[i]
        best = np.nanmax(sign * np.concatenate([t.effect_on, t.effect_off]))
        assert sign * val == pytest.approx(best)
    # profile make follows the greedy order
    prof = tmp_path / "g.json"
    r = cli("profile", "make", out, "--k", "2", "--activate", "1", "-o", prof)
    if (t.greedy_on > 0).any():
        assert r.returncode == 0, r.stderr
        e = json.loads(prof.read_text())["experts"][0]
        i = int(np.flatnonzero(t.greedy_on > 0)[np.argmin(t.greedy_on[t.greedy_on > 0])])
        assert (e["layer"], e["expert"]) == (int(t.layer[i]), int(t.expert[i]))
    else:
        assert_one_line_error(r, "greedy step")


def test_bad_input(tmp_path):
    out = tmp_path / "x.csv"
    r = cli("detect", DEMO_MODEL, "--pairs", "builtin:demo-numbers", "--candidates", "3", "-o", out)
    assert r.returncode == 2
    assert_one_line_error(r, "need --method causal")
    r = cli("detect", DEMO_MODEL, "--pairs", "builtin:demo-numbers", "--method", "causal", "--greedy-steps", "2",
            "-o", out)
    assert r.returncode == 2
    assert_one_line_error(r, "--greedy-steps")
    assert not out.exists()
    r = cli("detect", DEMO_MODEL, "--pairs", "builtin:demo-numbers", "--method", "causal", "--candidates", "0",
            "-o", out)
    assert r.returncode == 2 and not out.exists()
    # causal columns in a CSV: a bad effect value, and one column without its partner
    good = tmp_path / "good.csv"
    good.write_text("layer,expert,a1,d1,a2,d2,effect_on,effect_off\n0,0,1,1,0,2,0.5,-0.1\n0,1,0,2,1,1,,\n")
    t = DetectionTable.from_csv(good)
    assert t.method == "causal" and (t.layer[0], t.expert[0]) == (0, 0) and np.isnan(t.effect_on[1])
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,expert,a1,d1,a2,d2,effect_on,effect_off\n0,0,1,1,0,2,inf,0\n0,1,0,2,1,1,,\n")
    r = cli("profile", "make", bad, "--k", "1", "--activate", "1", "-o", tmp_path / "p.json")
    assert r.returncode == 2
    assert_one_line_error(r, "bad.csv:2", "effect_on", "finite")
    half = tmp_path / "half.csv"
    half.write_text("layer,expert,a1,d1,a2,d2,effect_on\n0,0,1,1,0,2,0.5\n0,1,0,2,1,1,\n")
    r = cli("profile", "make", half, "--k", "1", "--activate", "1", "-o", tmp_path / "p.json")
    assert r.returncode == 2
    assert_one_line_error(r, "effect_off")
    # nothing measured toward behavior 2 by forcing on: a clear error, not an empty profile
    r = cli("profile", "make", good, "--k", "1", "--activate", "1", "--reverse", "-o", tmp_path / "p.json")
    assert r.returncode == 2
    assert_one_line_error(r, "forced on")
    assert not (tmp_path / "p.json").exists()
    with pytest.raises(SteerError, match="candidates"):
        causal_detect(None, None, candidates=0)


def test_an_expert_is_never_both_activated_and_deactivated():
    # expert (0, 0) helps behavior 1 both forced on and forced off (measured one at a time)
    t = DetectionTable(np.array([0, 0, 0]), np.array([0, 1, 2]), np.ones(3), np.ones(3), np.ones(3), np.ones(3),
                       effect_on=np.array([0.9, -0.2, 0.1]), effect_off=np.array([0.8, 0.3, -0.4]))
    p = t.make_profile(1, activate=1, deactivate=1)
    assert [(r.expert, r.action) for r in p.experts] == [(0, "activate"), (1, "deactivate")]
    with pytest.raises(SteerError, match="only 1 experts have an effect when forced off"):
        t.make_profile(1, activate=1, deactivate=2)


def test_margin_tokens_scores_only_the_start_of_each_target(llm):
    pairs = load_pairs("builtin:demo-numbers", max_pairs=3)
    full, first = pair_tokens(llm, pairs), pair_tokens(llm, pairs, margin_tokens=1)
    for (a, b), (a1, b1), s, s1 in zip(full.spans, first.spans, full.seqs, first.seqs):
        assert (a1, b1) == (a, a + 1) and b > a + 1
        assert s1 == s[:a + 1]  # nothing after the scored token is prefilled
    with pytest.raises(SteerError, match="margin tokens"):
        causal_detect(llm, pairs, margin_tokens=0)


def test_effect_intervals_resample_each_pairs_change_of_margin(llm, results, tmp_path):
    from steer_gguf.detect.causal import pair_margins_under
    from steer_gguf.detect.confidence import mean_intervals

    t = results["builtin:demo-numbers"].table
    assert t.has_intervals and t.rd_lo is not None
    for lo, v, hi in ((t.effect_on_lo, t.effect_on, t.effect_on_hi), (t.effect_off_lo, t.effect_off, t.effect_off_hi)):
        assert ((lo <= v + 1e-6) & (v <= hi + 1e-6)).all()
    # the top row's interval is the bootstrap of its own pairs' margin changes, same seed
    pt = pair_tokens(llm, load_pairs("builtin:demo-numbers", max_pairs=N_PAIRS))
    old = llm.profile
    try:
        base = pair_margins_under(llm, pt, [])
        on = pair_margins_under(llm, pt, [ExpertRule(int(t.layer[0]), int(t.expert[0]), "activate")]) - base
    finally:
        llm.set_profile(old, force=True)
    iv = mean_intervals(on[:, None], 1000, seed=3)
    assert t.effect_on[0] == pytest.approx(on.mean(), abs=1e-6)
    assert t.effect_on_lo[0] == pytest.approx(iv.lo[0], abs=1e-6)
    assert t.effect_on_hi[0] == pytest.approx(iv.hi[0], abs=1e-6)
    path = tmp_path / "c.csv"
    t.to_csv(path)
    assert "effect_on_lo,effect_on_hi,on_conf,effect_off_lo,effect_off_hi,off_conf" in path.read_text().splitlines()[1]
    back = DetectionTable.from_csv(path)
    np.testing.assert_allclose(back.effect_off_hi, t.effect_off_hi, atol=1e-6)
