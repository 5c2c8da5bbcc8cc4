"""Causal expert detection: rank experts by what forcing them does to the behavior, not by
how their routing correlates with it (design.md, "Causal detection").

For a pair set, the *margin* under a steering profile is the mean over pairs of

    log P(behavior-1 target | its conversation) - log P(behavior-2 target | its conversation)

teacher-forced (scoring.continuation_logprob: many conversations per llama.cpp batch). For
each candidate (layer, expert) the expert alone is forced on, and separately off, and the
change of the margin against the unsteered one is its effect_on / effect_off. The greedy set
search then adds, one move at a time, the forcing that most increases the margin (toward
behavior 1) or decreases it (toward behavior 2) given the moves already taken, because
effects do not add up. Both return a DetectionTable, so `profile make` and `tune` take
either.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..engine.scoring import continuation_logprob
from ..errors import SteerError
from ..profile import ExpertRule, ModelRef, Profile
from .confidence import DEFAULT_BOOTSTRAP, DEFAULT_PERMUTATIONS, DEFAULT_SPLITS, mean_intervals
from .risk import DetectionTable, detect, target_rows

METHODS = ("risk_diff", "causal", "causal-greedy")

# on_progress(done, total, what): one call per margin measured
Progress = Callable[[int, int, str], None]


@dataclass
class PairTokens:
    """Both conversations of every usable pair, tokenized: seqs[2i] is pair i's behavior-1
    conversation, seqs[2i+1] its behavior-2 one; spans are their target token ranges."""
    seqs: list[list[int]]
    spans: list[tuple[int, int]]

    @property
    def n_pairs(self) -> int:
        return len(self.seqs) // 2


def pair_tokens(llm, pairs, skip_bad: bool = False, margin_tokens: int | None = None) -> PairTokens:
    """Tokenize the pairs as detect() does; pairs whose target cannot be found are skipped
    with skip_bad (detect() has already reported them), an error otherwise. margin_tokens=K
    keeps only the first K tokens of each target (and drops what follows them: teacher
    forcing never looks ahead), e.g. K=1 for the token where a reply picks its style."""
    seqs, spans = [], []
    for pair in pairs:
        found = []
        for side, msgs, target in ((0, pair.messages_0, pair.target_0), (1, pair.messages_1, pair.target_1)):
            toks, span = target_rows(llm, msgs, target)
            if span is None:
                if not skip_bad:
                    raise SteerError(f"{pairs.source}:{pair.line}: target of messages_{side} not found "
                                     f"in the rendered conversation")
                break
            if span[0] < 1:
                raise SteerError(f"{pairs.source}:{pair.line}: target of messages_{side} starts the "
                                 f"conversation: nothing precedes it to predict it from")
            if margin_tokens is not None:
                span = (span[0], min(span[1], span[0] + margin_tokens))
                toks = toks[:span[1]]
            found.append((toks, span))
        else:
            for toks, span in found:
                seqs.append(toks)
                spans.append(span)
    if not seqs:
        raise SteerError(f"{pairs.source}: no usable pairs")
    return PairTokens(seqs, spans)


def pair_margins(llm, pt: PairTokens, batch_tokens: int = 1024) -> np.ndarray:
    """log P(target 1) - log P(target 2) of each pair [P], under llm's current profile."""
    lp = np.asarray(continuation_logprob(llm, pt.seqs, pt.spans, batch_tokens=batch_tokens), dtype=np.float64)
    return lp[0::2] - lp[1::2]


def margin(llm, pt: PairTokens, batch_tokens: int = 1024) -> float:
    """Mean log P(target 1) - log P(target 2) over the pairs, under llm's current profile."""
    return float(np.mean(pair_margins(llm, pt, batch_tokens)))


def probe_profile(llm, rules: Sequence[ExpertRule]) -> Profile | None:
    return Profile(ModelRef.of(llm.info), list(rules), name="causal-probe") if rules else None


def margin_under(llm, pt: PairTokens, rules: Sequence[ExpertRule], batch_tokens: int = 1024) -> float:
    llm.set_profile(probe_profile(llm, rules))
    return margin(llm, pt, batch_tokens)


def pair_margins_under(llm, pt: PairTokens, rules: Sequence[ExpertRule], batch_tokens: int = 1024) -> np.ndarray:
    llm.set_profile(probe_profile(llm, rules))
    return pair_margins(llm, pt, batch_tokens)


@dataclass
class GreedyStep:
    toward: int       # +1: behavior 1, -1: behavior 2
    step: int         # 1-based
    layer: int
    expert: int
    action: str
    margin: float     # the margin with every move up to this one applied
    gain: float       # how far this move moved it toward the behavior


