"""`steer-gguf demo`: the whole workflow on a bundled model, in about a minute.

The demo model (steer_gguf/data/demo.gguf, made by scripts/train_demo.py) answers number questions
in digits or in words, and toy "restricted" requests by refusing or complying, choosing
between the two on its own. The demo detects the experts behind each style from built-in
pairs, makes one profile per style, and shows the answers move. `--model bilingual` does the
same for the reply's language (English or Russian) and its drift on a model trained on real text.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..fileio import DATA_DIR

DEMO_MODEL = DATA_DIR / "demo.gguf"
NATURAL_MODEL = DATA_DIR / "natural.gguf"
BILINGUAL_MODEL = DATA_DIR / "bilingual.gguf"

# what each bundled model is, said plainly before the demo runs on it
MODELS = {
    "demo": (DEMO_MODEL, "demo.gguf was TRAINED to tie each style to designated experts (a routing loss and "
                         "forced-routing examples, see data/MODEL_CARD.md): it shows the steering mechanism, "
                         "not what detection finds in a model that learned on its own (try --model natural)"),
    "natural": (NATURAL_MODEL, "natural.gguf: the same data, architecture and seed, trained with no routing "
                               "supervision (LM loss + load balancing, see data/NATURAL_MODEL_CARD.md): whether "
                               "steering moves it is an open question, answered below against random-expert "
                               "controls"),
    "bilingual": (BILINGUAL_MODEL, "bilingual.gguf: English and Russian on real text (Debian's message "
                                   "catalogues), no routing supervision (see data/BILINGUAL_MODEL_CARD.md); it "
                                   "replies in the prompt's language and drifts into Russian in some English "
                                   "replies, as trained: steering is measured below against random-expert controls"),
}
# random-expert controls per profile in the final eval, by model
DEFAULT_CONTROLS = {"demo": 0, "natural": 3, "bilingual": 2}

# behavior -> (pairs, style of behavior 1, style of behavior 2)
BEHAVIORS = {
    "numbers": ("builtin:demo-numbers", "digits", "words"),
    "restricted": ("builtin:demo-restricted", "refuse", "comply"),
}
BILINGUAL_BEHAVIORS = {
    "language": ("builtin:language", "english", "russian"),
    "drift": ("builtin:drift", "english", "drift"),
}


def behaviors_of(model: str) -> dict[str, tuple[str, str, str]]:
    return BILINGUAL_BEHAVIORS if model == "bilingual" else BEHAVIORS


def judge_name(behavior: str) -> str:
    """The steer_gguf.evaluation behavior that judges a demo behavior."""
    return behavior if behavior in BILINGUAL_BEHAVIORS else f"demo-{behavior}"


# The bilingual demo's profiles: 32 on + 32 off risk-difference experts, the only size at which
# risk difference moved the reply's script in the acceptance run (benchmarks/results/
# bilingual-acceptance.json; smaller ones move nothing), garbling the text as it does
BILINGUAL_SIZE = 32
BILINGUAL_RATE_PROMPTS = 24


def profile_size(llm, model: str) -> tuple[int, int]:
    """(activate, deactivate) of each demo profile: every routing slot for the demo models'
    styles, BILINGUAL_SIZE on and off for the bilingual one."""
    if model == "bilingual":
        return BILINGUAL_SIZE, BILINGUAL_SIZE
    return llm.info.n_expert_used * len(llm.info.moe_layers), 0


def classify(behavior: str, text: str) -> str | None:
    """The style an answer shows, or None when it shows neither or both: the judge of the
    demo behavior (steer_gguf.judges), so the demo and `steer-gguf eval` agree."""
    from ..evaluation.judges import UNCLASSIFIED, behavior as judged

    label = judged(judge_name(behavior)).judge_rule(text)
    return None if label == UNCLASSIFIED else label


@dataclass
class StyleRates:
    behavior: str
    profile: str          # "none" or the style steered toward
    n: int
    rates: dict[str, float] = field(default_factory=dict)  # style -> share of answers


def held_out_prompts(model: str = "demo") -> dict[str, dict[str, list[str]]]:
    """The built-in held-out eval sets of a model's demo behaviors (disjoint from their pairs),
    by prompt group (the language set has English and Russian prompts)."""
    from ..evaluation.evalsets import load_eval_set
    from ..evaluation.judges import behavior as judged

    out: dict[str, dict[str, list[str]]] = {}
    for b in behaviors_of(model):
        for item in load_eval_set(judged(judge_name(b)).eval_set).items:
            out.setdefault(b, {}).setdefault(item.group, []).append(item.prompt)
    return out


def make_profiles(llm, out_dir: str, max_pairs: int | None = None, log=print, model: str = "demo") -> dict[str, str]:
    """Detect each behavior's experts and write one profile per style: {style: path}; a style
    two behaviors share (the bilingual model's english) is named after both."""
    from ..detect.datasets import load_pairs
    from ..detect.risk import detect

    n_on, n_off = profile_size(llm, model)
    paths = {}
    behaviors = behaviors_of(model)
    for behavior, (spec, style1, style2) in behaviors.items():
        pairs = load_pairs(spec, max_pairs=max_pairs)
        table = detect(llm, pairs)
        table.to_csv(os.path.join(out_dir, f"{behavior}.csv"))
        top = table.top(4)
        log(f"{behavior}: {len(pairs)} pairs; top experts (layer/expert risk_diff): "
            + ", ".join(f"{r.layer}/{r.expert} {r.risk_diff:+.2f}" for r in top)
            + f"; half the signal in {table.concentration()} experts")
        for style, reverse in ((style1, False), (style2, True)):
            name = style if model != "bilingual" else f"{behavior}-{style}"
            p = table.make_profile(llm.info, activate=n_on, deactivate=n_off, reverse=reverse, name=name,
                                   provenance={"dataset": spec, "behavior": behavior, "toward": style})
            path = os.path.join(out_dir, f"{name}.json")
            p.save(path)
            paths[name] = path
    return paths


def answer(llm, prompt: str, max_tokens: int = 48, temperature: float = 0.0, seed: int = 0) -> str:
    r = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                   temperature=temperature, seed=seed)
    return (r["choices"][0]["message"]["content"] or "").strip()


