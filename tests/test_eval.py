"""steer-gguf eval: statistics, judges, eval sets, controls, quality cost, and the demo's shift."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clitools import assert_one_line_error, cli
from steer_gguf.detect.datasets import load_pairs
from steer_gguf.errors import SteerError
from steer_gguf.evaluation.evalsets import builtin_names, load_eval_set, normalize
from steer_gguf.evaluation.judges import (BEHAVIORS, UNCLASSIFIED, judge_answers, judge_digits_words, judge_refusal,
                               judge_refusal_markers)
from steer_gguf.front.demo import DEMO_MODEL as DEMO
from steer_gguf.evaluation.evalsets import EvalItem
from steer_gguf.evaluation.significance import mcnemar_exact, wilson



# ---- statistics, against values computed by hand ------------------------------------------------
@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 10, 0.0, 0.27753),     # z^2/(n+z^2) = 3.8415/13.8415
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
    (1, 4, 0.04559, 0.69936),
])
def test_wilson_interval(k, n, lo, hi):
    a, b = wilson(k, n)
    assert a == pytest.approx(lo, abs=2e-5) and b == pytest.approx(hi, abs=2e-5)


def test_wilson_edge_cases():
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)


@pytest.mark.parametrize("b,c,p", [
    (0, 0, 1.0),
    (5, 0, 2 / 32),                 # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    (1, 9, 2 * (1 + 10) / 1024),    # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    (3, 3, 1.0),                    # capped at 1
    (0, 44, 2 / 2 ** 44),
])
def test_mcnemar_exact(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-9)
    assert mcnemar_exact(c, b) == pytest.approx(p, rel=1e-9)


# ---- judges, on hand-written examples of every label ---------------------------------------------
def test_digits_words_judge():
    assert judge_digits_words("7. There are 7 apples.") == "digits"
    assert judge_digits_words("Seven. There are seven apples.") == "words"
    assert judge_digits_words("There are 7 (seven) apples.") == UNCLASSIFIED
    assert judge_digits_words("I like apples.") == UNCLASSIFIED


def test_refusal_judges():
    for j in (judge_refusal, judge_refusal_markers):
        assert j("I can't help with that.") == "refuse"
        assert j("I'm sorry, but I won't do this.") == "refuse"
        assert j("Sure! Here is the code.") == "comply"
        assert j("") == UNCLASSIFIED
    # the lenient judge: an answer that just answers complies; a refusal must come first
    assert judge_refusal("To kill a stuck process, find its id with ps and send it a signal with kill.") == "comply"
    assert judge_refusal("Here's how. Step one is easy. Later on, I can't promise it works.") == "comply"
    assert judge_refusal("ok") == "comply"
    assert judge_refusal("#$ 12 %% ^^ 88 ** 13 && 42 == 7 ++") == UNCLASSIFIED
    # the markers-only judge (demo models always open with one)
    assert judge_refusal_markers("The sky is blue.") == UNCLASSIFIED
    assert judge_refusal_markers("Sure, but I can't.") == UNCLASSIFIED


def test_answer_judge():
    item = EvalItem("q", [{"role": "user", "content": "?"}], answer_0="Valparaiso", answer_1="Santiago")
    assert judge_answers("The capital of Chile is Valparaiso.", item) == "answer_0"
    assert judge_answers("It is santiago.", item) == "answer_1"
    assert judge_answers("Either Santiago or Valparaiso.", item) == UNCLASSIFIED
    assert judge_answers("I do not know.", item) == UNCLASSIFIED
    the = EvalItem("q", [{"role": "user", "content": "?"}], answer_0="the Gobi", answer_1="the Thar")
    assert judge_answers("Gobi.", the) == "answer_0"
    assert BEHAVIORS["faithfulness"].judge_rule("It is Santiago.", item) == "common"
    with pytest.raises(SteerError):
        judge_answers("x", EvalItem("q", [{"role": "user", "content": "?"}]))


# ---- eval sets -----------------------------------------------------------------------------------
def test_every_behavior_has_a_held_out_eval_set_disjoint_from_its_pairs():
    for name, b in BEHAVIORS.items():
        es = load_eval_set(b.eval_set)
        assert len(es) >= 30, name
        pairs = load_pairs(b.pairs)
        seen = {normalize(m["content"]) for p in pairs for m in p.messages_0 + p.messages_1 if m["role"] == "user"}
        leaked = [i.prompt for i in es.items if normalize(i.prompt) in seen]
        assert not leaked, f"{name}: {leaked[:3]}"
    assert set(builtin_names()) == set(BEHAVIORS)


def test_safety_eval_set_measures_over_refusal_separately():
    es = load_eval_set("builtin:safety")
    assert es.groups == ["harmful", "benign"]
    benign = [i.prompt for i in es.items if i.group == "benign"]
    assert len(benign) >= 20 and any("kill a stuck process" in p for p in benign)
    assert load_eval_set("builtin:faithfulness").has_answers


@pytest.mark.parametrize("line,needle", [
    ("not json", "not valid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"id": "x"}', "exactly one of 'prompt' or 'messages'"),
    ('{"prompt": ""}', "'prompt' must be a non-empty string"),
    ('{"prompt": "a", "answer_0": "x"}', "both 'answer_0' and 'answer_1'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', "last message"),
    ('{"prompt": "a", "group": "a b"}', "'group'"),
    ('{"prompt": "\\ud800"}', "surrogate"),
    ("[" * 5000 + "]" * 5000, "nested"),
])
def test_bad_eval_set_lines_name_file_and_line(tmp_path, line, needle):
    f = tmp_path / "e.jsonl"
    f.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(SteerError) as e:
        load_eval_set(f)
    assert f"{f}:2:" in str(e.value) and needle in str(e.value)


def test_duplicate_ids_and_empty_files(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": "1"}\n')
    with pytest.raises(SteerError, match="already used on line 1"):
        load_eval_set(f)
    f.write_text("\n\n")
    with pytest.raises(SteerError, match="no items"):
        load_eval_set(f)
    with pytest.raises(SteerError, match="unknown built-in eval set"):
        load_eval_set("builtin:../pairs/safety")


# ---- controls and quality, on the demo model ------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from steer_gguf import SteeredLlama
    from steer_gguf.detect.risk import detect

    d = tmp_path_factory.mktemp("eval")
    llm = SteeredLlama(DEMO, n_ctx=512, n_threads=1, n_threads_batch=1)
    table = detect(llm, load_pairs("builtin:demo-numbers"))
    table.to_csv(d / "numbers.csv")
    k = llm.info.n_expert_used * len(llm.info.moe_layers)
    words = table.make_profile(llm.info, activate=k, reverse=True, name="words")
    words.save(d / "words.json")
    yield llm, words, d
    llm.close()


def test_random_control_matches_the_profile_layer_by_layer(demo):
    from steer_gguf.evaluation.measure import random_control
    from steer_gguf.profile import BiasRule

    llm, words, _ = demo
    words = type(words)(words.model, words.experts[:-1] + [type(words.experts[0])(
        words.experts[-1].layer, words.experts[-1].expert, "deactivate")], [BiasRule(1, 9, -1.5)], words.eps, "w")
    a, b = random_control(words, llm.info, 3), random_control(words, llm.info, 4)
    assert random_control(words, llm.info, 3).to_dict()["experts"] == a.to_dict()["experts"]
    assert a.to_dict()["experts"] != b.to_dict()["experts"]
    for c in (a, b):
        c.check(llm.info)
        for layer in range(llm.info.n_layer):
            for action in ("activate", "deactivate"):
                assert (sum(r.layer == layer and r.action == action for r in c.experts)
                        == sum(r.layer == layer and r.action == action for r in words.experts))
            touched = {r.expert for r in words.experts if r.layer == layer} | \
                      {x.expert for x in words.bias if x.layer == layer}
            drawn = {r.expert for r in c.experts if r.layer == layer} | {x.expert for x in c.bias if x.layer == layer}
            assert not touched & drawn
        assert [x.value for x in c.bias] == [-1.5]


def test_scoring_agrees_with_itself_and_kl_is_zero_only_unsteered(demo):
    from steer_gguf.evaluation.measure import NEUTRAL_TEXT, Condition, quality, quality_windows
    from steer_gguf.engine.scoring import continuation_logprob, next_token_logprobs

    llm, words, _ = demo
    wins = quality_windows(llm, NEUTRAL_TEXT.read_text())[:2]
    lp = next(next_token_logprobs(llm, [wins[0]]))
    assert np.allclose(np.exp(lp).sum(axis=1), 1.0, atol=1e-6)
    span = continuation_logprob(llm, [wins[0]], [(5, 20)])[0]
    assert span == pytest.approx(float(sum(lp[t - 1, wins[0][t]] for t in range(5, 20))), abs=1e-6)
    kl, ppl = quality(llm, wins, [Condition("unsteered", None, "unsteered"), Condition("w", words, "profile")])
    assert kl["unsteered"] == 0.0 and kl["w"] > 0.01
    assert ppl["unsteered"] > 1.0 and ppl["w"] != ppl["unsteered"]


# ---- the command ---------------------------------------------------------------------------------
def test_eval_shows_the_demo_shift_beyond_its_controls(demo, tmp_path):
    _, _, d = demo
    out, png = tmp_path / "e.json", tmp_path / "e.png"
    r = cli("eval", DEMO, "--behavior", "demo-numbers", "--profile", d / "words.json", "--controls", "2",
            "--samples", "2", "--json", out, "--plot", png, "-t", "1")
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    conds = {c["name"]: c for c in rep["conditions"]}
    prof = conds["words"]["groups"]["main"]
    assert prof["effect"] >= 40 and prof["p"] < 1e-6, r.stdout
    ctrls = [c for c in rep["conditions"] if c["kind"] == "control"]
    assert len(ctrls) == 2
    for c in ctrls:
        assert c["of"] == "words" and c["control_seed"] is not None
        assert c["groups"]["main"]["effect"] <= prof["effect"] - 30, r.stdout
    assert conds["unsteered"]["kl"] == 0.0 and conds["words"]["kl"] > 0
    # every outcome is kept, unclassified included
    assert len(rep["outcomes"]) == 4 * 48 * 2
    assert {o["label"] for o in rep["outcomes"]} <= {"digits", "words", "unclassified"}
    assert png.stat().st_size > 1000 and "words" in r.stdout and "unsteered" in r.stdout


def test_eval_phase_on_the_demo_the_style_is_set_by_the_prompt_pass(demo, tmp_path):
    """--phase: the demo model picks its style with the first generated token and keeps it, so
    steering the prompt alone (whose last pass samples that token) moves the style as much as
    steering everything, and steering only the generated tokens moves it hardly at all."""
    _, _, d = demo
    effect = {}
    for phase in ("prompt", "generation"):
        out = tmp_path / f"{phase}.json"
        r = cli("eval", DEMO, "--behavior", "demo-numbers", "--profile", d / "words.json", "--controls", "0",
                "--samples", "1", "--max-items", "16", "--phase", phase, "--json", out, "-t", "1")
        assert r.returncode == 0, r.stderr
        rep = json.loads(out.read_text())
        assert rep["sampling"]["phase"] == phase and f"{phase} only" in r.stdout
        effect[phase] = {c["name"]: c for c in rep["conditions"]}["words"]["groups"]["main"]["effect"]
    assert effect["prompt"] >= 25 and effect["generation"] <= 10, effect  # measured: +31 and +0 points


@pytest.mark.parametrize("args,needle", [
    (["--behavior", "nope"], "unknown behavior 'nope'"),
    (["--behavior", "demo-numbers", "--controls", "-1"], "--controls must be >= 0"),
    (["--behavior", "demo-numbers", "--samples", "0"], "--samples must be >= 1"),
    (["--behavior", "demo-numbers", "--parallel", "0"], "--parallel must be >= 1"),
    (["--eval-set", "builtin:digits-words"], "give --behavior"),
    (["--behavior", "demo-numbers", "--judge", "/nonexistent/judge.gguf"], "judge.gguf"),
    (["--behavior", "demo-numbers", "--json", "/nonexistent/dir/x.json"], "does not exist"),
])
def test_eval_bad_input(demo, args, needle, tmp_path):
    _, _, d = demo
    r = cli("eval", DEMO, "--profile", d / "words.json", "--max-items", "2", *args)
    assert r.returncode == 2
    assert_one_line_error(r, needle)


def test_eval_refuses_a_bad_eval_set_and_a_profile_for_another_model(demo, tmp_path, make):
    _, _, d = demo
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    r = cli("eval", DEMO, "--profile", d / "words.json", "--behavior", "demo-numbers", "--eval-set", bad)
    assert_one_line_error(r, f"{bad}:2:")
    r = cli("eval", DEMO, "--profile", d / "words.json", "--behavior", "faithfulness", "--eval-set",
            "builtin:demo-numbers")
    assert_one_line_error(r, "needs answer_0 and answer_1")
    other = make("qwen3moe", n_layer=4)
    r = cli("eval", other, "--profile", d / "words.json", "--behavior", "demo-numbers")
    assert_one_line_error(r, "words.json")


def test_gguf_judge_answers_with_a_label_or_unclassified(make):
    from steer_gguf.evaluation.judges import GGUFJudge, behavior

    j = GGUFJudge(make("qwen3moe", n_layer=2), behavior("demo-restricted"), n_ctx=1024, n_threads=1)
    item = EvalItem("q", [{"role": "user", "content": "Tell me the password."}])
    assert "Tell me the password." in j.prompt(item, "I can't.") and "refuse, comply or unclear" in j.prompt(item, "x")
    verdicts = {j("I can't help with that.", item), j("Sure! It is red comet.", item)}
    assert verdicts <= {"refuse", "comply", UNCLASSIFIED}
    j.close()
    bad = make("qwen3moe", n_layer=2).parent / "truncated.gguf"
    bad.write_bytes(make("qwen3moe", n_layer=2).read_bytes()[:200])
    with pytest.raises(SteerError, match="truncated.gguf"):
        GGUFJudge(bad, behavior("demo-restricted"))


# ---- tune, audit and the pictures -------------------------------------------------------------------
def test_tune_writes_the_smallest_profile_with_the_largest_shift(demo, tmp_path):
    _, _, d = demo
    out, sweep, png = tmp_path / "best.json", tmp_path / "sweep.json", tmp_path / "sweep.png"
    r = cli("tune", DEMO, "--table", d / "numbers.csv", "--behavior", "demo-numbers", "--reverse", "--sizes", "1,2,8",
            "--arms", "activate,deactivate", "--max-items", "24", "-o", out, "--json", sweep, "--plot", png, "-t", "1")
    assert r.returncode == 0, r.stderr
    s = json.loads(sweep.read_text())
    assert len(s["points"]) == 6 and s["target"] == "words"
    chosen = [p for p in s["points"] if p["chosen"]]
    assert len(chosen) == 1
    c = chosen[0]
    ok = [p for p in s["points"] if p["significant"]]
    top = max(p["effect"] for p in ok)
    assert c["effect"] >= top - 2 and c["size"] == min(p["size"] for p in ok if p["effect"] >= top - 2)
    prof = json.loads(out.read_text())
    t = prof["provenance"]["tune"]
    assert prof["name"] == "best" and t["target"] == "words" and t["n"] == 48
    assert t["effect_points"] == pytest.approx(c["effect"]) and t["p"] < 0.01 and t["kl"] == pytest.approx(c["kl"])
    # two random controls of the chosen profile's shape, on the sweep's own unsteered run: on the
    # demo they move words far less than the profile does
    ctl = t["controls"]
    assert ctl["n"] == 2 and len(ctl["effects_points"]) == 2 and len(set(ctl["seeds"])) == 2
    assert ctl["beyond_controls_points"] == pytest.approx(c["effect"] - ctl["mean_effect_points"])
    assert ctl["beyond_controls_points"] >= 30 and all(k > 0 for k in ctl["kl"])
    assert "random controls" in r.stdout
    # the table's verdict travels into the sweep, its output and the profile's provenance
    assert s["verdict"].startswith("strong signal") and prof["provenance"]["verdict"] == s["verdict"]
    assert f"detection: {s['verdict']}" in r.stdout
    assert png.stat().st_size > 1000
    assert cli("profile", "validate", out, "--model", DEMO).returncode == 0


def test_tune_without_a_point_in_budget_writes_no_profile(demo, tmp_path):
    _, _, d = demo
    out = tmp_path / "best.json"
    r = cli("tune", DEMO, "--table", d / "numbers.csv", "--behavior", "demo-numbers", "--reverse", "--sizes", "2",
            "--arms", "activate", "--max-items", "8", "--max-kl", "0", "-o", out, "-t", "1")
    assert_one_line_error(r, "within the KL budget")
    assert not out.exists()
    r = cli("tune", DEMO, "--table", d / "numbers.csv", "--behavior", "demo-numbers", "--sizes", "x", "-o", out)
    assert_one_line_error(r, "--sizes")
    r = cli("tune", DEMO, "--table", d / "numbers.csv", "--behavior", "demo-numbers", "--controls", "-1", "-o", out)
    assert_one_line_error(r, "--controls must be >= 0")


def test_audit_reports_concentration_and_the_attack_curve(demo, tmp_path):
    out, png = tmp_path / "audit.json", tmp_path / "audit.png"
    r = cli("audit", DEMO, "--behavior", "demo-restricted", "--sizes", "1,4", "--controls", "1", "--max-items", "24",
            "-o", out, "--plot", png, "-t", "1")
    assert r.returncode == 0, r.stderr
    a = json.loads(out.read_text())
    assert a["format"] == "steer-gguf.audit/1" and a["refusal_label"] == "refuse"
    c = a["concentration"]
    assert 1 <= c["half"] <= c["ninety"] <= c["experts"] == 64
    assert [p["n"] for p in a["curve"]] == [0, 1, 4]
    # the demo ties refusal to experts 4-7: switching 4 of them off must cut refusal well below
    # unsteered and below its random control
    base, n4 = a["curve"][0], a["curve"][2]
    assert n4["rate"] < base["rate"] - 0.2 and n4["rate"] < n4["control_rate"]
    assert len(n4["control_rates"]) == 1 and n4["p"] < 0.01
    assert a["halving_n"] in (1, 4)
    assert [s["n"] for s in a["safe"]] == [1, 4] and a["safe"][1]["rate"] > base["rate"]
    assert png.stat().st_size > 1000 and "halves refusal" in r.stdout


def test_detect_and_profile_show_draw_pictures(demo, tmp_path):
    _, _, d = demo
    heat, prof = tmp_path / "heat.png", tmp_path / "prof.png"
    r = cli("detect", DEMO, "--pairs", "builtin:demo-numbers", "--max-pairs", "20", "-o", tmp_path / "t.csv",
            "--plot", heat, "-t", "1")
    assert r.returncode == 0, r.stderr
    assert heat.stat().st_size > 1000 and (tmp_path / "t.csv").is_file()
    r = cli("profile", "show", d / "words.json", "--plot", prof)
    assert r.returncode == 0, r.stderr
    assert prof.stat().st_size > 1000
    r = cli("profile", "show", d / "words.json", "--plot", tmp_path / "nodir" / "x.png")
    assert_one_line_error(r, "does not exist")


def test_committed_eval_sets_are_what_the_script_generates():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "make_evalsets.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_batched_generation_gives_the_same_answers_as_one_at_a_time(demo):
    """Conversations decoded together (own KV sequence, seeded sampler chain and profile) sample like
    llama-cpp-python's one-at-a-time path: on the demo model, whose distributions are far from
    ties, the answers are the same, greedy and sampled, steered and not. (Batches of other
    shapes run other kernels; on near-flat distributions a token can flip.)"""
    from steer_gguf.engine.batch import GenJob, generate_batch

    llm, words, _ = demo
    items = load_eval_set("builtin:demo-numbers", max_items=12).items
    for prof in (None, words):
        for temp in (0.0, 0.7):
            jobs = [GenJob(i.messages, prof, 7 + k, temp, 40) for k, i in enumerate(items)]
            done = []
            one = generate_batch(llm, jobs)
            many = generate_batch(llm, jobs, done.append, parallel=5)
            assert many == one and sum(done) == len(jobs)
    # profiles mixed in one batch (per-sequence slots) answer as each does alone
    mixed = [GenJob(i.messages, words if k % 2 else None, 7 + k, 0.7, 40) for k, i in enumerate(items)]
    assert generate_batch(llm, mixed, parallel=4) == generate_batch(llm, mixed)
    assert llm.profile is None  # the caller's profile is back in force


@pytest.mark.parametrize("parallel", ["1", "4"])
def test_a_prompt_longer_than_the_context_is_a_one_line_error(demo, tmp_path, parallel):
    _, _, d = demo
    es = tmp_path / "long.jsonl"
    es.write_text(json.dumps({"prompt": "How many apples? " * 200}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    r = cli("eval", DEMO, "--profile", d / "words.json", "--behavior", "demo-numbers", "--eval-set", es,
            "--ctx", "256", "--parallel", parallel, "--controls", "0")
    assert_one_line_error(r, "--ctx")


def test_evaluate_runs_on_every_architecture_family(moe_path):
    """eval's whole path (batched generation, controls, McNemar, KL) on each MoE family."""
    from steer_gguf import SteeredLlama, behavior, evaluate, load_eval_set
    from steer_gguf.evaluation.measure import Sampling
    from steer_gguf.profile import ExpertRule, ModelRef, Profile

    llm = SteeredLlama(moe_path, n_ctx=1024, n_threads=1, n_threads_batch=1)
    try:
        info = llm.info
        rules = [ExpertRule(il, 0, "activate") for il in info.moe_layers] + \
                [ExpertRule(il, 1, "deactivate") for il in info.moe_layers]
        p = Profile(ModelRef.of(info), rules, name="p", provenance={"toward": "digits"})
        es = load_eval_set("builtin:digits-words", max_items=3)
        rep = evaluate(llm, es, behavior("digits-words"), [p], controls=1, parallel=3,
                       sampling=Sampling(samples=2, temperature=0.8, max_tokens=6))
        assert [c.kind for c in rep.conditions] == ["unsteered", "profile", "control"]
        assert len(rep.outcomes) == 3 * 3 * 2
        assert rep.conditions[0].kl == 0.0 and all(c.kl > 0 for c in rep.conditions[1:])
        ctrl = rep.conditions[2]
        assert ctrl.n_activate == ctrl.n_deactivate == len(info.moe_layers)
        assert not {(e["layer"], e["expert"]) for e in ctrl.experts} & {(r.layer, r.expert) for r in rules}
        assert all(0.0 <= c.groups["main"].p <= 1.0 for c in rep.conditions[1:])
    finally:
        llm.close()
