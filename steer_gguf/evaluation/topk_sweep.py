"""`steer-gguf tune --topk`: experts per token against speed and quality.

Every point is a profile with only `topk` (issue 32): a global K, or a per-layer scheme at K.
Schemes (router-chosen MoE layers only; hash-routed layers keep their table):
  global  K in every layer
  edges   K in the first and last quarter of the MoE layers, the model's k in between
  middle  K in the middle half, the model's k at both ends
For each point: prefill and decode tokens/s (teacher-forced on the text, the same tokens for
every point, measured in interleaved rounds and reported as the median, so a busy machine
slows every point alike) and their ratio to the model's own k, paired by round (the median of
the rounds' ratios, with a distribution-free interval for it: median_interval), mean KL(model's k || point) and perplexity on the text, and, with a
behavior, its rates on held-out prompts (the eval's own run: same prompts and seeds for all).
With a KL budget, the point with the fewest experts per token within it is the choice.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import SteerError
from ..profile import LayerK, Profile, with_topk
from .measure import Condition, quality, quality_windows, run_outcomes, summarize

SCHEMES = ("global", "edges", "middle")
UNSTEERED = "model-k"


def scheme_layers(info, scheme: str, k: int) -> dict[int, int]:
    """K by layer for one point: the layers the scheme sets (the others keep the model's k)."""
    layers = [il for il in info.moe_layers if il not in info.fixed_layers]
    if not layers:
        raise SteerError("the model has no router-chosen MoE layer: no experts per token to sweep")
    q = max(1, len(layers) // 4)
    if scheme == "global":
        chosen = layers
    elif scheme == "edges":
        chosen = layers[:q] + layers[-q:]
    elif scheme == "middle":
        chosen = layers[q:-q] or layers[len(layers) // 2:len(layers) // 2 + 1]
    else:
        raise SteerError(f"--topk-schemes: unknown scheme {scheme!r} (one of {', '.join(SCHEMES)})")
    return {il: k for il in chosen}


def point_profile(info, scheme: str, k: int) -> Profile:
    topk = k if scheme == "global" else [LayerK(il, kk) for il, kk in sorted(scheme_layers(info, scheme, k).items())]
    return dataclasses.replace(with_topk(None, topk, info), name=f"topk-{scheme}{k}")


def mean_k(info, p: Profile | None) -> float:
    """Experts per token averaged over the MoE layers (what a token's expert reads scale with)."""
    layers = list(info.moe_layers)
    return sum(info.n_expert_used if p is None else p.k_of(il, info.n_expert_used) for il in layers) / len(layers)


@dataclass
class TopkPoint:
    name: str
    scheme: str
    k: int | None                       # None: the model's own k (the reference point)
    mean_k: float
    prefill_tps: float
    decode_tps: float
    kl: float
    perplexity: float
    rates: dict[str, dict[str, float]] = field(default_factory=dict)  # group -> label -> rate
    within_kl: bool = True
    chosen: bool = False
    # against the model's own k, round by round: [median, low, high] (median_interval)
    prefill_x: list[float | None] = field(default_factory=list)
    decode_x: list[float | None] = field(default_factory=list)


@dataclass
class TopkSweep:
    points: list[TopkPoint]
    text: str
    n_tokens: int                       # positions KL and perplexity were measured on
    rounds: int
    prefill_tokens: int
    decode_tokens: int
    behavior: str | None = None
    interval_level: float = 0.0         # the coverage of the prefill_x / decode_x intervals
    max_kl: float | None = None
    skipped: list[str] = field(default_factory=list)
    chosen: Profile | None = None

    def table(self) -> str:
        groups = sorted({g for p in self.points for g in p.rates})
        labels = sorted({lab for p in self.points for r in p.rates.values() for lab, v in r.items() if v})
        head = (f"{'point':<16} {'mean k':>6} {'prefill t/s':>12} {'x [interval]':>19} {'decode t/s':>11} "
                f"{'x [interval]':>19} "
                f"{'KL':>8} {'ppl':>8}" + "".join(f" {(g + ':' + lab)[:14]:>14}" for g in groups for lab in labels))
        lines = [f"experts per token: {len(self.points) - 1} points against the model's own k, speed over "
                 f"{self.rounds} interleaved rounds ({self.prefill_tokens}-token prefill, {self.decode_tokens} "
                 f"decode steps; x: the median ratio to the model's k over rounds, "
                 + (f"with its {100 * self.interval_level:.1f}% interval" if self.interval_level else
                    "too few rounds for an interval")
                 + f"), KL and perplexity over {self.n_tokens} positions of {self.text}", head,
                 "-" * len(head)]
        for p in self.points:
            mark = "  <- chosen" if p.chosen else ("" if p.within_kl else "  (over KL budget)")
            lines.append(f"{p.name[:16]:<16} {p.mean_k:>6.2f} {p.prefill_tps:>12.1f} {_ratio(p.prefill_x):>19} "
                         f"{p.decode_tps:>11.1f} {_ratio(p.decode_x):>19} {p.kl:>8.4f} {p.perplexity:>8.2f}"
                         + "".join(f" {100 * p.rates.get(g, {}).get(lab, 0.0):>13.0f}%" for g in groups
                                   for lab in labels) + mark)
        lines += [f"skipped {x}" for x in self.skipped]
        return "\n".join(lines)

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k != "chosen"}
        d["format"] = "steer-gguf.tune-topk/1"
        d["chosen"] = None if self.chosen is None else self.chosen.name
        return json.dumps(d, indent=1) + "\n"


def _ratio(x: list[float]) -> str:
    if not x:
        return ""
    return f"{x[0]:.2f}" + ("" if x[1] is None else f" [{x[1]:.2f}, {x[2]:.2f}]")


def median_interval(n: int, level: float = 0.90) -> tuple[int, float]:
    """The order statistics that bound the median of n paired rounds with at least `level`
    coverage, whatever the distribution: (j, coverage) for [x_(j), x_(n+1-j)] (1-based), the
    narrowest such; (0, 0.0) when n rounds are too few (fewer than 5 for 90%)."""
    best = (0, 0.0)
    tail = 0.0
    for j in range(1, n // 2 + 1):
        tail += math.comb(n, j - 1) / 2 ** n   # P(Binomial(n, 1/2) <= j - 1)
        cover = 1 - 2 * tail
        if cover < level:
            break
        best = (j, cover)
    return best


def _paired(num: list[float], den: list[float], j: int) -> list[float | None]:
    r = sorted(a / b for a, b in zip(num, den))
    lo, hi = (r[j - 1], r[len(r) - j]) if j else (None, None)
    return [statistics.median(r), lo, hi]


def _speed(llm, profile: Profile | None, prompt: list[int], decode: list[int]) -> tuple[float, float]:
    with llm.steering(profile):
        # a new profile rebuilds the graph of each shape on its first decode: not the point's cost
        llm.reset()
        llm.eval(prompt)
        llm.eval(decode[:1])
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for t in decode:
            llm.eval([t])
        t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), len(decode) / (t2 - t1)


def sweep_topk(llm, ks: list[int], schemes: list[str], text: str, text_name: str, *, rounds: int = 5,
               prefill_tokens: int = 128, decode_tokens: int = 32, max_kl: float | None = None,
               eval_set=None, behavior=None, sampling=None, judge=None, parallel: int = 1,
               on_progress=None) -> TopkSweep:
    """The sweep; eval_set and behavior (both or neither) add the behavior's rates."""
    info = llm.info
    if not ks or min(ks) < 1 or max(ks) > info.n_expert:
        raise SteerError(f"--topk: every K must lie in 1..{info.n_expert} (the model's experts), got "
                         f"{','.join(map(str, ks)) or 'none'}")
    if rounds < 1:
        raise SteerError(f"--rounds must be >= 1, got {rounds}")
    if max_kl is not None and not max_kl >= 0:
        raise SteerError(f"--max-kl must be >= 0, got {max_kl}")
    points: list[tuple[str, int | None, Profile | None]] = [("model", None, None)]
    skipped = []
    for scheme in schemes:
        for k in sorted(set(ks)):
            p = point_profile(info, scheme, k)
            if all(p.k_of(il, info.n_expert_used) == info.n_expert_used for il in info.moe_layers):
                skipped.append(f"{p.name}: the model's own k in every layer")
                continue
            p.check(info, force=llm.force)
            points.append((scheme, k, p))
    if len(points) == 1:
        raise SteerError("every point of the sweep is the model's own k; nothing to compare (" + "; ".join(skipped) + ")")
    toks = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    if len(toks) < 3:
        raise SteerError(f"{text_name}: too short to time (needs at least 3 tokens)")
    n_pre = min(prefill_tokens, max(2, len(toks) - 1), llm.n_ctx() // 2)
    prompt, decode = toks[:n_pre], toks[n_pre:n_pre + decode_tokens] or toks[:decode_tokens]
    decode = decode[:max(1, min(len(decode), llm.n_ctx() - n_pre))]
    timings: list[list[tuple[float, float]]] = [[] for _ in points]
    for _ in range(rounds):
        for i, (_, _, p) in enumerate(points):
            timings[i].append(_speed(llm, p, prompt, decode))
            if on_progress:
                on_progress(1)
    conds = [Condition(UNSTEERED, None, "unsteered")] + [Condition(p.name, p, "profile") for _, _, p in points[1:]]
    windows = quality_windows(llm, text)
    kl, ppl = quality(llm, windows, conds)
    rates: dict[str, dict[str, dict[str, float]]] = {}
    if behavior is not None:
        # the eval's run: every point on the same prompts with the same seeds
        outs = run_outcomes(llm, eval_set.items, conds, judge or behavior.judge_rule, sampling, on_progress, parallel)
        for c in summarize(conds, outs, eval_set.groups, behavior.labels):
            rates[c.name] = {g: {lab: n / s.n for lab, n in s.counts.items()} for g, s in c.groups.items() if s.n}
    n_q = sum(len(w) - 1 for w in windows)
    j, level = median_interval(rounds)
    ref = timings[0]
    out = []
    for (scheme, k, p), c, t in zip(points, conds, timings):
        out.append(TopkPoint(c.name if p is not None else "model k", scheme, k, mean_k(info, p),
                             statistics.median(x for x, _ in t), statistics.median(y for _, y in t),
                             kl[c.name], ppl[c.name], rates.get(c.name, {}),
                             within_kl=max_kl is None or kl[c.name] <= max_kl,
                             prefill_x=_paired([x for x, _ in t], [x for x, _ in ref], j),
                             decode_x=_paired([y for _, y in t], [y for _, y in ref], j)))
    res = TopkSweep(out, text_name, n_q, rounds, len(prompt), len(decode),
                    behavior.name if behavior is not None else None, level, max_kl, skipped=skipped)
    if max_kl is not None:
        ok = [i for i in range(1, len(out)) if out[i].within_kl]
        if ok:
            best = min(ok, key=lambda i: (out[i].mean_k, out[i].kl))
            out[best].chosen = True
            res.chosen = points[best][2]
    return res


def work_units(n_points: int, rounds: int, eval_set=None, sampling=None) -> int:
    """on_progress units: a timing per point and round, and an answer per generated reply."""
    n = (n_points + 1) * rounds
    if eval_set is not None:
        n += len(eval_set) * sampling.samples * (n_points + 1)
    return n


def provenance(res: TopkSweep) -> dict[str, Any]:
    """What the chosen profile records of the sweep that chose it."""
    p = next(x for x in res.points if x.chosen)
    ref = res.points[0]
    return {"tune_topk": {"text": res.text, "max_kl": res.max_kl, "kl": p.kl, "perplexity": p.perplexity,
                          "model_perplexity": ref.perplexity, "mean_k": p.mean_k,
                          "prefill_speedup": p.prefill_x[0], "decode_speedup": p.decode_x[0], "points": len(res.points) - 1}}
