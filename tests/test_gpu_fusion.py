"""On a GPU backend, steered layers keep the backend's fused top-k-MoE kernel.

Runs only with STEER_GGUF_TEST_NGL set (every layer offloaded) on a build with a GPU backend
(CUDA, Vulkan): benchmarks/gpu_check.py and the Vulkan CI step. The patched ggml names every
fused top-k-MoE dispatch when STEER_GGUF_LOG_FUSION=1 (fusion_probe.py), so these tests count
what the backend actually dispatched, steered and unsteered, and hold the fused result to the
backend's unfused kernels.
"""
from __future__ import annotations

import numpy as np
import pytest

from fixtures.backend import TEST_NGL, gpu_offload_supported
from fusion_probe import TEXT, run_probe

needs_gpu = pytest.mark.skipif(TEST_NGL == 0, reason="runs with every layer on a GPU: set STEER_GGUF_TEST_NGL=99 "
                                                     "on a GPU build")

# (fixture kind, make_model arguments, gating); deepseek-v3 with 6 of 8 experts gets no expert
# groups (tests/fixtures/make_models.py), the sigmoid + selection-bias pattern backends fuse
CASES = {
    "softmax (qwen3moe)": ("qwen3moe", dict(n_layer=4)),
    "softmax, no norm (olmoe)": ("olmoe", dict(n_layer=4)),
    "softmax (mixtral)": ("mixtral", dict(n_layer=4)),
    "softmax after top-k (gpt-oss)": ("gpt-oss", dict(n_layer=4)),
    "sigmoid + selection bias (deepseek-v3)": ("deepseek-v3", dict(n_layer=4, n_expert=8, n_expert_used=6)),
    "sigmoid + selection bias, expert groups (deepseek-v3)": ("deepseek-v3", dict(n_layer=4)),
}


@pytest.fixture(scope="module")
def gpu():
    if not gpu_offload_supported():
        pytest.skip("this build has no GPU backend with a device")


@needs_gpu
@pytest.mark.parametrize("case", list(CASES))
def test_steered_layers_stay_fused(gpu, make, case):
    kind, kw = CASES[case]
    path = make(kind, **kw)
    r = run_probe(path, TEST_NGL)
    fused = r["fused"]
    if not fused.get("plain"):
        pytest.skip(f"{case}: the backend fuses no layer of this model even unsteered")
    moe = set(r["moe_layers"])
    # every MoE layer is steered in the second phase: each one fused unsteered stays fused
    assert set(fused["plain"]) <= moe
    assert set(fused.get("steered", [])) >= set(fused["plain"]), fused
    assert not np.allclose(r["scores"]["steered"], r["scores"]["plain"]), "the profile changed nothing"


@needs_gpu
@pytest.mark.parametrize("case", list(CASES))
def test_recorded_layers_stay_fused(gpu, make, case):
    """Routing kept as graph outputs is copied out after the fused kernel (a node outside it),
    so a layer fused unrecorded stays fused while the graph records, with the same logits."""
    kind, kw = CASES[case]
    r = run_probe(make(kind, **kw), TEST_NGL)
    fused = r["fused"]
    if not fused.get("plain"):
        pytest.skip(f"{case}: the backend fuses no layer of this model even unsteered")
    assert set(fused.get("traced", [])) >= set(fused["plain"]), fused
    np.testing.assert_array_equal(r["scores"]["traced"], r["scores"]["plain"])


@needs_gpu
@pytest.mark.parametrize("case", ["softmax (qwen3moe)", "softmax after top-k (gpt-oss)",
                                  "sigmoid + selection bias (deepseek-v3)"])
def test_fused_and_unfused_kernels_agree_on_steered_output(gpu, make, case):
    kind, kw = CASES[case]
    path = make(kind, **kw)
    fused = run_probe(path, TEST_NGL)
    off = run_probe(path, TEST_NGL, env={"GGML_CUDA_DISABLE_FUSION": "1", "GGML_VK_DISABLE_FUSION": "1"})
    if not fused["fused"].get("plain"):
        pytest.skip(f"{case}: the backend fuses no layer of this model")
    # the counter counts the fused kernel only: with fusion off it stays silent
    assert not any(off["fused"].values()), off["fused"]
    # fused and unfused kernels round differently (H100: up to 5e-3 on these logits, steered or
    # not); steering moves the logits by far more than that, and must survive fusion
    for phase in ("plain", "steered"):
        np.testing.assert_allclose(fused["scores"][phase], off["scores"][phase], rtol=0, atol=2e-2,
                                   err_msg=f"{case}, {phase}")
    moved = np.abs(fused["scores"]["steered"] - fused["scores"]["plain"]).max()
    assert moved > 3 * np.abs(fused["scores"]["steered"] - off["scores"]["steered"]).max()


