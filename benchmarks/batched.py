"""Batched decode with per-sequence steering, side by side with llama.cpp's own batched decode.

    python benchmarks/batched.py [--quick] [--threads N] [--json OUT]

For N = 1, 2, 4, 8 concurrent sequences (each with its own prompt in its own KV sequence),
one llama.cpp context decodes one token per sequence per step. Timed by benchmarks/harness.py: every
(configuration, N) once per round in a shuffled order, rounds added until the watched ratios'
bootstrap 95% intervals are --target-width wide (at least 20), the load of other processes
recorded. Configurations:
  plain       no steering at all: llama.cpp's batched decode (the reference)
  mixed       sequences bound in turn to: none, a profile steering ~10% of the experts of
              every MoE layer, a second such profile; every graph carries the per-token
              table selection
  mixed-noop  the same slots and bindings, every profile "noop" (the steering op in every
              MoE layer, routing exactly upstream's): the per-sequence op's own cost
  one-by-one  the same sequences decoded one at a time (the speedup batching buys)
  engine      BatchEngine end to end (mixed profiles, greedy sampling, stop checks) in
              generated tokens/s, prompts included: what eval and the server get, Python included
"""
from __future__ import annotations

import argparse

import numpy as np

import harness
from common import QUICK_SHAPE, bench_profiles, machine, summary, synthetic_model, thread_kwargs, timed
from harness import Figure, Target


