"""Experts per token (issue 32): a profile's `topk` routes exactly as the same model loaded with
llama.cpp's own `<arch>.expert_used_count` override; the format, every bad input, per-layer K,
per-sequence K with several K in one batch, and the refusals (hook engine, hash routing)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures.backend import TEST_NGL
from steer_gguf import ExpertRule, LayerK, ModelRef, Profile, SteeredLlama, SteerError, model_info
from steer_gguf.engine.contexts import _native
from steer_gguf.engine.tracing import Recorder, recorder_kw
from steer_gguf.profile import FORMAT, FORMAT_TOPK

LLAMA = dict(n_ctx=256, n_threads=1, n_threads_batch=1, n_gpu_layers=TEST_NGL)
TEXT = "The quick brown fox jumps over the lazy dog 0123456789 again and again."
K_MODEL = 4  # the fixtures' k here: K = 2 is k/2, K = 6 is more than the model was trained with
# the gating families the suite builds: softmax top-k normalised (qwen3moe, mixtral) and not
# (olmoe), softmax after top-k (gpt-oss), sigmoid with a selection bias and expert groups
# (deepseek-v3: 4 groups of 2, 3 used, so K <= 6)
KINDS = ("qwen3moe", "olmoe", "mixtral", "gpt-oss", "deepseek-v3")


def _topk_profile(info, topk, rules=()) -> Profile:
    return Profile(ModelRef.of(info), [ExpertRule(l, e, a) for l, e, a in rules], name="k", topk=topk)


@pytest.fixture(scope="module", params=KINDS)
def kind_path(request, make):
    return make(request.param, n_layer=4, n_expert_used=K_MODEL)


@pytest.fixture(scope="module")
def steered(kind_path):
    llm = SteeredLlama(kind_path, **LLAMA)
    yield llm
    llm.close()


def _override(path, k: int) -> SteeredLlama:
    """The stock way: the model loaded with llama.cpp's expert_used_count override."""
    arch = model_info(path).architecture
    return SteeredLlama(path, kv_overrides={f"{arch}.expert_used_count": k}, **LLAMA)


@pytest.mark.parametrize("k", [2, 6])
def test_topk_routes_as_the_expert_used_count_override(steered, kind_path, k):
    """K through the profile is the model run with expert_used_count = K: the same experts, weights
    and logits, bit for bit."""
    info = model_info(kind_path)
    toks = steered.tokenize(TEXT.encode(), add_bos=True, special=True)
    stock = _override(kind_path, k)
    try:
        want = stock.trace(tokens=toks)
        want_logits = stock._trace_context(256).run([toks], [list(range(len(toks)))], logits=True)[0]
    finally:
        stock.close()
    with steered.steering(_topk_profile(info, k)):
        got = steered.trace(tokens=toks)
        tc = steered._trace_context(256)
        tc.sync_profile()
        got_logits = tc.run([toks], [list(range(len(toks)))], logits=True)[0]
    assert got.experts.shape == (len(toks), len(info.moe_layers), k)
    # a topk-only profile adds no node: the graph is the override's, op for op, so the bits agree
    # (which also makes its cost the override's: benchmarks/topk.py times it)
    np.testing.assert_array_equal(got.experts, want.experts)
    np.testing.assert_array_equal(got.weights, want.weights)
    np.testing.assert_array_equal(got_logits, want_logits)
    base = steered.trace(tokens=toks)  # the profile is gone: the model's own k again
    assert base.experts.shape[-1] == K_MODEL


def test_topk_of_the_model_k_is_the_unsteered_routing(steered, kind_path):
    info = model_info(kind_path)
    toks = steered.tokenize(TEXT.encode(), add_bos=True, special=True)
    base = steered.trace(tokens=toks)
    with steered.steering(_topk_profile(info, K_MODEL)):
        same = steered.trace(tokens=toks)
    np.testing.assert_array_equal(same.experts, base.experts)
    np.testing.assert_array_equal(same.weights, base.weights)


