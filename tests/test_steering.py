"""Steering inside llama.cpp's gating, for every MoE architecture family we support."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures.backend import TEST_NGL
from steer_gguf import ExpertRule, ModelRef, Profile, SteeredLlama, model_info

# tiny models gain nothing from a second thread, and spinning threads stall on a busy machine;
# STEER_GGUF_TEST_NGL=99 runs every layer on the build's GPU backend (fixtures/backend.py)
LLAMA = dict(n_ctx=256, n_threads=1, n_threads_batch=1, n_gpu_layers=TEST_NGL)
TEXT = "The quick brown fox jumps over the lazy dog 0123456789 again and again."


def _profile(info, rules, bias=()):
    return Profile(ModelRef.of(info), [ExpertRule(l, e, a) for l, e, a in rules], list(bias), name="t")


def least_used(tr, info, j=-1) -> int:
    """The expert column j of a trace picks least often: forcing it on is a real change."""
    return int(np.argmin(np.bincount(tr.experts[:, j, :].ravel(), minlength=info.n_expert)))


@pytest.fixture(scope="module")
def llms(moe_path):
    graph = SteeredLlama(moe_path, **LLAMA)
    hook = SteeredLlama(moe_path, engine="hook", **LLAMA)
    yield graph, hook
    graph.close()
    hook.close()


def test_trace_covers_every_token_and_moe_layer(llms, moe_path):
    llm, _ = llms
    info = model_info(moe_path)
    toks = llm.tokenize(TEXT.encode(), add_bos=True, special=True)
    tr = llm.trace(tokens=toks)
    assert tr.layers == info.moe_layers
    assert tr.experts.shape == (len(toks), len(info.moe_layers), info.n_expert_used)
    assert tr.weights.shape == tr.experts.shape
    assert (tr.experts >= 0).all() and (tr.experts < info.n_expert).all()
    # k distinct experts per token, in every layer, the last one included
    srt = np.sort(tr.experts, axis=-1)
    assert (np.diff(srt, axis=-1) > 0).all()
    assert np.isfinite(tr.weights).all() and (tr.weights > 0).all()
    # routing varies across tokens (the recorder reads rows with their stride)
    assert len({tuple(r) for r in srt[:, -1, :]}) > 1


def test_activate_and_deactivate(llms, moe_path):
    llm, _ = llms
    info = model_info(moe_path)
    base = llm.trace(text=TEXT)
    first, last = info.moe_layers[0], info.moe_layers[-1]
    on = least_used(base, info)
    off = int(np.argmax(np.bincount(base.experts[:, 0, :].ravel(), minlength=info.n_expert)))
    assert not (base.experts[:, -1, :] == on).any(axis=1).all(), "fixture: expert already always chosen"
    assert (base.experts[:, 0, :] == off).any(), "fixture: expert never chosen"
    llm.set_profile(_profile(info, [(last, on, "activate"), (first, off, "deactivate")]))
    try:
        tr = llm.trace(text=TEXT)
    finally:
        llm.set_profile(None)
    assert (tr.experts[:, -1, :] == on).any(axis=1).all(), "activated expert missing from some token's top-k"
    assert not (tr.experts[:, 0, :] == off).any(), "deactivated expert still selected"


def test_unsteered_layers_route_as_upstream(llms, moe_path):
    llm, _ = llms
    info = model_info(moe_path)
    base = llm.trace(text=TEXT)
    last = info.moe_layers[-1]
    on = least_used(base, info)
    with llm.steering(_profile(info, [(last, on, "activate")])):
        tr = llm.trace(text=TEXT)
    # layers before the steered one see identical inputs, so identical routing and weights
    np.testing.assert_array_equal(tr.experts[:, :-1], base.experts[:, :-1])
    np.testing.assert_array_equal(tr.weights[:, :-1], base.weights[:, :-1])
    assert not np.array_equal(tr.experts[:, -1], base.experts[:, -1])


def test_empty_profile_is_bit_identical(moe_path):
    info = model_info(moe_path)
    llm = SteeredLlama(moe_path, logits_all=True, **LLAMA)
    toks = llm.tokenize(TEXT.encode(), add_bos=True, special=True)
    llm.eval(toks)
    plain = np.array(llm.scores[: len(toks)])
    llm.set_profile(Profile.empty(info))
    llm.eval(toks)
    empty = np.array(llm.scores[: len(toks)])
    llm.set_profile(_profile(info, [(info.moe_layers[0], 0, "activate")]))
    llm.eval(toks)
    steered = np.array(llm.scores[: len(toks)])
    llm.close()
    assert np.array_equal(plain, empty)
    assert not np.array_equal(plain, steered)


def test_graph_and_hook_engines_agree(llms, moe_path):
    graph, hook = llms
    info = model_info(moe_path)
    base = graph.trace(text=TEXT)
    rules = []
    for j, il in enumerate(info.moe_layers):
        counts = np.bincount(base.experts[:, j, :].ravel(), minlength=info.n_expert)
        rules.append((il, int(np.argmin(counts)), "activate"))
        rules.append((il, int(np.argmax(counts)), "deactivate"))
    p = _profile(info, rules)
    graph.set_profile(p)
    hook.set_profile(p)
    try:
        a, b = graph.trace(text=TEXT), hook.trace(text=TEXT)
    finally:
        graph.set_profile(None)
        hook.set_profile(None)
    np.testing.assert_array_equal(np.sort(a.experts, -1), np.sort(b.experts, -1))
    np.testing.assert_allclose(np.sort(a.weights, -1), np.sort(b.weights, -1), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(np.sort(a.experts, -1), np.sort(base.experts, -1))


def test_soft_bias_moves_routing(llms, moe_path):
    llm, _ = llms
    info = model_info(moe_path)
    from steer_gguf import BiasRule

    base = llm.trace(text=TEXT)
    last = info.moe_layers[-1]
    on = least_used(base, info)
    with llm.steering(_profile(info, [], [BiasRule(last, on, 1e3)])):
        tr = llm.trace(text=TEXT)
    # soft steering is a strength, not a guarantee (sigmoid gating saturates), so ask for a
    # large shift rather than every token
    before = (base.experts[:, -1, :] == on).any(axis=1).mean()
    after = (tr.experts[:, -1, :] == on).any(axis=1).mean()
    assert after >= 0.6 and after - before >= 0.4, (before, after)


def test_profile_switch_between_generations(llms, moe_path):
    llm, _ = llms
    info = model_info(moe_path)
    base = llm.trace(text=TEXT)
    last = info.moe_layers[-1]
    on = least_used(base, info)
    # random-weight models may pick end-of-text at once: forbid it so tokens get generated
    special = {t: -1e4 for t in range(llm.n_vocab()) if llm.detokenize([t], special=True).startswith(b"<|")}
    gen = dict(max_tokens=6, temperature=0.0, logit_bias=special)
    def run():
        with llm.recording() as log:
            out = llm.create_completion("Once upon a time", **gen)
        # the last sampled token is never decoded
        return log, out["usage"]["completion_tokens"] - 1

    plain_log, n_plain = run()
    llm.set_profile(_profile(info, [(last, on, "activate")]))
    steered_log, n_steered = run()
    llm.set_profile(None)
    back_log, n_back = run()
    assert n_steered >= 1 and n_plain == n_back >= 1
    assert (steered_log.tail(n_steered)[:, -1, :] == on).any(axis=1).all()
    np.testing.assert_array_equal(back_log.tail(n_back), plain_log.tail(n_plain))


def test_c_api_rejects_invalid_tables(moe_path):
    from steer_gguf.engine.steered import _native

    info = model_info(moe_path)
    llm = SteeredLlama(moe_path, **LLAMA)
    ctx = llm._ctx_ptr
    L, E, k = info.n_layer, info.n_expert, info.n_expert_used
    il = info.moe_layers[-1]
    base = llm.trace(text=TEXT)

    def table():
        return np.zeros((L, E), np.int8)

    S = _native.STATUS  # steer.h's codes, exported by the module
    bad_shape = np.zeros((L + 1, E), np.int8)
    assert _native.set_table(ctx, bad_shape, None, 0.01)[0] == S["ERR_SHAPE"]
    t = table(); t[il, 0] = 7
    rc, msg = _native.set_table(ctx, t, None, 0.01)
    assert rc == S["ERR_ACTION"] and f"layer {il} expert 0" in msg
    t = table(); t[il, : k + 1] = 1
    assert _native.set_table(ctx, t, None, 0.01)[0] == S["ERR_TOO_MANY"]
    t = table(); t[il, : E - k + 1] = 2
    assert _native.set_table(ctx, t, None, 0.01)[0] == S["ERR_TOO_FEW"]
    b = np.zeros((L, E), np.float32); b[il, 1] = np.nan
    assert _native.set_table(ctx, table(), b, 0.01)[0] == S["ERR_NONFINITE"]
    assert _native.set_table(ctx, table(), None, float("inf"))[0] == S["ERR_NONFINITE"]
    assert _native.set_table(ctx, table(), None, -1.0)[0] == S["ERR_NONFINITE"]
    dense = [i for i in range(L) if i not in info.moe_layers]
    if dense:
        t = table(); t[dense[0], 0] = 1
        rc, msg = _native.set_table(ctx, t, None, 0.01)
        assert rc == S["ERR_NOT_MOE"] and "dense" in msg
    # rejected tables leave routing untouched
    np.testing.assert_array_equal(llm.trace(text=TEXT).experts, base.experts)
    llm.close()


def test_table_change_between_two_decodes_is_not_served_a_stale_graph(llms, moe_path):
    """Same-shaped single-token decodes are exactly where llama.cpp reuses its graph."""
    llm, _ = llms
    info = model_info(moe_path)
    toks = llm.tokenize(TEXT.encode(), add_bos=True, special=True)
    # the whole text, as the other tests trace it: on a GPU backend every batch size is its own
    # set of kernels (llvmpipe compiles each on first use, minutes apiece on a cold cache)
    plain = llm.trace(tokens=toks).experts[-4:, -1, :]
    on = next(e for e in range(info.n_expert) if e not in plain[2])  # unsteered, that token does not pick it
    last = info.moe_layers[-1]
    with llm.lock, llm.recording() as log:
        llm.reset()
        llm.eval(toks[:-4])
        llm.eval(toks[-4:-3])                    # builds the one-token graph
        llm.eval(toks[-3:-2])                    # reuses it
        llm._apply(_profile(info, [(last, on, "activate")]))  # no reset: only the table changes
        llm.eval(toks[-2:-1])
        llm._apply(None)
        llm.eval(toks[-1:])
    rows = log.tail(4)[:, -1, :]
    np.testing.assert_array_equal(np.sort(rows[[0, 1, 3]], -1), np.sort(plain[[0, 1, 3]], -1))
    assert (rows[2] == on).any(), "the decode after the table change still routed the old way"
    llm.reset()


def test_gpu_op_chain_matches_the_cpu_op(moe_path, monkeypatch):
    """GPU backends steer with a chain of stock ggml ops, the CPU with one fused op; CI has no
    GPU, so run the chain on the CPU and hold it to the same routing."""
    info = model_info(moe_path)
    llm = SteeredLlama(moe_path, **LLAMA)
    base = llm.trace(text=TEXT)
    rules = []
    for j, il in enumerate(info.moe_layers):
        counts = np.bincount(base.experts[:, j, :].ravel(), minlength=info.n_expert)
        rules += [(il, int(np.argmin(counts)), "activate"), (il, int(np.argmax(counts)), "deactivate")]
    from steer_gguf import BiasRule
    p = _profile(info, rules, [BiasRule(info.moe_layers[0], 1, 0.5)])
    llm.set_profile(p)
    fused = llm.trace(text=TEXT)
    monkeypatch.setenv("STEER_GGUF_PORTABLE_OPS", "1")  # read when the table is set
    llm.set_profile(p)
    chain = llm.trace(text=TEXT)
    llm.close()
    np.testing.assert_array_equal(np.sort(chain.experts, -1), np.sort(fused.experts, -1))
    np.testing.assert_allclose(np.sort(chain.weights, -1), np.sort(fused.weights, -1), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(np.sort(fused.experts, -1), np.sort(base.experts, -1))
