"""`steer-gguf tune`: sweep the profile size on a documented schedule, evaluate every point on
held-out prompts, and keep the smallest profile that reaches the largest significant shift
within a KL budget.

Schedule: for each size N in SIZES (1, 2, 4, ... up to k x MoE layers, the most a profile can
activate), three arms built from the detection table by SteerMoE's rule: `activate` (N on),
`deactivate` (N off) and `both` (N on and N off). Points the table cannot fill (not enough
experts of the needed sign, or a layer left with fewer than k) are skipped and listed. All
points share one unsteered run (same prompts, same seeds).

Choice: among points whose shift toward the target is positive and significant (exact
McNemar p < alpha) and whose KL is within --max-kl, take the largest shift E; every point
within `tolerance` points of E (default 2: sampling noise, not a better profile) counts as
reaching it, and the smallest of those wins (then the lower KL, then the arm order above).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..detect.confidence import tune_sizes
from ..errors import SteerError
from ..profile import Profile
from .evalsets import EvalSet
from .judges import Behavior
from .measure import Condition, EvalReport, Sampling, evaluate, kl_cost, random_control, run_outcomes, summarize
from .measure import work_units as eval_units

ARMS = ("activate", "deactivate", "both")


def default_sizes(info) -> list[int]:
    return tune_sizes(info.n_expert_used, len(info.moe_layers))


@dataclass
class TuneResult:
    points: list[dict[str, Any]]
    skipped: list[str]
    report: EvalReport
    chosen: Profile | None = None
    target: str = ""
    verdict: str | None = None  # detect's on the table (also in every profile's provenance)


def sweep_profiles(table, info, reverse: bool, sizes: list[int], arms: tuple[str, ...] = ARMS,
                   name: str = "tuned") -> tuple[list[tuple[str, int, Profile]], list[str]]:
    """(arm, size, profile) for every feasible point, and why each other point was skipped."""
    out, skipped = [], []
    for n in sizes:
        for arm in arms:
            act = n if arm in ("activate", "both") else 0
            deact = n if arm in ("deactivate", "both") else 0
            try:
                p = table.make_profile(info, activate=act, deactivate=deact, reverse=reverse,
                                       name=f"{name}-{arm}{n}")
            except SteerError as e:
                skipped.append(f"{arm} {n}: {e}")
                continue
            out.append((arm, n, p))
    return out, skipped


def tune(llm, table, eval_set: EvalSet, behavior: Behavior, *, reverse: bool = False, max_kl: float | None = None,
         alpha: float = 0.01, sizes: list[int] | None = None, arms: tuple[str, ...] = ARMS,
         tolerance: float = 2.0, sampling: Sampling | None = None, judge=None, name: str = "tuned",
         controls: int = 0, control_seed: int = 0, on_progress=None, parallel: int = 1) -> TuneResult:
    """The sweep, the choice, and with controls > 0 that many random-expert controls of the
    chosen profile, evaluated on the same prompts and seeds (recorded in its provenance)."""
    if controls < 0:
        raise SteerError(f"controls must be >= 0, got {controls}")
    if not 0 < alpha < 1:
        raise SteerError(f"alpha must lie in (0, 1), got {alpha}")
    if not tolerance >= 0:
        raise SteerError(f"tolerance must be >= 0 points, got {tolerance}")
    if max_kl is not None and not max_kl >= 0:
        raise SteerError(f"max-kl must be >= 0, got {max_kl}")
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise SteerError(f"arms must be among {', '.join(ARMS)}, got {', '.join(bad) or 'none'}")
    sizes = sorted(set(sizes or default_sizes(llm.info)))
    if not sizes or sizes[0] < 1:
        raise SteerError("sizes must be positive integers")
    target = behavior.labels[1 if reverse else 0]
    points, skipped = sweep_profiles(table, llm.info, reverse, sizes, arms, name)
    if not points:
        raise SteerError("no point of the sweep can be built from this table: " + "; ".join(skipped[:3]))
    conds = [Condition("unsteered", None, "unsteered")] + [
        Condition(p.name, p, "profile", target) for _, _, p in points]
    report = evaluate(llm, eval_set, behavior, [], sampling=sampling, judge=judge, conditions=conds,
                      on_progress=on_progress, parallel=parallel)
    g = report.primary
    rows = []
    for (arm, n, p), c in zip(points, report.conditions[1:]):
        s = c.groups[g]
        rows.append({"name": p.name, "arm": arm, "n": n, "size": p.count("activate") + p.count("deactivate"),
                     "activate": p.count("activate"), "deactivate": p.count("deactivate"),
                     "rate": s.target_rate, "ci": list(s.target_ci), "effect": s.effect, "p": s.p, "kl": c.kl,
                     "significant": bool(s.effect > 0 and s.p < alpha),
                     "within_kl": max_kl is None or c.kl <= max_kl, "chosen": False})
    ok = [i for i, r in enumerate(rows) if r["significant"] and r["within_kl"]]
    res = TuneResult(rows, skipped, report, target=target, verdict=table.verdict)
    if ok:
        top = max(rows[i]["effect"] for i in ok)
        reach = [i for i in ok if rows[i]["effect"] >= top - tolerance]
        best = min(reach, key=lambda i: (rows[i]["size"], rows[i]["kl"], ARMS.index(rows[i]["arm"])))
        rows[best]["chosen"] = True
        chosen = points[best][2]
        base = report.conditions[0].groups[g]
        r = rows[best]
        chosen.name = name
        chosen.provenance.update({"toward": target, "tune": {
            "behavior": behavior.name, "eval_set": eval_set.source, "group": g, "n": base.n,
            "samples": report.sampling.samples, "temperature": report.sampling.temperature,
            "seed": report.sampling.seed, "target": target,
            "unsteered_rate": base.counts.get(target, 0) / base.n if base.n else None,
            "rate": r["rate"], "ci": r["ci"], "effect_points": r["effect"], "p": r["p"], "kl": r["kl"],
            "alpha": alpha, "max_kl": max_kl, "tolerance": tolerance, "arm": r["arm"], "points": len(rows)}})
        res.chosen = chosen
        if controls:
            chosen.provenance["tune"]["controls"] = _controls(llm, eval_set, behavior, report, conds[0], chosen,
                                                              r["effect"], controls, control_seed, judge,
                                                              on_progress, parallel)
    return res


def _controls(llm, eval_set, behavior, report, unsteered, chosen, effect, n, seed, judge, on_progress,
              parallel) -> dict[str, Any]:
    """Random controls of the chosen profile against the sweep's own unsteered run."""
    target = report.conditions[1].target
    ctrl = [Condition(f"{chosen.name}~random{i + 1}", random_control(chosen, llm.info, seed + i,
                                                                     f"{chosen.name}~random{i + 1}"),
                      "control", target, chosen.name, seed + i) for i in range(n)]
    outs = run_outcomes(llm, eval_set.items, ctrl, judge or behavior.judge_rule, report.sampling, on_progress,
                        parallel)
    base = [o for o in report.outcomes if o.condition == unsteered.name]
    reps = summarize([unsteered] + ctrl, base + outs,
                     report.groups, behavior.labels)[1:]
    kl, _, _ = kl_cost(llm, ctrl)
    effects = [c.groups[report.primary].effect for c in reps]
    mean = sum(effects) / len(effects)
    return {"n": n, "seeds": [c.control_seed for c in ctrl], "effects_points": effects,
            "p": [c.groups[report.primary].p for c in reps], "kl": [kl[c.name] for c in ctrl],
            "mean_effect_points": mean, "beyond_controls_points": effect - mean}


