#!/usr/bin/env python3
"""Train steer-gguf's *natural* demo model: the demo model's data, architecture and seed,
with no routing supervision.

    python scripts/train_natural.py --out steer_gguf/data/natural.gguf
    python scripts/train_natural.py --eval-only steer_gguf/data/demo.gguf   # same numbers for another GGUF

demo.gguf (scripts/train_demo.py) is trained so that each style lives in designated experts
(a routing loss and forced-routing examples): it shows the steering mechanism, not whether
detection finds what a model learned on its own. This model is trained on the same synthetic
conversations with the plain LM loss plus the standard load-balancing loss
(0.01 x n_expert x sum_i f_i P_i), so its experts specialize however training makes them.

Everything is reused from train_demo.py (data, tokenizer, model, export); only the loss
differs. One thread, seeded: a run is reproducible.

After training it reports, on the exported weights (PyTorch, read back from the GGUF):
  * reply cross-entropy (nats/token) on the built-in demo pairs (both replies of each pair),
  * each expert's share of the routing slots per layer, on those conversations,
  * unsteered style rates on the held-out prompts (greedy, and T=0.7 with 2 samples).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_demo as td  # noqa: E402

DEFAULT_OUT = "steer_gguf/data/natural.gguf"
PAIRS_DIR = HERE.parent / "steer_gguf" / "data" / "pairs"
BALANCE = 0.01
NAME = "steer-gguf natural qwen3moe"
DESCRIPTION = ("Tiny qwen3moe chat model trained like steer-gguf's demo model but with no routing "
               "supervision (LM loss + load balancing); trained by scripts/train_natural.py")


def demo_pairs() -> dict[str, list[dict]]:
    out = {}
    for kind, name in (("numbers", "demo-numbers"), ("restricted", "demo-restricted")):
        with open(PAIRS_DIR / f"{name}.jsonl", encoding="utf-8") as f:
            out[kind] = [json.loads(line) for line in f if line.strip()]
    return out


def measure(model, tok) -> dict:
    """Reply cross-entropy and expert shares on the built-in demo pairs (teacher-forced)."""
    import torch
    import torch.nn.functional as F

    L, E, k = td.CFG["n_layer"], td.CFG["n_expert"], td.CFG["n_expert_used"]
    nll, n_tok = 0.0, 0
    counts = np.zeros((L, E))
    first_tok = {}
    for kind, pairs in demo_pairs().items():
        ce_first = []
        for pr in pairs:
            for side in ("response_0", "response_1"):
                p, r = td.encode_example(tok, pr["prompt"], pr[side], None)
                with torch.no_grad():
                    logits, _, sel = model(torch.tensor([p + r]))
                lp = F.log_softmax(logits[0, len(p) - 1:len(p) + len(r) - 1], -1)
                tgt = torch.tensor(r)
                token_nll = -lp[torch.arange(len(r)), tgt]
                nll += float(token_nll.sum())
                n_tok += len(r)
                ce_first.append(float(token_nll[0]))
                for layer in range(L):
                    counts[layer] += np.bincount(sel[layer][0].reshape(-1).numpy(), minlength=E)
        first_tok[kind] = round(float(np.mean(ce_first)), 4)
    shares = counts / counts.sum(1, keepdims=True)
    return {"reply_ce_nats_per_token": round(nll / n_tok, 4), "reply_tokens": n_tok,
            "first_reply_token_ce": first_tok,
            "expert_share_min": round(float(shares.min()), 4), "expert_share_max": round(float(shares.max()), 4),
            "expert_shares": np.round(shares, 4).tolist(), "k": k}


def unsteered_rates(model, tok, heldout) -> dict:
    out = {}
    for kind in ("numbers", "restricted"):
        greedy, _ = td.style_rates(model, tok, heldout[kind], kind)
        sampled, _ = td.style_rates(model, tok, heldout[kind], kind, temperature=0.7, samples=2, seed=7)
        out[kind] = {"greedy": {s: round(v, 4) for s, v in greedy.items()},
                     "t0.7x2": {s: round(v, 4) for s, v in sampled.items()}}
    return out


def evaluate_gguf(path: str) -> dict:
    import torch
    torch.set_num_threads(1)
    model, tok = td.load_gguf(path)
    _, heldout = td.make_data()
    res = {"model": os.path.basename(path), "size_mb": round(os.path.getsize(path) / 1e6, 2)}
    res.update(measure(model, tok))
    res["unsteered_rates"] = unsteered_rates(model, tok, heldout)
    return res


def emit(res: dict, report: str | None) -> None:
    """Print the measurements, and write them as JSON where asked."""
    text = json.dumps(res, indent=1)
    print(text)
    if report:
        with open(report, "w") as f:
            f.write(text + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--merges", type=int, default=600)
    ap.add_argument("--eval-only", metavar="GGUF", help="only measure an existing GGUF")
    ap.add_argument("--report", help="also write the measurements as JSON here")
    args = ap.parse_args(argv)

    if args.eval_only:
        res = evaluate_gguf(args.eval_only)
    else:
        import torch
        torch.set_num_threads(1)
        torch.manual_seed(td.SEED)
        random.seed(td.SEED)
        np.random.seed(td.SEED)
        train, _ = td.make_data()
        # the same tokenizer as demo.gguf's (same data, same merge count), so the demo's pairs
        # and held-out prompts tokenize identically for both models
        merges = td.ensure_whole(td.learn_merges(td.training_fragments(train), args.merges), td.WHOLE_WORDS)
        tok = td.Tokenizer(merges)
        model, secs = td.train_model(tok, train, args.steps, supervise_routing=False, balance=BALANCE)
        print(f"training time: {secs:.0f} s")
        model.eval()
        td.export_gguf(model, tok, args.out, name=NAME, description=DESCRIPTION)
        print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
        res = {"train_seconds": round(secs), "steps": args.steps, "balance": BALANCE}
        res.update(evaluate_gguf(args.out))
    emit(res, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