def test_per_layer_topk(steered, kind_path):
    """K in one layer only: that layer takes K experts (the override's routing there, given the
    same input), the layers before it are untouched, and the trace pads the narrower layers."""
    info = model_info(kind_path)
    il = info.moe_layers[-1]
    toks = steered.tokenize(TEXT.encode(), add_bos=True, special=True)
    base = steered.trace(tokens=toks)
    with steered.steering(_topk_profile(info, [LayerK(il, 1)])):
        tr = steered.trace(tokens=toks)
    assert tr.experts.shape == base.experts.shape  # the widest layer: the model's k
    np.testing.assert_array_equal(tr.experts[:, :-1], base.experts[:, :-1])
    last = tr.experts[:, -1]
    assert (last[:, 1:] == -1).all() and (last[:, 0] >= 0).all()
    # the top-1 is the expert the unsteered router scored highest: its first pick
    np.testing.assert_array_equal(last[:, 0], base.experts[:, -1, 0])
    counts = tr.counts(info.n_expert)
    assert counts[-1].sum() == len(toks)


def test_batched_tracing_pads_per_layer_topk_as_trace_does(steered, kind_path):
    """Detection's batched tracing under a profile with K per layer (more than the model's k in
    the first MoE layer, 1 in the last): several sequences in one batch give each sequence the
    experts its own trace gives, narrower layers padded with -1, and the counts skip the padding."""
    from steer_gguf.detect.risk import accumulate

    info = model_info(kind_path)
    first, last = info.moe_layers[0], info.moe_layers[-1]
    toks = steered.tokenize(TEXT.encode(), add_bos=True, special=True)
    seqs = [toks, toks[:9], toks[3:20]]
    with steered.steering(_topk_profile(info, [LayerK(first, 6), LayerK(last, 1)])):
        alone = [steered.trace(tokens=s).experts for s in seqs]
        many = steered.trace_many(seqs)
    for got, want in zip(many, alone):
        assert got.shape == want.shape == (want.shape[0], len(info.moe_layers), 6)
        np.testing.assert_array_equal(got, want)
        assert (got[:, -1, 1:] == -1).all() and (got[:, -1, 0] >= 0).all()
    counts = accumulate(np.zeros((len(info.moe_layers), info.n_expert), np.int64), np.concatenate(many))
    n = sum(len(s) for s in seqs)
    assert counts[0].sum() == 6 * n and counts[-1].sum() == n


def test_activated_experts_count_inside_k(steered, kind_path):
    info = model_info(kind_path)
    il = info.moe_layers[-1]
    toks = steered.tokenize(TEXT.encode(), add_bos=True, special=True)
    base = steered.trace(tokens=toks)
    on = int(np.argmin(np.bincount(base.experts[:, -1].ravel(), minlength=info.n_expert)))
    with steered.steering(_topk_profile(info, 2, [(il, on, "activate")])):
        tr = steered.trace(tokens=toks)
    assert tr.experts.shape[-1] == 2
    assert (tr.experts[:, -1] == on).any(axis=1).all()


# ---- the format ---------------------------------------------------------------------------

GOOD = {"format": FORMAT, "name": "p",
        "model": {"architecture": "qwen3moe", "n_layer": 4, "n_expert": 8, "n_expert_used": 2},
        "eps": 0.01, "experts": [{"layer": 1, "expert": 2, "action": "activate"}], "bias": []}