def sweep_table(res: TuneResult) -> str:
    base = res.report.conditions[0].groups[res.report.primary]
    lines = [f"{res.report.behavior}: toward {res.target}, {res.report.n_items} held-out prompts x "
             f"{res.report.sampling.samples} samples; unsteered {res.target} rate "
             f"{100 * base.counts.get(res.target, 0) / max(1, base.n):.0f}%",
             *([f"detection: {res.verdict}"] if res.verdict else []),
             f"{'point':<22} {'on/off':>7} {res.target + ' rate':>14} {'effect':>7} {'p':>9} {'KL':>8}  "]
    for r in res.points:
        mark = "  <- chosen" if r["chosen"] else ("" if r["within_kl"] else "  (over KL budget)")
        lines.append(f"{r['name'][:22]:<22} {str(r['activate']) + '/' + str(r['deactivate']):>7} "
                     f"{100 * r['rate']:>13.0f}% {r['effect']:>+7.0f} {r['p']:>9.1e} {r['kl']:>8.4f}{mark}")
    ctl = res.chosen.provenance["tune"].get("controls") if res.chosen else None
    if ctl:
        lines.append(f"chosen {res.chosen.name}: {ctl['n']} random controls of its shape shifted "
                     + ", ".join(f"{e:+.0f}" for e in ctl["effects_points"])
                     + f" points (mean {ctl['mean_effect_points']:+.0f}); the profile beats them by "
                       f"{ctl['beyond_controls_points']:+.0f}")
    return "\n".join(lines)


def work_units(table, info, eval_set: EvalSet, sampling: Sampling, reverse: bool, sizes: list[int] | None,
               arms: tuple[str, ...], controls: int) -> int:
    """How many on_progress units tune() reports: the unsteered run, every feasible point, the controls."""
    n_points = len(sweep_profiles(table, info, reverse, sizes or default_sizes(info), arms)[0])
    return eval_units(eval_set, 1 + n_points + controls, sampling)


def to_json(res: TuneResult, alpha: float, max_kl: float | None) -> str:
    """The sweep, every point, as `tune --json` writes it."""
    return json.dumps({"format": "steer-gguf.tune/1", "target": res.target, "alpha": alpha, "max_kl": max_kl,
                       "verdict": res.verdict, "points": res.points, "skipped": res.skipped, "report": res.report.to_dict()}, indent=1) + "\n"


def chosen_summary(res: TuneResult, output: str) -> str:
    """The line that says which profile was written, and what it did."""
    tp = res.chosen.provenance["tune"]
    return (f"{output}: {res.chosen.summary()}; {res.target} {100 * tp['rate']:.0f}% "
            f"({tp['effect_points']:+.0f} points, p={tp['p']:.1e}, KL {tp['kl']:.4f})")
