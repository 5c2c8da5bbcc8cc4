"""Detection throughput against plain prefill of the same tokens, in one process.

    python benchmarks/detect_throughput.py [--quick] [--pairs builtin:safety] [--json OUT]

Both sides prefill the same conversations in the same batches, each on a tracing context of
its own model (so neither switches its recorder, a graph rebuild, between repetitions):
detection records routing as graph outputs with the target spans as routed rows (through the
last layer, without logits), plain prefill asks for one output per conversation. Also the
eval-callback recorder (the oracle; detection before steer.h API 3), with the spans as outputs.
Timed by benchmarks/harness.py: the three interleaved in a shuffled order each round, rounds
added until detection/plain's bootstrap 95% interval is --target-width wide (at least 20), the
ratios medians of per-round ratios, the load of other processes recorded.
"""
from __future__ import annotations

import argparse

import harness
from common import QUICK_SHAPE, machine, summary, synthetic_model, thread_kwargs, timed
from harness import Figure, Target

FIGURES = [Figure("detect/plain prefill", "prefill", "detect", "plain", Target(low=0.95)),
           Figure("detect-cb/plain prefill", "prefill", "detect-cb", "plain", watch=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", default="builtin:safety")
    ap.add_argument("--max-pairs", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    harness.add_arguments(ap)
    args = ap.parse_args()

    from steer_gguf import SteeredLlama
    from steer_gguf.detect.datasets import load_pairs
    from steer_gguf.detect.risk import target_rows

    if args.quick:
        path = synthetic_model(**QUICK_SHAPE)
        max_pairs = args.max_pairs or 24
    else:
        path = synthetic_model()
        max_pairs = args.max_pairs or 64
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
    run = harness.run_from_args(args, {k: (lambda f=f: {"prefill": n_tokens / timed(f)}) for k, f in runs.items()},
                                FIGURES)
    res = {"model": path.name, "pairs": args.pairs, "conversations": len(seqs), "tokens": n_tokens,
           "target_tokens": sum(map(len, rows)), "batch_tokens": args.batch, "machine": machine(),
           "settings": run["settings"], "rounds": run["rounds"], "stopped_by": run["stopped_by"],
           "load": run["load"], "rates": {k: summary(v["prefill"]) for k, v in run["rates"].items()},
           "figures": run["figures"]}
    # the old keys, for readers of earlier results: the medians alone
    res["ratio"] = run["figures"]["detect/plain prefill"]["ratio"]
    res["ratio_callback"] = run["figures"]["detect-cb/plain prefill"]["ratio"]
    print(f"model {path.name}; {len(seqs)} conversations, {n_tokens} tokens ({res['target_tokens']} traced), "
          f"{run['rounds']} rounds; {res['machine']['cpu']} x{res['machine']['cores']}")
    for k, s in res["rates"].items():
        print(f"{k:7s} {s['median']:10.1f} tok/s [{s['min']:.1f}-{s['max']:.1f}]")
    harness.finish(res, run["figures"], args.json)


if __name__ == "__main__":
    main()