def test_format_versions_round_trip():
    plain = Profile.from_dict(GOOD)
    assert plain.to_dict()["format"] == FORMAT and "topk" not in plain.to_dict()  # older readers read it
    g = Profile.from_dict({**GOOD, "topk": 3})
    assert g.to_dict()["format"] == FORMAT_TOPK and g.to_dict()["topk"] == 3 and g.topk_global == 3
    per = Profile.from_dict({**GOOD, "format": FORMAT_TOPK, "topk": [{"layer": 1, "k": 1}, {"layer": 3, "k": 8}]})
    assert per.to_dict()["topk"] == [{"layer": 1, "k": 1}, {"layer": 3, "k": 8}] and per.topk_global is None
    assert Profile.from_dict(json.loads(json.dumps(per.to_dict()))).to_dict() == per.to_dict()
    only = Profile.from_dict({"format": FORMAT_TOPK, "model": {"n_expert_used": 2}, "topk": 1})
    assert not only.experts and not only.is_empty
    assert "topk 1 experts per token in every MoE layer" in only.report()


@pytest.mark.parametrize("change, needle", [
    ({"topk": 0}, "x.json: topk: must be >= 1, got 0"),
    ({"topk": 9}, "x.json: topk: 9 experts per token, but the model has 8 experts"),
    ({"topk": -3}, "x.json: topk: must be >= 1"),
    ({"topk": 2.5}, "x.json: topk: must be an integer K or a list"),
    ({"topk": True}, "x.json: topk: must be an integer K or a list"),
    ({"topk": "4"}, "x.json: topk: must be an integer K or a list"),
    ({"topk": []}, "x.json: topk: an empty list sets nothing"),
    ({"topk": [3]}, "x.json: topk[0]: must be an object"),
    ({"topk": [{"layer": 1}]}, "x.json: topk[0].k: must be an integer"),
    ({"topk": [{"layer": 4, "k": 1}]}, "x.json: topk[0].layer: 4 out of range (model has 4 layers)"),
    ({"topk": [{"layer": -1, "k": 1}]}, "x.json: topk[0].layer: must be >= 0"),
    ({"topk": [{"layer": 1, "k": 0}]}, "x.json: topk[0].k: must be >= 1"),
    ({"topk": [{"layer": 1, "k": 2}, {"layer": 1, "k": 3}]}, "x.json: topk[1]: layer 1 appears twice"),
    ({"topk": [{"layer": 1, "k": 2, "weight": 1}]}, "x.json: topk[0].weight: unknown field"),
    ({"topk": [{"layer": 0, "k": 1}], "experts": [{"layer": 0, "expert": 1, "action": "activate"},
                                                  {"layer": 0, "expert": 2, "action": "activate"}]},
     "x.json: experts: layer 0 activates 2 experts, more than topk K=1 per token"),
    ({"topk": 7, "experts": [{"layer": 0, "expert": 1, "action": "deactivate"},
                             {"layer": 0, "expert": 2, "action": "deactivate"}]},
     "x.json: experts: layer 0 deactivates 2 of 8 experts, leaving fewer than topk K=7"),
    ({"top_k": 2}, "x.json: top_k: unknown field"),
    ({"model": {"n_expert_used": 2, "k": 4}}, "x.json: model.k: unknown field"),
    ({"experts": [{"layer": 1, "expert": 2, "action": "activate", "strength": 2}]},
     "x.json: experts[0].strength: unknown field"),
    ({"bias": [{"layer": 1, "expert": 2, "value": 1.0, "scale": 2}]}, "x.json: bias[0].scale: unknown field"),
    ({"format": "steer-gguf.profile/3"}, "x.json: format: must be"),
])
def test_bad_topk_and_unknown_fields_are_refused_naming_file_and_field(change, needle):
    with pytest.raises(SteerError) as e:
        Profile.from_dict({**GOOD, **change}, source="x.json")
    assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)


