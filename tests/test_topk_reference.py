"""Issue 32's held-out reference: the suite's tiny MoE models, loaded into transformers' own model
classes with num_experts_per_tok = K, route like steer-gguf with topk = K (scripts/topk_reference.py
holds the weight mapping, the routing hooks and the comparison)."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("torch", reason="the reference needs torch (pip install .[reference])")
pytest.importorskip("transformers", reason="the reference needs transformers (pip install .[reference])")

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "topk_reference.py"


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("topk_reference", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", params=("qwen3moe", "olmoe", "mixtral", "gpt-oss", "deepseek-v3"))
def kind_path(request, make, ref):
    return request.param, make(request.param, n_layer=4, n_expert_used=ref.K_MODEL)


@pytest.mark.parametrize("k", [2, 4, 6])
def test_routes_like_transformers(ref, kind_path, k):
    """Same experts on every decisive slot, weights within f32 rounding of the f64 reference
    (K = 2 is k/2, 4 the model's own k, 6 above it)."""
    kind, path = kind_path
    row = ref.run(kind, path, k)
    assert row.level == "whole model"
    # near-ties are rare on these models: a reference that is nearly all ties would prove nothing
    assert row.decisive >= 0.9 * row.slots, row
    assert row.same_set == row.decisive, row
    assert row.weights_ok, row
    assert row.ok


def _olmoe_normalised(model):
    for m in model.modules():
        if hasattr(m, "norm_topk_prob"):
            m.norm_topk_prob = True


def _deepseek_unbiased(model):
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.zero_()


@pytest.mark.parametrize("kind,tweak,breaks", [
    ("olmoe", _olmoe_normalised, "weights"),        # olmoe does not renormalise its top-k
    ("deepseek-v3", _deepseek_unbiased, "experts"),  # exp_probs_b moves the selection
])
def test_a_wrong_reference_is_caught(ref, make, kind, tweak, breaks):
    """The comparison has teeth: a reference whose gating differs from the model's fails it."""
    row = ref.run(kind, make(kind, n_layer=4, n_expert_used=ref.K_MODEL), 2, tweak=tweak)
    assert not row.ok
    if breaks == "weights":
        # (the changed weights change later layers' inputs, so their experts may differ too)
        assert not row.weights_ok
    else:
        assert row.same_set < row.decisive
