"""Pruning by measured use (issue 35): the saliency recorder (steer.h API 5), the choice of
experts, the pruned file against the steered source, the random baseline, and every bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clitools import assert_one_line_error, cli
from steer_gguf import SteeredLlama, model_info
from steer_gguf.bake.prune import kept_at_random, kept_by_score, last_layer_stride, n_keep
from steer_gguf.engine.saliency import expert_usage, last_layer_rows, window_records

LLAMA = dict(n_ctx=256, n_threads=1, n_threads_batch=1)
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! 0123456789 and again, the quick brown fox.")


@pytest.fixture(scope="module")
def qwen(make):
    return make("qwen3moe", n_layer=4)


def _usage_of(path, text):
    llm = SteeredLlama(path, **LLAMA)
    try:
        return expert_usage(llm, [llm.tokenize(text.encode(), add_bos=True, special=False)])
    finally:
        llm.close()


def test_usage_counts_every_token_k_times_and_matches_the_trace(qwen):
    """Counts and gate-weight sums equal what the routing trace of the same text records; every
    routed (token, expert) has a positive saliency, the others none."""
    llm = SteeredLlama(qwen, **LLAMA)
    try:
        toks = llm.tokenize(TEXT.encode(), add_bos=True, special=False)
        u = expert_usage(llm, [toks])
        tr = llm.trace(tokens=toks)
    finally:
        llm.close()
    info = model_info(qwen)
    assert u.tokens == len(toks) and u.layers == list(info.moe_layers)
    assert (u.count.sum(axis=1) == len(toks) * info.n_expert_used).all()
    np.testing.assert_array_equal(u.count, tr.counts(info.n_expert))
    for j in range(len(u.layers)):
        w = np.zeros(info.n_expert)
        np.add.at(w, tr.experts[:, j, :].reshape(-1), tr.weights[:, j, :].reshape(-1))
        np.testing.assert_allclose(u.weight[j], w, rtol=1e-5, atol=1e-7)
    assert ((u.saliency > 0) == (u.count > 0)).all()


def test_a_sampled_last_layer_records_the_same_rows_for_those_tokens(qwen):
    """With the last layer sampling 1 token in 3, every other layer's usage is that of the full
    run, and the last layer's is the full run's rows at exactly the sampled tokens (window's last
    token included): the same experts, weights and output norms, fewer rows."""
    info = model_info(qwen)
    last = info.n_layer - 1
    assert last in info.moe_layers
    llm = SteeredLlama(qwen, **LLAMA)
    try:
        toks = llm.tokenize(TEXT.encode(), add_bos=True, special=False)
        wins = [toks, toks[:17]]
        full = [{il: tuple(np.copy(a) for a in r) for il, r in rec.items()} for _, rec in window_records(llm, wins)]
        u1 = expert_usage(llm, wins)
        u3 = expert_usage(llm, wins, last_stride=3)
        sampled = [{il: tuple(np.copy(a) for a in r) for il, r in rec.items()} for _, rec in window_records(llm, wins, 3)]
    finally:
        llm.close()
    j = info.moe_layers.index(last)
    others = [i for i in range(len(u1.layers)) if i != j]
    np.testing.assert_array_equal(u3.count[others], u1.count[others])
    np.testing.assert_array_equal(u3.saliency[others], u1.saliency[others])
    assert list(u3.layer_tokens[others]) == [len(toks) + 17] * len(others)
    rows = [last_layer_rows(len(w), 3).astype(bool) for w in wins]
    assert u3.layer_tokens[j] == sum(int(r.sum()) for r in rows) < u1.layer_tokens[j]
    assert all(r[-1] for r in rows) and all(r.sum() == len(r) // 3 + (len(r) % 3 != 0) for r in rows)
    for f, s, r in zip(full, sampled, rows):
        e_full, w_full, _, n_full = f[last]
        e, w, _, nrm = s[last]
        np.testing.assert_array_equal(e, e_full[r])
        np.testing.assert_allclose(w, w_full[r], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(nrm, n_full[r], rtol=1e-4)
    assert u3.count[j].sum() == u3.layer_tokens[j] * info.n_expert_used
    np.testing.assert_allclose(u3.frequency().sum(axis=1), info.n_expert_used)


def test_the_last_layer_samples_only_where_it_costs_and_with_enough_data(qwen):
    """By default the last layer samples 1 token in ceil(25 / MoE layers): 7 on this 4-layer
    model, 4 on 8 layers, every token from 25 MoE layers up (exact REAP); never leaving fewer than
    10 tokens per expert; an explicit stride is kept (1: every token); below 1 is refused."""
    from types import SimpleNamespace

    from steer_gguf.errors import SteerError

    info = model_info(qwen)
    need = 10 * info.n_expert
    assert len(info.moe_layers) == 4
    assert last_layer_stride(info, need - 1) == 1
    assert last_layer_stride(info, 2 * need) == 2
    assert last_layer_stride(info, 100 * need) == 7
    assert last_layer_stride(info, 100 * need, 3) == 3 and last_layer_stride(info, 100 * need, 1) == 1
    for layers, want in ((8, 4), (16, 2), (24, 2), (25, 1), (48, 1)):
        shape = SimpleNamespace(n_layer=layers, moe_layers=list(range(layers)), n_expert=info.n_expert)
        assert last_layer_stride(shape, 100 * need) == want, layers
    dense_last = SimpleNamespace(n_layer=5, moe_layers=[0, 1, 2, 3], n_expert=info.n_expert)
    assert last_layer_stride(dense_last, 100 * need) == 1  # nothing to sample: prefill computes it anyway
    with pytest.raises(SteerError, match="--last-layer-stride must be >= 1"):
        last_layer_stride(info, 100 * need, 0)


def test_saliency_is_weight_times_the_experts_output_norm(qwen, tmp_path):
    """An expert whose down projection is doubled has twice the output norm: in its layer its
    routing is unchanged (routing precedes the experts) and its REAP score doubles exactly."""
    import gguf

    info = model_info(qwen)
    layer = info.moe_layers[0]
    scaled = tmp_path / "scaled.gguf"
    shutil.copyfile(qwen, scaled)
    r = gguf.GGUFReader(scaled, "r+")
    (t,) = [t for t in r.tensors if t.name == f"blk.{layer}.ffn_down_exps.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
    t.data[3] *= 2.0  # expert 3: [n_expert, n_embd, n_ff] as numpy sees it
    r.data.flush()
    del r
    a, b = _usage_of(qwen, TEXT * 3), _usage_of(scaled, TEXT * 3)
    j = 0
    np.testing.assert_array_equal(a.count[j], b.count[j])
    assert a.count[j, 3] > 0, "the fixture text must route to expert 3 in the first MoE layer"
    ra, rb = a.reap()[j], b.reap()[j]
    np.testing.assert_allclose(rb[3], 2 * ra[3], rtol=1e-6)
    others = np.arange(info.n_expert) != 3
    np.testing.assert_allclose(rb[others], ra[others], rtol=1e-6)


def test_choice_keeps_the_top_scores_and_random_is_seeded():
    scores = np.array([[0.1, 0.5, 0.5, 0.0, 0.9], [3, 2, 1, 0, -1.0]])
    assert kept_by_score([1, 2], scores, 3) == {1: [1, 2, 4], 2: [0, 1, 2]}
    a, b = kept_at_random([1, 2], 5, 3, 7), kept_at_random([1, 2], 5, 3, 7)
    assert a == b and all(len(v) == 3 and len(set(v)) == 3 for v in a.values())
    assert a != kept_at_random([1, 2], 5, 3, 8)


def test_prune_writes_a_file_that_routes_as_the_steered_source(qwen, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 20)
    out, rep = tmp_path / "small.gguf", tmp_path / "rep.json"
    r = cli("prune", qwen, "--calibration", calib, "--keep", "0.5", "-o", out, "--json", rep, "-t", "1")
    assert r.returncode == 0, r.stderr
    info, small = model_info(qwen), model_info(out)
    assert small.n_expert == info.n_expert // 2 and small.baked["method"] == "prune"
    assert json.loads(small.baked["prune"])["criterion"] == "reap"
    d = json.loads(rep.read_text())
    # the stock-loadable file (its own expert_count) routes as the source with the drops deactivated
    assert d["check"]["verdict"].startswith("as graded: exact"), d["check"]
    assert d["check"]["agreement"] == 1.0
    crit = {p["criterion"] for p in d["points"]}
    assert crit == {"reap", "frequency", "random"}
    assert sum(p["criterion"] == "random" for p in d["points"]) == 5
    assert all(p["kl"] >= 0 and p["perplexity"] > 0 for p in d["points"])
    assert d["calibration_tokens"] > 0 and d["heldout"] == "the built-in neutral text"
    # TEXT * 20 is enough calibration for the last layer to be sampled; the report and file say so
    stride = last_layer_stride(info, d["calibration_tokens"])
    assert stride > 1 and d["last_layer_stride"] == stride
    assert json.loads(small.baked["prune"])["last_layer_stride"] == stride
    assert f"the last layer's usage from 1 token in {stride}" in r.stdout
    assert "random (mean of 5)" in r.stdout and "pruned by" in cli("info", out).stdout
    assert out.stat().st_size < qwen.stat().st_size


def test_sweep_prints_size_against_cost_and_writes_no_model(qwen, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 20)
    rep = tmp_path / "sweep.json"
    r = cli("prune", qwen, "--calibration", calib, "--sweep", "0.75,0.5", "--criterion", "frequency",
            "--seeds", "2", "--json", rep, "-t", "1")
    assert r.returncode == 0, r.stderr
    d = json.loads(rep.read_text())
    assert sorted({p["keep"] for p in d["points"]}) == [4, 6] and d["written"] is None
    sizes = {p["keep"]: p["size_bytes"] for p in d["points"]}
    assert sizes[4] < sizes[6] < d["size_before"]
    assert list(tmp_path.glob("*.gguf")) == []


@pytest.mark.parametrize("args, needle", [
    (["--keep", "1.5"], "--keep must lie strictly between 0 and 1"),
    (["--keep", "0.1"], "fewer than the 2 each token uses"),
    (["--drop", "0"], "--drop must be >= 1"),
    (["--keep", "0.5", "--drop", "2"], "one of --keep F"),
    ([], "one of --keep F"),
    (["--sweep", "0.5", "--keep", "0.5"], "--sweep compares keep fractions"),
    (["--sweep", "x"], "--sweep: expected comma-separated numbers"),
    (["--keep", "0.5", "--last-layer-stride", "0"], "--last-layer-stride must be >= 1"),
])
def test_bad_numbers_are_one_line_and_write_nothing(qwen, tmp_path, args, needle):
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT)
    out = tmp_path / "o.gguf"
    extra = [] if "--sweep" in args else ["-o", out]
    assert_one_line_error(cli("prune", qwen, "--calibration", calib, *args, *extra, "-t", "1"), needle)
    assert not out.exists()


def test_bad_data_and_models_are_one_line(qwen, make, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "o.gguf"
    assert_one_line_error(cli("prune", qwen, "--calibration", empty, "--keep", "0.5", "-o", out, "-t", "1"),
                          "holds no tokens")
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT)
    assert_one_line_error(cli("prune", qwen, "--calibration", calib, "--heldout", calib, "--keep", "0.5", "-o", out,
                              "-t", "1"), "the held-out text is the calibration data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    assert_one_line_error(cli("prune", qwen, "--calibration", bad, "--keep", "0.5", "-o", out, "-t", "1"),
                          "bad.jsonl:2")
    ds = make("deepseek-v3", n_layer=4)
    assert_one_line_error(cli("prune", ds, "--calibration", calib, "--keep", "0.75", "-o", out, "-t", "1"),
                          "groups its experts")
    dense = make("dense", n_layer=2)
    r = cli("prune", dense, "--calibration", calib, "--keep", "0.5", "-o", out, "-t", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert not out.exists()


def test_few_calibration_tokens_warn(qwen, tmp_path):
    calib = tmp_path / "c.txt"
    calib.write_text("hello there")
    r = cli("prune", qwen, "--calibration", calib, "--sweep", "0.5", "--seeds", "1", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stdout and "calibration tokens for 8 experts" in r.stdout


def test_n_keep_rounds_and_bounds(qwen):
    info = model_info(qwen)
    assert n_keep(info, 0.75, None) == 6 and n_keep(info, None, 2) == 6
