"""Cost of causal detection per candidate expert, extrapolated to Qwen3-30B-A3B.

    python benchmarks/causal_cost.py [--quick] [--pairs builtin:safety] [--max-pairs 32] [--json OUT]

A candidate costs two teacher-forced passes over every pair's two conversations (forced on,
forced off). Measured here: seconds per candidate on the synthetic benchmark model
(common.synthetic_model: random weights, realistic widths, Q4_K_M), and the plain prefill
rate of the same conversations on the same context, so the cost can also be read as
"2 x the pairs' tokens of prefill per candidate".

The extrapolation to Qwen3-30B-A3B (48 MoE layers x 128 experts = 6144 candidates) scales
the measured time per candidate by the ratio of parameters active per token (compute per
token; memory traffic and attention length are not modelled), with the same pairs. It is an
order of magnitude, not a measurement; `--candidates M` divides it by 6144 / M.
"""
from __future__ import annotations

import argparse
import json
import sys

from common import QUICK_SHAPE, machine, summary, synthetic_model, thread_kwargs, timed

QWEN3_30B_A3B = {"n_moe_layers": 48, "n_expert": 128, "active_params": 3.3e9}  # model card: 3.3B activated


def active_params(path) -> float:
    """Parameters a token uses: every tensor except the embedding lookup, expert tensors
    scaled by k / n_expert."""
    import gguf

    r = gguf.GGUFReader(str(path))
    k = int(r.fields["qwen3moe.expert_used_count"].parts[-1][0])
    e = int(r.fields["qwen3moe.expert_count"].parts[-1][0])
    n = 0.0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            continue
        size = float(t.n_elements)
        n += size * k / e if "_exps" in t.name else size
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", default="builtin:safety")
    ap.add_argument("--max-pairs", type=int, default=32)
    ap.add_argument("--candidates", type=int, default=None, help="experts to force (default: 16, quick: 4)")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    args = ap.parse_args()

    from steer_gguf import SteeredLlama
    from steer_gguf.detect.causal import causal_detect, pair_tokens
    from steer_gguf.detect.datasets import load_pairs

    if args.quick:
        path = synthetic_model(**QUICK_SHAPE)
        n_cand = args.candidates or 4
    else:
        path = synthetic_model()
        n_cand = args.candidates or 16
    threads = thread_kwargs(args.threads)
    llm = SteeredLlama(path, n_ctx=512, **threads)
    pairs = load_pairs(args.pairs, max_pairs=args.max_pairs)
    pt = pair_tokens(llm, pairs)
    n_tokens = sum(map(len, pt.seqs))
    rows = [[len(s) - 1] for s in pt.seqs]
    llm.trace_many(pt.seqs[:4], rows[:4], batch_tokens=args.batch, record=False)  # warm-up
    plain = [n_tokens / timed(lambda: llm.trace_many(pt.seqs, rows, args.batch, record=False)) for _ in range(3)]
    res = causal_detect(llm, pairs, candidates=n_cand, batch_tokens=args.batch,
                        on_progress=lambda d, t, w: print(f"candidate {d}/{t}", file=sys.stderr))
    per = res.seconds_per_candidate
    info = llm.info
    mine = active_params(path)
    q = QWEN3_30B_A3B
    n_q = q["n_moe_layers"] * q["n_expert"]
    scale = q["active_params"] / mine
    out = {
        "model": path.name, "pairs": args.pairs, "n_pairs": pt.n_pairs, "conversations": len(pt.seqs),
        "tokens_per_margin": n_tokens, "batch_tokens": args.batch, "candidates_measured": res.n_candidates,
        "moe_layers": len(info.moe_layers), "n_expert": info.n_expert, "n_expert_used": info.n_expert_used,
        "seconds_per_candidate": per,
        "prefill_tokens_per_s": summary(plain),
        "candidate_cost_in_prefill_seconds": 2 * n_tokens / summary(plain)["median"],
        "all_candidates_seconds": per * len(info.moe_layers) * info.n_expert,
        "active_params": mine,
        "qwen3_30b_a3b": {
            "candidates": n_q, "active_params": q["active_params"], "compute_ratio": scale,
            "seconds_per_candidate_est": per * scale,
            "all_candidates_hours_est": per * scale * n_q / 3600,
            "top_256_candidates_hours_est": per * scale * 256 / 3600,
        },
        "machine": machine(),
    }
    print(f"{path.name}: {pt.n_pairs} pairs ({n_tokens} tokens per margin), {res.n_candidates} candidates: "
          f"{per:.3f} s per candidate (2 margins; plain prefill {summary(plain)['median']:,.0f} tok/s -> "
          f"{out['candidate_cost_in_prefill_seconds']:.3f} s of prefill); all {len(info.moe_layers)}x{info.n_expert} "
          f"experts: {out['all_candidates_seconds']:.0f} s")
    qq = out["qwen3_30b_a3b"]
    print(f"Qwen3-30B-A3B estimate ({q['active_params'] / 1e9:.1f}B active vs {mine / 1e6:.0f}M here, x{scale:.0f}): "
          f"{qq['seconds_per_candidate_est']:.1f} s per candidate, all {n_q}: {qq['all_candidates_hours_est']:.1f} h, "
          f"top 256 by |risk_diff| (--candidates 256): {qq['top_256_candidates_hours_est']:.2f} h on this machine")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