def test_a_profile_with_topk_for_the_model(make):
    path = make("deepseek-v3", n_layer=4, n_expert_used=K_MODEL)  # layer 0 is dense; groups: K <= 6
    info = model_info(path)
    with pytest.raises(SteerError, match=r"topk\[0\]\.layer: layer 0 has no experts"):
        _topk_profile(info, [LayerK(0, 2)]).check(info)
    with pytest.raises(SteerError, match="topk: 9 experts per token, but the model has 8"):
        _topk_profile(info, 9).check(info)
    llm = SteeredLlama(path, **LLAMA)
    try:
        with pytest.raises(SteerError, match="a token chooses among 6 .3 of 4 expert groups"):
            llm.set_profile(_topk_profile(info, 7))
        assert llm.profile is None  # nothing changed
        with pytest.raises(SteerError, match="topk .* needs the graph engine"):
            SteeredLlama(path, _topk_profile(info, 2), engine="hook", **LLAMA)
    finally:
        llm.close()


def test_hash_routed_layers_refuse_k(make_arch):
    from fixtures.any_arch import Layout

    path = make_arch("deepseek4", Layout(n_layer=4, hash_layers=1))
    info = model_info(path)
    assert info.fixed_layers == [0]
    with pytest.raises(SteerError, match=r"topk\[0\]\.layer: layer 0 of .* is hash-routed"):
        _topk_profile(info, [LayerK(0, 1)]).check(info)
    # a global K sets the router-chosen layers only
    assert set(_topk_profile(info, 1).topk_layers(info)) == set(info.moe_layers) - {0}


# ---- slots: K per sequence, several K in one batch -------------------------------------------

def _slot_table(tc, info, slot, k) -> None:
    none = np.full((info.n_layer, info.n_expert), _native.ACTIONS["none"], np.int8)
    topk = None if k is None else _topk_profile(info, k).topk_array(info)
    assert _native.slot_set(tc.ptr, slot, none, None, 0.01, topk)[0] == _native.STATUS["OK"]


def test_sequences_of_different_k_in_one_batch_route_as_each_alone(steered, kind_path):
    """Three sequences in one decode, bound to tables of K = 2, the model's k and 6: the graph is
    built with the widest K and each token's weights are cut to its own. Each sequence's experts
    and weights are bit for bit those of the same batch built with its K alone, and its experts
    those of its own single-sequence run (weights within float noise: a batch of other shape
    sums in another order upstream); a row lists its own K experts, then -1."""
    info = model_info(kind_path)
    toks = steered.tokenize(TEXT.encode(), add_bos=True, special=True)[:10]
    tc = steered._trace_context(256)
    ks = [2, None, 6]
    try:
        for slot, k in enumerate(ks):
            _slot_table(tc, info, slot + 1, k)
        for seq in range(3):
            assert _native.seq_bind(tc.ptr, seq, seq + 1)[0] == _native.STATUS["OK"]
        rec = Recorder(tc.ptr, tc.obs, info.n_layer, "graph", weights=True, **recorder_kw(info.architecture))
        rec.on()
        mixed = _record(tc, rec, [toks] * 3)
        same, alone = [], []
        for seq, k in enumerate(ks):
            for other in range(3):  # the same batch, every sequence of this K: a graph of one K
                _native.seq_bind(tc.ptr, other, seq + 1)
            same.append(_record(tc, rec, [toks] * 3))
            alone.append(_record(tc, rec, [toks]))
    finally:
        rec.off()
        if tc.rec.recording:  # the trace context's own recorder (experts only) as it was
            tc.rec.on()
        for slot in range(1, 4):
            _native.slot_clear(tc.ptr, slot)
        for seq in range(3):
            _native.seq_bind(tc.ptr, seq, -1)
        tc.profile_applied = False
    n = len(toks)
    for seq, k in enumerate(ks):
        kk = K_MODEL if k is None else k
        for il, (e, w) in mixed.items():
            es, ws = same[seq][il]
            ea, wa = alone[seq][il]
            rows = slice(seq * n, (seq + 1) * n)
            assert e.shape[0] == 3 * n and ea.shape == (n, kk) and es.shape == (3 * n, kk)
            np.testing.assert_array_equal(e[rows, :kk], es[rows], err_msg=f"layer {il}, K={kk}")
            np.testing.assert_array_equal(w[rows, :kk], ws[rows], err_msg=f"layer {il}, K={kk}")
            assert (e[rows, kk:] == -1).all() and (w[rows, kk:] == 0).all()
            np.testing.assert_array_equal(e[rows, :kk], ea, err_msg=f"layer {il}, K={kk}")
            np.testing.assert_allclose(w[rows, :kk], wa, rtol=1e-4, atol=1e-6)


