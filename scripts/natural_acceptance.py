#!/usr/bin/env python3
"""Issue 14's acceptance on the natural model: risk difference vs causal vs causal-greedy.

    python scripts/natural_acceptance.py [--model steer_gguf/data/natural.gguf] [--json OUT]

For both demo behaviors, detection runs on the same built-in pairs for every method
(the first --pairs of builtin:demo-<behavior>). For each direction (toward behavior 1, toward
behavior 2), each method and each size N, the profile activates N and deactivates N experts
(`profile make --activate N --deactivate N [--reverse]`); every profile is evaluated with
steer-gguf's eval harness on the held-out eval set (disjoint from the pairs) against
--controls random-expert controls of the same shape: 48 prompts x 2 samples at T=0.7, exact
McNemar against unsteered, KL on the neutral text.

The goal (fixed before running, not tuned): a causal profile whose shift toward its target
exceeds its controls' mean shift by >= 15 points with p < 0.01, at a KL no larger than its
controls' mean, in at least two of the four directions. The numbers are written whatever
they are.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEHAVIORS = ("numbers", "restricted")
GOAL_POINTS, GOAL_P = 15.0, 0.01


def tables(llm, behavior: str, n_pairs: int, steps: int, pool: int, cache: pathlib.Path, log,
           margin_tokens: int | None = None, pairs_spec: str | None = None) -> dict:
    """{method: DetectionTable} on the same pairs, cached as CSV (detection is the slow part)."""
    from steer_gguf.detect.causal import causal_detect
    from steer_gguf.detect.datasets import load_pairs
    from steer_gguf.detect.risk import DetectionTable, detect

    pairs = load_pairs(pairs_spec or f"builtin:demo-{behavior}", max_pairs=n_pairs)
    out = {}
    rd_path, g_path = cache / f"{behavior}-risk_diff.csv", cache / f"{behavior}-causal-greedy.csv"
    if not rd_path.exists():
        detect(llm, pairs).to_csv(rd_path)
    out["risk_diff"] = DetectionTable.from_csv(rd_path)
    info: dict = {}
    if not g_path.exists():
        t0 = time.perf_counter()
        def progress(done, total, what):
            if done == total:
                log(f"{behavior}: {what}: {total} margins measured ({time.perf_counter() - t0:.0f} s)")

        res = causal_detect(llm, pairs, greedy_steps=steps, greedy_pool=pool, margin_tokens=margin_tokens,
                            on_progress=progress)
        res.table.to_csv(g_path)
        info = {"seconds": time.perf_counter() - t0, "seconds_per_candidate": res.seconds_per_candidate,
                "margin_unsteered": res.baseline,
                "greedy": [vars(g) for g in res.greedy]}
        (cache / f"{behavior}-causal.json").write_text(json.dumps(info, indent=1) + "\n")
        log(f"{behavior}: causal detection {info['seconds']:.0f} s ({res.seconds_per_candidate:.2f} s per candidate)")
    else:
        info = json.loads((cache / f"{behavior}-causal.json").read_text())
    g = DetectionTable.from_csv(g_path)
    out["causal-greedy"] = g
    # the same measurements without the greedy columns: the plain causal table
    out["causal"] = DetectionTable(g.layer, g.expert, g.a1, g.d1, g.a2, g.d2, dict(g.meta),
                                   effect_on=g.effect_on, effect_off=g.effect_off)
    return out, info


def sized_profiles(info, tabs: dict, sizes: list[int], reverse: bool, toward: str, pattern: str,
                   log) -> tuple[list, list[dict]]:
    """N activated + N deactivated experts from each method's table, for each size N; a profile
    a table cannot give (too few experts of a sign) is listed with why."""
    from steer_gguf.errors import SteerError

    profiles, missing = [], []
    for method, t in tabs.items():
        for n in sizes:
            name = pattern.format(method=method, n=n)
            try:
                profiles.append(t.make_profile(info, activate=n, deactivate=n, reverse=reverse, name=name,
                                               provenance={"toward": toward}))
            except SteerError as e:
                missing.append({"profile": name, "why": str(e)})
                log(f"{name}: not made: {e}")
    return profiles, missing


def profile_rows(rep, profiles, group: str) -> list[dict]:
    """Each profile's shift toward its target in one group of an eval report, beside its
    random controls' (mean shift, mean KL), and whether it meets the goal."""
    rows = []
    for p in profiles:
        c = rep.condition(p.name)
        ctl = [x for x in rep.conditions if x.kind == "control" and x.of == p.name]
        ce = [x.groups[group].effect for x in ctl]
        ck = [x.kl for x in ctl]
        s = c.groups[group]
        row = {"profile": p.name, "method": p.provenance["method"], "toward": c.target,
               "n": p.count("activate"), "rate": s.target_rate, "effect": s.effect, "p": s.p,
               "unclassified": s.counts.get("unclassified", 0) / s.n, "counts": s.counts, "kl": c.kl,
               "controls_effect": ce, "controls_effect_mean": sum(ce) / len(ce),
               "controls_kl_mean": sum(ck) / len(ck)}
        row["beyond_controls"] = row["effect"] - row["controls_effect_mean"]
        row["meets_goal"] = bool(row["beyond_controls"] >= GOAL_POINTS and s.p < GOAL_P
                                 and row["kl"] <= row["controls_kl_mean"])
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "steer_gguf" / "data" / "natural.gguf"))
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--sizes", default="2,4,8")
    ap.add_argument("--controls", type=int, default=5)
    ap.add_argument("--greedy-pool", type=int, default=24)
    ap.add_argument("--cache", default=str(ROOT / "build" / "natural-acceptance"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--margin-tokens", type=int, default=None,
                    help="causal margin on the first K reply tokens only (default: the whole reply)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "natural-acceptance.json"))
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]

    from steer_gguf.evaluation.measure import Sampling, evaluate
    from steer_gguf.evaluation.evalsets import load_eval_set
    from steer_gguf.evaluation.judges import behavior as judged
    from steer_gguf.engine.steered import SteeredLlama

    cache = pathlib.Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    llm = SteeredLlama(args.model, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads)
    result = {"model": os.path.basename(args.model), "pairs": args.pairs, "sizes": sizes, "controls": args.controls,
              "greedy_steps": max(sizes), "greedy_pool": args.greedy_pool, "margin_tokens": args.margin_tokens,
              "goal": f"shift - controls' mean >= {GOAL_POINTS:.0f} points, p < {GOAL_P}, KL <= controls' mean",
              "behaviors": {}}
    for behavior in BEHAVIORS:
        b = judged(f"demo-{behavior}")
        tabs, info = tables(llm, behavior, args.pairs, max(sizes), args.greedy_pool, cache, log, args.margin_tokens)
        profiles, missing = [], []
        for reverse in (False, True):
            toward = b.labels[1 if reverse else 0]
            made, not_made = sized_profiles(llm.info, tabs, sizes, reverse, toward, f"{{method}}-{toward}-{{n}}", log)
            profiles += made
            missing += not_made
        t0 = time.perf_counter()
        rep = evaluate(llm, load_eval_set(b.eval_set), b, profiles, controls=args.controls,
                       sampling=Sampling(2, 0.7))
        log(f"{behavior}: eval of {len(rep.conditions)} conditions in {time.perf_counter() - t0:.0f} s")
        print(rep.table())
        g = rep.primary
        rows = profile_rows(rep, profiles, g)
        result["behaviors"][behavior] = {
            "labels": list(b.labels), "unsteered": rep.condition("unsteered").groups[g].counts,
            "n_answers": rep.condition("unsteered").groups[g].n, "causal": info, "profiles": rows,
            "not_made": missing,
            "max_abs_risk_diff": float(abs(tabs["risk_diff"].risk_diff).max()),
            "risk_diff_concentration": tabs["risk_diff"].concentration(),
            "causal_concentration": tabs["causal"].concentration(),
        }
    directions = {}
    for behavior, r in result["behaviors"].items():
        for row in r["profiles"]:
            if row["method"] != "risk_diff" and row["meets_goal"]:
                directions.setdefault(f"{behavior}->{row['toward']}", []).append(row["profile"])
    result["directions_meeting_goal_with_a_causal_profile"] = directions
    result["goal_met"] = len(directions) >= 2
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    for behavior, r in result["behaviors"].items():
        for row in r["profiles"]:
            print(f"{row['profile']:28s} effect {row['effect']:+5.0f}  controls {row['controls_effect_mean']:+5.1f}  "
                  f"beyond {row['beyond_controls']:+5.1f}  p {row['p']:.1e}  KL {row['kl']:.3f} "
                  f"(controls {row['controls_kl_mean']:.3f})  {'GOAL' if row['meets_goal'] else ''}")
    print(f"goal met: {result['goal_met']} ({directions})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
