"""Pruning by measured use against random pruning (issue 35), and what recording saliency costs.

    python benchmarks/prune.py [--json OUT] [--quick] [--threads N] [harness options]

1. For the bundled models (demo, natural, bilingual; calibration: each one's own pair data,
   held-out: its neutral text) and the benchmark model (benchmarks/common.py; calibration: the
   first half of the neutral text, held-out: the second half), at keep fractions 0.75 and 0.5:
   KL(source || prune) and perplexity on the held-out text for REAP, frequency and 5 seeded
   random prunes of the same size (`steer-gguf prune --sweep`'s own code).
2. The cost of recording saliency (experts, weights and expert output norms, steer.h API 5)
   against plain prefill of the same windows, on the benchmark model, interleaved rounds by
   benchmarks/harness.py (target: saliency/plain prefill rate >= 0.90), as `prune` records it by
   default (the last layer 1 token in 4 on the 8-layer model, every token on the 48-layer one),
   and, where that samples, with every token of the last layer beside it.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import harness
from common import QUICK_SHAPE, machine, synthetic_model, thread_kwargs
from harness import Target

KEEPS = (0.75, 0.5)


def sweep(path, calibration: str | None, heldout: str, threads: dict, text_split: str | None = None) -> dict:
    from steer_gguf import SteeredLlama
    from steer_gguf.bake import prune as pr

    llm = SteeredLlama(str(path), n_ctx=512, **threads)
    try:
        if calibration is None:  # the first half of the text calibrates, the second is held out
            half = len(text_split) // 2
            toks = llm.tokenize(text_split[:half].encode(), add_bos=True, special=False)
            windows = [toks[i:i + 256] for i in range(0, len(toks), 256)]
            held, held_name, calib = text_split[half:], "the second half of the neutral text", "its first half"
        else:
            from steer_gguf.detect.datasets import load_prompts

            windows = pr.calibration_windows(llm, calibration, load_prompts(calibration))
            held, held_name, calib = heldout, "the neutral text", calibration
        keeps = sorted({pr.n_keep(llm.info, f, None) for f in KEEPS}, reverse=True)
        rep, _ = pr.run_prune(llm, calib, windows, held, held_name, keeps, "reap")
    finally:
        llm.close()
    print(rep.table(), flush=True)
    out = rep.to_dict()
    out["verdicts"] = {}
    for k in keeps:
        reap = next(p.kl for p in rep.points if p.criterion == "reap" and p.keep == k)
        rnd = rep.random_mean(k)[0]
        out["verdicts"][str(k)] = {"reap_kl": reap, "random_mean_kl": rnd, "reap_not_worse": bool(reap <= rnd)}
    return out


def saliency_cost(path, threads: dict, args) -> dict:
    from steer_gguf import SteeredLlama
    from steer_gguf.bake import prune as pr
    from steer_gguf.engine.saliency import expert_usage

    llm = SteeredLlama(str(path), n_ctx=512, n_batch=256, n_ubatch=256, **threads)
    rng = np.random.default_rng(1)
    win = [int(t) for t in rng.integers(0, 256, 256)]

    def plain():
        with llm.lock:
            tc = llm._trace_context(256)
            tc.run([win], [[len(win) - 1]], record=False)  # upstream graph: prefill, one output
        return {"prefill": len(win)}

    def timed(fn):
        import time

        t0 = time.perf_counter()
        n = fn()
        return {"prefill": n / (time.perf_counter() - t0)}

    # the last layer's stride `prune` takes by default on a calibration set of any real size (its
    # cap of 10 tokens per expert does not bind); where it samples, every token is timed beside it
    stride = pr.last_layer_stride(llm.info, 1 << 40)
    configs = {"plain": lambda: timed(lambda: plain()["prefill"]),
               "saliency": lambda: timed(lambda: expert_usage(llm, [win], last_stride=stride).tokens)}
    figs = [harness.Figure("saliency/plain prefill", "prefill", "saliency", "plain", Target(low=0.90))]
    if stride > 1:
        configs["saliency-every-token"] = lambda: timed(lambda: expert_usage(llm, [win]).tokens)
        figs.append(harness.Figure("saliency (last layer: every token)/plain prefill", "prefill",
                                   "saliency-every-token", "plain", None, watch=False))
    try:
        res = harness.run_from_args(args, configs, figs)
    finally:
        llm.close()
    for name, r in res["figures"].items():
        print(harness.format_figure(name, r), flush=True)
    res["last_layer_stride"] = stride
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="a smaller benchmark model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-cost", action="store_true", help="only the sweeps")
    ap.add_argument("--skip-sweeps", action="store_true", help="only the saliency cost")
    ap.add_argument("--cost-model", choices=("benchmark", "qwen3-30b"), default="benchmark",
                    help="the model the saliency cost is timed on: the benchmark model (8 MoE layers), or one "
                         "shaped like Qwen3-30B-A3B's MoE stack (48 layers x 128 experts, tiny width)")
    harness.add_arguments(ap)
    args = ap.parse_args()
    from steer_gguf.evaluation.measure import NEUTRAL_TEXT
    from steer_gguf.fileio import DATA_DIR

    threads = thread_kwargs(args.threads)
    neutral = NEUTRAL_TEXT.read_text(encoding="utf-8")
    data = DATA_DIR
    bench = synthetic_model(**(QUICK_SHAPE if args.quick else {}))
    out = {"machine": machine(), "models": {}}
    for name, path, calib, held in (
            ("demo", data / "demo.gguf", "builtin:demo-numbers", neutral),
            ("natural", data / "natural.gguf", "builtin:digits-words", neutral),
            ("bilingual", data / "bilingual.gguf", "builtin:language",
             (data / "eval" / "bilingual-neutral.txt").read_text(encoding="utf-8")),
            ("benchmark", bench, None, None)):
        if args.skip_sweeps:
            break
        print(f"== {name}", flush=True)
        out["models"][name] = sweep(path, calib, held, threads, text_split=neutral)
    if not args.skip_cost:
        # the last layer is where saliency costs: plain prefill computes its experts for the
        # output row only, saliency for every token (1 / MoE layers of the expert work)
        from topk import QWEN3_30B_SHAPE

        model = bench if args.cost_model == "benchmark" else synthetic_model(**QWEN3_30B_SHAPE)
        out["saliency_cost"] = saliency_cost(model, threads, args)
        out["saliency_cost"]["model"] = args.cost_model
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