def figures(seq_counts: list[int]) -> list[Figure]:
    # the per-sequence op's own cost (mixed-noop) has the op's target, at most 1%
    return [f for n in seq_counts for f in (
        Figure(f"mixed/plain decode @{n}", "decode", f"mixed@{n}", f"plain@{n}", watch=False),
        Figure(f"mixed-noop/plain decode @{n}", "decode", f"mixed-noop@{n}", f"plain@{n}", Target(low=0.99)),
        Figure(f"plain/one-by-one decode @{n}", "decode", f"plain@{n}", f"one-by-one@{n}", watch=False))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model and fewer repetitions (smoke run)")
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument("--seqs", default="1,2,4,8")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=None, help="[default: 128, 32 with --quick]")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    harness.add_arguments(ap)
    args = ap.parse_args()

    from steer_gguf import Profile, SteeredLlama, model_info
    from steer_gguf.engine.batch import BatchEngine, Request, SamplerSpec
    from steer_gguf.engine.slots import ContextSlots
    from steer_gguf.engine.contexts import llama_cpp, secondary_context

    path = synthetic_model(**QUICK_SHAPE) if args.quick else synthetic_model()
    args.decode_tokens = args.decode_tokens or (32 if args.quick else 128)
    info = model_info(path)
    seq_counts = [int(x) for x in args.seqs.split(",")]
    n_max = max(seq_counts)
    per_seq = args.prompt_tokens + args.decode_tokens + 8
    llm = SteeredLlama(path, n_ctx=per_seq, n_gpu_layers=args.n_gpu_layers, **thread_kwargs(args.threads))
    profile, noop = bench_profiles(info)
    # a second steering profile: the same experts, actions swapped where the rule allows
    other = Profile(profile.model, [type(r)(r.layer, r.expert, "deactivate") for r in profile.experts],
                    name="bench-10pct-off")
    noop2 = Profile(noop.model, [], noop.bias, name="bench-noop-2")
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(0, 256, args.prompt_tokens)] for _ in range(n_max)]
    feeds = [[int(t) for t in rng.integers(0, 256, args.decode_tokens)] for _ in range(n_max)]

    ctx, ptr = secondary_context(llm, per_seq * n_max, n_max, "benchmark")
    mem = llama_cpp.llama_get_memory(ctx.ctx)
    batch = llama_cpp.llama_batch_init(per_seq * n_max, 0, 1)
    slots = ContextSlots(ptr, info)

    def fill(items):  # items: (seq, token, pos, logits)
        for i, (s, t, p, out) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, out
            batch.seq_id[i][0] = s
        batch.n_tokens = len(items)
        if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def prefill(seqs):
        llama_cpp.llama_memory_clear(mem, True)
        fill([(s, t, p, p == len(prompts[s]) - 1) for s in seqs for p, t in enumerate(prompts[s])])
        llama_cpp.llama_synchronize(ctx.ctx)

    def decode_together(seqs):
        for j in range(args.decode_tokens):
            fill([(s, feeds[s][j], args.prompt_tokens + j, True) for s in seqs])
        llama_cpp.llama_synchronize(ctx.ctx)

    def decode_one_by_one(seqs):
        for s in seqs:
            for j in range(args.decode_tokens):
                fill([(s, feeds[s][j], args.prompt_tokens + j, True)])
        llama_cpp.llama_synchronize(ctx.ctx)

    def configure(kind, n):
        slots.clear()
        if kind in ("plain", "one-by-one"):
            return
        cycle = [None, profile, other] if kind == "mixed" else [None, noop, noop2]
        for s in range(n):
            slots.bind(s, slots.acquire(cycle[s % 3]))
        if n == 1:  # one sequence: still carry the per-token selection, on a slot bound to nothing
            slots.acquire(cycle[1])

    def engine_rate(n):
        eng = BatchEngine(llm, n, per_seq)
        cycle = [None, profile, other]
        reqs = [(i, Request(prompts[i], cycle[i % 3], max_tokens=args.decode_tokens,
                            sampling=SamplerSpec(temperature=0))) for i in range(n)]
        made = []

        def done(_, r):
            made.append(len(r.tokens))

        try:
            t = timed(lambda: eng.run(lambda idle: reqs.pop(0) if reqs else None, done))
        finally:
            eng.close()
        return sum(made) / t

    kinds = ["plain", "mixed", "mixed-noop", "one-by-one"]

    def timed_decode(kind: str, n: int) -> dict[str, float]:
        seqs = list(range(n))
        configure(kind, n)
        prefill(seqs)
        run = decode_one_by_one if kind == "one-by-one" else decode_together
        rate = n * args.decode_tokens / timed(lambda: run(seqs))
        slots.clear()
        return {"decode": rate}

    configs = {f"{k}@{n}": (lambda k=k, n=n: timed_decode(k, n)) for n in seq_counts for k in kinds}
    configs.update({f"engine@{n}": (lambda n=n: {"decode": engine_rate(n)}) for n in seq_counts})
    run = harness.run_from_args(args, configs, figures(seq_counts))

    result = {"machine": machine(), "model": path.name, "threads": args.threads,
              "n_gpu_layers": args.n_gpu_layers, "prompt_tokens": args.prompt_tokens,
              "decode_tokens": args.decode_tokens, "settings": run["settings"], "rounds": run["rounds"],
              "stopped_by": run["stopped_by"], "load": run["load"], "figures": run["figures"], "by_seqs": {}}
    print(f"{run['rounds']} rounds (stopped by {run['stopped_by']})")
    print(f"{'seqs':>4} {'plain tok/s':>12} {'mixed/plain':>12} {'noop/plain':>11} {'batched/1-by-1':>15} "
          f"{'engine tok/s':>13}")
    for n in seq_counts:
        row = {k: summary(run["rates"][f"{k}@{n}"]["decode"]) for k in kinds + ["engine"]}
        # the old keys, for readers of earlier results: the medians alone
        fig = lambda name: run["figures"][f"{name} decode @{n}"]["ratio"]  # noqa: E731
        row["ratios"] = {"mixed/plain": fig("mixed/plain"), "mixed-noop/plain": fig("mixed-noop/plain"),
                         "plain/one-by-one": fig("plain/one-by-one")}
        result["by_seqs"][str(n)] = row
        print(f"{n:>4} {row['plain']['median']:>12.1f} {row['ratios']['mixed/plain']:>12.3f} "
              f"{row['ratios']['mixed-noop/plain']:>11.3f} {row['ratios']['plain/one-by-one']:>15.2f} "
              f"{row['engine']['median']:>13.1f}")
    llama_cpp.llama_batch_free(batch)
    ctx.close()
    llm.close()
    harness.finish(result, run["figures"], args.json)


if __name__ == "__main__":
    main()
