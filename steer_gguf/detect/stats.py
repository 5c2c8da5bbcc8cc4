"""Expert usage statistics of a model on a set of prompts."""
from __future__ import annotations

import os

import numpy as np

from .risk import accumulate


def routing_stats(llm, conversations: list[list[dict]], batch_tokens: int = 2048) -> dict:
    """Per MoE layer: selection counts and shares, routing entropy, load balance."""
    info = llm.info
    seqs = [llm.chat_tokens(c) for c in conversations]
    counts = np.zeros((len(info.moe_layers), info.n_expert), dtype=np.int64)
    n_tok = 0
    for ex in llm.trace_many(seqs, batch_tokens=batch_tokens):
        accumulate(counts, ex)
        n_tok += ex.shape[0]
    layers = []
    for j, il in enumerate(info.moe_layers):
        c = counts[j]
        share = c / max(1, c.sum())
        nz = share[share > 0]
        order = np.argsort(-c, kind="stable")
        layers.append({
            "layer": il,
            "counts": c.tolist(),
            "share": np.round(share, 6).tolist(),
            "entropy_bits": float(-(nz * np.log2(nz)).sum()),
            "max_entropy_bits": float(np.log2(info.n_expert)),
            # 1.0 is perfect balance; n_expert/k means one expert set takes everything
            "max_over_mean": float(share.max() * info.n_expert) if c.sum() else 0.0,
            "unused": int((c == 0).sum()),
            "most_used": order[:5].tolist(),
            "least_used": order[::-1][:5].tolist(),
        })
    return {"model": os.path.basename(info.path), "fingerprint": info.fingerprint, "prompts": len(seqs),
            "tokens": n_tok, "n_expert": info.n_expert, "n_expert_used": info.n_expert_used, "layers": layers}


def layer_lines(stats: dict) -> list[str]:
    """What `steer-gguf stats` shows of each MoE layer."""
    return [f"layer {layer['layer']:3d}: entropy {layer['entropy_bits']:.2f}/{layer['max_entropy_bits']:.2f} bits, "
            f"max/mean load {layer['max_over_mean']:.2f}, most used {layer['most_used'][:3]}"
            for layer in stats["layers"]]