@dataclass
class CausalResult:
    table: DetectionTable
    baseline: float                     # unsteered margin
    seconds_per_candidate: float        # both forcings of one candidate
    n_candidates: int
    greedy: list[GreedyStep] = field(default_factory=list)


def summary(res: CausalResult, output: str, seconds: float, n_top: int) -> str:
    """What `steer-gguf detect --method causal` shows: the run, the top rows, the greedy moves."""
    table = res.table
    lines = [f"{table.meta.get('pairs')} pairs, {res.n_candidates} candidates forced on and off -> {output} "
             f"({seconds:.1f} s; {res.seconds_per_candidate:.3f} s per candidate)",
             f"unsteered margin log P(target 1) - log P(target 2): {res.baseline:+.4f} nats per pair; "
             f"{table.concentration()} experts hold half of the total |effect|"]
    ci = table.has_intervals
    if n_top:
        lines.append("  rank layer expert  risk_diff  effect_on  effect_off   effect"
                     + ("   on 95% interval     off 95% interval" if ci else ""))
        for i, r in enumerate(table.top(n_top)):
            if r.effect is None:
                break
            line = (f"  {i + 1:4d} {r.layer:5d} {r.expert:6d}   {r.risk_diff:+.4f}   {r.effect_on:+.4f}    "
                    f"{r.effect_off:+.4f}  {r.effect:+.4f}")
            if ci:
                line += (f"   [{table.effect_on_lo[i]:+.3f}, {table.effect_on_hi[i]:+.3f}]"
                         f"   [{table.effect_off_lo[i]:+.3f}, {table.effect_off_hi[i]:+.3f}]")
            lines.append(line)
    for g in res.greedy:
        lines.append(f"  greedy toward behavior {1 if g.toward > 0 else 2}, step {g.step}: {g.action} layer {g.layer} "
                     f"expert {g.expert}: margin {g.margin:+.4f} (gain {g.gain:+.4f})")
    if table.verdict:
        lines.append(f"routing verdict (risk difference): {table.verdict}")
    return "\n".join(lines)


def causal_detect(llm, pairs, *, candidates: int | None = None, greedy_steps: int = 0, greedy_pool: int = 32,
                  batch_tokens: int = 1024, skip_bad: bool = False, margin_tokens: int | None = None,
                  on_progress: Progress | None = None, bootstrap: int = DEFAULT_BOOTSTRAP,
                  permutations: int = DEFAULT_PERMUTATIONS, splits: int = DEFAULT_SPLITS,
                  seed: int = 0) -> CausalResult:
    """Causal detection table on a PairSet. candidates: measure only the top M experts by
    |risk_diff| (None: every expert of every MoE layer). greedy_steps > 0 adds the greedy set
    search, up to that many activations and that many deactivations per direction, over the
    greedy_pool moves with the largest single effect toward it. The model's profile is
    restored afterwards. margin_tokens=K: the margin counts the first K target tokens only.
    bootstrap > 0: 95% intervals of effect_on / effect_off over pairs (each pair's margin
    change is kept), and the risk-difference part's intervals, null and verdict (detect())."""
    if candidates is not None and candidates < 1:
        raise SteerError(f"candidates: must be at least 1, got {candidates}")
    if greedy_steps < 0 or greedy_pool < 1:
        raise SteerError("greedy steps must be >= 0 and the greedy pool >= 1")
    if margin_tokens is not None and margin_tokens < 1:
        raise SteerError(f"margin tokens: must be at least 1, got {margin_tokens}")
    # the risk-difference pass gives the counts columns and the candidates' order
    rd = detect(llm, pairs, batch_tokens=batch_tokens, skip_bad=skip_bad, bootstrap=bootstrap,
                permutations=permutations, splits=splits, seed=seed)
    pt = pair_tokens(llm, pairs, skip_bad=skip_bad, margin_tokens=margin_tokens)
    n = len(rd) if candidates is None else min(candidates, len(rd))
    # each pair's change of margin per candidate: the effects are their means, the intervals
    # resample them
    on_pp = np.full((pt.n_pairs, len(rd)), np.nan)
    off_pp = np.full((pt.n_pairs, len(rd)), np.nan)
    old = llm.profile
    try:
        base_pp = pair_margins_under(llm, pt, [], batch_tokens)
        base = float(np.mean(base_pp))
        t0 = time.perf_counter()
        for i in range(n):
            layer, expert = int(rd.layer[i]), int(rd.expert[i])
            on_pp[:, i] = pair_margins_under(llm, pt, [ExpertRule(layer, expert, "activate")], batch_tokens) - base_pp
            off_pp[:, i] = pair_margins_under(llm, pt, [ExpertRule(layer, expert, "deactivate")],
                                              batch_tokens) - base_pp
            if on_progress is not None:
                on_progress(i + 1, n, f"layer {layer} expert {expert}")
        per_candidate = (time.perf_counter() - t0) / max(1, n)
        on, off = on_pp.mean(axis=0), off_pp.mean(axis=0)
        meta = dict(rd.meta, method="causal", margin_unsteered=base, candidates=n, margin_tokens=margin_tokens)
        greedy_log: list[GreedyStep] = []
        g_on = g_off = None
        if greedy_steps:
            g_on = np.zeros(len(rd), dtype=np.int64)
            g_off = np.zeros(len(rd), dtype=np.int64)
            for toward in (1, -1):
                greedy_log += _greedy(llm, pt, rd, on, off, toward, base, greedy_steps, greedy_pool, g_on, g_off,
                                      batch_tokens, on_progress)
            meta["method"] = "causal-greedy"
    finally:
        llm.set_profile(old, force=True)
    cis = {}
    if bootstrap:
        cis = {"rd_lo": rd.rd_lo, "rd_hi": rd.rd_hi, "rd_conf": rd.rd_conf}
        for name, pp in (("on", on_pp), ("off", off_pp)):
            iv = mean_intervals(pp, bootstrap, seed + 3)
            cis.update({f"effect_{name}_lo": iv.lo, f"effect_{name}_hi": iv.hi, f"{name}_conf": iv.conf})
    table = DetectionTable(rd.layer, rd.expert, rd.a1, rd.d1, rd.a2, rd.d2, meta, effect_on=on, effect_off=off,
                           greedy_on=g_on, greedy_off=g_off, **cis)
    return CausalResult(table, base, per_candidate, n, greedy_log)


