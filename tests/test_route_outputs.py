"""Routing recorded by the graph (steer.h API version 3) against the eval-callback recorder,
its oracle: the same experts and weights, row for row, on every MoE architecture family and
engine configuration (graph or hook engine, the CPU op or the portable op chain, slots),
through every consumer (trace, trace_many, recording, the batch engine's traces)."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures.backend import TEST_NGL
from steer_gguf import ExpertRule, ModelRef, Profile, SteeredLlama
from steer_gguf.engine.batch import BatchEngine, Request, SamplerSpec
from steer_gguf.engine.contexts import _native, llama_cpp
from steer_gguf.errors import SteerError

# n_batch > n_ubatch: one decode of the trace runs as several micro-batches
LLAMA = dict(n_ctx=256, n_batch=32, n_ubatch=16, n_threads=1, n_threads_batch=1, n_gpu_layers=TEST_NGL)
# every layer on a GPU (STEER_GGUF_TEST_NGL): the graph recorder leaves the backend's fused
# top-k-MoE kernel in place, while the callback recorder's split at each layer runs the unfused
# kernels, which round differently (as tests/test_gpu_fusion.py allows); experts stay equal
GPU = TEST_NGL > 0
TEXT = "The quick brown fox jumps over the lazy dog 0123456789 again and again."


def _forcing(info, base) -> Profile:
    """Forces on, in every MoE layer, the expert the unsteered trace picks least (a real change)."""
    rules = []
    for j, il in enumerate(info.moe_layers):
        rules.append(ExpertRule(il, int(np.argmin(np.bincount(base.experts[:, j, :].ravel(),
                                                              minlength=info.n_expert))), "activate"))
    return Profile(ModelRef.of(info), rules, [], name="forced")


@pytest.fixture(scope="module")
def pair(moe_path):
    """(graph-recorded, callback-recorded) models of each engine, and a forcing profile."""
    out = {}
    for engine in ("graph", "hook"):
        out[engine] = (SteeredLlama(moe_path, engine=engine, **LLAMA),
                       SteeredLlama(moe_path, engine=engine, recorder="callback", **LLAMA))
    g, _ = out["graph"]
    out["profile"] = _forcing(g.info, g.trace(text=TEXT))
    yield out
    for engine in ("graph", "hook"):
        for m in out[engine]:
            m.close()


def _same_trace(a, b):
    np.testing.assert_array_equal(a.experts, b.experts)
    if GPU:
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-3, atol=2e-4)  # llvmpipe: 7e-5 seen
    else:
        np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("engine", ["graph", "hook"])
@pytest.mark.parametrize("portable", [False, True])
def test_trace_equals_the_callback_recorder(pair, engine, portable, monkeypatch):
    if portable:
        # the copy nodes that GPU backends need (and the GPU steering op chain), on the CPU
        monkeypatch.setenv("STEER_GGUF_PORTABLE_OPS", "1")
    new, old = pair[engine]
    base_new = None
    for prof in (None, pair["profile"]):
        new.set_profile(prof)
        old.set_profile(prof)
        a, b = new.trace(text=TEXT), old.trace(text=TEXT)
        _same_trace(a, b)
        assert a.experts.shape[0] > LLAMA["n_batch"]  # several decodes of several micro-batches
        if prof is None:
            base_new = a
    new.set_profile(None)
    old.set_profile(None)
    # the profile changed the recorded routing: the comparison saw real differences
    assert not np.array_equal(a.experts, base_new.experts)


def test_trace_many_equals_the_callback_recorder(pair):
    new, old = pair["graph"]
    toks = new.tokenize(TEXT.encode(), add_bos=True, special=True)
    seqs = [toks, toks[:20], toks[5:40], toks[:9]]
    rows = [list(range(len(toks))), [3, 7, 19], list(range(10, 35)), [8]]  # the last row: an output only
    for prof in (None, pair["profile"]):
        new.set_profile(prof)
        old.set_profile(prof)
        got = new.trace_many(seqs, rows, batch_tokens=64)
        want = old.trace_many(seqs, rows, batch_tokens=64)
        for g, w, r in zip(got, want, rows):
            assert g.shape == (len(r), len(new.info.moe_layers), new.info.n_expert_used)
            np.testing.assert_array_equal(g, w)
    new.set_profile(None)
    old.set_profile(None)
    # and they are the rows a one-sequence trace records
    full = new.trace(tokens=seqs[2]).experts
    np.testing.assert_array_equal(new.trace_many([seqs[2]], [rows[2]])[0], full[rows[2]])


def test_recording_during_generation_equals_the_callback_recorder(pair):
    new, old = pair["graph"]
    logs = []
    for m in (new, old):
        m.reset()
        with m.lock, m.recording() as log:
            m.create_completion(TEXT, max_tokens=6, temperature=0)
        logs.append(log)
    a, b = logs
    for il in new.info.moe_layers:
        np.testing.assert_array_equal(a.per_layer[il], b.per_layer[il])
    # every decode of the prompt and of the 5 tokens after the first is in it
    assert a.per_layer[new.info.moe_layers[0]].shape[0] == len(new.tokenize(TEXT.encode())) + 5
    np.testing.assert_array_equal(a.tail(5), b.tail(5))


@pytest.mark.parametrize("portable", [False, True])
def test_batch_engine_traces_equal_the_callback_recorder(pair, portable, monkeypatch):
    """Several conversations per decode, each under its own slot (or none)."""
    if portable:
        monkeypatch.setenv("STEER_GGUF_PORTABLE_OPS", "1")
    prof = pair["profile"]
    results = []
    for m in pair["graph"]:
        prompts = [m.tokenize(t.encode(), add_bos=True, special=True)
                   for t in (TEXT, "How many apples?", "Zebra 42 quartz", TEXT[10:])]
        reqs = [Request(p, profile=prof if i % 2 else None, max_tokens=6, sampling=SamplerSpec(temperature=0),
                        trace=i != 2) for i, p in enumerate(prompts)]
        out: list = [None] * len(reqs)
        pending = list(enumerate(reqs))
        eng = BatchEngine(m, 3, 128)  # fewer sequences than requests: one joins mid-run
        try:
            eng.run(lambda idle: pending.pop(0) if pending else None, lambda i, r: out.__setitem__(i, r))
        finally:
            eng.close()
        results.append(out)
    for a, b in zip(*results):
        assert not isinstance(a, Exception), a
        assert a.tokens == b.tokens
        if b.experts is None:
            assert a.experts is None
            continue
        assert a.experts.shape == (len(a.tokens), len(pair["graph"][0].info.moe_layers),
                                   pair["graph"][0].info.n_expert_used)
        np.testing.assert_array_equal(a.experts, b.experts)


def _decode_all(m, toks):
    m.reset()
    m._ctx.kv_cache_seq_rm(-1, 0, -1)
    m._batch.set_batch(batch=toks, n_past=0, logits_all=True)
    m._ctx.decode(m._batch)
    n_vocab = m.n_vocab()
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(m._ctx.ctx), (len(toks), n_vocab)).copy()


def test_recording_leaves_the_numbers_as_they_were(pair):
    """Graph outputs change what the allocator may reuse, never a value: the logits with
    recording on are bit-identical to those without (and to those after it went off)."""
    m, _ = pair["graph"]
    toks = m.tokenize(TEXT.encode(), add_bos=True, special=True)[:24]
    with m.lock:
        plain = _decode_all(m, toks)
        m._recorder.on()
        try:
            rec_on = _decode_all(m, toks)
            assert m._recorder.take()  # it did record
        finally:
            m._recorder.off()
        after = _decode_all(m, toks)
    np.testing.assert_array_equal(plain, rec_on)
    np.testing.assert_array_equal(plain, after)


def test_recording_keeps_graph_reuse_and_needs_no_eval_callback(pair):
    m, _ = pair["graph"]
    toks = m.tokenize(TEXT.encode(), add_bos=True, special=True)
    with m.lock:
        m.reset()
        m._ctx.kv_cache_seq_rm(-1, 0, -1)
        m._recorder.on()
        try:
            assert not m._recorder._attached  # no eval callback on this path
            m.eval(toks[:8])
            before = llama_cpp.llama_perf_context(m._ctx.ctx).n_reused
            for t in toks[8:14]:  # one token per decode: the same graph each time
                m.eval([t])
            reused = llama_cpp.llama_perf_context(m._ctx.ctx).n_reused - before
            rec = m._recorder.take()
        finally:
            m._recorder.off()
            m.reset()
    assert reused >= 5
    for il in m.info.moe_layers:
        e, w, idx = rec[il]
        # rows accumulate over decodes; each row names its token in its own decode's batch
        # (most architectures compute only the output row of the 8-token prompt in the last layer)
        assert e.shape[0] == 8 + 6 or (il == m.info.moe_layers[-1] and e.shape[0] == 1 + 6)
        assert idx.tolist()[-6:] == [0] * 6
        assert w is not None and w.shape == e.shape


def test_route_api_rejects_bad_input(pair):
    m, _ = pair["graph"]
    ptr = m._ctx_ptr
    for flags in (-1, 2, 4, 6, 8):  # weights or norms without experts, unknown bits
        rc, msg = _native.route_record(ptr, flags)
        assert rc == _native.STATUS["ERR_ROUTE"] and msg
    assert _native.route_take(ptr, m.info.n_layer, False) == {}  # nothing recorded: nothing to read
    with pytest.raises(SteerError):
        SteeredLlama(m.model_path, recorder="eval", **LLAMA)


@pytest.mark.parametrize("slots", [False, True])
@pytest.mark.parametrize("portable", [False, True])
def test_routed_rows_route_as_outputs_without_logits(pair, slots, portable, monkeypatch):
    """llama_steer_route_tokens: tokens routed in every layer (the last included) without
    being outputs route exactly as when they are outputs, with or without per-sequence tables,
    and the outputs' logits stay what they were."""
    if portable:
        monkeypatch.setenv("STEER_GGUF_PORTABLE_OPS", "1")
    from steer_gguf.engine.contexts import secondary_context
    from steer_gguf.engine.tracing import Recorder, by_token

    m, _ = pair["graph"]
    info = m.info
    ctx, ptr = secondary_context(m, 128, 2, "test")
    batch = llama_cpp.llama_batch_init(128, 0, 1)
    rec = Recorder(ptr, _native.Observer(info.n_layer), info.n_layer, "graph", weights=True)
    try:
        if slots:  # sequence 0 takes the profile from a slot, sequence 1 none
            actions, bias = pair["profile"].to_arrays(info, _native.ACTIONS)
            assert _native.slot_set(ptr, 0, actions, bias, float(pair["profile"].eps))[0] == 0
            assert _native.seq_bind(ptr, 0, 0)[0] == 0
        toks = m.tokenize(TEXT.encode(), add_bos=True, special=True)
        seqs = [toks[:20], toks[3:30]]
        n = sum(map(len, seqs))
        last = [len(seqs[0]) - 1, n - 1]
        rec.on()

        def run(outputs, routed):
            i = 0
            for sid, s in enumerate(seqs):
                for pos, t in enumerate(s):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos, 1, i in outputs
                    batch.seq_id[i][0] = sid
                    i += 1
            batch.n_tokens = n
            mask = np.zeros(n, dtype=bool)
            mask[list(routed)] = True
            rec.route_rows(mask)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx.ctx), True)
            assert llama_cpp.llama_decode(ctx.ctx, batch) == 0
            logits = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, j), (m.n_vocab(),)).copy()
                      for j in sorted(outputs)]
            return by_token(rec.take(), info.moe_layers, n, sorted(outputs)), logits

        every, every_logits = run(set(range(n)), ())
        routed, routed_logits = run(set(last), range(n))
        for a, b in zip(every, routed):
            np.testing.assert_array_equal(a, b)
        assert (routed[-1] >= 0).all()  # the last layer computed every token
        # the last layer ran at another batch size: other kernels, other rounding (more on a GPU)
        for j, lg in zip(last, routed_logits):
            np.testing.assert_allclose(lg, every_logits[j], rtol=1e-4, atol=2e-2 if GPU else 1e-4)
        # routed rows alone, no output at all: the last layer computes just those
        some = [2, 5, 19, 21, 40]
        only, _ = run(set(), some)
        assert (only[-1][some] == every[-1][some]).all()
        rest = np.delete(only[-1], some, axis=0)
        # not computed; or, where the architecture computes its last layer for every token
        # anyway (gpt-oss), computed as ever
        assert (rest == -1).all() or np.array_equal(rest, np.delete(every[-1], some, axis=0))
        for a, b in zip(every[:-1], only[:-1]):
            np.testing.assert_array_equal(a, b)
        rc, _ = _native.route_tokens(ptr, np.zeros((2, 2), dtype=np.int8))
        assert rc == _native.STATUS["ERR_ROUTE"]
    finally:
        rec.off()
        llama_cpp.llama_batch_free(batch)
        ctx.close()