# The model holds both styles about 50/50 for every prompt, so a greedy answer only shows
# which side of a coin flip wins; sampled answers measure how often the model chooses a style.
RATE_TEMPERATURE = 0.7
RATE_SAMPLES = 2


def style_rates(llm, behavior: str, prompts: list[str], profile_name: str, samples: int = RATE_SAMPLES,
                temperature: float = RATE_TEMPERATURE) -> StyleRates:
    counts: dict[str, int] = {}
    n = 0
    for i, p in enumerate(prompts):
        for j in range(samples):
            s = classify(behavior, answer(llm, p, temperature=temperature, seed=1000 * i + j)) or "other"
            counts[s] = counts.get(s, 0) + 1
            n += 1
    return StyleRates(behavior, profile_name, n, {s: c / n for s, c in counts.items()})


def run_demo(out_dir: str, n_show: int = 3, n_rates: int | None = None, max_pairs: int | None = None,
             n_threads: int | None = None, log=print, model: str = "demo",
             controls: int | None = None) -> list[StyleRates]:
    """Detect, make profiles, show answers side by side, and measure style rates on the
    held-out prompts; with controls > 0 (the natural model's default), also evaluate each
    profile against that many random-expert controls. Returns the measured rates."""
    from ..errors import SteerError
    from ..engine.steered import SteeredLlama

    if model not in MODELS:
        raise SteerError(f"unknown demo model {model!r} (bundled: {', '.join(MODELS)})")
    path, note = MODELS[model]
    if not path.is_file():
        raise SteerError(f"{path}: the bundled {model} model is missing from this installation")
    controls = DEFAULT_CONTROLS[model] if controls is None else controls
    if n_rates is None and model == "bilingual":
        n_rates = BILINGUAL_RATE_PROMPTS  # per prompt group: the whole demo stays within minutes
    if controls < 0:
        raise SteerError(f"controls must be >= 0, got {controls}")
    os.makedirs(out_dir, exist_ok=True)
    threads = {} if n_threads is None else {"n_threads": n_threads, "n_threads_batch": n_threads}
    llm = SteeredLlama(path, n_ctx=512, **threads)
    i = llm.info
    log(f"{model} model: {i.architecture}, {i.n_layer} layers, {i.n_expert} experts, top-{i.n_expert_used} "
        f"({path.stat().st_size / 1e6:.1f} MB)")
    log(f"note: {note}")
    log("1. detecting behavior-linked experts (risk difference on built-in pairs)")
    paths = make_profiles(llm, out_dir, max_pairs=max_pairs, log=lambda s: log("   " + s), model=model)
    from ..profile import Profile

    profiles = {s: Profile.load(p) for s, p in paths.items()}
    behaviors = behaviors_of(model)
    name_of = (lambda b, s: s) if model != "bilingual" else (lambda b, s: f"{b}-{s}")  # noqa: E731
    prompts = held_out_prompts(model)
    log(f"2. held-out prompts, unsteered vs steered (profiles in {out_dir})")
    for behavior, (_, s1, s2) in behaviors.items():
        for group, qs in prompts[behavior].items():
            for q in qs[:n_show]:
                log(f"   Q: {q}")
                with llm.steering(None):
                    log(f"      unsteered     : {answer(llm, q)}")
                for s in (s1, s2):
                    with llm.steering(profiles[name_of(behavior, s)]):
                        log(f"      toward {s:7s}: {answer(llm, q)}")
    log(f"3. style rates over the held-out prompts ({RATE_SAMPLES} answers each, temperature {RATE_TEMPERATURE})")
    results = []
    for behavior, (_, s1, s2) in behaviors.items():
        for group, all_qs in prompts[behavior].items():
            qs = all_qs[:n_rates]
            where = behavior if group == "main" else f"{behavior}, {group} prompts"
            row = []
            for name, prof in (("none", None), (s1, profiles[name_of(behavior, s1)]),
                               (s2, profiles[name_of(behavior, s2)])):
                with llm.steering(prof):
                    r = style_rates(llm, behavior, qs, name)
                if group != "main":
                    r.behavior = f"{behavior}/{group}"
                results.append(r)
                row.append(f"{'unsteered' if name == 'none' else 'toward ' + name}: "
                           f"{r.rates.get(s1, 0):.0%} {s1} / {r.rates.get(s2, 0):.0%} {s2}")
            log(f"   {where} ({len(qs)} prompts): " + "; ".join(row))
    if controls:
        log(f"4. against {controls} random-expert controls per profile (same layers, same counts, other experts)")
        for behavior, (_, s1, s2) in behaviors.items():
            _eval_with_controls(llm, behavior, [profiles[name_of(behavior, s1)], profiles[name_of(behavior, s2)]],
                                controls, n_rates, log)
    llm.close()
    first, (_, _, s2) = next(iter(behaviors.items()))
    log(f"profiles written to {out_dir}: " + ", ".join(os.path.basename(p) for p in paths.values())
        + f"  (try: steer-gguf chat {path} --profile {paths[name_of(first, s2)]})")
    return results


