"""Detection throughput against plain prefill of the same tokens, in one process.

    python benchmarks/detect_throughput.py [--quick] [--pairs builtin:safety] [--json OUT]

Both sides prefill the same conversations in the same batches on the same tracing context;
detection adds the routing recorder and marks the target spans as outputs (so the last
layer computes them), plain prefill asks for one output per conversation.
"""
from __future__ import annotations

import argparse
import json
import sys

from common import QUICK_SHAPE, machine, summary, synthetic_model, thread_kwargs, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", default="builtin:safety")
    ap.add_argument("--max-pairs", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    args = ap.parse_args()

    from steer_gguf import SteeredLlama
    from steer_gguf.detect.datasets import load_pairs
    from steer_gguf.detect.risk import target_rows

    if args.quick:
        path = synthetic_model(**QUICK_SHAPE)
        reps, max_pairs = args.reps or 2, args.max_pairs or 24
    else:
        path = synthetic_model()
        reps, max_pairs = args.reps or 5, args.max_pairs or 64
    threads = thread_kwargs(args.threads)
    llm = SteeredLlama(path, n_ctx=512, **threads)
    pairs = load_pairs(args.pairs, max_pairs=max_pairs)
    seqs, rows = [], []
    for p in pairs:
        for msgs, target in ((p.messages_0, p.target_0), (p.messages_1, p.target_1)):
            toks, span = target_rows(llm, msgs, target)
            seqs.append(toks)
            rows.append(list(range(*span)))
    n_tokens = sum(map(len, seqs))
    llm.trace_many(seqs[:4], rows[:4], batch_tokens=args.batch)  # warm-up
    rates = {"plain": [], "detect": []}
    for rep in range(reps):
        rates["plain"].append(n_tokens / timed(lambda: llm.trace_many(seqs, rows, args.batch, record=False)))
        rates["detect"].append(n_tokens / timed(lambda: llm.trace_many(seqs, rows, args.batch)))
        print(f"rep {rep + 1}/{reps} done", file=sys.stderr)
    res = {"model": path.name, "pairs": args.pairs, "conversations": len(seqs), "tokens": n_tokens,
           "target_tokens": sum(map(len, rows)), "batch_tokens": args.batch, "machine": machine(),
           "rates": {k: summary(v) for k, v in rates.items()}}
    res["ratio"] = res["rates"]["detect"]["median"] / res["rates"]["plain"]["median"]
    print(f"model {path.name}; {len(seqs)} conversations, {n_tokens} tokens ({res['target_tokens']} traced), "
          f"{reps} reps; {res['machine']['cpu']} x{res['machine']['cores']}")
    for k, s in res["rates"].items():
        print(f"{k:7s} {s['median']:10.1f} tok/s [{s['min']:.1f}-{s['max']:.1f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"ratio: detection/plain prefill {res['ratio']:.3f}")


if __name__ == "__main__":
    main()
