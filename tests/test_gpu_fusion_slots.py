"""Fused top-k-MoE kernels and per-sequence steering (profile slots, steer.h API 2).

With a slot holding a table, every MoE layer's steering is per token: each token's coefficients
are gathered (get_rows) from its sequence's table. Logits steering comes before the gating, so
the backend's fused gating -> top-k kernel still sees its pattern. The selection-bias route
(sigmoid + bias, DeepSeek-V3 style) replaces the bias vector only for a context-wide table,
because the fused kernel reads one bias for every token; with slots in use the selection scores
are steered after the bias add instead, which leaves that layer to the unfused kernels: correct,
not fused. These tests count the backend's fused dispatches (STEER_GGUF_LOG_FUSION=1, as
tests/test_gpu_fusion.py does) for a context-wide table, a slot bound to the evaluated
sequence, and a slot that exists but is bound to no sequence, and hold the slot's logits to the
context-wide table's. They run with STEER_GGUF_TEST_NGL set on a GPU build (CUDA, Vulkan).

Measured on Vulkan (llvmpipe, Mesa 25.0): qwen3moe, OLMoE, Mixtral and gpt-oss keep every MoE
layer fused with a slot bound or unbound, the slot's logits equal to the context-wide table's;
DeepSeek-V3 without groups fuses every MoE layer unsteered and with a context-wide table, none
while any slot holds a table (bound to the evaluated sequence or not). A backend that starts
fusing the latter fails the test on purpose: update CASES and docs/architectures.md then. The batch
engine therefore runs a batch whose conversations share one profile as the context-wide table
on such models: fused; a batch mixing profiles (or with an unsteered one) is not.

Run as a script it is the probe's child process: `python test_gpu_fusion_slots.py MODEL NGL OUT.npz`.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from fixtures.backend import TEST_NGL, gpu_offload_supported
from fusion_probe import MARK, TEXT, parse

needs_gpu = pytest.mark.skipif(TEST_NGL == 0, reason="runs with every layer on a GPU: set STEER_GGUF_TEST_NGL=99 "
                                                     "on a GPU build")

# case -> (fixture kind, make_model arguments, whether a bound slot keeps the fused kernel)
CASES = {
    "softmax (qwen3moe)": ("qwen3moe", dict(n_layer=4), True),
    "softmax after top-k (gpt-oss)": ("gpt-oss", dict(n_layer=4), True),
    # 6 of 8 experts: no expert groups, the sigmoid + selection-bias pattern backends fuse
    "sigmoid + selection bias (deepseek-v3)": ("deepseek-v3", dict(n_layer=4, n_expert=8, n_expert_used=6), False),
}
PHASES = ("plain", "uniform", "slot", "slot-unbound")


def _child(model: str, ngl: int, out: str) -> None:
    from steer_gguf import ExpertRule, ModelRef, Profile, SteeredLlama, model_info
    from steer_gguf.engine import runtime

    _, native = runtime.load()
    ok = native.STATUS["OK"]
    info = model_info(model)
    llm = SteeredLlama(model, n_ctx=256, n_threads=1, n_threads_batch=1, n_gpu_layers=ngl, logits_all=True)
    toks = llm.tokenize(TEXT.encode(), add_bos=True, special=True)
    rules = [r for il in info.moe_layers
             for r in (ExpertRule(il, 1, "activate"), ExpertRule(il, 0, "deactivate"))]
    profile = Profile(ModelRef.of(info), rules, name="probe")
    actions, bias = profile.to_arrays(info, native.ACTIONS)
    ptr = llm._ctx_ptr

    def check(r):
        assert r[0] == ok, r

    def uniform():
        llm.set_profile(profile)

    def slot():  # the same table in slot 3, bound to sequence 0 (the one evaluated)
        llm.set_profile(None)
        check(native.slot_set(ptr, 3, actions, bias, float(profile.eps)))
        check(native.seq_bind(ptr, 0, 3))

    def slot_unbound():  # slot 3 still holds it: per-sequence graph, sequence 0 on the identity
        check(native.seq_bind(ptr, 0, -1))

    scores = {}
    for phase, setup in zip(PHASES, (lambda: None, uniform, slot, slot_unbound)):
        setup()
        print(MARK + phase, file=sys.stderr, flush=True)
        with llm.lock:
            llm.reset()
            llm.eval(toks)           # prefill: a many-token graph
            llm.eval(toks[:1])       # one decode: the one-token graph
        scores[phase] = np.array(llm.scores[: len(toks) + 1])
        print(MARK + "end", file=sys.stderr, flush=True)
    check(native.slot_clear(ptr, 3))
    # the batch engine (server --parallel, eval): two conversations sharing the profile, then
    # the profile beside an unsteered one
    from steer_gguf.engine.batch import BatchEngine, Request, SamplerSpec

    for phase, profiles in (("batch-shared", (profile, profile)), ("batch-mixed", (profile, None))):
        eng = BatchEngine(llm, 2, 128)
        pending = [(i, Request(toks, profile=p, max_tokens=4, sampling=SamplerSpec(temperature=0)))
                   for i, p in enumerate(profiles)]
        print(MARK + phase, file=sys.stderr, flush=True)
        try:
            eng.run(lambda idle: pending.pop(0) if pending else None, lambda i, r: None)
        finally:
            eng.close()
        print(MARK + "end", file=sys.stderr, flush=True)
    llm.close()
    np.savez(out, **scores)
    print(json.dumps({"moe_layers": list(info.moe_layers), "gating": info.gating}))


def run_slots_probe(model, n_gpu_layers: int = 99, env: dict | None = None, timeout: float = 300) -> dict:
    full_env = dict(os.environ, STEER_GGUF_LOG_FUSION="1", **(env or {}))
    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "scores.npz"
        p = subprocess.run([sys.executable, __file__, str(model), str(n_gpu_layers), str(out)],
                           capture_output=True, text=True, env=full_env, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"slots fusion probe failed ({p.returncode}):\n{p.stderr[-4000:]}")
        result = json.loads(p.stdout.strip().splitlines()[-1])
        with np.load(out) as z:
            result["scores"] = {k: z[k] for k in z.files}
    result["fused"] = parse(p.stderr)
    return result


@pytest.fixture(scope="module")
def gpu():
    if not gpu_offload_supported():
        pytest.skip("this build has no GPU backend with a device")


@needs_gpu
@pytest.mark.parametrize("case", list(CASES))
def test_fusion_with_profile_slots(gpu, make, case):
    kind, kw, slot_keeps_fusion = CASES[case]
    r = run_slots_probe(make(kind, **kw), TEST_NGL)
    fused = {ph: set(r["fused"].get(ph, [])) for ph in PHASES}
    moe = set(r["moe_layers"])
    if not fused["plain"]:
        pytest.skip(f"{case}: the backend fuses no layer of this model even unsteered")
    assert fused["plain"] <= moe
    assert fused["uniform"] >= fused["plain"], f"a context-wide table broke fusion: {fused}"
    if slot_keeps_fusion:
        assert fused["slot"] >= fused["plain"], f"a bound slot broke fusion: {fused}"
        assert fused["slot-unbound"] >= fused["plain"], f"an unbound slot broke fusion: {fused}"
    else:
        # by design: with slots in use the selection scores are steered after the bias add,
        # between the gating and the top-k, so no steered layer matches the fused pattern
        assert not fused["slot"] & moe, f"expected the steered layers unfused with a slot: {fused}"
        assert not fused["slot-unbound"] & moe, f"expected the steered layers unfused with a slot: {fused}"
    # a batch on one profile runs it context-wide (slots.py): fused wherever the model fuses
    batch = {ph: set(r["fused"].get(ph, [])) for ph in ("batch-shared", "batch-mixed")}
    assert batch["batch-shared"] >= fused["plain"], f"a batch sharing one profile broke fusion: {batch}"
    if slot_keeps_fusion:
        assert batch["batch-mixed"] >= fused["plain"], f"a mixed batch broke fusion: {batch}"
    else:
        assert not batch["batch-mixed"] & moe, f"expected a mixed batch unfused: {batch}"
    sc = r["scores"]
    assert not np.allclose(sc["uniform"], sc["plain"]), "the profile changed nothing"
    # a slot steers its sequence as the context-wide table steers the context: the same experts,
    # so the same logits up to the rounding of fused vs unfused kernels
    np.testing.assert_allclose(sc["slot"], sc["uniform"], rtol=0, atol=2e-2)
    np.testing.assert_allclose(sc["slot-unbound"], sc["plain"], rtol=0, atol=2e-2)


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
