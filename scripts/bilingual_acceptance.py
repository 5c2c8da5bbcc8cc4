#!/usr/bin/env python3
"""Issue 31's acceptance on the bilingual model: does expert steering move the reply's language?

    python scripts/bilingual_acceptance.py [--model steer_gguf/data/bilingual.gguf] [--json OUT]

Three targets, each measured with steer-gguf's eval harness on held-out prompts (disjoint from the
detection pairs), 5 random-expert controls per profile, T = 0.7, 2 samples per prompt, exact
McNemar against unsteered, KL on the built-in bilingual neutral text:
  - english-on-ru: reply in English to Russian prompts (builtin:language, group "ru", 96 answers);
  - russian-on-en: reply in Russian to English prompts (builtin:language, group "en", 96 answers);
  - less-drift: stay in English on English prompts (builtin:drift, 128 answers).
Profiles: N activated + N deactivated experts from risk-difference, causal and causal-greedy tables
on the same pairs, N at the sizes `tune` sweeps (1, 2, 4, ... k x MoE layers).

The bar, fixed before any run (issue 31): `detect --pairs builtin:language` says "strong signal";
in at least two of the three targets one profile beats its controls' mean shift by >= 15 points
with p < 0.01, at a KL no larger than its controls' mean. The numbers are written whatever they are.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from natural_acceptance import GOAL_P, GOAL_POINTS, profile_rows, sized_profiles, tables  # noqa: E402

# target -> (behavior, eval group or None for the whole set, label steered toward)
TARGETS = {
    "english-on-ru": ("language", "ru", "english"),
    "russian-on-en": ("language", "en", "russian"),
    "less-drift": ("drift", None, "english"),
}
SHOW = 3  # answers kept per profile in the report: what forcing does to the text


def detect_verdict(model: str, log) -> dict:
    """The acceptance's first line, run as a user runs it: the CLI's last line and verdict."""
    cmd = [sys.executable, "-m", "steer_gguf", "detect", model, "--pairs", "builtin:language",
           "-o", str(ROOT / "build" / "bilingual-acceptance" / "cli-language.csv")]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = r.stdout.strip().splitlines()  # the verdict is stdout's last line (progress goes to stderr)
    log(f"detect CLI: rc {r.returncode}, {time.perf_counter() - t0:.0f} s: {out[-1] if out else ''}")
    return {"command": "steer-gguf detect bilingual.gguf --pairs builtin:language", "rc": r.returncode,
            "last_line": out[-1] if out else "", "strong": bool(out) and "strong signal" in out[-1]}


def write(result: dict, path: str, t_start: float, complete: bool) -> None:
    met = [t for t, r in result["targets"].items() if r["met_by"]]
    result["targets_meeting_goal"] = met
    result["goal_met"] = bool(result["detect_cli"]["strong"]) and len(met) >= 2
    result["complete"] = complete
    result["seconds"] = round(time.perf_counter() - t_start)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "steer_gguf" / "data" / "bilingual.gguf"))
    ap.add_argument("--pairs", type=int, default=64, help="pairs per behavior for detection (causal is the slow part)")
    ap.add_argument("--drift-pairs", type=int, default=None, help="pairs for the drift behavior  [default: --pairs]")
    ap.add_argument("--sizes", default=None, help="profile sizes N (default: the sizes tune sweeps)")
    ap.add_argument("--controls", type=int, default=5)
    ap.add_argument("--greedy-pool", type=int, default=24)
    ap.add_argument("--cache", default=str(ROOT / "build" / "bilingual-acceptance"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "bilingual-acceptance.json"))
    args = ap.parse_args(argv)

    from steer_gguf.detect.confidence import tune_sizes
    from steer_gguf.engine.steered import SteeredLlama
    from steer_gguf.evaluation.evalsets import load_eval_set
    from steer_gguf.evaluation.judges import behavior as judged
    from steer_gguf.errors import SteerError
    from steer_gguf.evaluation.measure import Sampling, evaluate, random_control

    cache = pathlib.Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    n_pairs = {"language": args.pairs, "drift": args.drift_pairs or args.pairs}
    result = {"model": os.path.basename(args.model), "pairs": n_pairs, "controls": args.controls,
              "goal": f"detect says strong signal; in >= 2 of 3 targets a profile's shift - its controls' mean "
                      f">= {GOAL_POINTS:.0f} points, p < {GOAL_P}, KL <= controls' mean",
              "detect_cli": detect_verdict(args.model, log), "targets": {}, "detection": {}}
    threads = {} if args.threads is None else {"n_threads": args.threads, "n_threads_batch": args.threads}
    llm = SteeredLlama(args.model, n_ctx=512, **threads)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else tune_sizes(llm.info.n_expert_used,
                                                                                  len(llm.info.moe_layers))
    result["sizes"] = sizes
    tabs_by = {}
    for name in ("language", "drift"):
        tabs, info = tables(llm, name, n_pairs[name], max(sizes), args.greedy_pool, cache, log,
                            pairs_spec=f"builtin:{name}")
        tabs_by[name] = tabs
        rd = tabs["risk_diff"]
        result["detection"][name] = {
            "verdict": (rd.meta.get("trust") or {}).get("verdict"), "max_abs_risk_diff": round(float(abs(rd.risk_diff).max()), 3),
            "risk_diff_concentration": rd.concentration(), "causal_concentration": tabs["causal"].concentration(),
            "per_layer": [{"layer": la, "max_abs_risk_diff": round(mx, 3), "mean_abs_risk_diff": round(mn, 3)}
                          for la, mx, mn in rd.by_layer()], "causal": info}
        log(f"{name}: verdict {result['detection'][name]['verdict']}; per layer max |rd|: "
            + " ".join(f"{r['max_abs_risk_diff']:.2f}" for r in result["detection"][name]["per_layer"]))
    for target, (bname, group, toward) in TARGETS.items():
        b = judged(bname)
        reverse = toward == b.labels[1]
        profiles, missing = sized_profiles(llm.info, tabs_by[bname], sizes, reverse, toward,
                                           f"{target}-{{method}}-{{n}}", log)
        # a profile that touches more than half of a layer's experts has no random control of its
        # shape: it cannot be judged against controls, so it is listed with why, not evaluated
        kept = []
        for p in profiles:
            try:
                random_control(p, llm.info, 0)
                kept.append(p)
            except SteerError as e:
                missing.append({"profile": p.name, "why": str(e)})
                log(f"{p.name}: not evaluated: {e}")
        profiles = kept
        es = load_eval_set(b.eval_set).subset(group)
        t0 = time.perf_counter()
        rep = evaluate(llm, es, b, profiles, controls=args.controls, sampling=Sampling(2, 0.7, max_tokens=64),
                       toward=toward, parallel=args.parallel)
        secs = time.perf_counter() - t0
        log(f"{target}: eval of {len(rep.conditions)} conditions in {secs:.0f} s")
        print(rep.table(), flush=True)
        g = rep.primary
        rows = profile_rows(rep, profiles, g)
        for row in rows:
            row["answers"] = [o.text for o in rep.outcomes if o.condition == row["profile"]][:SHOW]
        base = rep.condition("unsteered").groups[g]
        result["targets"][target] = {
            "behavior": bname, "group": group, "toward": toward, "n_answers": base.n, "unsteered": base.counts,
            "unsteered_answers": [o.text for o in rep.outcomes if o.condition == "unsteered"][:SHOW],
            "eval_seconds": round(secs), "profiles": rows, "not_made": missing,
            "best": max(rows, key=lambda r: r["beyond_controls"])["profile"] if rows else None,
            "met_by": [r["profile"] for r in rows if r["meets_goal"]]}
        # written after every target, so a long run that is stopped keeps what it measured
        write(result, args.json, t_start, complete=target == list(TARGETS)[-1])
    llm.close()
    met = result["targets_meeting_goal"]
    for target, r in result["targets"].items():
        print(f"== {target}: unsteered {r['unsteered']}")
        for row in r["profiles"]:
            print(f"{row['profile']:34s} effect {row['effect']:+5.0f}  controls {row['controls_effect_mean']:+5.1f}  "
                  f"beyond {row['beyond_controls']:+5.1f}  p {row['p']:.1e}  KL {row['kl']:.3f} "
                  f"(controls {row['controls_kl_mean']:.3f})  {'GOAL' if row['meets_goal'] else ''}")
    print(f"detect: {result['detect_cli']['last_line']}")
    print(f"goal met: {result['goal_met']} (targets meeting it: {met or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
