"""What a profile does to a model (design.md, "Evaluation, exactly"): judged behavior rates on
held-out prompts for unsteered, each profile and its random-expert controls, with Wilson
intervals, exact McNemar tests against unsteered, and the quality cost as KL divergence
(and perplexity) on teacher-forced text.

    report = evaluate(llm, load_eval_set("builtin:demo-numbers"), behavior("demo-numbers"),
                      [Profile.load("words.json")], controls=2)
    print(report.table())
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from ..engine.batch import GenJob, generate_batch
from ..engine.scoring import kl_divergence, next_token_logprobs, token_nll
from ..engine.slots import check_phase
from ..errors import SteerError
from ..fileio import DATA_DIR
from ..model import ModelInfo
from ..profile import BiasRule, ExpertRule, ModelRef, Profile
from .evalsets import EvalItem, EvalSet
from .judges import UNCLASSIFIED, Behavior
from .significance import mcnemar_exact, wilson

NEUTRAL_TEXT = DATA_DIR / "eval" / "neutral.txt"
UNSTEERED = "unsteered"
WINDOW = 128  # tokens per teacher-forced window of the quality texts


@dataclass
class Sampling:
    samples: int = 2
    temperature: float = 0.7
    max_tokens: int = 64
    seed: int = 0
    phase: str = "all"  # which tokens a profile steers: slots.PHASES

    def seed_of(self, item_index: int, sample: int) -> int:
        # the same (prompt, sample) gets the same seed in every condition: outcomes pair up
        return self.seed + 1000 * item_index + sample


@dataclass
class Condition:
    name: str
    profile: Profile | None
    kind: str                    # "unsteered" | "profile" | "control"
    target: str | None = None    # the label this condition steers toward
    of: str | None = None        # a control's profile
    control_seed: int | None = None


@dataclass
class Outcome:
    id: str
    group: str
    condition: str
    sample: int
    seed: int
    label: str
    text: str


@dataclass
class GroupStats:
    n: int
    counts: dict[str, int]
    target_rate: float | None = None
    target_ci: tuple[float, float] | None = None
    effect: float | None = None          # target rate minus unsteered's, in points
    p: float | None = None               # exact McNemar against unsteered
    discordant: tuple[int, int] | None = None  # (only steered hit the target, only unsteered did)


@dataclass
class ConditionReport:
    name: str
    kind: str
    target: str | None
    of: str | None
    control_seed: int | None
    n_activate: int
    n_deactivate: int
    n_bias: int
    groups: dict[str, GroupStats]
    kl: float | None = None
    perplexity: float | None = None
    experts: list[dict] = field(default_factory=list)


@dataclass
class EvalReport:
    behavior: str
    labels: tuple[str, str]
    eval_set: str
    groups: list[str]
    n_items: int
    sampling: Sampling
    conditions: list[ConditionReport]
    outcomes: list[Outcome]
    quality_text: str | None
    quality_tokens: int
    unsteered_perplexity: float | None = None

    @property
    def primary(self) -> str:
        return self.groups[0]

    def condition(self, name: str) -> ConditionReport:
        for c in self.conditions:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = "steer-gguf.eval/1"
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"

    def table(self) -> str:
        """The summary, one line per condition and group, for a terminal."""
        l1, l2 = self.labels
        # labels a judge gives beside the two (language's "mixed", drift's "russian"): shown, never dropped
        extra = sorted({lab for c in self.conditions for g in c.groups.values() for lab, n in g.counts.items()
                        if n and lab not in (l1, l2, UNCLASSIFIED)})
        lines = [f"{self.behavior}: {self.n_items} held-out prompts x {self.sampling.samples} samples "
                 f"(T={self.sampling.temperature}, seed {self.sampling.seed}), eval set {self.eval_set}"
                 + ("" if self.sampling.phase == "all" else f", profiles steer the {self.sampling.phase} only")]
        head = (f"{'condition':<24} {'group':<8} {'on/off':>6} {l1[:10]:>10} {l2[:10]:>10} "
                + "".join(f"{x[:8]:>9}" for x in extra) + f" {'unclass.':>8}  "
                f"{'toward':<10} {'rate [95% CI]':<20} {'effect':>7} {'p':>9} {'KL':>8}")
        lines.append(head)
        lines.append("-" * len(head))
        for c in self.conditions:
            for g in self.groups:
                s = c.groups[g]
                pct = lambda k: f"{100 * s.counts.get(k, 0) / s.n:.0f}%" if s.n else "-"  # noqa: E731
                if s.target_rate is None:
                    rate = effect = p = ""
                else:
                    lo, hi = s.target_ci
                    rate = f"{100 * s.target_rate:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"
                    effect = "" if s.effect is None else f"{s.effect:+.0f}"
                    p = "" if s.p is None else f"{s.p:.1e}"
                kl = "" if c.kl is None or g != self.primary else f"{c.kl:.4f}"
                lines.append(f"{c.name[:24]:<24} {g[:8]:<8} {f'{c.n_activate}/{c.n_deactivate}':>6} "
                             f"{pct(l1):>10} {pct(l2):>10} " + "".join(f"{pct(x):>9}" for x in extra)
                             + f" {pct(UNCLASSIFIED):>8}  {(c.target or '')[:10]:<10} "
                             f"{rate:<20} {effect:>7} {p:>9} {kl:>8}")
        if self.quality_text:
            lines.append(f"KL: mean KL(unsteered || steered) of the next-token distribution over "
                         f"{self.quality_tokens} positions of {self.quality_text}")
        return "\n".join(lines)


# ---- conditions ---------------------------------------------------------------------------------
def target_of(profile: Profile, labels: tuple[str, str]) -> str:
    """The label a profile steers toward: provenance `toward` if it names a label, else
    behavior 2 for a reversed profile and behavior 1 otherwise."""
    prov = profile.provenance or {}
    toward = prov.get("toward")
    if toward in labels:
        return toward
    return labels[1] if prov.get("reverse") else labels[0]


def random_control(profile: Profile, info: ModelInfo, seed: int, name: str | None = None) -> Profile:
    """design.md's control: in each layer as many activated, deactivated and biased experts
    as the profile has there, drawn uniformly (seeded) from that layer's experts the profile
    does not touch; biases keep their values."""
    rng = np.random.default_rng(seed)
    layers = sorted({r.layer for r in profile.experts} | {b.layer for b in profile.bias})
    experts: list[ExpertRule] = []
    bias: list[BiasRule] = []
    for layer in layers:
        rules = [r for r in profile.experts if r.layer == layer]
        biases = [b for b in profile.bias if b.layer == layer]
        touched = {r.expert for r in rules} | {b.expert for b in biases}
        free = [e for e in range(info.n_expert) if e not in touched]
        need = len(rules) + len(biases)
        if need > len(free):
            raise SteerError(f"profile {profile.name!r}: layer {layer} touches {len(touched)} of {info.n_expert} "
                             f"experts; too few are left to draw a random control of the same size")
        drawn = [int(e) for e in rng.choice(free, size=need, replace=False)]
        for r, e in zip(rules, drawn):
            experts.append(ExpertRule(layer, e, r.action))
        for b, e in zip(biases, drawn[len(rules):]):
            bias.append(BiasRule(layer, e, b.value))
    # the same experts per token: a control differs from its profile in which experts only
    return Profile(model=ModelRef.of(info), experts=experts, bias=bias, eps=profile.eps, topk=profile.topk,
                   name=name or f"{profile.name}~random{seed}",
                   provenance={"method": "random-control", "of": profile.name, "seed": int(seed)})


def conditions_for(profiles: list[Profile], info: ModelInfo, labels: tuple[str, str], controls: int = 2,
                   control_seed: int = 0, toward: str | None = None) -> list[Condition]:
    """unsteered, then each profile followed by its random controls."""
    if controls < 0:
        raise SteerError(f"controls must be >= 0, got {controls}")
    if toward is not None and toward not in labels:
        raise SteerError(f"toward {toward!r}: not a label of this behavior ({', '.join(labels)})")
    conds = [Condition(UNSTEERED, None, "unsteered")]
    names = {UNSTEERED}
    for pi, p in enumerate(profiles):
        name = p.name
        while name in names:
            name += "'"
        names.add(name)
        t = toward or target_of(p, labels)
        conds.append(Condition(name, p, "profile", t))
        for ci in range(controls):
            seed = control_seed + 1000 * pi + ci
            cname = f"{name}~random{ci + 1}"
            names.add(cname)
            conds.append(Condition(cname, random_control(p, info, seed, cname), "control", t, name, seed))
    return conds


# ---- running ------------------------------------------------------------------------------------
Progress = Callable[[int], None]


def run_outcomes(llm, items: list[EvalItem], conds: list[Condition], judge, sampling: Sampling,
                 on_progress: Progress | None = None, parallel: int = 1) -> list[Outcome]:
    """Generate and judge every (condition, item, sample)."""
    jobs, keys = [], []
    for c in conds:
        for i, item in enumerate(items):
            for s in range(sampling.samples):
                seed = sampling.seed_of(i, s)
                jobs.append(GenJob(item.messages, c.profile, seed, sampling.temperature, sampling.max_tokens,
                                   sampling.phase))
                keys.append((c.name, item, s, seed))
    texts = generate_batch(llm, jobs, on_progress, parallel)
    return [Outcome(item.id, item.group, cname, s, seed, judge(text, item), text)
            for (cname, item, s, seed), text in zip(keys, texts)]


def quality_windows(llm, text: str) -> list[list[int]]:
    """Teacher-forcing windows of a text: WINDOW tokens each, each starting with BOS when the
    model has one, so every window is a plausible start of a document."""
    toks = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    bos = llm.token_bos()
    head = [bos] if bos is not None and bos >= 0 else []
    w = min(WINDOW, llm.n_ctx()) - len(head)
    return [head + toks[i:i + w] for i in range(0, len(toks), w) if len(head) + len(toks[i:i + w]) >= 2]


def quality(llm, windows: list[list[int]], conds: list[Condition]) -> tuple[dict[str, float], dict[str, float]]:
    """Per condition: mean KL(unsteered || condition) over every position of the windows, and
    the perplexity of the text. One window at a time, so memory holds one window's
    distributions per condition whatever the vocabulary."""
    kl_sum = {c.name: 0.0 for c in conds}
    nll_sum = {c.name: 0.0 for c in conds}
    n = 0
    with llm.lock:
        for win in windows:
            with llm.steering(None):
                base = next(next_token_logprobs(llm, [win]))
            n += base.shape[0]
            for c in conds:
                if c.profile is None:
                    lp = base
                else:
                    with llm.steering(c.profile):
                        lp = next(next_token_logprobs(llm, [win]))
                    kl_sum[c.name] += float(kl_divergence(base, lp).sum())
                nll_sum[c.name] += float(token_nll(lp, win).sum())
    if n == 0:
        raise SteerError("the quality text is too short: no token to predict")
    return ({k: v / n for k, v in kl_sum.items()}, {k: math.exp(v / n) for k, v in nll_sum.items()})


def kl_cost(llm, conds: list[Condition], quality_text: str | None = None,
            neutral: str | None = None) -> tuple[dict[str, float], str, int]:
    """Per condition the mean KL on the quality text (default: the built-in neutral text, or the
    built-in text `neutral` of data/eval that a behavior names), the text's description, and the
    number of positions measured."""
    if quality_text is None:
        path = NEUTRAL_TEXT if neutral is None else DATA_DIR / "eval" / neutral
        quality_text = path.read_text(encoding="utf-8")
        qname = "the built-in neutral text" if neutral is None else f"the built-in {neutral}"
    else:
        qname = "the given quality text"
    windows = quality_windows(llm, quality_text)
    kl, _ = quality(llm, windows, conds)
    return kl, qname, sum(len(w) - 1 for w in windows)


def summarize(conds: list[Condition], outcomes: list[Outcome], groups: list[str],
              labels: tuple[str, str]) -> list[ConditionReport]:
    by: dict[tuple[str, str], dict[tuple[str, int], str]] = {}
    for o in outcomes:
        by.setdefault((o.condition, o.group), {})[(o.id, o.sample)] = o.label
    reports = []
    for c in conds:
        gs = {}
        for g in groups:
            mine = by.get((c.name, g), {})
            counts: dict[str, int] = {k: 0 for k in (*labels, UNCLASSIFIED)}
            for lab in mine.values():
                counts[lab] = counts.get(lab, 0) + 1
            st = GroupStats(len(mine), counts)
            if c.target is not None and mine:
                hits = counts.get(c.target, 0)
                st.target_rate = hits / len(mine)
                st.target_ci = wilson(hits, len(mine))
                base = by.get((UNSTEERED, g), {})
                b = sum(1 for k, lab in mine.items() if lab == c.target and base.get(k) != c.target)
                cc = sum(1 for k, lab in mine.items() if lab != c.target and base.get(k) == c.target)
                base_rate = sum(1 for lab in base.values() if lab == c.target) / len(base) if base else 0.0
                st.effect = 100 * (st.target_rate - base_rate)
                st.p = mcnemar_exact(b, cc)
                st.discordant = (b, cc)
            gs[g] = st
        p = c.profile
        reports.append(ConditionReport(
            c.name, c.kind, c.target, c.of, c.control_seed,
            p.count("activate") if p else 0, p.count("deactivate") if p else 0, len(p.bias) if p else 0, gs,
            experts=[{"layer": r.layer, "expert": r.expert, "action": r.action} for r in p.experts] if p else []))
    return reports


def evaluate(llm, eval_set: EvalSet, behavior: Behavior, profiles: list[Profile], *, controls: int = 2,
             sampling: Sampling | None = None, control_seed: int = 0, toward: str | None = None, judge=None,
             quality_text: str | None = None, text: str | None = None,
             on_progress: Progress | None = None, conditions: list[Condition] | None = None,
             parallel: int = 1) -> EvalReport:
    """Evaluate profiles (and their random controls) against unsteered on held-out prompts.

    judge(reply, item) -> label defaults to the behavior's rule judge. quality_text: the text
    KL is measured on (default: the built-in neutral text); text: a user text whose
    perplexity is reported per condition. `conditions` replaces the conditions made from
    `profiles` (tune passes its sweep). on_progress(n) is called as work finishes. parallel:
    conversations decoded together (batch.generate_batch)."""
    sampling = sampling or Sampling()
    check_phase(sampling.phase)
    if sampling.samples < 1 or sampling.max_tokens < 1 or sampling.temperature < 0:
        raise SteerError("samples and max_tokens must be >= 1 and temperature >= 0")
    conds = conditions or conditions_for(profiles, llm.info, behavior.labels, controls, control_seed, toward)
    for c in conds:
        if c.profile is not None:
            c.profile.check(llm.info, force=llm.force)
    judge = judge or behavior.judge_rule
    outcomes = run_outcomes(llm, eval_set.items, conds, judge, sampling, on_progress, parallel)
    reports = summarize(conds, outcomes, eval_set.groups, behavior.labels)
    kl, qname, n_q = kl_cost(llm, conds, quality_text, behavior.neutral)
    for r in reports:
        r.kl = kl[r.name]
    base_ppl = None
    if text is not None:
        _, ppl = quality(llm, quality_windows(llm, text), conds)
        for r in reports:
            r.perplexity = ppl[r.name]
        base_ppl = ppl[UNSTEERED]
    return EvalReport(behavior.name, behavior.labels, eval_set.source, list(eval_set.groups), len(eval_set),
                      sampling, reports, outcomes, qname, n_q, unsteered_perplexity=base_ppl)


def work_units(eval_set: EvalSet, n_conditions: int, sampling: Sampling) -> int:
    """How many on_progress units a run reports: one per generated answer."""
    return len(eval_set) * sampling.samples * n_conditions