def test_recording_adds_no_node_on_the_cpu_and_leaves_the_eval_callback_free(pair, monkeypatch):
    """A caller's own eval callback (here: one that counts the graph's nodes) runs while the
    graph records; on the CPU recording adds no node (the top-k and weights are outputs where
    they are), the portable path (and a GPU) adds its two copies per MoE layer, and with
    recording off the graph is the one it was before."""
    import ctypes

    m, _ = pair["graph"]
    lib = llama_cpp.llama_cpp._lib
    cb_type = llama_cpp.llama_cpp.ggml_backend_sched_eval_callback
    lib.llama_steer_set_eval_callback.argtypes = [ctypes.c_void_p, cb_type, ctypes.c_void_p]
    lib.llama_steer_set_eval_callback.restype = None
    asked = [0]

    def count(t, ask, ud):
        asked[0] += bool(ask)
        return not ask  # asked: not needed (no split); told: go on

    cb = cb_type(count)
    toks = m.tokenize(TEXT.encode(), add_bos=True, special=True)[:16]

    def nodes() -> int:
        asked[0] = 0
        _decode_all(m, toks)
        return asked[0]

    def recorded_nodes():
        m._recorder.on()
        try:
            return nodes(), m._recorder.take()
        finally:
            m._recorder.off()

    with m.lock:
        lib.llama_steer_set_eval_callback(m._ctx_ptr, cb, None)
        try:
            plain = nodes()
            recorded, rec = recorded_nodes()
            after = nodes()
            monkeypatch.setenv("STEER_GGUF_PORTABLE_OPS", "1")  # read when recording starts
            copied, rec_copied = recorded_nodes()
        finally:
            lib.llama_steer_set_eval_callback(m._ctx_ptr, cb_type(), None)
    copies = 2 * len(m.info.moe_layers)  # top-k and weights, copied out per layer
    # offloaded MoE layers copy theirs (llama.cpp offloads the last TEST_NGL layers, the output
    # layer counting as one): all of them with 99, some with a split (benchmarks/rpc_check.py)
    first_offloaded = max(m.info.n_layer + 1 - TEST_NGL, 0) if GPU else m.info.n_layer
    offloaded = 2 * sum(il >= first_offloaded for il in m.info.moe_layers)
    assert plain > 0 and recorded == plain + offloaded and after == plain
    assert copied == plain + copies
    assert sorted(rec) == sorted(rec_copied) == list(m.info.moe_layers)
    for il in m.info.moe_layers:
        np.testing.assert_array_equal(rec[il][0], rec_copied[il][0])
        np.testing.assert_array_equal(rec[il][1], rec_copied[il][1])
