#!/usr/bin/env python3
"""Held-out reference for issue 32: transformers' own MoE classes route like steer-gguf's topk.

For each gating family the test suite builds (tests/fixtures/make_models.py: qwen3moe and mixtral,
softmax top-k normalised; olmoe, softmax top-k not normalised; gpt-oss, softmax after top-k;
deepseek-v3, sigmoid with a selection bias and expert groups), the tiny GGUF's weights are loaded
into the transformers model class of that family, configured with num_experts_per_tok = K, and
the same token ids are run through both:

- steer-gguf: SteeredLlama(path, topk=K).trace(tokens) -> experts and weights per token and layer;
- transformers: the whole model in float64, a forward hook on every MoE router recording the
  experts it selects, the weights it hands the experts, and its selection scores.

A slot (token, MoE layer) is *decisive* when the reference's K-th and (K+1)-th selection scores
(and, with expert groups, the last kept and first dropped group scores) differ by more than
MARGIN: then float noise cannot flip the selection, and the two must select the same set. On
those slots the weights must agree within RTOL/ATOL (f32 whole-model propagation against f64).

    python scripts/topk_reference.py            # all families, K in {2, 4 (the model's k), 6}
    python scripts/topk_reference.py --kind olmoe --k 2

writes benchmarks/results/topk-reference.json (with the transformers and torch versions).
Needs transformers and torch (`pip install .[reference]`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "topk-reference.json"
KINDS = ("qwen3moe", "olmoe", "mixtral", "gpt-oss", "deepseek-v3")
FAMILY = {
    "qwen3moe": "softmax top-k, normalised",
    "olmoe": "softmax top-k, not normalised",
    "mixtral": "softmax top-k, normalised",
    "gpt-oss": "softmax after top-k",
    "deepseek-v3": "sigmoid, selection bias, groups",
}
K_MODEL = 4          # the fixtures' trained k here (as tests/test_topk.py builds them)
KS = (2, K_MODEL, 6)  # k/2, k, above k (deepseek-v3: 3 of 4 groups of 2 -> at most 6)
TEXT = "The quick brown fox jumps over the lazy dog 0123456789 again and again."
# selection scores closer than this (absolute, on the scale the router ranks: logits for the
# softmax families, sigmoid + bias for deepseek) could swap under f32 noise: not decisive
MARGIN = 1e-4
RTOL, ATOL = 1e-4, 1e-6
# llama.cpp's KV cache is f16 by default, which alone moves the weights by ~4e-4 relative;
# an f32 cache leaves f32 rounding (~1e-6) as the only difference from the f64 reference
GGML_F32 = 0


# ---- GGUF -> transformers --------------------------------------------------------------------

@dataclass
class Gguf:
    meta: dict
    tensors: dict[str, np.ndarray]  # numpy order (ggml's ne reversed)

    @classmethod
    def read(cls, path: pathlib.Path) -> "Gguf":
        import gguf
        r = gguf.GGUFReader(path)
        arch = r.fields["general.architecture"].contents()
        meta = {name[len(arch) + 1:]: f.contents() for name, f in r.fields.items()
                if name.startswith(arch + ".")}
        meta["arch"] = arch
        tensors = {t.name: np.array(t.data, dtype=np.float64) for t in r.tensors}
        return cls(meta, tensors)

    def t(self, name: str) -> np.ndarray:
        return self.tensors[name]


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the llama converter's Q/K row permutation: llama.cpp's llama arch ropes consecutive
    pairs (2j, 2j+1) of a head, transformers' Mixtral the halves (j, j + d/2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _common(g: Gguf) -> dict:
    m = g.meta
    n_embd, n_head = int(m["embedding_length"]), int(m["attention.head_count"])
    return dict(vocab_size=g.t("token_embd.weight").shape[0], hidden_size=n_embd,
                num_hidden_layers=int(m["block_count"]), num_attention_heads=n_head,
                num_key_value_heads=int(m["attention.head_count_kv"]),
                rms_norm_eps=float(m["attention.layer_norm_rms_epsilon"]),
                rope_parameters={"rope_type": "default", "rope_theta": float(m["rope.freq_base"])},
                max_position_embeddings=int(m["context_length"]), tie_word_embeddings=False,
                pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _top(g: Gguf) -> dict[str, np.ndarray]:
    return {"model.embed_tokens.weight": g.t("token_embd.weight"),
            "model.norm.weight": g.t("output_norm.weight"),
            "lm_head.weight": g.t("output.weight")}


def _attn(g: Gguf, i: int, p: str, q_rows=lambda w: w, k_rows=lambda w: w, bias=False) -> dict:
    b = f"blk.{i}."
    sd = {p + "q_proj.weight": q_rows(g.t(b + "attn_q.weight")),
          p + "k_proj.weight": k_rows(g.t(b + "attn_k.weight")),
          p + "v_proj.weight": g.t(b + "attn_v.weight"),
          p + "o_proj.weight": g.t(b + "attn_output.weight")}
    if bias:
        for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                       ("o_proj", "attn_output")):
            sd[f"{p}{hf}.bias"] = g.t(f"{b}{gg}.bias")
    return sd


def _experts_fused(g: Gguf, i: int, p: str) -> dict:
    """[n_expert, 2 n_ff, n_embd] gate rows then up rows; down [n_expert, n_embd, n_ff]."""
    b = f"blk.{i}."
    return {p + "gate_up_proj": np.concatenate([g.t(b + "ffn_gate_exps.weight"),
                                                g.t(b + "ffn_up_exps.weight")], axis=1),
            p + "down_proj": g.t(b + "ffn_down_exps.weight")}


def _dense_mlp(g: Gguf, i: int, p: str, suffix: str = "") -> dict:
    b = f"blk.{i}."
    return {p + "gate_proj.weight": g.t(f"{b}ffn_gate{suffix}.weight"),
            p + "up_proj.weight": g.t(f"{b}ffn_up{suffix}.weight"),
            p + "down_proj.weight": g.t(f"{b}ffn_down{suffix}.weight")}


def _qwen3moe(g: Gguf, k: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    m = g.meta
    cfg = Qwen3MoeConfig(**_common(g), head_dim=int(m["attention.key_length"]),
                         num_experts=int(m["expert_count"]), num_experts_per_tok=k,
                         moe_intermediate_size=int(m["expert_feed_forward_length"]),
                         intermediate_size=int(m["feed_forward_length"]), norm_topk_prob=True,
                         decoder_sparse_step=1, mlp_only_layers=[])
    sd = _qk_norm_moe(g, cfg.num_hidden_layers)
    return Qwen3MoeForCausalLM, cfg, sd


def _qk_norm_moe(g: Gguf, n_layer: int) -> dict:
    """The weights of a model with q/k norms and one fused MoE block per layer (Qwen3-MoE and
    OLMoE name them alike)."""
    sd = _top(g)
    for i in range(n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        sd |= _attn(g, i, p + "self_attn.")
        sd[p + "self_attn.q_norm.weight"] = g.t(b + "attn_q_norm.weight")
        sd[p + "self_attn.k_norm.weight"] = g.t(b + "attn_k_norm.weight")
        sd[p + "input_layernorm.weight"] = g.t(b + "attn_norm.weight")
        sd[p + "post_attention_layernorm.weight"] = g.t(b + "ffn_norm.weight")
        sd[p + "mlp.gate.weight"] = g.t(b + "ffn_gate_inp.weight")
        sd |= _experts_fused(g, i, p + "mlp.experts.")
    return sd


def _olmoe(g: Gguf, k: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM
    m = g.meta
    cfg = OlmoeConfig(**_common(g), num_experts=int(m["expert_count"]), num_experts_per_tok=k,
                      intermediate_size=int(m["feed_forward_length"]), norm_topk_prob=False,
                      clip_qkv=None)
    sd = _qk_norm_moe(g, cfg.num_hidden_layers)
    return OlmoeForCausalLM, cfg, sd


def _mixtral(g: Gguf, k: int):
    from transformers import MixtralConfig, MixtralForCausalLM
    m = g.meta
    cfg = MixtralConfig(**_common(g), num_local_experts=int(m["expert_count"]), num_experts_per_tok=k,
                        intermediate_size=int(m["feed_forward_length"]), router_jitter_noise=0.0,
                        sliding_window=None)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    sd = _top(g)
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        sd |= _attn(g, i, p + "self_attn.", q_rows=lambda w: _unpermute_rope(w, n_head),
                    k_rows=lambda w: _unpermute_rope(w, n_kv))
        sd[p + "input_layernorm.weight"] = g.t(b + "attn_norm.weight")
        sd[p + "post_attention_layernorm.weight"] = g.t(b + "ffn_norm.weight")
        sd[p + "mlp.gate.weight"] = g.t(b + "ffn_gate_inp.weight")
        sd |= _experts_fused(g, i, p + "mlp.experts.")
    return MixtralForCausalLM, cfg, sd


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gpt-oss keeps gate and up interleaved on the last axis (gate even, up odd)."""
    out = np.empty(gate.shape[:-1] + (2 * gate.shape[-1],), dtype=gate.dtype)
    out[..., 0::2], out[..., 1::2] = gate, up
    return out


