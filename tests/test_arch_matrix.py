"""Every MoE architecture of the vendored llama.cpp, built by llama.cpp's own model builder
(fixtures/any_arch.py) and checked the same way: read, traced, a profile honoured on every MoE
layer and token, cleared back to the unsteered routing exactly, graph engine == hook engine,
unsteered logits bit for bit, detection and `profile make`, a bias rule, the portable GPU op
chain and profile slots. Architectures steer-gguf cannot steer are asserted refused, each with
its one-line reason; models.txt must say exactly what this module proves."""
from __future__ import annotations

import numpy as np
import pytest

from clitools import assert_one_line_error, cli
from fixtures.any_arch import REAL_LAYOUTS, Layout
from steer_gguf import BiasRule, ExpertRule, ModelRef, Profile, SteeredLlama, SteerError, model_info
from steer_gguf.detect.datasets import load_pairs
from steer_gguf.detect.risk import detect
from steer_gguf.engine.contexts import _native
from steer_gguf.model import GATING_BY_ARCH, GATING_NAMES, routing_architectures, verification

LLAMA = dict(n_ctx=256, n_threads=1, n_threads_batch=1)
TEXT = "The quick brown fox jumps over the lazy dog 0123456789 again and again."
N_TOK = 16
OK = _native.STATUS["OK"]

