"""Per-sequence steering (steer.h API version 2): profile slots bound to sequences, on every
MoE architecture family. Sequences of one batch route by their own tables; unbound ones
exactly as upstream; rebinding reuses the graph."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures.backend import TEST_NGL
from steer_gguf import ExpertRule, ModelRef, Profile, SteeredLlama, model_info
from steer_gguf.engine.contexts import _native, llama_cpp, secondary_context

LLAMA = dict(n_ctx=256, n_threads=1, n_threads_batch=1, n_gpu_layers=TEST_NGL)
TEXT = "The quick brown fox jumps over the lazy dog 0123456789 again and again."
OK = _native.STATUS["OK"]


def _profile(info, rules, name="t"):
    return Profile(ModelRef.of(info), [ExpertRule(l, e, a) for l, e, a in rules], [], name=name)


def _set_slot(ptr, info, slot, p):
    actions, bias = p.to_arrays(info, _native.ACTIONS)
    rc, msg = _native.slot_set(ptr, slot, actions, bias, float(p.eps))
    assert rc == OK, msg


@pytest.fixture(scope="module")
def setup(moe_path):
    info = model_info(moe_path)
    llm = SteeredLlama(moe_path, **LLAMA)
    # 18 tokens: batches of two or three copies stay within the kernel sizes test_steering
    # already used, which matters on llvmpipe (each new GPU kernel size compiles for minutes cold)
    toks = llm.tokenize(TEXT.encode(), add_bos=True, special=True)[:18]
    base = llm.trace(tokens=toks)
    first, last = info.moe_layers[0], info.moe_layers[-1]
    on = int(np.argmin(np.bincount(base.experts[:, -1, :].ravel(), minlength=info.n_expert)))
    off = int(np.argmax(np.bincount(base.experts[:, 0, :].ravel(), minlength=info.n_expert)))
    act = _profile(info, [(last, on, "activate")], "act")
    deact = _profile(info, [(first, off, "deactivate")], "deact")
    yield dict(llm=llm, info=info, toks=toks, base=base, on=on, off=off, act=act, deact=deact)
    llm.close()


def test_each_sequence_routes_by_its_own_slot(setup):
    """Three copies of one text in one batch: bound to an activating slot, to a deactivating
    slot, and unbound. Each routes as if it ran alone under its profile; the unbound one's
    routing and logits are upstream's, bit for bit."""
    s = setup
    llm, info, toks = s["llm"], s["info"], s["toks"]
    tc = llm._trace_context(256)
    seqs, rows = [toks] * 3, [list(range(len(toks)))] * 3
    plain_logits = tc.run(seqs, rows, logits=True)
    try:
        _set_slot(tc.ptr, info, 0, s["act"])
        _set_slot(tc.ptr, info, 5, s["deact"])
        assert _native.seq_bind(tc.ptr, 0, 0)[0] == OK
        assert _native.seq_bind(tc.ptr, 1, 5)[0] == OK
        ex = tc.run(seqs, rows)
        lg = tc.run(seqs, rows, logits=True)
    finally:
        for slot in (0, 5):
            _native.slot_clear(tc.ptr, slot)
        for seq in (0, 1):
            _native.seq_bind(tc.ptr, seq, -1)
    assert (ex[0][:, -1, :] == s["on"]).any(axis=1).all(), "activated expert missing in its sequence"
    assert not (ex[1][:, 0, :] == s["off"]).any(), "deactivated expert still chosen in its sequence"
    np.testing.assert_array_equal(np.sort(ex[2], -1), np.sort(s["base"].experts, -1))
    np.testing.assert_array_equal(lg[2], plain_logits[2])  # untouched, bit for bit
    assert not np.array_equal(lg[0], plain_logits[0])
    # a slot steers its sequence exactly as the context-wide table steers a context
    for j, p in ((0, s["act"]), (1, s["deact"])):
        with llm.steering(p):
            alone = llm.trace(tokens=toks)
        np.testing.assert_array_equal(np.sort(ex[j], -1), np.sort(alone.experts, -1))


def test_rebinding_takes_effect_on_the_next_decode_without_a_new_graph(setup):
    """One-token decodes of the same shape are where llama.cpp reuses its graph: a binding
    change between them must steer the next token, and the graph must still be reused."""
    s = setup
    llm, info, toks = s["llm"], s["info"], s["toks"]
    ctx, ptr = secondary_context(llm, 256, 2, "test")
    mem = llama_cpp.llama_get_memory(ctx.ctx)
    batch = llama_cpp.llama_batch_init(64, 0, 1)
    n_vocab = llm.n_vocab()

    def decode(tokens, pos0):
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos0 + i, 1, i == len(tokens) - 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(ctx.ctx, batch) == 0
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, len(tokens) - 1), (n_vocab,)).copy()

    def reused():
        return llama_cpp.llama_perf_context(ctx.ctx).n_reused

    n = len(toks)
    try:
        _set_slot(ptr, info, 3, s["act"])
        decode(toks[:n - 2], 0)
        decode(toks[n - 2:n - 1], n - 2)  # builds the one-token graph
        llama_cpp.llama_memory_seq_rm(mem, 0, n - 1, -1)
        unbound, r0 = decode(toks[n - 1:], n - 1), reused()
        results = []
        for slot in (3, -1, 3):
            llama_cpp.llama_memory_seq_rm(mem, 0, n - 1, -1)
            assert _native.seq_bind(ptr, 0, slot)[0] == OK
            results.append(decode(toks[n - 1:], n - 1))
        assert reused() == r0 + 3, "a binding change rebuilt the graph"
        assert not np.array_equal(results[0], unbound), "the binding did not steer the next decode"
        np.testing.assert_array_equal(results[1], unbound)
        np.testing.assert_array_equal(results[2], results[0])
    finally:
        llama_cpp.llama_batch_free(batch)
        ctx.close()