def _record(tc, rec, seqs: list[list[int]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """One decode of the sequences (ids 0..) with every token an output; each MoE layer's rows."""
    import llama_cpp

    b = tc.batch
    n = 0
    for sid, toks in enumerate(seqs):
        for pos, t in enumerate(toks):
            b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0], b.logits[n] = t, pos, 1, sid, True
            n += 1
    b.n_tokens = n
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(tc.ctx.ctx), True)
    rec.clear()
    assert llama_cpp.llama_decode(tc.ctx.ctx, b) == 0
    return {il: (e, w) for il, (e, w, _) in rec.take().items()}


def test_batch_engine_decodes_requests_of_different_k_together(steered, kind_path):
    """The server's engine puts requests of different K in one batch: each one's text and
    routing equal its own run alone."""
    from test_arch_matrix import _batch

    info = model_info(kind_path)
    toks = steered.tokenize(TEXT.encode(), add_bos=True, special=True)[:12]

    def run(profiles):
        out = _batch(steered, toks, profiles)
        for v in out:
            assert not isinstance(v, Exception), v
        return out

    p2, p3 = _topk_profile(info, 2), _topk_profile(info, 3)
    mixed = run([p2, None, p3])
    for got, p in zip(mixed, [p2, None, p3]):
        (alone,) = run([p])
        assert got.tokens == alone.tokens
        assert got.experts.shape[-1] == (K_MODEL if p is None else p.topk)
        np.testing.assert_array_equal(got.experts, alone.experts)


def test_bad_k_in_a_slot_is_refused_with_one_line(steered, kind_path):
    info = model_info(kind_path)
    tc = steered._trace_context(256)
    none = np.full((info.n_layer, info.n_expert), _native.ACTIONS["none"], np.int8)
    rc, msg = _native.slot_set(tc.ptr, 3, none, None, 0.01, np.full(info.n_layer, 99, np.int32))
    assert rc == _native.STATUS["ERR_TOPK"] and "outside 1..8" in msg and "\n" not in msg
    rc, msg = _native.set_table(tc.ptr, none, None, 0.01, np.full(info.n_layer, -1, np.int32))
    assert rc == _native.STATUS["ERR_TOPK"] and "outside 1..8" in msg


# ---- everywhere a profile goes ---------------------------------------------------------------