# ---- runs everywhere (CPU included) ---------------------------------------------------------

def test_selection_bias_steering_without_groups_matches_the_hook_engine(make):
    """Sigmoid + selection bias without expert groups: the graph engine steers the bias tensor
    (so backends keep their fused gating -> add -> top-k kernel), the hook engine steers the
    selection scores; both must pick the same experts, and honour every action."""
    from steer_gguf import ExpertRule, ModelRef, Profile, SteeredLlama, model_info

    path = make("deepseek-v3", n_layer=4, n_expert=8, n_expert_used=6)
    info = model_info(path)
    # both traced through the eval callback, so that both run the unfused kernels and the
    # weights compare to rounding of one kind (the graph's own routing outputs would keep a GPU's
    # fused kernel for the graph engine only)
    kw = dict(n_ctx=256, n_threads=1, n_threads_batch=1, n_gpu_layers=TEST_NGL, recorder="callback")
    graph, hook = SteeredLlama(path, **kw), SteeredLlama(path, engine="hook", **kw)
    base = graph.trace(text=TEXT)
    rules, on, off = [], {}, {}
    for j, il in enumerate(info.moe_layers):
        counts = np.bincount(base.experts[:, j, :].ravel(), minlength=info.n_expert)
        on[j], off[j] = int(np.argmin(counts)), int(np.argmax(counts))
        rules += [ExpertRule(il, on[j], "activate"), ExpertRule(il, off[j], "deactivate")]
    p = Profile(ModelRef.of(info), rules, name="t")
    graph.set_profile(p)
    hook.set_profile(p)
    a, b = graph.trace(text=TEXT), hook.trace(text=TEXT)
    graph.close()
    hook.close()
    for j in range(len(info.moe_layers)):
        assert (a.experts[:, j, :] == on[j]).any(axis=1).all(), f"MoE layer {j}: activated expert missing"
        assert not (a.experts[:, j, :] == off[j]).any(), f"MoE layer {j}: deactivated expert selected"
    np.testing.assert_array_equal(np.sort(a.experts, -1), np.sort(b.experts, -1))
    np.testing.assert_allclose(np.sort(a.weights, -1), np.sort(b.weights, -1), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(np.sort(a.experts, -1), np.sort(base.experts, -1))


def test_replacing_tables_between_prefills(make):
    """Set, replace and clear tables between prefills and decodes. A decode's graph may still be
    running on the device when the next table arrives; freeing the old table under it crashed
    llvmpipe in its shader code (the process dies: a failure here is a crash, not an assertion).
    The model test_steering uses: on llvmpipe a new weight type or shape compiles its own kernels
    (this test's first, Q4_K_M model took 7 minutes of a cold Mesa cache)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks"))
    from common import bench_profiles
    from steer_gguf import SteeredLlama, model_info
    import llama_cpp

    path = make("qwen3moe")
    info = model_info(path)
    profile, noop = bench_profiles(info)
    llm = SteeredLlama(path, n_ctx=160, n_batch=128, n_ubatch=128, n_gpu_layers=TEST_NGL)
    prompt = llm.tokenize(TEXT.encode(), add_bos=True, special=True)
    seen = []
    for p in (None, profile, profile, None, noop, profile, None):
        llm.set_profile(noop)  # two replacements between decodes: neither may free what still runs
        llm.set_profile(p)
        with llm.lock:
            llm.reset()
            llm.eval(prompt)
            seen.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                              shape=(llm.n_vocab(),)).copy())
            for t in prompt[:4]:  # and one-token decodes: the graph the table change follows
                llm.eval([t])
    llm.close()
    np.testing.assert_array_equal(seen[0], seen[3])  # cleared: upstream's output again
    np.testing.assert_array_equal(seen[0], seen[6])
    np.testing.assert_array_equal(seen[1], seen[2])  # the same table twice: the same output
    assert not np.array_equal(seen[0], seen[1])