# what steer-gguf does with each architecture it cannot steer: where it refuses (model_info, or
# SteeredLlama before/after loading) and the words its one-line error must hold
REFUSED = {
    "llada-moe": ("load", "diffusion language model"),
    "rnd1": ("load", "diffusion language model"),
    "dflash": ("load", "speculative-decoding draft model"),
    "nomic-bert-moe": ("load", "without KV memory"),
    "llama-embed": ("load", "embedding model with no language-model head"),
    # llama.cpp's lfm2 loader makes every layer dense (n_layer_dense_lead = n_layer); MoE LFM2
    # files are lfm2moe
    "lfm2": ("info", "not a Mixture-of-Experts model"),
}
# graphs that share build_moe_ffn code with a MoE sibling, but whose loaders never load a router
# (csrc/moe_archs.py leaves them out): a file claiming experts is refused before llama.cpp sees it
DENSE_LOADERS = ("bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "phi3")
ARCHS = sorted(routing_architectures())
STEERED = [a for a in ARCHS if a not in REFUSED]
# the matrix layout: 3 layers, a dense lead layer, a shared expert; DeepSeek V4 with one
# hash-routed layer (llama.cpp raises its layer count to 4)
LAYOUT = Layout(n_layer=3)
LAYOUTS = {"deepseek4": Layout(n_layer=4, hash_layers=1)}


def _profile(info, rules, bias=()) -> Profile:
    return Profile(ModelRef.of(info), [ExpertRule(l, e, a) for l, e, a in rules], list(bias), name="m")


def _steerable(info) -> list[int]:
    return [il for il in info.moe_layers if il not in info.fixed_layers]


def _every_layer(info, base) -> tuple[Profile, dict[int, tuple[int, int]]]:
    """In every steerable MoE layer, the least-chosen expert on, the most-chosen off."""
    rules, chosen = [], {}
    for j, il in enumerate(info.moe_layers):
        if il in info.fixed_layers:
            continue
        counts = np.bincount(base.experts[:, j, :].ravel(), minlength=info.n_expert)
        on, off = int(np.argmin(counts)), int(np.argmax(counts))
        chosen[j] = (on, off)
        rules += [(il, on, "activate"), (il, off, "deactivate")]
    return _profile(info, rules), chosen


def _no_specials(g: SteeredLlama) -> dict[int, float]:
    """A logit bias forbidding the special tokens: random weights may pick end-of-text at once."""
    return {t: -1e4 for t in range(g.n_vocab()) if g.detokenize([t], special=True).startswith(b"<|")}


def _sorted(a: np.ndarray) -> np.ndarray:
    return np.sort(a, axis=-1)


@pytest.fixture(scope="module", params=STEERED)
def m(request, make_arch):
    arch = request.param
    path = make_arch(arch, LAYOUTS.get(arch, LAYOUT))
    info = model_info(path)
    graph = SteeredLlama(path, **LLAMA)
    hook = SteeredLlama(path, engine="hook", **LLAMA)
    toks = graph.tokenize(TEXT.encode(), add_bos=True, special=True)[:N_TOK]
    base = graph.trace(tokens=toks)
    profile, chosen = _every_layer(info, base)
    graph.set_profile(profile)
    steered = graph.trace(tokens=toks)
    graph.set_profile(None)
    yield dict(arch=arch, path=path, info=info, graph=graph, hook=hook, toks=toks, base=base,
               profile=profile, chosen=chosen, steered=steered)
    graph.close()
    hook.close()


def test_read(m):
    info = m["info"]
    assert info.architecture == m["arch"]
    assert info.moe_layers and _steerable(info)
    assert (info.n_expert, info.n_expert_used) == (8, 2)
    assert info.gating in set(GATING_NAMES.values()) | {"sigmoid-after-topk"}


def test_trace_covers_every_token_and_moe_layer(m):
    info, tr = m["info"], m["base"]
    assert tr.layers == info.moe_layers
    assert tr.experts.shape == (N_TOK, len(info.moe_layers), info.n_expert_used)
    assert (np.diff(_sorted(tr.experts), axis=-1) > 0).all(), "k distinct experts per token"
    assert np.isfinite(tr.weights).all()
    assert len({tuple(r) for r in _sorted(tr.experts[:, -1])}) > 1, "routing varies across tokens"


def test_profile_is_honoured_on_every_moe_layer_and_token(m):
    info, st = m["info"], m["steered"]
    for j, (on, off) in m["chosen"].items():
        il = info.moe_layers[j]
        assert (st.experts[:, j] == on).any(axis=1).all(), f"layer {il}: activated expert {on} missing"
        assert not (st.experts[:, j] == off).any(), f"layer {il}: deactivated expert {off} still chosen"
    for j, il in enumerate(info.moe_layers):
        if il in info.fixed_layers:  # a token table routes it: the same tokens, the same experts
            np.testing.assert_array_equal(st.experts[:, j], m["base"].experts[:, j])


def test_clearing_restores_unsteered_routing_exactly(m):
    g = m["graph"]
    g.set_profile(m["profile"])
    g.trace(tokens=m["toks"])
    g.set_profile(None)
    back = g.trace(tokens=m["toks"])
    np.testing.assert_array_equal(back.experts, m["base"].experts)
    np.testing.assert_array_equal(back.weights, m["base"].weights)


def _routes_as_the_graph_engine(m, llm: SteeredLlama, rtol: float) -> None:
    """`llm` under the matrix profile routes as the graph engine did (experts exactly, weights
    to rtol)."""
    llm.set_profile(m["profile"])
    try:
        tr = llm.trace(tokens=m["toks"])
    finally:
        llm.set_profile(None)
    np.testing.assert_array_equal(_sorted(tr.experts), _sorted(m["steered"].experts))
    np.testing.assert_allclose(_sorted(tr.weights), _sorted(m["steered"].weights), rtol=rtol, atol=rtol / 10)


def test_generation_is_steered_and_recorded(m):
    """Decoding one token at a time (the recorder's per-decode path, grovemoe's two routings
    included) follows the profile on every steerable layer."""
    g, info = m["graph"], m["info"]
    with g.steering(m["profile"]), g.recording() as log:
        out = g.create_completion("Once upon a time", max_tokens=4, temperature=0.0, logit_bias=_no_specials(g))
    n = out["usage"]["completion_tokens"] - 1  # the last sampled token is never decoded
    assert n >= 1
    rows = log.tail(n)
    # one row per decoded token (the prompt's, then each generated one) in every layer but the
    # model's last, which computes output rows only
    for il in info.moe_layers:
        if il != info.n_layer - 1:
            assert log.per_layer[il].shape[0] == out["usage"]["prompt_tokens"] + n, il
    for j, (on, off) in m["chosen"].items():
        assert (rows[:, j] == on).any(axis=1).all() and not (rows[:, j] == off).any(), info.moe_layers[j]


def test_batched_generation_steers_its_request_only(m):
    """Two requests decoded together (BatchEngine: profile slots, per-request routing traces):
    the steered one follows the profile on every steerable layer, in every sampled token; its
    unsteered neighbour routes, token for token, as in a batch where neither is steered."""
    g, info = m["graph"], m["info"]
    steered, neighbour = _batch(g, m["toks"], (m["profile"], None))
    _, alone = _batch(g, m["toks"], (None, None))
    assert steered.experts.shape == (len(steered.tokens), len(info.moe_layers), info.n_expert_used)
    for j, (on, off) in m["chosen"].items():
        rows = steered.experts[:, j]
        assert (rows == on).any(axis=1).all() and not (rows == off).any(), info.moe_layers[j]
    assert neighbour.tokens == alone.tokens
    np.testing.assert_array_equal(_sorted(neighbour.experts), _sorted(alone.experts))


def _batch(g: SteeredLlama, toks: list[int], profiles: tuple) -> list:
    """The results of one BatchEngine run: one greedy request of `toks` per profile, 3 tokens."""
    from steer_gguf.engine.batch import BatchEngine, Request, SamplerSpec

    greedy = SamplerSpec(temperature=0, logit_bias=_no_specials(g))
    pending = [(i, Request(list(toks), profile=p, max_tokens=3, sampling=greedy, trace=True))
               for i, p in enumerate(profiles)]
    out: dict = {}
    eng = BatchEngine(g, len(profiles), 128)
    try:
        eng.run(lambda idle: pending.pop(0) if pending else None, out.__setitem__)
    finally:
        eng.close()
    return [out[i] for i in range(len(profiles))]


def test_graph_and_hook_engines_route_alike(m):
    _routes_as_the_graph_engine(m, m["hook"], 1e-4)


def test_unsteered_logits_are_bit_identical(m):
    """Logits before any profile, after one was set and cleared, and under a table that changes
    nothing (no action, zero bias) are the same bits."""
    g, info, toks = m["graph"], m["info"], m["toks"]
    tc = g._trace_context(256)
    rows = [list(range(len(toks)))]
    plain = tc.run([toks], rows, logits=True)[0]
    none = np.full((info.n_layer, info.n_expert), _native.ACTIONS["none"], np.int8)
    assert _native.set_table(tc.ptr, none, np.zeros((info.n_layer, info.n_expert), np.float32), 0.01)[0] == OK
    try:
        zeroed = tc.run([toks], rows, logits=True)[0]
    finally:
        _native.clear_table(tc.ptr)
    with g.steering(m["profile"]):
        tc.sync_profile()
        steered = tc.run([toks], rows, logits=True)[0]
    tc.sync_profile()
    cleared = tc.run([toks], rows, logits=True)[0]
    assert np.array_equal(plain, cleared) and np.array_equal(plain, zeroed)
    assert not np.array_equal(plain, steered)


def test_detection_and_profile_make(m):
    g, info = m["graph"], m["info"]
    table = detect(g, load_pairs("builtin:digits-words", max_pairs=3))
    assert table.layers == _steerable(info), "detection covers the steerable layers, and only them"
    p = table.make_profile(info, activate=2, deactivate=1)
    p.check(info)
    assert len(p.experts) == 3
    with g.steering(p):
        tr = g.trace(tokens=m["toks"])
    for r in p.experts:
        picked = (tr.experts[:, info.moe_layers.index(r.layer)] == r.expert).any(axis=1)
        assert picked.all() if r.action == "activate" else not picked.any(), r


@pytest.mark.parametrize("arch", ["deepseek4", "grovemoe", "gemma4"])
def test_detect_and_profile_make_from_the_cli(arch, make_arch, tmp_path):
    """The commands a user runs, on the architectures with a special case (hash-routed layers,
    two routings per layer, logits computed outside build_moe_ffn)."""
    path = make_arch(arch, LAYOUTS.get(arch, LAYOUT))
    table, prof = tmp_path / "t.csv", tmp_path / "p.json"
    r = cli("detect", path, "--pairs", "builtin:digits-words", "--max-pairs", "3", "-o", table, "--threads", "1")
    assert r.returncode == 0, r.stderr
    r = cli("profile", "make", table, "--model", path, "--activate", "2", "--deactivate", "1", "-o", prof)
    assert r.returncode == 0, r.stderr
    info, p = model_info(path), Profile.load(prof)
    p.check(info)
    assert len(p.experts) == 3 and not {x.layer for x in p.experts} & set(info.fixed_layers)


def test_a_bias_rule_shifts_routing(m):
    g, info, base = m["graph"], m["info"], m["base"]
    il = _steerable(info)[-1]
    j = info.moe_layers.index(il)
    on = m["chosen"][j][0]
    with g.steering(_profile(info, [], [BiasRule(il, on, 1e3)])):
        tr = g.trace(tokens=m["toks"])
    before = (base.experts[:, j] == on).any(axis=1).mean()
    after = (tr.experts[:, j] == on).any(axis=1).mean()
    assert after >= 0.6 and after - before >= 0.4, (before, after)


def test_portable_op_chain_steers_alike(m, monkeypatch):
    monkeypatch.setenv("STEER_GGUF_PORTABLE_OPS", "1")  # read when the table is set
    _routes_as_the_graph_engine(m, m["graph"], 1e-5)


def test_profile_slots_steer_their_sequence_only(m):
    """Two copies of the text in one batch, one bound to a slot holding the profile: it routes
    as the profile in force context-wide does, the unbound one as no profile does. Compared on
    the same context: llama.cpp's attention sums in another order at another context size, and
    a near tie between experts can then go the other way."""
    g, info, toks = m["graph"], m["info"], m["toks"]
    tc = g._trace_context(256)
    seqs, rows = [toks, toks], [list(range(len(toks)))] * 2
    plain = tc.run(seqs, rows)
    with g.steering(m["profile"]):
        tc.sync_profile()
        wide = tc.run(seqs, rows)
    tc.sync_profile()
    actions, bias = m["profile"].to_arrays(info, _native.ACTIONS)
    assert _native.slot_set(tc.ptr, 3, actions, bias, float(m["profile"].eps))[0] == OK
    assert _native.seq_bind(tc.ptr, 0, 3)[0] == OK
    try:
        bound, unbound = tc.run(seqs, rows)
    finally:
        _native.seq_bind(tc.ptr, 0, -1)
        _native.slot_clear(tc.ptr, 3)
    np.testing.assert_array_equal(_sorted(bound), _sorted(wide[0]))
    np.testing.assert_array_equal(_sorted(unbound), _sorted(plain[1]))
    assert not np.array_equal(_sorted(bound), _sorted(plain[0]))


# llama.cpp's loader cannot take an expert_used_count override on these files; why
OVERRIDE_UNLOADABLE = {"deepseek4": "ffn_gate_tid2eid.weight' has wrong shape"}  # the hash table is k wide


def test_topk_half_routes_as_the_expert_used_count_override(m, make_arch):
    """A profile's topk = k/2 (issue 32) routes as llama.cpp's own loader does with
    `<arch>.expert_used_count` = k/2: the same experts on every MoE layer and token and the same
    weights, bit for bit; hash-routed layers keep their experts. DeepSeek V4 with a hash-routed
    layer cannot be loaded with the override (its token table is k wide): there the file without
    hash-routed layers is compared, and the matrix's file is checked for its hash layer."""
    info, g, toks = m["info"], m["graph"], m["toks"]
    k = info.n_expert_used // 2
    prof = Profile(ModelRef.of(info), name="half", topk=k)
    if m["arch"] in OVERRIDE_UNLOADABLE:
        with pytest.raises(SteerError, match="could not load"):
            _override(m["path"], info, k)
        with g.steering(prof):
            got = g.trace(tokens=toks)
        for j, il in enumerate(info.moe_layers):
            if il in info.fixed_layers:
                np.testing.assert_array_equal(got.experts[:, j], m["base"].experts[:, j])
            else:
                assert (got.experts[:, j, k:] == -1).all() and (got.experts[:, j, :k] >= 0).all()
        path = make_arch(m["arch"], LAYOUT)
        other = SteeredLlama(path, **LLAMA)
        try:
            _topk_as_override(other, path, model_info(path), toks, k)
        finally:
            other.close()
        return
    _topk_as_override(g, m["path"], info, toks, k)


def _override(path, info, k: int) -> SteeredLlama:
    return SteeredLlama(path, kv_overrides={f"{info.architecture}.expert_used_count": k}, **LLAMA)


def _topk_as_override(g: SteeredLlama, path, info, toks, k: int) -> None:
    stock = _override(path, info, k)
    try:
        want = stock.trace(tokens=toks)
    finally:
        stock.close()
    with g.steering(Profile(ModelRef.of(info), name="half", topk=k)):
        got = g.trace(tokens=toks)
    assert got.experts.shape == want.experts.shape == (len(toks), len(info.moe_layers), k)
    # no steering node: the override's graph, op for op, so the same bits
    np.testing.assert_array_equal(got.experts, want.experts)
    np.testing.assert_array_equal(got.weights, want.weights)


# ---- what is refused ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_refused_with_its_reason(arch, make_arch):
    where, reason = REFUSED[arch]
    path = make_arch(arch, LAYOUT)
    if where == "info":
        with pytest.raises(SteerError, match=reason):
            model_info(path)
        assert_one_line_error(cli("info", path), reason)
    else:
        assert model_info(path).architecture == arch  # `info` still describes the file
        with pytest.raises(SteerError, match=reason):
            SteeredLlama(path, **LLAMA)


def test_info_warns_once_on_a_refused_architecture_and_not_on_a_verified_one(make_arch):
    r = cli("info", make_arch("rnd1", LAYOUT))
    assert r.returncode == 0 and r.stderr.count("warning:") == 1 and "refuses to run rnd1" in r.stderr
    r = cli("info", make_arch("qwen35moe", LAYOUT))
    assert r.returncode == 0 and "warning" not in r.stderr and "qwen35moe" in r.stdout


@pytest.mark.parametrize("arch", DENSE_LOADERS)
def test_an_architecture_whose_loader_never_routes_is_refused(arch, tmp_path):
    from test_architectures import _moe_file

    assert arch not in routing_architectures()
    with pytest.raises(SteerError, match="never routes"):
        model_info(_moe_file(tmp_path / f"{arch}.gguf", arch))


def test_a_profile_touching_hash_routed_layers_is_refused(make_arch):
    """DeepSeek V4's hash-routed layers take experts from a token table: a profile there is
    refused naming them; the matrix steers the other layers and detection leaves them out."""
    path = make_arch("deepseek4", LAYOUTS["deepseek4"])
    info = model_info(path)
    assert info.fixed_layers == [0] and 0 in info.moe_layers
    with pytest.raises(SteerError, match=r"touches layers 0 .*fixed per-token table.*steerable: 1\.\.3"):
        _profile(info, [(0, 1, "activate"), (2, 1, "activate")]).check(info)
    assert "hash-routed   layers 0" in info.report()


UNPRUNABLE = {"deepseek4": "hash routing", "grovemoe": "adjugate expert"}


@pytest.mark.parametrize("arch", [a for a in STEERED if a not in UNPRUNABLE])
def test_bake_routes_as_the_profile_did(arch, make_arch, tmp_path):
    """One expert deactivated in every MoE layer, baked (a selection or router bias edited, or
    the expert pruned): the baked file, unsteered, never chooses it, and its first MoE layer
    chooses as the steered source did (later layers too where every action is exact)."""
    from steer_gguf.bake.write import bake_profile

    src = make_arch(arch, LAYOUT)
    info = model_info(src)
    prof = _profile(info, [(il, 3, "deactivate") for il in info.moe_layers])
    plan, res = bake_profile(src, prof, tmp_path / "baked.gguf")
    assert {a.grade for a in plan.actions} <= {"exact", "selection-exact"}
    steered = SteeredLlama(src, prof, **LLAMA)
    try:
        toks = steered.tokenize(TEXT.encode(), add_bos=True, special=True)[:N_TOK]
        want = steered.trace(tokens=toks).experts
    finally:
        steered.close()
    baked = SteeredLlama(res.path, **LLAMA)
    try:
        got = baked.trace(tokens=toks).experts
    finally:
        baked.close()
    if plan.removed:  # back to the source's expert numbers
        for j, il in enumerate(info.moe_layers):
            got[:, j] = np.asarray(plan.kept[il])[got[:, j]]
    assert not (got == 3).any()
    deep = len(info.moe_layers) if {a.grade for a in plan.actions} == {"exact"} else 1
    np.testing.assert_array_equal(_sorted(got[:, :deep]), _sorted(want[:, :deep]))


@pytest.mark.parametrize("arch, why", sorted(UNPRUNABLE.items()))
def test_pruning_is_refused_where_experts_are_named_by_number(arch, why, make_arch):
    from steer_gguf.bake.plan import plan_bake

    info = model_info(make_arch(arch, LAYOUTS.get(arch, LAYOUT)))
    p = _profile(info, [(info.moe_layers[-1], 1, "deactivate")])
    with pytest.raises(SteerError, match=f"cannot bake by prune: .*{why}"):
        plan_bake(info, p, method="prune")


def test_pruning_refuses_experts_in_a_layer_the_graph_never_routes(make_arch, tmp_path):
    """ernie4_5-moe with interleave_moe_layer_step 2: layer 2 has a router and experts that its
    graph never uses."""
    from steer_gguf.bake.write import bake_profile

    src = make_arch("ernie4_5-moe", LAYOUT)
    info = model_info(src)
    assert info.moe_layers == [1]
    with pytest.raises(SteerError, match="layer 2 holds experts that llama.cpp's ernie4_5-moe graph never routes"):
        bake_profile(src, _profile(info, [(1, 3, "deactivate")]), tmp_path / "b.gguf", method="prune")
    assert not (tmp_path / "b.gguf").exists()


def test_a_llama4_file_llama_cpp_would_abort_on_is_refused(make_arch):
    path = make_arch("llama4", Layout(n_layer=4, n_dense_lead=0, extra={"%s.block_count": 2}))
    with pytest.raises(SteerError, match="llama4 file with 2 layers: llama.cpp aborts on fewer than 4"):
        model_info(path)


def test_gating_fixed_in_code_is_reported_as_llama_cpp_runs_it(tmp_path):
    from test_architectures import _moe_file

    # Gemma 4's graph passes softmax to build_moe_ffn whatever the file says
    assert model_info(_moe_file(tmp_path / "g.gguf", "gemma4", gating=2)).gating == "softmax"
    assert model_info(_moe_file(tmp_path / "c.gguf", "cohere2moe", gating=2)).gating == "sigmoid"


# ---- models.txt says what this module proves ------------------------------------------------

def test_models_txt_states_what_the_matrix_proves():
    for arch in ARCHS:
        want = "refused" if arch in REFUSED else "verified"
        assert verification(arch) == want, f"models.txt: {arch} should be {want}"
    for arch in DENSE_LOADERS:
        assert verification(arch) == "refused", f"models.txt: {arch} should be refused"


# ---- gating read from the file: the other gating functions -------------------------------------

FILE_GATED = [a for a in STEERED if a not in GATING_BY_ARCH and a != "deepseek4"]  # deepseek4: sqrt-softplus


@pytest.mark.parametrize("arch", FILE_GATED)
def test_softmax_gating_from_the_file_is_steered(arch, make_arch):
    """The matrix's models gate by sigmoid where the file chooses; the same architectures with
    softmax (DeepSeek-V2 style) are read as such and steered alike by both engines."""
    path = make_arch(arch, Layout(n_layer=3, gating=1))
    info = model_info(path)
    assert info.gating == "softmax"
    _steered_on_every_layer(path, info)


@pytest.mark.parametrize("arch", STEERED)
def test_expert_groups_are_steered(arch, make_arch):
    """Group-limited selection (DeepSeek-V3 style: 4 groups of 2 experts, 2 groups per token;
    llama.cpp applies it in build_moe_ffn to any architecture whose file has the keys): an
    activated expert's group is kept, a deactivated expert never chosen, by both engines."""
    path = make_arch(arch, Layout(n_layer=3, n_expert_groups=4, n_group_used=2))
    info = model_info(path)
    assert (info.n_expert_groups, info.n_group_used) == (4, 2)
    _steered_on_every_layer(path, info)


def _steered_on_every_layer(path, info) -> None:
    """One expert on and one off in every steerable MoE layer: honoured on every token, by
    both engines alike, and cleared back exactly."""
    graph, hook = SteeredLlama(path, **LLAMA), SteeredLlama(path, engine="hook", **LLAMA)
    try:
        toks = graph.tokenize(TEXT.encode(), add_bos=True, special=True)[:N_TOK]
        base = graph.trace(tokens=toks)
        profile, chosen = _every_layer(info, base)
        graph.set_profile(profile)
        hook.set_profile(profile)
        st, sh = graph.trace(tokens=toks), hook.trace(tokens=toks)
        graph.set_profile(None)
        back = graph.trace(tokens=toks)
    finally:
        graph.close()
        hook.close()
    assert len(chosen) == len(_steerable(info))
    for j, (on, off) in chosen.items():
        assert (st.experts[:, j] == on).any(axis=1).all() and not (st.experts[:, j] == off).any(), j
    np.testing.assert_array_equal(_sorted(st.experts), _sorted(sh.experts))
    np.testing.assert_array_equal(back.experts, base.experts)


@pytest.mark.parametrize("arch", ["qwen3moe", "glm4moe", "gpt-oss"])
def test_nvfp4_style_scales_are_steered(arch, make_arch):
    """Files that carry per-expert weight and input scales (NVFP4 checkpoints): build_moe_ffn's
    scaled path is steered like the plain one."""
    import gguf

    path = make_arch(arch, Layout(n_layer=3, quant_scales=True))
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert any(n.endswith("_exps.scale") for n in names) and any(n.endswith(".input_scale") for n in names)
    _steered_on_every_layer(path, model_info(path))


# ---- real models' layouts at tiny width -------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REAL_LAYOUTS))
def test_real_layouts_steer_on_every_layer(name, make_arch):
    arch, layout = REAL_LAYOUTS[name]
    path = make_arch(arch, layout)
    info = model_info(path)
    assert (info.n_layer, info.n_expert, info.n_expert_used) == (layout.n_layer, layout.n_expert,
                                                                 layout.n_expert_used)
    assert info.n_expert_groups == layout.n_expert_groups
    _steered_on_every_layer(path, info)


def test_graph_recorder_equals_the_callback_recorder(m):
    """The graph recorder (tokens routed without logits where the graph takes routed rows; made
    outputs in OUTPUT_ROWS_ONLY's graphs) records what the eval-callback recorder sees with every
    traced token an output, steered and not."""
    from steer_gguf.engine.tracing import OUTPUT_ROWS_ONLY
    from steer_gguf.model import ROUTES_TWICE

    g = m["graph"]
    assert g._recorder.routes_rows == (m["arch"] not in OUTPUT_ROWS_ONLY)
    if m["arch"] in ROUTES_TWICE:  # its rows carry no batch index to undouble by
        with pytest.raises(SteerError, match="cannot record a model that routes twice"):
            SteeredLlama(m["path"], recorder="callback", **LLAMA)
        return
    old = SteeredLlama(m["path"], recorder="callback", **LLAMA)
    try:
        for prof in (None, m["profile"]):
            g.set_profile(prof)
            old.set_profile(prof)
            a, b = g.trace(tokens=m["toks"]), old.trace(tokens=m["toks"])
            np.testing.assert_array_equal(_sorted(a.experts), _sorted(b.experts))
            np.testing.assert_allclose(_sorted(a.weights), _sorted(b.weights), rtol=1e-6, atol=1e-7)
    finally:
        g.set_profile(None)
        old.close()