def test_cli_topk_on_generate_and_trace_and_profile_commands(make, tmp_path):
    from clitools import assert_one_line_error, cli

    path = make("qwen3moe", n_layer=4, n_expert_used=K_MODEL)
    out = tmp_path / "t.npz"
    r = cli("trace", path, "-p", "hello there", "--topk", "2", "-o", out, "-t", "1")
    assert r.returncode == 0 and "k=2" in r.stdout, r.stderr
    from steer_gguf import RoutingTrace

    assert RoutingTrace.load(out).experts.shape[-1] == 2
    r = cli("generate", path, "-p", "hello", "-n", "3", "--topk", "1", "-t", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["profile"] == "topk1"
    assert_one_line_error(cli("generate", path, "-p", "hello", "--topk", "9", "-t", "1"),
                          "topk: 9 experts per token, but the model has 8")
    r = cli("generate", path, "-p", "hello", "--topk", "0", "-t", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert_one_line_error(cli("trace", path, "-p", "hi", "--topk", "2", "--engine", "hook", "-o", tmp_path / "h.json",
                              "-t", "1"), "needs the graph engine")
    prof = tmp_path / "k.json"
    prof.write_text(json.dumps({"format": FORMAT_TOPK, "model": {"n_expert_used": K_MODEL},
                                "topk": [{"layer": 1, "k": 2}]}))
    r = cli("profile", "show", prof)
    assert r.returncode == 0 and "experts per token: topk layer 1: 2" in r.stdout, r.stderr
    r = cli("profile", "validate", prof, "--model", path)
    assert r.returncode == 0, r.stderr
    prof.write_text(json.dumps({"format": FORMAT_TOPK, "model": {"n_expert_used": K_MODEL}, "topk": 2, "k": 3}))
    assert_one_line_error(cli("profile", "validate", prof), "k.json: k: unknown field")


def test_chat_topk_command(make):
    from steer_gguf.front.chat import ChatSession

    path = make("qwen3moe", n_layer=4, n_expert_used=K_MODEL)
    llm = SteeredLlama(path, topk=2, **LLAMA)
    out, err = [], []
    try:
        s = ChatSession(llm, None, 4, 0.0, 0, out=lambda *a: out.append(" ".join(map(str, a))), err=err.append,
                        topk=2)
        assert llm.profile.topk == 2
        s.handle("/topk 3")
        assert llm.profile.topk == 3 and out[-1] == "experts per token: 3"
        s.handle("/topk 99")
        assert llm.profile.topk == 3 and "99 experts per token" in err[-1]
        s.handle("/topk x")
        assert err[-1].startswith("usage: /topk K|off")
        s.handle("/topk off")
        assert llm.profile is None and "the model's k=4" in out[-1]
    finally:
        llm.close()


def test_bake_writes_a_global_k_as_expert_used_count(make, tmp_path):
    from steer_gguf import bake_profile

    src = make("qwen3moe", n_layer=4, n_expert_used=K_MODEL)
    info = model_info(src)
    plan, res = bake_profile(src, _topk_profile(info, 2), tmp_path / "k2.gguf")
    assert plan.topk == 2 and "experts per token 4 -> 2 (expert_used_count, exact)" in plan.report()
    baked = model_info(res.path)
    assert baked.n_expert_used == 2 and baked.n_expert == info.n_expert
    steered = SteeredLlama(src, _topk_profile(info, 2), **LLAMA)
    try:
        toks = steered.tokenize(TEXT.encode(), add_bos=True, special=True)
        want = steered.trace(tokens=toks)
    finally:
        steered.close()
    plain = SteeredLlama(res.path, **LLAMA)
    try:
        got = plain.trace(tokens=toks)
    finally:
        plain.close()
    np.testing.assert_array_equal(np.sort(got.experts, -1), np.sort(want.experts, -1))
    from steer_gguf.bake.check import check_bake

    report = check_bake(plan, res.path, **LLAMA)
    assert plan.all_exact and report.agreement == 1.0 and report.verdict(plan).startswith("as graded: exact")
    with pytest.raises(SteerError, match="a per-layer K is not bakeable"):
        bake_profile(src, _topk_profile(info, [LayerK(1, 2)]), tmp_path / "p.gguf")
    assert not (tmp_path / "p.gguf").exists()


def test_server_steer_topk(make, tmp_path):
    pytest.importorskip("fastapi")
    from clitools import assert_one_line_error, cli
    from test_server import Server, chat

    path = make("qwen3moe", n_layer=4, n_expert_used=K_MODEL)
    assert_one_line_error(cli("serve", path, "--topk", "2", "--engine", "hook", "--port", "0", "-t", "1"),
                          "--topk (experts per token) needs the graph engine")
    s = Server(path, "--topk", "3", "--api-key", "k")
    try:
        c = s.client(key="k")
        r = chat(c, "Hello there", max_tokens=3, extra_body={"steer_trace": True, "steer_topk": 2})
        assert all(len(row) == 2 for tok in r.steer_trace["experts"] for row in tok)
        r = chat(c, "Hello there", max_tokens=3, extra_body={"steer_trace": True})  # serve --topk 3
        assert all(len(row) == 3 for tok in r.steer_trace["experts"] for row in tok)
        bad = s.post("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "steer_topk": 99}, key="k")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "steer_topk", bad.text
        bad = s.post("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "steer_topk": "2"}, key="k")
        assert bad.status_code == 400
    finally:
        s.stop()


def test_random_control_keeps_the_profiles_k(make):
    from steer_gguf.evaluation.measure import random_control

    info = model_info(make("qwen3moe", n_layer=4, n_expert_used=K_MODEL))
    p = _topk_profile(info, [LayerK(1, 2)], [(1, 3, "activate")])
    c = random_control(p, info, seed=1)
    assert c.topk == p.topk and len(c.experts) == 1 and c.experts[0].expert != 3


@pytest.mark.parametrize("phase", ["generation", "prompt"])
def test_k_follows_the_steering_phase(steered, kind_path, phase):
    """K is part of the profile: it holds in the phase the profile steers, and the other phase's
    tokens take the model's k (row 0 is the prompt's last token, the others generated ones)."""
    from steer_gguf.engine.batch import BatchEngine, Request, SamplerSpec

    info = model_info(kind_path)
    toks = steered.tokenize(TEXT.encode(), add_bos=True, special=True)[:12]
    reqs = [(0, Request(list(toks), profile=_topk_profile(info, 2), phase=phase, max_tokens=3,
                        sampling=SamplerSpec(temperature=0), trace=True))]
    out: dict = {}
    eng = BatchEngine(steered, 1, 128)
    try:
        eng.run(lambda idle: reqs.pop(0) if reqs else None, out.__setitem__)
    finally:
        eng.close()
    assert not isinstance(out[0], Exception), out[0]
    e = out[0].experts
    width = (e >= 0).sum(axis=-1)  # [tokens, layers]: experts per token in each layer
    prompt_k, gen_k = (K_MODEL, 2) if phase == "generation" else (2, K_MODEL)
    assert e.shape[-1] == K_MODEL and len(e) == 3
    assert (width[0] == prompt_k).all() and (width[1:] == gen_k).all()


_GRAPH_DUMP = """
import os, sys
os.environ["GGML_SCHED_DEBUG"] = "2"  # read when the context's scheduler is made: every node printed
from steer_gguf import SteeredLlama, model_info
path, how, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
info = model_info(path)
kw = dict(n_ctx=256, n_threads=1, n_threads_batch=1, verbose=True)
if how == "stock":
    llm = SteeredLlama(path, kv_overrides={info.architecture + ".expert_used_count": k}, **kw)
else:
    llm = SteeredLlama(path, topk=k, **kw)
print("=====graphs", file=sys.stderr, flush=True)
llm.eval([1, 2, 3, 4])  # a prefill graph
llm.eval([5])           # and a decode graph
"""


def _graph_nodes(path, how: str, k: int) -> list[str]:
    import re
    import subprocess
    import sys

    from clitools import ENV, NEUTRAL_CWD

    r = subprocess.run([sys.executable, "-c", _GRAPH_DUMP, str(path), how, str(k)], capture_output=True, text=True,
                       cwd=NEUTRAL_CWD, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    after = r.stderr.split("=====graphs", 1)[1]
    # op, name, size and backend of every node and of its sources; use counts left out
    return [re.sub(r"use=\d+,c=\d+", "", line) for line in after.splitlines() if line.startswith("node #")]


def test_topk_graph_is_the_override_graph_node_for_node(kind_path):
    """Why a global K through a profile costs what the stock override costs: the scheduler runs
    the same nodes (op, tensor, size, backend), in the same order, in prefill and in decode."""
    stock, prof = _graph_nodes(kind_path, "stock", 2), _graph_nodes(kind_path, "profile", 2)
    assert len(stock) > 50 and stock == prof


# ---- tune --topk: speed beside quality -----------------------------------------------------------

def test_tune_topk_sweeps_k_and_writes_the_fewest_experts_within_the_kl_budget(tmp_path):
    from clitools import cli
    from steer_gguf.front.demo import DEMO_MODEL

    out, sweep = tmp_path / "k.json", tmp_path / "sweep.json"
    r = cli("tune", DEMO_MODEL, "--topk", "1,2,3", "--topk-schemes", "global,edges", "--behavior", "digits-words",
            "--max-items", "4", "--samples", "1", "--rounds", "1", "--max-kl", "100", "-o", out, "--json", sweep,
            "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "skipped topk-global2: the model's own k in every layer" in r.stdout  # the demo model's k is 2
    d = json.loads(sweep.read_text())
    pts = {p["name"]: p for p in d["points"]}
    assert set(pts) == {"model k", "topk-global1", "topk-global3", "topk-edges1", "topk-edges3"}
    ref = pts["model k"]
    assert ref["kl"] == 0 and ref["mean_k"] == 2
    assert pts["topk-global1"]["mean_k"] == 1 and pts["topk-global3"]["mean_k"] == 3
    assert 1 < pts["topk-edges1"]["mean_k"] < 2  # K in the first and last quarter only
    for p in pts.values():
        assert p["prefill_tps"] > 0 and p["decode_tps"] > 0 and p["perplexity"] > 0
        assert p["prefill_x"][0] > 0 and p["prefill_x"][1:] == [None, None]  # one round: no interval
        assert abs(sum(p["rates"]["main"].values()) - 1) < 1e-9  # every reply judged once
    assert ref["prefill_x"][0] == ref["decode_x"][0] == 1.0 and d["interval_level"] == 0
    assert "too few rounds for an interval" in r.stdout
    assert all(p["kl"] > 0 for n, p in pts.items() if n != "model k")
    # the budget admits every point: the fewest experts per token wins
    assert pts["topk-global1"]["chosen"] and d["chosen"] == "topk-global1"
    p = Profile.load(out)
    assert p.topk == 1 and not p.experts and p.provenance["tune_topk"]["mean_k"] == 1
    assert cli("profile", "validate", out, "--model", DEMO_MODEL).returncode == 0


def test_the_speed_ratio_interval_is_the_median_order_statistics():
    """Paired ratios by round; the interval's order statistics cover the median with >= 90%
    whatever the distribution (binomial), the narrowest such; too few rounds give none."""
    from steer_gguf.evaluation.topk_sweep import _paired, median_interval

    assert median_interval(4) == (0, 0.0)
    j, cover = median_interval(5)
    assert j == 1 and cover == 1 - 2 / 32
    j, cover = median_interval(20)
    assert j == 6 and 0.958 < cover < 0.959  # j = 7 would cover 0.885 only
    num, den = [2.0, 3.0, 4.0, 5.0, 100.0], [1.0, 1.0, 2.0, 1.0, 1.0]  # ratios 2, 3, 2, 5, 100
    assert _paired(num, den, 1) == [3.0, 2.0, 100.0]
    assert _paired(num, den, 0) == [3.0, None, None]


@pytest.mark.parametrize("args, needle", [
    (["--topk", "0,2"], "--topk: expected positive integers"),
    (["--topk", "2", "--topk-schemes", "sideways"], "--topk-schemes: sideways"),
    (["--topk", "99"], "every K must lie in 1..16"),
    (["--topk", "1", "-o", "x.json"], "needs --max-kl"),
    (["--topk", "2"], "every point of the sweep is the model's own k"),
    (["--topk", "1", "--table", "t.csv"], "drop --table"),
    ([], "tune needs --table and --output"),
])
def test_tune_topk_bad_input_is_one_line(args, needle, tmp_path):
    from clitools import assert_one_line_error, cli
    from steer_gguf.front.demo import DEMO_MODEL

    assert_one_line_error(cli("tune", DEMO_MODEL, *args, "-t", "1"), needle)
    assert not (tmp_path / "x.json").exists()
