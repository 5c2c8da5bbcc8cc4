"""Detection throughput against plain prefill of the same tokens, in one process.

    python benchmarks/detect_throughput.py [--quick] [--pairs builtin:safety] [--json OUT]

Both sides prefill the same conversations in the same batches, each on a tracing context of
its own model (so neither switches its recorder, a graph rebuild, between repetitions):
detection records routing as graph outputs with the target spans as routed rows (through the
last layer, without logits), plain prefill asks for one output per conversation. Also the
eval-callback recorder (the oracle; detection before steer.h API 3), with the spans as outputs.
Repetitions interleave the three; the ratios are medians of per-repetition ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
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
    plain_llm = SteeredLlama(path, n_ctx=512, **threads)
    callback = SteeredLlama(path, n_ctx=512, recorder="callback", **threads)
    pairs = load_pairs(args.pairs, max_pairs=max_pairs)
    seqs, rows = [], []
    for p in pairs:
        for msgs, target in ((p.messages_0, p.target_0), (p.messages_1, p.target_1)):
            toks, span = target_rows(llm, msgs, target)
            seqs.append(toks)
            rows.append(list(range(*span)))
    n_tokens = sum(map(len, seqs))
    runs = {"plain": lambda: plain_llm.trace_many(seqs, rows, args.batch, record=False),
            "detect": lambda: llm.trace_many(seqs, rows, args.batch),
            "detect-cb": lambda: callback.trace_many(seqs, rows, args.batch)}
    for f in runs.values():  # warm-up
        f()
    rates = {k: [] for k in runs}
    order = list(runs)
    for rep in range(reps):
        order = order[1:] + order[:1]  # no configuration always first
        for k in order:
            rates[k].append(n_tokens / timed(runs[k]))
        print(f"rep {rep + 1}/{reps} done", file=sys.stderr)
    res = {"model": path.name, "pairs": args.pairs, "conversations": len(seqs), "tokens": n_tokens,
           "target_tokens": sum(map(len, rows)), "batch_tokens": args.batch, "machine": machine(),
           "rates": {k: summary(v) for k, v in rates.items()}}
    def per_rep(a: str, b: str) -> float:
        return float(statistics.median(x / y for x, y in zip(rates[a], rates[b])))

    res["ratio"] = per_rep("detect", "plain")
    res["ratio_callback"] = per_rep("detect-cb", "plain")
    print(f"model {path.name}; {len(seqs)} conversations, {n_tokens} tokens ({res['target_tokens']} traced), "
          f"{reps} reps; {res['machine']['cpu']} x{res['machine']['cores']}")
    for k, s in res["rates"].items():
        print(f"{k:7s} {s['median']:10.1f} tok/s [{s['min']:.1f}-{s['max']:.1f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"ratio: detection/plain prefill {res['ratio']:.3f} (eval-callback recorder: {res['ratio_callback']:.3f})")


if __name__ == "__main__":
    main()