def _eval_with_controls(llm, behavior: str, profiles, controls: int, n_items: int | None, log) -> None:
    """steer-gguf eval on one demo behavior: the shift of each profile beside its controls'."""
    from ..evaluation.measure import Sampling, evaluate
    from ..evaluation.evalsets import load_eval_set
    from ..evaluation.judges import behavior as judged

    b = judged(judge_name(behavior))
    es = load_eval_set(b.eval_set).subset(per_group=n_items)  # the first n of each prompt group
    rep = evaluate(llm, es, b, profiles, controls=controls, sampling=Sampling(RATE_SAMPLES, RATE_TEMPERATURE),
                   parallel=4)
    for line in rep.table().splitlines():
        log("   " + line)
    for p in profiles:
        for g in rep.groups:
            mine = rep.condition(p.name).groups[g]
            ctl = [c.groups[g].effect for c in rep.conditions if c.kind == "control" and c.of == p.name]
            mean = sum(ctl) / len(ctl)
            where = "" if len(rep.groups) == 1 else f" ({g} prompts)"
            log(f"   toward {p.name}{where}: {mine.effect:+.0f} points (McNemar p={mine.p:.2g}); its {len(ctl)} "
                f"random controls: {mean:+.0f} on average ({min(ctl):+.0f} to {max(ctl):+.0f})")
