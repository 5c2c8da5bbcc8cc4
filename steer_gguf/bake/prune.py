"""`steer-gguf prune`: a smaller model by measured use. Which experts to drop, chosen per MoE
layer from calibration data (REAP's saliency or plain routing frequency), the same number kept
in every layer (GGUF's expert_count is one number), written by the prune bake; and what it costs,
against a random prune of the same size, on held-out text the calibration never saw.

KL and perplexity of a prune are measured on the source with the dropped experts deactivated:
under renormalised or softmax-after-top-k gating that is the pruned file's routing exactly (the
bake's check compares the written file against it), so every point of a sweep and every random
seed is measured without writing a file.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import SteerError
from ..profile import ExpertRule, ModelRef, Profile

CRITERIA = ("reap", "frequency")
RANDOM_SEEDS = 5
MIN_TOKENS_PER_EXPERT = 10  # below this many calibration tokens per expert the ranking is noise
# Recording the model's last layer for every token costs about 1 / (MoE layers) of prefill
# (engine/saliency.expert_usage says why): by default it records 1 token in as few as keep that
# under this share, so from 25 MoE layers up every token (exact REAP), on 8 layers 1 in 4
LAST_LAYER_BUDGET = 0.04


def last_layer_stride(info, n_tokens: int, stride: int | None = None) -> int:
    """The last layer's sampling stride for n_tokens of calibration: `stride` (--last-layer-stride),
    else the fewest-skipping one within LAST_LAYER_BUDGET; never so large that the last layer sees
    fewer than MIN_TOKENS_PER_EXPERT tokens per expert; 1 (every token) where it is dense."""
    if stride is not None and stride < 1:
        raise SteerError(f"--last-layer-stride must be >= 1, got {stride}")
    if info.n_layer - 1 not in info.moe_layers:
        return 1
    want = stride if stride is not None else math.ceil(1 / (LAST_LAYER_BUDGET * len(info.moe_layers)) - 1e-9)
    return max(1, min(want, n_tokens // (MIN_TOKENS_PER_EXPERT * info.n_expert)))


def n_keep(info, keep: float | None, drop: int | None) -> int:
    """Experts kept per MoE layer, from --keep F or --drop N; refused where it leaves fewer than k
    or removes nothing."""
    n = info.n_expert
    if (keep is None) == (drop is None):
        raise SteerError("prune takes one of --keep F (a fraction of the experts) or --drop N (per layer)")
    if keep is not None:
        if not 0 < keep < 1:
            raise SteerError(f"--keep must lie strictly between 0 and 1, got {keep}")
        k = int(round(keep * n))
    else:
        if drop < 1:
            raise SteerError(f"--drop must be >= 1, got {drop}")
        k = n - drop
    if k >= n:
        raise SteerError(f"--keep {keep} of {n} experts keeps them all: nothing to prune")
    if k < info.n_expert_used:
        raise SteerError(f"keeping {k} of {n} experts per layer leaves fewer than the {info.n_expert_used} "
                         f"each token uses")
    return k


def kept_by_score(layers: list[int], scores: np.ndarray, k: int) -> dict[int, list[int]]:
    """The k highest-scoring experts of each layer (ties: the lower index)."""
    out = {}
    for j, il in enumerate(layers):
        order = np.lexsort((np.arange(scores.shape[1]), -scores[j]))
        out[il] = sorted(int(e) for e in order[:k])
    return out


def kept_at_random(layers: list[int], n_expert: int, k: int, seed: int) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    return {il: sorted(int(e) for e in rng.choice(n_expert, k, replace=False)) for il in layers}


def drop_profile(info, kept: dict[int, list[int]], name: str) -> Profile:
    """The profile that deactivates every expert not kept: what the pruned file routes like."""
    rules = [ExpertRule(il, e, "deactivate") for il, ks in sorted(kept.items())
             for e in range(info.n_expert) if e not in set(ks)]
    return Profile(ModelRef.of(info), rules, name=name)


def expert_bytes(info) -> tuple[int, int]:
    """(bytes of the whole model, bytes of its per-expert tensors): what pruning scales."""
    from ..model import open_parts

    total = per_expert = 0
    for _, reader in open_parts(info.path):
        for t in reader.tensors:
            nbytes = int(t.n_bytes)
            total += nbytes
            shape = [int(x) for x in t.shape]
            if shape and shape[-1] == info.n_expert and ("_exps" in t.name or "ffn_gate_inp" in t.name):
                per_expert += nbytes
    return total, per_expert


@dataclass
class PrunePoint:
    name: str
    criterion: str             # reap | frequency | random
    keep: int                  # experts kept per MoE layer
    seed: int | None
    kl: float
    perplexity: float
    size_bytes: int            # tensor bytes after the prune (estimated: per-expert tensors scale)
    kept: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class PruneReport:
    model: str
    calibration: str
    calibration_tokens: int
    heldout: str
    heldout_tokens: int
    n_expert: int
    size_before: int
    source_perplexity: float
    points: list[PrunePoint]
    warnings: list[str] = field(default_factory=list)
    last_layer_stride: int = 1     # the last layer's saliency from 1 calibration token in this many
    last_layer_tokens: int | None = None
    written: str | None = None
    check: dict[str, Any] | None = None

    def random_mean(self, keep: int) -> tuple[float, float]:
        r = [p for p in self.points if p.criterion == "random" and p.keep == keep]
        return (float(np.mean([p.kl for p in r])), float(np.mean([p.perplexity for p in r]))) if r else (math.nan, math.nan)

    def table(self) -> str:
        lines = [f"prune {os.path.basename(self.model)}: calibration {self.calibration} ({self.calibration_tokens} "
                 f"tokens), held-out {self.heldout} ({self.heldout_tokens} positions); source perplexity "
                 f"{self.source_perplexity:.3f}, {self.size_before / 2**20:.1f} MiB of tensors"
                 + (f"; the last layer's usage from 1 token in {self.last_layer_stride} "
                    f"({self.last_layer_tokens} tokens)" if self.last_layer_stride > 1 else ""),
                 f"{'point':<22} {'kept/layer':>10} {'MiB':>8} {'KL':>9} {'ppl':>9}"]
        for keep in sorted({p.keep for p in self.points}, reverse=True):
            for p in self.points:
                if p.keep == keep and p.criterion != "random":
                    lines.append(f"{p.name:<22} {p.keep:>4}/{self.n_expert:<5} {p.size_bytes / 2**20:>8.1f} "
                                 f"{p.kl:>9.4f} {p.perplexity:>9.3f}")
            kl, ppl = self.random_mean(keep)
            n = sum(1 for p in self.points if p.criterion == "random" and p.keep == keep)
            size = next(p.size_bytes for p in self.points if p.keep == keep)
            lines.append(f"{f'random (mean of {n})':<22} {keep:>4}/{self.n_expert:<5} {size / 2**20:>8.1f} "
                         f"{kl:>9.4f} {ppl:>9.3f}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = "steer-gguf.prune/1"
        for p in d["points"]:
            p["kept"] = {str(k): v for k, v in p["kept"].items()}
        return d


def calibration_windows(llm, spec: str, conversations: list | None = None, text: str | None = None,
                        window: int = 256) -> list[list[int]]:
    """Token windows of the calibration data `spec`: its chats (a JSONL of chats or builtin:NAME,
    read by the caller) or its text."""
    if conversations is not None:
        toks = [llm.chat_tokens(c, False) for c in conversations]
    else:
        toks = [llm.tokenize((text or "").encode("utf-8"), add_bos=True, special=False)]
    wins = [t[i:i + window] for t in toks for i in range(0, len(t), window)]
    wins = [w for w in wins if w]
    if not wins:
        raise SteerError(f"{spec}: the calibration data holds no tokens")
    return wins


def measure(llm, windows_heldout, kept_sets: list[tuple[str, dict[int, list[int]]]]) -> tuple[dict, dict]:
    """KL(source || prune) and perplexity on the held-out windows, for every named kept set."""
    from ..evaluation.measure import Condition, quality

    conds = [Condition("source", None, "unsteered")] + [
        Condition(name, drop_profile(llm.info, kept, name), "profile") for name, kept in kept_sets]
    return quality(llm, windows_heldout, conds)


def run_prune(llm, calibration: str, windows: list[list[int]], heldout: str, heldout_name: str, keeps: list[int],
              criterion: str, seeds: int = RANDOM_SEEDS, on_progress=None,
              last_stride: int | None = None) -> tuple[PruneReport, dict]:
    """Usage on the calibration data, then every keep count: the criterion's prune, the frequency
    prune beside REAP, and `seeds` random prunes, each measured on the held-out text. Also returns
    the criterion's kept sets by keep count (what the written file keeps). windows: the
    calibration's tokens (calibration_windows); last_stride: --last-layer-stride (None: the
    default of last_layer_stride)."""
    from ..engine.saliency import expert_usage
    from ..evaluation.measure import quality_windows
    from .plan import _check_prunable

    info = llm.info
    if criterion not in CRITERIA:
        raise SteerError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    _check_prunable(info)
    if info.n_expert_groups > 1:
        raise SteerError(f"{os.path.basename(info.path)}: cannot prune: the model groups its experts "
                         f"({info.n_expert_groups} groups), and pruning would unbalance them")
    if seeds < 1:
        raise SteerError(f"--seeds must be >= 1, got {seeds}")
    held = quality_windows(llm, heldout)
    if not held:
        raise SteerError(f"{heldout_name}: the held-out text holds no token to predict")
    stride = last_layer_stride(info, sum(len(w) for w in windows), last_stride)
    usage = expert_usage(llm, windows, on_progress, last_stride=stride)
    warnings = []
    need = MIN_TOKENS_PER_EXPERT * info.n_expert
    if usage.tokens < need:
        warnings.append(f"{usage.tokens} calibration tokens for {info.n_expert} experts per layer: fewer than "
                        f"{need} ({MIN_TOKENS_PER_EXPERT} per expert), so the ranking rests on few routings")
    never = int((usage.count == 0).sum())
    if never:
        warnings.append(f"{never} (layer, expert) pairs were never routed to by the calibration data")
    scores = {"reap": usage.reap(), "frequency": usage.frequency()}
    crits = [criterion] + (["frequency"] if criterion == "reap" else [])
    total, per_expert = expert_bytes(info)
    sets: list[tuple[str, str, int, int | None, dict]] = []
    for k in keeps:
        for c in crits:
            sets.append((f"{c}-keep{k}", c, k, None, kept_by_score(usage.layers, scores[c], k)))
        for s in range(seeds):
            sets.append((f"random{s}-keep{k}", "random", k, s, kept_at_random(usage.layers, info.n_expert, k, s)))
    kl, ppl = measure(llm, held, [(name, kept) for name, _, _, _, kept in sets])
    points = [PrunePoint(name, c, k, seed, kl[name], ppl[name],
                         total - per_expert * (info.n_expert - k) // info.n_expert, kept)
              for name, c, k, seed, kept in sets]
    rep = PruneReport(info.path, calibration, usage.tokens, heldout_name, sum(len(w) - 1 for w in held),
                      info.n_expert, total, ppl["source"], points, warnings, stride,
                      int(usage.layer_tokens[-1]) if stride > 1 else None)
    return rep, {k: kept for _, c, k, _, kept in sets if c == criterion}
