"""`steer-gguf bake`: a profile written into the model file, loaded with no profile at all.

Where the plan grades every action exact, the baked file must route as the source does under
the profile on every (token, MoE layer) slot, with next-token distributions equal to float
noise; where it does not, `--check` must say so. The baked file is read back tensor by tensor:
everything the plan does not edit is byte for byte the source's."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from clitools import assert_one_line_error, cli
from steer_gguf import ExpertRule, Profile, SteeredLlama, SteerError, bake_profile, model_info
from steer_gguf.bake.check import check_bake
from steer_gguf.bake.plan import plan_bake
from steer_gguf.engine.scoring import next_token_logprobs

TEXT = ("The river ran past the old mill, and 42 ducks swam in it while the miller counted 17 sacks "
        "of flour. Nobody knew why the wheel had stopped turning on that cold morning in March.")


def _uniform_off(info, expert: int = 3, name: str = "off") -> Profile:
    p = Profile.empty(info, name=name)
    p.experts = [ExpertRule(il, expert, "deactivate") for il in info.moe_layers]
    return p


def _on_and_off(info, on: int = 5, off: int = 1) -> Profile:
    p = Profile.empty(info, name="on-off")
    p.experts = ([ExpertRule(il, on, "activate") for il in info.moe_layers]
                 + [ExpertRule(il, off, "deactivate") for il in info.moe_layers])
    return p


def _quantized(src, out, quant: str):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) == 0
    return out


@pytest.fixture(scope="module")
def q8_qwen(make, tmp_path_factory):
    return _quantized(make("qwen3moe", n_layer=4), tmp_path_factory.mktemp("q") / "qwen3moe-q8_0.gguf", "Q8_0")


def _routes(path, profile, kept=None):
    """(experts sorted per slot, in source ids; next-token log-probs) on TEXT."""
    llm = SteeredLlama(path, profile=profile, n_ctx=256, n_threads=1, n_threads_batch=1)
    try:
        toks = llm.tokenize(TEXT.encode(), add_bos=True)
        tr = llm.trace(tokens=toks)
        e = tr.experts.astype(np.int64)
        if kept:
            for j, il in enumerate(tr.layers):
                e[:, j, :] = np.asarray(kept[il])[e[:, j, :]]
        lp = next(iter(next_token_logprobs(llm, [toks])))
        return np.sort(e, axis=-1), lp
    finally:
        llm.close()


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(np.exp(p) * (p - q), axis=-1)


def _tensors(path) -> dict[str, tuple[str, bytes]]:
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).tobytes())) for t in r.tensors}


@pytest.mark.parametrize("kind", ["qwen3moe", "mixtral", "q8"])
def test_prune_is_exact_where_the_weights_are_renormalized(kind, make, q8_qwen, tmp_path):
    src = q8_qwen if kind == "q8" else make(kind, n_layer=4)
    info = model_info(src)
    prof = _uniform_off(info)
    plan, res = bake_profile(src, prof, tmp_path / "baked.gguf")
    assert plan.method == "prune" and {a.grade for a in plan.actions} == {"exact"}
    baked = model_info(res.path)
    assert baked.n_expert == info.n_expert - 1 and baked.moe_layers == info.moe_layers
    assert baked.baked["method"] == "prune" and baked.baked["source_fingerprint"] == info.fingerprint
    want, lp_want = _routes(src, prof)
    got, lp_got = _routes(res.path, None, plan.kept)
    assert np.array_equal(want, got), "a slot routes differently"
    assert not (got == 3).any(), "the pruned expert is still chosen"
    kl = _kl(lp_want, lp_got)
    assert kl.mean() < 1e-6 and kl.max() < 1e-4
    if kind != "q8":  # Q8_0 re-quantizes activations: a 1e-7 weight difference can flip one rounding
        assert np.abs(lp_want - lp_got).max() < 1e-4
    # the baked file's unsteered routing differs from the source's unsteered routing: it is baked
    plain, _ = _routes(src, None)
    assert (plain == 3).any() and not np.array_equal(plain, got)


def test_pruned_tensors_are_the_sources_bytes(make, q8_qwen, tmp_path):
    info = model_info(q8_qwen)
    plan, res = bake_profile(q8_qwen, _uniform_off(info, expert=6), tmp_path / "b.gguf")
    a, b = _tensors(q8_qwen), _tensors(res.path)
    assert a.keys() == b.keys()
    sliced = set(res.tensors_edited)
    assert any(a[n][0] == "Q8_0" for n in sliced), "the fixture has no quantized expert tensor"
    for name, (qtype, data) in a.items():
        assert b[name][0] == qtype, name
        if name not in sliced:
            assert b[name][1] == data, f"{name} changed"
            continue
        per = len(data) // info.n_expert
        keep = b"".join(data[e * per:(e + 1) * per] for e in range(info.n_expert) if e != 6)
        assert b[name][1] == keep, f"{name}: not the kept experts' bytes"


@pytest.mark.parametrize("kind", ["gpt-oss", "deepseek-v3-flat", "deepseek-v3-no-bias"])
def test_bias_bake(kind, make, tmp_path):
    # deepseek-v3-flat: 7 experts, so the fixture has no expert groups (a selection bias alone);
    # no-bias: a deepseek2 file without exp_probs_b, which the bake adds (llama.cpp's optional)
    src = (make("deepseek-v3", n_layer=4, n_expert=7) if kind == "deepseek-v3-flat" else
           make("deepseek-v3", n_layer=4, n_expert=7, selection_bias=False) if kind == "deepseek-v3-no-bias" else
           make(kind, n_layer=4))
    info = model_info(src)
    assert info.n_expert_groups <= 1
    off = _uniform_off(info)
    plan, res = bake_profile(src, off, tmp_path / "off.gguf")
    assert plan.method == "bias" and {a.grade for a in plan.actions} == {"exact"}
    assert plan.adds_bias == (kind == "deepseek-v3-no-bias")
    if plan.adds_bias:
        assert not info.has_selection_bias and model_info(res.path).has_selection_bias
        assert "adds a selection bias" in plan.report()
    assert model_info(res.path).fingerprint == info.fingerprint  # router rows untouched
    want, lp_want = _routes(src, off)
    got, lp_got = _routes(res.path, None)
    assert np.array_equal(want, got) and not (got == 3).any()
    assert np.abs(lp_want - lp_got).max() < 1e-4
    # activation: the same experts forced in and out, the weights are not the runtime's
    both = _on_and_off(info)
    plan, res = bake_profile(src, both, tmp_path / "on.gguf")
    assert {a.grade for a in plan.actions if a.action == "activate"} == {"selection-exact"}
    got, _ = _routes(res.path, None)
    assert (got == 5).any(axis=-1).all() and not (got == 1).any()
    rep = check_bake(plan, res.path, n_threads=1, n_threads_batch=1)
    assert "not exact" in rep.verdict(plan) or "NOT" in rep.verdict(plan)


def test_check_reports_what_differs(make, tmp_path):
    """OLMoE does not renormalize the chosen weights: a pruned expert leaves the softmax
    denominator, so the plan cannot call it exact and the check measures the difference."""
    src = make("olmoe", n_layer=4)
    plan, res = bake_profile(src, _uniform_off(model_info(src)), tmp_path / "b.gguf")
    assert {a.grade for a in plan.actions} == {"selection-exact"}
    rep = check_bake(plan, res.path, n_threads=1, n_threads_batch=1)
    assert rep.mean_kl > 1e-6 and rep.max_weight_diff > 1e-4
    assert "not exact" in rep.verdict(plan)
    # and an exact plan checked against an unrelated file is caught, not called exact
    other = make("qwen3moe", n_layer=4)
    p2, r2 = bake_profile(other, _uniform_off(model_info(other)), tmp_path / "q.gguf")
    wrong = bake_profile(other, _uniform_off(model_info(other), expert=4), tmp_path / "wrong.gguf")[1]
    bad = check_bake(p2, wrong.path, n_threads=1, n_threads_batch=1)
    assert bad.agreement < 1.0 and bad.verdict(p2).startswith("NOT as graded")


def test_what_cannot_be_baked_is_refused_or_dropped(make, tmp_path):
    src = make("qwen3moe", n_layer=4)
    info = model_info(src)
    with pytest.raises(SteerError, match="activation cannot be pruned"):
        bake_profile(src, _on_and_off(info), tmp_path / "x.gguf")
    plan, res = bake_profile(src, _on_and_off(info), tmp_path / "x.gguf", drop_unbakeable=True)
    assert {a.grade for a in plan.actions if a.action == "activate"} == {"dropped"}
    assert model_info(res.path).n_expert == info.n_expert - 1
    uneven = _uniform_off(info)
    uneven.experts.append(ExpertRule(info.moe_layers[0], 4, "deactivate"))
    with pytest.raises(SteerError, match=r"deactivates 1 in layers 1\.\.3; 2 in layers 0.*--deactivate-per-layer"):
        bake_profile(src, uneven, tmp_path / "y.gguf")
    with pytest.raises(SteerError, match="no router or selection bias"):
        bake_profile(src, _uniform_off(info), tmp_path / "z.gguf", method="bias")
    soft = Profile.empty(info, name="soft")
    from steer_gguf import BiasRule
    soft.bias = [BiasRule(info.moe_layers[0], 2, -1.0)]
    with pytest.raises(SteerError, match="soft bias"):
        bake_profile(src, soft, tmp_path / "s.gguf")
    assert not (tmp_path / "y.gguf").exists() and not (tmp_path / "z.gguf").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".steer-")]


def test_a_baked_file_is_not_steered_twice(make, tmp_path):
    src = make("gpt-oss", n_layer=4)
    prof = _uniform_off(model_info(src))
    _, res = bake_profile(src, prof, tmp_path / "b.gguf")
    baked = model_info(res.path)
    assert "baked" in baked.report() and "prune" not in baked.report()
    with pytest.raises(SteerError, match="already has profile 'off' baked in"):
        prof.check(baked)
    with pytest.raises(SteerError, match="already baked"):
        bake_profile(res.path, prof, tmp_path / "again.gguf", force=True)


def test_a_failed_write_leaves_nothing(make, tmp_path, monkeypatch):
    from steer_gguf.bake import write

    src = make("qwen3moe", n_layer=4)
    out = tmp_path / "b.gguf"
    out.write_bytes(b"an older file")

    def boom(self, f):
        raise KeyboardInterrupt

    monkeypatch.setattr(write._Experts, "tofile", boom)
    with pytest.raises(KeyboardInterrupt):
        bake_profile(src, _uniform_off(model_info(src)), out)
    assert out.read_bytes() == b"an older file"
    assert sorted(os.listdir(tmp_path)) == ["b.gguf"]


def test_bake_cli(make, tmp_path):
    src = make("mixtral", n_layer=4)
    info = model_info(src)
    p = tmp_path / "off.json"
    _uniform_off(info).save(p)
    out, js = tmp_path / "baked.gguf", tmp_path / "bake.json"
    r = cli("bake", src, "--profile", p, "-o", out, "--check", "--json", js, "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "4 exact" in r.stdout and "100.00% of slots agree" in r.stdout and "ollama create" in r.stdout
    doc = json.loads(js.read_text())
    assert doc["plan"]["counts"]["exact"] == 4 and doc["check"]["agreement"] == 1.0
    assert "baked         profile off by prune" in cli("info", out).stdout
    # bad input: one line, exit 2
    assert_one_line_error(cli("bake", src, "--profile", p, "-o", src), "source model")
    assert_one_line_error(cli("bake", src, "--profile", tmp_path / "nope.json", "-o", tmp_path / "n.gguf"), "nope.json")
    assert_one_line_error(cli("bake", src, "--profile", p, "-o", tmp_path / "missing" / "x.gguf"), "does not exist")
    other = tmp_path / "other.json"
    _uniform_off(model_info(make("olmoe", n_layer=4))).save(other)
    assert_one_line_error(cli("bake", src, "--profile", other, "-o", tmp_path / "o.gguf"), "made for")
    assert not (tmp_path / "o.gguf").exists()


def test_profile_make_deactivate_per_layer(make, tmp_path):
    from steer_gguf.detect.risk import DetectionTable

    src = make("qwen3moe", n_layer=4)
    info = model_info(src)
    rng = np.random.default_rng(0)
    shape = (len(info.moe_layers), info.n_expert)
    t = DetectionTable.from_counts(rng.integers(0, 100, shape), rng.integers(0, 100, shape), 100, 100,
                                   list(info.moe_layers))
    prof = t.make_profile(info, activate=0, deactivate_per_layer=2)
    per = {il: sum(1 for r in prof.experts if r.layer == il) for il in info.moe_layers}
    assert set(per.values()) == {2}
    plan, _ = bake_profile(src, prof, tmp_path / "b.gguf")
    assert plan.n_expert_out == info.n_expert - 2
    # each layer's two are its two most negative risk differences
    for il in info.moe_layers:
        rows = [i for i in range(len(t)) if t.layer[i] == il]
        worst = sorted(rows, key=lambda i: (t.risk_diff[i], t.expert[i]))[:2]
        assert {int(t.expert[i]) for i in worst} == {r.expert for r in prof.experts if r.layer == il}
    with pytest.raises(SteerError, match="not both"):
        t.make_profile(info, activate=0, deactivate=1, deactivate_per_layer=1)
    with pytest.raises(SteerError, match="fewer than k"):
        t.make_profile(info, activate=0, deactivate_per_layer=info.n_expert - 1)


def test_the_verdict_uses_the_noise_floor(make):
    """An all-exact plan passes within 3x the floor's disagreement and KL, and fails outside it;
    with no floor (a float model) it must agree everywhere."""
    from steer_gguf.bake.check import CheckReport, TextCheck

    src = make("qwen3moe", n_layer=4)
    plan = plan_bake(model_info(src), _uniform_off(model_info(src)))
    floor = [TextCheck("t", 100, 1000, 980, 0.1, 1e-3)]
    near = CheckReport([TextCheck("t", 100, 1000, 960, 0.1, 2e-3)], floor)
    far = CheckReport([TextCheck("t", 100, 1000, 900, 0.1, 2e-3)], floor)
    hot = CheckReport([TextCheck("t", 100, 1000, 990, 0.1, 5e-3)], floor)
    assert near.verdict(plan).startswith("as graded")
    assert far.verdict(plan).startswith("NOT") and hot.verdict(plan).startswith("NOT")
    assert CheckReport([TextCheck("t", 100, 1000, 999, 0.0, 0.0)], []).verdict(plan).startswith("NOT")
    assert CheckReport([TextCheck("t", 100, 1000, 1000, 0.0, 1e-9)], []).verdict(plan) == \
        "as graded: exact (every slot agrees, KL at float noise)"
