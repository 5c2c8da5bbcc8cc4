"""Can detection be trusted? The figures of docs/detection.md (issue 25).

    python benchmarks/trust.py [--json OUT] [--plot OUT.png] [--threads N]

For the two bundled models (demo.gguf, trained to tie styles to experts; natural.gguf, not)
and both of their pair sets: the verdict, the permutation null, split-half stability and the
interval widths, at F32 and at Q8_0 / Q4_K_M made here by llama.cpp's own quantizer (nothing
quantized is committed); the agreement of the quantized tables with F32 (`detect compare`);
the time of prefill and of the trust computation apart; and the coverage of the bootstrap
intervals on simulated tables with a planted effect (as tests/test_confidence.py, more
replicates), against token-level resampling, the wrong unit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from common import ROOT, machine, thread_kwargs

QUANTS = ("Q8_0", "Q4_K_M")
PAIR_SETS = ("demo-numbers", "demo-restricted")


def quantize(src: str, out: str, quant: str) -> dict:
    import steer_gguf  # noqa: F401  (points llama_cpp at the patched library)
    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = 1
    if llama_cpp.llama_model_quantize(src.encode(), out.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize {quant} failed")
    # tensors too narrow for a K-quant fall back to another type: record what the file holds
    types: dict[str, int] = {}
    for t in gguf.GGUFReader(out).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return types


def detect_one(model: str, pairs: str, threads: int | None, out_csv: str) -> dict:
    from steer_gguf.detect.confidence import assess
    from steer_gguf.detect.datasets import load_pairs
    from steer_gguf.detect.risk import DetectionTable, pair_counts
    from steer_gguf.engine.steered import SteeredLlama

    llm = SteeredLlama(model, n_ctx=2048, verbose=False, **thread_kwargs(threads))
    t0 = time.perf_counter()
    pc, meta = pair_counts(llm, load_pairs(f"builtin:{pairs}"))
    t1 = time.perf_counter()
    trust = assess(pc, llm.info.n_expert_used)
    t2 = time.perf_counter()
    c1, c2, n1, n2 = pc.totals()
    table = DetectionTable.from_counts(c1, c2, n1, n2, pc.layers, dict(meta, trust=trust.to_meta()),
                                       intervals=trust.intervals)
    table.to_csv(out_csv)
    top = min(8, len(table))
    return {"pairs": pc.n_pairs, "prefill_s": round(t1 - t0, 3), "trust_s": round(t2 - t1, 3),
            "verdict": trust.verdict, "level": trust.level, "max_abs_risk_diff": round(trust.max_abs, 4),
            "beyond_null": trust.null.beyond, "null_p": trust.null.p,
            "null_q99_per_layer": [round(float(x), 4) for x in trust.null.threshold],
            "observed_max_per_layer": [round(float(x), 4) for x in trust.null.observed_max],
            "split_half": trust.stability.overlap,
            "top8_median_interval_width": round(float(np.median(table.rd_hi[:top] - table.rd_lo[:top])), 4),
            "crossing_zero_in_top16": int(((table.rd_lo[:16] <= 0) & (table.rd_hi[:16] >= 0)).sum())}


def coverage(reps: int = 400) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_confidence import DELTA, simulate, token_level_intervals

    from steer_gguf.detect.confidence import risk_diff_intervals

    rng = np.random.default_rng(11)
    pairs = tokens = total = 0
    t0 = time.perf_counter()
    for rep in range(reps):
        pc = simulate(rng)
        iv = risk_diff_intervals(pc, 1000, seed=rep)
        pairs += int(((iv.lo <= DELTA) & (DELTA <= iv.hi)).sum())
        lo, hi = token_level_intervals(pc, 1000, rng)
        tokens += int(((lo <= DELTA) & (DELTA <= hi)).sum())
        total += DELTA.size
    return {"tables": reps, "intervals": total, "pairs_per_table": 100, "resamples": 1000,
            "coverage_pairs": round(pairs / total, 4), "coverage_token_level": round(tokens / total, 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def cost_at_scale(n_pairs: int = 400, n_layers: int = 48, n_expert: int = 128, k: int = 8) -> dict:
    """The trust computation at defaults on counts of a Qwen3-30B-A3B-sized table (48 MoE
    layers x 128 experts, k = 8; random counts: only the shape matters for the time)."""
    from steer_gguf.detect.confidence import PairCounts, assess

    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 200, size=(n_pairs, 2))
    counts = rng.binomial(tokens[:, :, None, None], k / n_expert, size=(n_pairs, 2, n_layers, n_expert))
    pc = PairCounts(counts.astype(np.int32), tokens, list(range(n_layers)))
    t0 = time.perf_counter()
    trust = assess(pc, k)
    return {"pairs": n_pairs, "layers": n_layers, "experts": n_expert, "k": k,
            "seconds": round(time.perf_counter() - t0, 2), "level_on_random_counts": trust.level}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "trust-cpu.json"))
    ap.add_argument("--plot", help="the F32 vs Q8_0 vs Q4_K_M scatter of every table (PNG)")
    args = ap.parse_args()

    from steer_gguf.detect.compare import compare
    from steer_gguf.detect.risk import DetectionTable
    from steer_gguf.fileio import DATA_DIR, atomic_write

    res: dict = {"machine": machine(), "models": {}, "agreement": []}
    comps = []
    with tempfile.TemporaryDirectory() as d:
        for model in ("demo", "natural"):
            src = str(DATA_DIR / f"{model}.gguf")
            files = {"F32": src}
            entry: dict = {"quant_tensor_types": {}, "tables": {}}
            for q in QUANTS:
                files[q] = os.path.join(d, f"{model}-{q}.gguf")
                entry["quant_tensor_types"][q] = quantize(src, files[q], q)
            for pairs in PAIR_SETS:
                csvs = {}
                for q, path in files.items():
                    csvs[q] = os.path.join(d, f"{model}-{pairs}-{q}.csv")
                    entry["tables"][f"{pairs} {q}"] = detect_one(path, pairs, args.threads, csvs[q])
                    print(f"{model} {pairs} {q}: {entry['tables'][f'{pairs} {q}']['verdict']}", flush=True)
                base = DetectionTable.from_csv(csvs["F32"])
                for q in QUANTS:
                    c = compare(base, DetectionTable.from_csv(csvs[q]), f"{model} {pairs} F32", q)
                    comps.append(c)
                    res["agreement"].append({"model": model, "pairs": pairs, "vs": q, "spearman": round(c.spearman, 4),
                                             "top_n_overlap": c.overlap, "both_significant": c.both_significant,
                                             "sign_agree": c.sign_agree, "only_one_significant": c.only_one_significant,
                                             "largest_disagreement": max((abs(x.a - x.b) for x in c.disagreements),
                                                                         default=0.0)})
                    print(f"  vs {q}: Spearman {c.spearman:+.3f}, overlap {c.overlap}", flush=True)
            res["models"][model] = entry
        if args.plot:
            from steer_gguf.front.plots import compare_plot

            compare_plot(comps, args.plot)
    res["coverage"] = coverage()
    print(f"coverage: {res['coverage']}")
    res["cost_at_scale"] = cost_at_scale()
    print(f"trust computation at scale: {res['cost_at_scale']}")
    atomic_write(args.json, json.dumps(res, indent=1) + "\n")
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
