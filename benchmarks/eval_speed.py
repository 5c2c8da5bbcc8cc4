"""Wall time of `steer-gguf eval` per 100 prompts per condition, on the synthetic model.

    python benchmarks/eval_speed.py [--quick] [--prompts 20] [--max-tokens 32] [--parallel 1,4,8] [--json OUT]

The generation of evaluate(): unsteered, the benchmark's 10% profile and one random control,
over held-out prompts of builtin:digits-words, one sample each, once per --parallel value
(conversations decoded together), in one process; then the KL pass. A random-weight model
never stops early, so every answer costs exactly --max-tokens decodes: the figure is an upper
bound for a model that answers briefly. Settings are interleaved over --reps repetitions;
medians are reported. Batches of different shapes run different kernels, so a random model's
near-flat distributions can pick other tokens than one-at-a-time decoding: "same answers"
counts how many match the first setting's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from common import QUICK_SHAPE, bench_profiles, machine, synthetic_model, thread_kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parallel", default="1,4,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()

    from steer_gguf import Sampling, SteeredLlama, behavior, load_eval_set
    from steer_gguf.evaluation.measure import NEUTRAL_TEXT, conditions_for, quality, quality_windows, run_outcomes

    path = (synthetic_model(**QUICK_SHAPE) if args.quick
            else synthetic_model())
    threads = thread_kwargs(args.threads)
    llm = SteeredLlama(path, n_ctx=512, **threads)
    b = behavior("digits-words")
    es = load_eval_set(b.eval_set, max_items=args.prompts)
    profile, _ = bench_profiles(llm.info)
    conds = conditions_for([profile], llm.info, b.labels, controls=1)
    sampling = Sampling(samples=1, temperature=0.7, max_tokens=args.max_tokens)
    pars = [int(x) for x in args.parallel.split(",")]
    times: dict[int, list[float]] = {p: [] for p in pars}
    answers = {}
    for _ in range(args.reps):  # interleaved, so a busy moment hits every setting alike
        for par in pars:
            t0 = time.perf_counter()
            outcomes = run_outcomes(llm, es.items, conds, b.judge_rule, sampling, parallel=par)
            times[par].append((time.perf_counter() - t0) / len(conds) / len(es) * 100)
            answers[par] = [o.text for o in outcomes]
    per100 = {p: statistics.median(t) for p, t in times.items()}
    windows = quality_windows(llm, NEUTRAL_TEXT.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    quality(llm, windows, conds)
    t_kl = time.perf_counter() - t0
    first = next(iter(answers.values()))
    res = {"model": path.name, "prompts": len(es), "conditions": len(conds), "answers": len(first),
           "max_tokens": args.max_tokens, "seconds_per_100_prompts_per_condition": per100, "all": times,
           "same_answers_as_first": {p: sum(a == b for a, b in zip(first, x)) for p, x in answers.items()},
           "kl_s": t_kl, "kl_positions": sum(len(w) - 1 for w in windows), "machine": machine()}
    print(f"model {path.name}; {len(es)} prompts x {len(conds)} conditions x 1 sample, {args.max_tokens} tokens each; "
          f"{res['machine']['cpu']} x{res['machine']['cores']}")
    base = next(iter(per100.values()))
    for par, sec in per100.items():
        print(f"parallel {par}: {sec:.1f} s per 100 prompts per condition "
              f"({len(first) * args.max_tokens / (sec * len(conds) * len(es) / 100):.0f} generated tok/s), "
              f"x{base / sec:.2f}; same answers {res['same_answers_as_first'][par]}/{len(first)}")
    print(f"KL pass: {t_kl:.1f} s for {len(conds)} conditions x {res['kl_positions']} positions")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
