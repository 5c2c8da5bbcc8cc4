"""Steering and tracing overhead, side by side in one process.

    python benchmarks/overhead.py [--quick] [--json OUT]

Configurations, interleaved over the repetitions so drift hits all alike:
  plain   no profile (upstream graph)
  graph   a profile steering ~10% of the experts of every MoE layer, graph engine
  noop    the steering op in every MoE layer with routing left exactly as upstream's (a 1e-30
          bias, lost to rounding): the op's own cost, free of the speed-up that steering
          gets from routing more tokens to the same (cache-warm) experts
  hook    the same profile through the eval-callback hook engine
  trace   prefill with every token traced (detection mode; prefill only): the graph's own
          routing outputs (steer.h API version 3)
Tracing by part, all on the tracing context that trace/trace_many/detection use (prefill only):
  tc-plain     one output row per sequence, no recorder: the reference of the parts
  tc-outputs   every token an output row (so the last layer computes it, and its logits), no
               recorder: what asking for every row costs
  trace-cb     every token traced through the eval-callback recorder (the oracle, and the
               recorder before API version 3): a graph split and a synchronization per layer
  engine       decode through the batch engine (one sequence, greedy, a 32-token prompt
               included), as the server runs it
  engine-trace the same with steer_trace on: every decode's routing kept as graph outputs
--tracing-only runs plain and the tracing configurations alone.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from common import QUICK_SHAPE, bench_profiles, machine, summary, synthetic_model, thread_kwargs, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model and fewer repetitions (smoke run)")
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--tracing-only", action="store_true", help="only plain prefill and the tracing configurations")
    args = ap.parse_args()

    from steer_gguf import SteeredLlama, model_info

    if args.quick:
        path = synthetic_model(**QUICK_SHAPE)
        reps = args.reps or 2
    else:
        path = synthetic_model()
        reps = args.reps or 5
    info = model_info(path)
    threads = thread_kwargs(args.threads)
    kw = dict(n_ctx=args.prompt_tokens + args.decode_tokens + 16, n_batch=args.prompt_tokens,
              n_ubatch=args.prompt_tokens, n_gpu_layers=args.n_gpu_layers, **threads)

    profile, noop = bench_profiles(info)
    n_steer = len(profile.experts) // len(info.moe_layers)

    graph = SteeredLlama(path, **kw)
    hook = SteeredLlama(path, engine="hook", profile=profile, **kw)
    # one model per tracing configuration, so that none switches its tracing context's recorder
    # (a graph rebuild) between repetitions
    traced = SteeredLlama(path, **kw)
    callback = SteeredLlama(path, recorder="callback", **kw)
    rng_tokens = np.random.default_rng(1)
    prompt = [int(t) for t in rng_tokens.integers(0, 256, args.prompt_tokens)]
    decode = [int(t) for t in rng_tokens.integers(0, 256, args.decode_tokens)]

    import llama_cpp

    # GPU backends compute asynchronously: without waiting for the device, a timed prefill
    # would end at submission and its work would be billed to whatever ran next
    def prefill(llm):
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm.eval(prompt)
        llama_cpp.llama_synchronize(llm._ctx.ctx)

    def tc_prefill(all_outputs: bool):
        # the tracing context as trace_many drives it, recorder off: one output row, or all
        tc = graph._trace_context(len(prompt))
        if tc.rec.recording:
            tc.rec.off()
        b = tc.batch
        for i, t in enumerate(prompt):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, all_outputs or i == len(prompt) - 1
            b.seq_id[i][0] = 0
        b.n_tokens = len(prompt)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(tc.ctx.ctx), True)
        if llama_cpp.llama_decode(tc.ctx.ctx, b) != 0:
            raise SystemExit("llama_decode failed")
        llama_cpp.llama_synchronize(tc.ctx.ctx)

    from steer_gguf.engine.batch import BatchEngine, Request, SamplerSpec

    eng = BatchEngine(graph, 1, len(prompt) + args.decode_tokens + 8)

    def engine_decode(trace: bool) -> float:
        # generated tokens per second of one request, its 32-token prompt included
        req = Request(prompt[:32], max_tokens=args.decode_tokens, sampling=SamplerSpec(temperature=0), trace=trace)
        pending = [(0, req)]
        out = []
        dt = timed(lambda: eng.run(lambda idle: pending.pop(0) if pending else None, lambda k, r: out.append(r)))
        r = out[0]
        if isinstance(r, Exception):
            raise r
        if trace:
            assert r.experts is not None and r.experts.shape[0] == len(r.tokens)
        return len(r.tokens) / dt

    def decode_run(llm):
        for t in decode:  # one token per decode, as in generation
            llm.eval([t])
        llama_cpp.llama_synchronize(llm._ctx.ctx)

    configs = {
        "plain": (graph, None),
        "graph": (graph, profile),
        "noop": (graph, noop),
        "hook": (hook, profile),
        "trace": (traced, None),
        "tc-plain": (graph, None),
        "tc-outputs": (graph, None),
        "trace-cb": (callback, None),
        "engine": (graph, None),
        "engine-trace": (graph, None),
    }
    if args.tracing_only:
        configs = {c: v for c, v in configs.items() if c not in ("graph", "noop", "hook")}
    rates: dict[str, dict[str, list[float]]] = {c: {"prefill": [], "decode": []} for c in configs}
    for llm in (graph, hook):  # warm-up: page in weights, build graphs
        prefill(llm)
        decode_run(llm)
    for llm in (traced, callback):
        llm.trace_many([prompt], batch_tokens=len(prompt))
    tc_prefill(True)
    order = list(configs)
    for rep in range(reps):
        # a different order each repetition, so no configuration always runs first or last
        order = order[1:] + order[:1]
        for name in order:
            llm, prof = configs[name]
            if llm is graph and name in ("plain", "graph", "noop"):
                llm.set_profile(prof)
            if name in ("trace", "trace-cb"):
                # the detection path: batched tracing context, recorder on, every token traced
                dt = timed(lambda: llm.trace_many([prompt], batch_tokens=len(prompt)))
                rates[name]["prefill"].append(len(prompt) / dt)
                continue
            if name.startswith("engine"):
                rates[name]["decode"].append(engine_decode(name == "engine-trace"))
                continue
            if name.startswith("tc-"):
                rates[name]["prefill"].append(len(prompt) / timed(lambda: tc_prefill(name == "tc-outputs")))
                continue
            rates[name]["prefill"].append(len(prompt) / timed(lambda: prefill(llm)))
            rates[name]["decode"].append(len(decode) / timed(lambda: decode_run(llm)))
        print(f"rep {rep + 1}/{reps} done", file=sys.stderr)
    graph.set_profile(None)

    result = {
        "model": {"path": str(path.name), "architecture": info.architecture, "n_layer": info.n_layer,
                  "n_embd": info.n_embd, "n_expert": info.n_expert, "n_expert_used": info.n_expert_used,
                  "quant": path.stem.rsplit("-", 1)[-1], "steered_experts_per_layer": n_steer},
        "machine": machine(),
        "settings": {"prompt_tokens": len(prompt), "decode_tokens": len(decode), "reps": reps,
                     "n_gpu_layers": args.n_gpu_layers, "threads": args.threads},
        "rates": {c: {k: summary(v) for k, v in d.items() if v} for c, d in rates.items()},
    }
    # ratios of rates measured in the same repetition, then their median: drift in the
    # machine's speed between repetitions cancels out
    def ratio(a: str, b: str, phase: str) -> float:
        return float(np.median(np.array(rates[a][phase]) / np.array(rates[b][phase])))

    ratios = {}
    if not args.tracing_only:
        ratios.update({
            "graph/plain prefill": ratio("graph", "plain", "prefill"),
            "graph/plain decode": ratio("graph", "plain", "decode"),
            "noop/plain prefill": ratio("noop", "plain", "prefill"),
            "noop/plain decode": ratio("noop", "plain", "decode"),
            "hook/plain prefill": ratio("hook", "plain", "prefill"),
            "hook/plain decode": ratio("hook", "plain", "decode"),
        })
    ratios.update({
        "trace/plain prefill": ratio("trace", "plain", "prefill"),
        # the parts, on the tracing context: rows as outputs, then the recorder on top of them
        "tc-plain/plain prefill": ratio("tc-plain", "plain", "prefill"),
        "trace/tc-plain prefill": ratio("trace", "tc-plain", "prefill"),
        "tc-outputs/tc-plain prefill": ratio("tc-outputs", "tc-plain", "prefill"),
        "trace/tc-outputs prefill": ratio("trace", "tc-outputs", "prefill"),
        "trace-cb/tc-outputs prefill": ratio("trace-cb", "tc-outputs", "prefill"),
        "trace-cb/plain prefill": ratio("trace-cb", "plain", "prefill"),
        "engine-trace/engine decode": ratio("engine-trace", "engine", "decode"),
    })
    result["ratios"] = ratios

    m = result["model"]
    print(f"model: {m['path']} ({m['n_layer']} layers, d={m['n_embd']}, {m['n_expert']} experts, k={m['n_expert_used']}, "
          f"{m['quant']}); {len(prompt)}-token prefill, {len(decode)}-token decode, {reps} reps; "
          f"{result['machine']['cpu']} x{result['machine']['cores']}")
    print(f"{'config':8s} {'prefill tok/s (median [min-max])':>36s} {'decode tok/s (median [min-max])':>36s}")
    for c, d in result["rates"].items():
        cells = []
        for k in ("prefill", "decode"):
            s = d.get(k)
            cells.append(f"{s['median']:10.1f} [{s['min']:.1f}-{s['max']:.1f}]" if s else "-")
        print(f"{c:8s} {cells[0]:>36s} {cells[1]:>36s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