def _greedy(llm, pt: PairTokens, rd: DetectionTable, on: np.ndarray, off: np.ndarray, toward: int, base: float,
            steps: int, pool: int, g_on: np.ndarray, g_off: np.ndarray, batch_tokens: int,
            on_progress: Progress | None) -> list[GreedyStep]:
    """One direction of the greedy search; writes the steps it takes into g_on / g_off
    (signed by direction). Only moves whose single effect already points toward the
    behavior enter the pool: a move that hurts alone is not worth the evaluations."""
    info = llm.info
    k, n_expert = info.n_expert_used, info.n_expert
    moves = [(float(toward * on[i]), i, "activate") for i in range(len(rd)) if toward * np.nan_to_num(on[i]) > 0]
    moves += [(float(toward * off[i]), i, "deactivate") for i in range(len(rd)) if toward * np.nan_to_num(off[i]) > 0]
    moves.sort(key=lambda m: (-m[0], int(rd.layer[m[1]]), int(rd.expert[m[1]]), m[2]))
    moves = [(i, a) for _, i, a in moves[:pool]]
    chosen: list[ExpertRule] = []
    touched: set[int] = set()
    n_act: dict[int, int] = {}
    n_deact: dict[int, int] = {}
    count = {"activate": 0, "deactivate": 0}
    current = base
    log: list[GreedyStep] = []
    label = "behavior 1" if toward > 0 else "behavior 2"
    for step in range(1, 2 * steps + 1):
        best = None
        allowed = []
        for i, action in moves:
            layer = int(rd.layer[i])
            if i in touched or count[action] >= steps:
                continue
            if action == "activate" and n_act.get(layer, 0) >= k:
                continue
            if action == "deactivate" and n_expert - n_deact.get(layer, 0) - 1 < k:
                continue
            allowed.append((i, action))
        for j, (i, action) in enumerate(allowed):
            rule = ExpertRule(int(rd.layer[i]), int(rd.expert[i]), action)
            m = margin_under(llm, pt, chosen + [rule], batch_tokens)
            gain = toward * (m - current)
            if best is None or gain > best[0]:
                best = (gain, m, i, action, rule)
            if on_progress is not None:
                on_progress(j + 1, len(allowed), f"greedy toward {label}, step {step}")
        if best is None or best[0] <= 0:
            break
        gain, m, i, action, rule = best
        chosen.append(rule)
        touched.add(i)
        count[action] += 1
        layer = int(rd.layer[i])
        if action == "activate":
            n_act[layer] = n_act.get(layer, 0) + 1
            g_on[i] = toward * step
        else:
            n_deact[layer] = n_deact.get(layer, 0) + 1
            g_off[i] = toward * step
        current = m
        log.append(GreedyStep(toward, step, layer, int(rd.expert[i]), action, m, gain))
    return log