def _gpt_oss(g: Gguf, k: int):
    from transformers import GptOssConfig, GptOssForCausalLM
    m = g.meta
    n_layer = int(m["block_count"])
    # llama.cpp's gpt-oss: every other layer sliding-window, the first one included
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
    cfg = GptOssConfig(**_common(g), head_dim=int(m["attention.key_length"]),
                       num_local_experts=int(m["expert_count"]), num_experts_per_tok=k,
                       intermediate_size=int(m["expert_feed_forward_length"]),
                       sliding_window=int(m["attention.sliding_window"]), layer_types=types,
                       attention_bias=True, swiglu_alpha=1.702, swiglu_limit=7.0)
    sd = _top(g)
    for i in range(n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        sd |= _attn(g, i, p + "self_attn.", bias=True)
        sd[p + "self_attn.sinks"] = g.t(b + "attn_sinks.weight")
        sd[p + "input_layernorm.weight"] = g.t(b + "attn_norm.weight")
        sd[p + "post_attention_layernorm.weight"] = g.t(b + "post_attention_norm.weight")
        sd[p + "mlp.router.weight"] = g.t(b + "ffn_gate_inp.weight")
        sd[p + "mlp.router.bias"] = g.t(b + "ffn_gate_inp.bias")
        tr = lambda a: np.swapaxes(a, 1, 2)  # noqa: E731  [E, out, in] -> [E, in, out]
        sd[p + "mlp.experts.gate_up_proj"] = _interleave(tr(g.t(b + "ffn_gate_exps.weight")),
                                                         tr(g.t(b + "ffn_up_exps.weight")))
        sd[p + "mlp.experts.gate_up_proj_bias"] = _interleave(g.t(b + "ffn_gate_exps.bias"),
                                                              g.t(b + "ffn_up_exps.bias"))
        sd[p + "mlp.experts.down_proj"] = tr(g.t(b + "ffn_down_exps.weight"))
        sd[p + "mlp.experts.down_proj_bias"] = g.t(b + "ffn_down_exps.bias")
    return GptOssForCausalLM, cfg, sd


def _deepseek_v3(g: Gguf, k: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    m = g.meta
    common = _common(g)
    n_head = common["num_attention_heads"]
    qk_rope = int(m["rope.dimension_count"])
    qk_nope = int(m["attention.key_length_mla"]) - qk_rope
    common["num_key_value_heads"] = n_head  # the file's 1 is the absorbed-MLA latent "head"
    cfg = DeepseekV3Config(
        **common, n_routed_experts=int(m["expert_count"]), num_experts_per_tok=k,
        n_group=int(m.get("expert_group_count", 1)), topk_group=int(m.get("expert_group_used_count", 1)),
        routed_scaling_factor=float(m["expert_weights_scale"]), norm_topk_prob=bool(m["expert_weights_norm"]),
        first_k_dense_replace=int(m["leading_dense_block_count"]),
        n_shared_experts=int(m["expert_shared_count"]),
        intermediate_size=int(m["feed_forward_length"]),
        moe_intermediate_size=int(m["expert_feed_forward_length"]),
        q_lora_rank=int(m["attention.q_lora_rank"]), kv_lora_rank=int(m["attention.kv_lora_rank"]),
        qk_rope_head_dim=qk_rope, qk_nope_head_dim=qk_nope,
        v_head_dim=int(m["attention.value_length_mla"]),
        # llama.cpp ropes deepseek2 on consecutive pairs: transformers' interleaved layout
        rope_interleave=True, attention_bias=False, num_nextn_predict_layers=0)
    sd = _top(g)
    for i in range(cfg.num_hidden_layers):
        p, b, a = f"model.layers.{i}.", f"blk.{i}.", f"model.layers.{i}.self_attn."
        sd[a + "q_a_proj.weight"] = g.t(b + "attn_q_a.weight")
        sd[a + "q_a_layernorm.weight"] = g.t(b + "attn_q_a_norm.weight")
        sd[a + "q_b_proj.weight"] = g.t(b + "attn_q_b.weight")
        sd[a + "kv_a_proj_with_mqa.weight"] = g.t(b + "attn_kv_a_mqa.weight")
        sd[a + "kv_a_layernorm.weight"] = g.t(b + "attn_kv_a_norm.weight")
        # the converter split kv_b per head into k_b (stored transposed) and v_b
        k_b = np.swapaxes(g.t(b + "attn_k_b.weight"), 1, 2)  # [head, nope, latent]
        v_b = g.t(b + "attn_v_b.weight")                      # [head, v, latent]
        kv_b = np.concatenate([k_b, v_b], axis=1)
        sd[a + "kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
        sd[a + "o_proj.weight"] = g.t(b + "attn_output.weight")
        sd[p + "input_layernorm.weight"] = g.t(b + "attn_norm.weight")
        sd[p + "post_attention_layernorm.weight"] = g.t(b + "ffn_norm.weight")
        if i < cfg.first_k_dense_replace:
            sd |= _dense_mlp(g, i, p + "mlp.")
            continue
        sd[p + "mlp.gate.weight"] = g.t(b + "ffn_gate_inp.weight")
        bias = g.tensors.get(b + "exp_probs_b.bias")
        sd[p + "mlp.gate.e_score_correction_bias"] = (bias if bias is not None
                                                      else np.zeros(cfg.n_routed_experts))
        sd |= _experts_fused(g, i, p + "mlp.experts.")
        sd |= _dense_mlp(g, i, p + "mlp.shared_experts.", "_shexp")
    return DeepseekV3ForCausalLM, cfg, sd


BUILDERS: dict[str, Callable] = {"qwen3moe": _qwen3moe, "olmoe": _olmoe, "mixtral": _mixtral,
                                 "gpt-oss": _gpt_oss, "deepseek-v3": _deepseek_v3}


def build_reference(kind: str, path: pathlib.Path, k: int):
    """The transformers model of `kind` holding the GGUF's weights, float64, routing top-k = k."""
    import torch
    cls, cfg, sd = BUILDERS[kind](Gguf.read(path), k)
    # the plain loops (float64 has no grouped-mm kernel), attention without fused kernels
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    model = cls(cfg).to(torch.float64).eval()
    state = model.state_dict()
    missing = sorted(set(state) - set(sd))
    extra = sorted(set(sd) - set(state))
    if missing or extra:
        raise SystemExit(f"{kind}: weight map incomplete: missing {missing}, unexpected {extra}")
    for name, arr in sd.items():
        if tuple(state[name].shape) != arr.shape:
            raise SystemExit(f"{kind}: {name}: transformers wants {tuple(state[name].shape)}, "
                             f"the GGUF gives {arr.shape}")
    model.load_state_dict({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in sd.items()})
    return model


# ---- routing as transformers computes it -------------------------------------------------------

@dataclass
class Routing:
    experts: np.ndarray   # int [T, L, k]
    weights: np.ndarray   # float [T, L, k]
    margin: np.ndarray    # float [T, L]: how far the selection is from a tie (see MARGIN)


def _selection_margin(router, x, k: int) -> np.ndarray:
    """Per token: the gap that decides the router's top-k, on the scores it ranks."""
    import torch
    logits = torch.nn.functional.linear(x, router.weight, getattr(router, "bias", None))
    if hasattr(router, "e_score_correction_bias"):  # deepseek-v3: sigmoid + bias, groups
        s = logits.sigmoid() + router.e_score_correction_bias
        n_group, keep = router.num_group, router.topk_group
        grouped = s.view(-1, n_group, s.shape[-1] // n_group)
        gs = grouped.topk(2, dim=-1)[0].sum(-1).sort(dim=-1, descending=True)[0]
        group_gap = (gs[:, keep - 1] - gs[:, keep]) if keep < n_group else torch.full_like(gs[:, 0], np.inf)
        kept = gs[:, keep - 1:keep]
        mask = grouped.topk(2, dim=-1)[0].sum(-1) >= kept  # the groups transformers keeps
        s = s.masked_fill(~mask.repeat_interleave(s.shape[-1] // n_group, dim=-1), -np.inf)
    else:  # softmax before or after top-k ranks the logits either way
        s = logits
        group_gap = torch.full_like(s[:, 0], np.inf)
    top = s.sort(dim=-1, descending=True)[0]
    gap = top[:, k - 1] - top[:, k] if k < s.shape[-1] else torch.full_like(top[:, 0], np.inf)
    # the (K+1)-th past the kept groups is -inf: an infinite gap; K past them too (-inf - -inf,
    # nan) would leave the choice to tie-breaking: 0, never decisive
    gap = torch.nan_to_num(gap, nan=0.0, posinf=np.inf)
    return torch.minimum(gap, group_gap).numpy()


def reference_routing(model, tokens: list[int], k: int) -> Routing:
    import torch
    routers = [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
    seen: list[tuple] = []

    def hook(module, args, out):
        x = args[0].reshape(-1, module.hidden_dim)
        _, weights, idx = out
        seen.append((idx.numpy().copy(), weights.detach().numpy().copy(), _selection_margin(module, x, k)))

    handles = [r.register_forward_hook(hook) for r in routers]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([tokens]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(seen) != len(routers):
        raise SystemExit(f"expected one call per router ({len(routers)}), got {len(seen)}")
    return Routing(np.stack([s[0] for s in seen], 1), np.stack([s[1] for s in seen], 1),
                   np.stack([s[2] for s in seen], 1))


# ---- comparison -----------------------------------------------------------------------------------

@dataclass
class Row:
    kind: str
    family: str
    k: int
    level: str            # "whole model": the tokens run through both models end to end
    slots: int            # tokens x MoE layers
    decisive: int
    same_set: int         # decisive slots whose expert sets agree
    undecisive_same: int  # near-tie slots that agree anyway (reported, not required)
    max_abs_dw: float     # weights, over the decisive slots
    max_rel_dw: float
    weights_ok: bool      # every decisive slot's weights within ATOL + RTOL * |w|
    min_margin: float     # the smallest selection gap of the reference over all slots

    @property
    def ok(self) -> bool:
        return self.decisive > 0 and self.same_set == self.decisive and self.weights_ok


def compare(kind: str, k: int, ref: Routing, exp: np.ndarray, w: np.ndarray) -> Row:
    T, L, _ = ref.experts.shape
    if exp.shape != (T, L, k):
        raise SystemExit(f"{kind} K={k}: steer-gguf traced {exp.shape}, transformers {ref.experts.shape}")
    decisive = ref.margin > MARGIN
    same = np.zeros((T, L), dtype=bool)
    dabs = drel = 0.0
    weights_ok = True
    for t in range(T):
        for j in range(L):
            a = dict(zip(ref.experts[t, j].tolist(), ref.weights[t, j].tolist()))
            b = dict(zip(exp[t, j].tolist(), w[t, j].astype(np.float64).tolist()))
            same[t, j] = set(a) == set(b)
            if decisive[t, j] and same[t, j]:
                for e, want in a.items():
                    d = abs(b[e] - want)
                    dabs, drel = max(dabs, d), max(drel, d / max(abs(want), 1e-30))
                    weights_ok &= d <= ATOL + RTOL * abs(want)
    return Row(kind, FAMILY[kind], k, "whole model", T * L, int(decisive.sum()),
               int((same & decisive).sum()), int((same & ~decisive).sum()), dabs, drel,
               bool(weights_ok), float(ref.margin.min()))


def steer_routing(path: pathlib.Path, k: int, tokens: list[int] | None = None):
    from steer_gguf import SteeredLlama
    llm = SteeredLlama(path, n_ctx=256, n_threads=1, n_threads_batch=1, topk=k,
                       type_k=GGML_F32, type_v=GGML_F32)
    try:
        toks = tokens or llm.tokenize(TEXT.encode(), add_bos=True, special=True)
        tr = llm.trace(tokens=toks)
    finally:
        llm.close()
    return toks, tr.experts, tr.weights


def run(kind: str, path: pathlib.Path, k: int, tweak: Callable | None = None) -> Row:
    """steer-gguf at topk=k against the reference at num_experts_per_tok=k; tweak(model), if
    given, alters the reference first (the test's check that a wrong reference is caught)."""
    toks, exp, w = steer_routing(path, k)
    model = build_reference(kind, path, k)
    if tweak is not None:
        tweak(model)
    return compare(kind, k, reference_routing(model, toks, k), exp, w)


def make_fixture(kind: str, directory: pathlib.Path) -> pathlib.Path:
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures.make_models import make_model
    return make_model(kind, directory / f"{kind}.gguf", n_layer=4, n_expert_used=K_MODEL)


def versions() -> dict:
    import torch
    import transformers
    from importlib.metadata import version
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "steer-gguf": version("steer-gguf"), "gguf": version("gguf")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", action="append", choices=KINDS, help="repeatable; default: all")
    ap.add_argument("--k", action="append", type=int, help=f"repeatable; default: {KS}")
    ap.add_argument("--out", type=pathlib.Path, default=RESULT)
    args = ap.parse_args(argv)
    rows: list[Row] = []
    print(f"{'kind':12} {'family':32} {'K':>2} {'decisive':>12} {'same set':>9} "
          f"{'max |dw|':>9} {'max rel':>9}  ok")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kind or KINDS:
            path = make_fixture(kind, pathlib.Path(tmp))
            for k in args.k or KS:
                r = run(kind, path, k)
                rows.append(r)
                print(f"{r.kind:12} {r.family:32} {r.k:2} {r.decisive:5}/{r.slots:<6} {r.same_set:9} "
                      f"{r.max_abs_dw:9.2e} {r.max_rel_dw:9.2e}  {'yes' if r.ok else 'NO'}", flush=True)
    out = {"what": "steer-gguf topk=K against transformers num_experts_per_tok=K, same weights and "
                   "tokens (issue 32 held-out reference)",
           "text": TEXT, "margin": MARGIN, "rtol": RTOL, "atol": ATOL, "reference_dtype": "float64",
           "versions": versions(),
           "rows": [asdict(r) | {"ok": r.ok} for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