def test_gpu_op_chain_selects_tables_per_token_like_the_cpu_op(setup, monkeypatch):
    """GPU backends gather each token's coefficients with get_rows; run that chain on the
    CPU (STEER_GGUF_PORTABLE_OPS) and hold it to the CPU op's routing."""
    s = setup
    llm, info, toks = s["llm"], s["info"], s["toks"]
    seqs, rows = [toks] * 3, [list(range(len(toks)))] * 3
    results = []
    for portable in ("0", "1"):
        monkeypatch.setenv("STEER_GGUF_PORTABLE_OPS", portable)  # read when a table is set
        ctx_tc = llm._trace_context(256)
        try:
            _set_slot(ctx_tc.ptr, info, 0, s["act"])
            _set_slot(ctx_tc.ptr, info, 1, s["deact"])
            _native.seq_bind(ctx_tc.ptr, 0, 1)
            _native.seq_bind(ctx_tc.ptr, 2, 0)
            results.append(ctx_tc.run(seqs, rows))
        finally:
            for slot in (0, 1):
                _native.slot_clear(ctx_tc.ptr, slot)
            for seq in (0, 2):
                _native.seq_bind(ctx_tc.ptr, seq, -1)
    for a, b in zip(*results):
        np.testing.assert_array_equal(np.sort(a, -1), np.sort(b, -1))
    assert (results[1][2][:, -1, :] == s["on"]).any(axis=1).all()
    np.testing.assert_array_equal(np.sort(results[1][1], -1), np.sort(s["base"].experts, -1))


def test_slot_api_rejects_bad_input_and_keeps_routing(setup):
    s = setup
    llm, info, toks = s["llm"], s["info"], s["toks"]
    tc = llm._trace_context(256)
    S = _native.STATUS
    L, E, k = info.n_layer, info.n_expert, info.n_expert_used
    t = np.zeros((L, E), np.int8)
    for slot in (-1, _native.MAX_SLOTS):
        rc, msg = _native.slot_set(tc.ptr, slot, t, None, 0.01)
        assert rc == S["ERR_SLOT"] and str(slot) in msg
        assert _native.slot_clear(tc.ptr, slot)[0] == S["ERR_SLOT"]
    assert _native.seq_bind(tc.ptr, 0, _native.MAX_SLOTS)[0] == S["ERR_SLOT"]
    rc, msg = _native.seq_bind(tc.ptr, 10_000, 0)
    assert rc == S["ERR_SEQ"] and "10000" in msg
    assert _native.seq_bind(tc.ptr, -2, 0)[0] == S["ERR_SEQ"]
    bad = t.copy()
    bad[info.moe_layers[-1], : k + 1] = _native.ACTIONS["activate"]
    rc, msg = _native.slot_set(tc.ptr, 2, bad, None, 0.01)
    assert rc == S["ERR_TOO_MANY"] and f"layer {info.moe_layers[-1]}" in msg
    # a rejected slot table leaves the slot empty and routing as it was
    assert _native.seq_bind(tc.ptr, 0, 2)[0] == OK
    try:
        got = tc.run([toks], [list(range(len(toks)))])[0]
    finally:
        _native.seq_bind(tc.ptr, 0, -1)
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(s["base"].experts, -1))


def test_the_context_wide_table_steers_unbound_sequences_next_to_slots(setup):
    s = setup
    llm, info, toks = s["llm"], s["info"], s["toks"]
    tc = llm._trace_context(256)
    seqs, rows = [toks] * 2, [list(range(len(toks)))] * 2
    a, _ = s["act"].to_arrays(info, _native.ACTIONS)
    try:
        assert _native.set_table(tc.ptr, a, None, 0.01)[0] == OK
        _set_slot(tc.ptr, info, 0, s["deact"])
        assert _native.seq_bind(tc.ptr, 1, 0)[0] == OK
        ex = tc.run(seqs, rows)
    finally:
        _native.clear_table(tc.ptr)
        _native.slot_clear(tc.ptr, 0)
        _native.seq_bind(tc.ptr, 1, -1)
        tc.profile_applied = False  # make the next sync_profile reinstall the llm's profile
    assert (ex[0][:, -1, :] == s["on"]).any(axis=1).all()
    assert not (ex[1][:, 0, :] == s["off"]).any()
