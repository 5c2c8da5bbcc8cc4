"""`bake --check`: the baked file run with no profile against the source run with the profile.

Both are traced on the same tokens (the built-in neutral text, and the prompts of the eval set
named by the profile's dataset when there is one). Per (token, MoE layer) slot the chosen
experts are compared (a pruned file's expert ids mapped back to the source's), then the weights
of the slots that agree, then the next-token distributions (mean KL, source || baked)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from ..engine.scoring import next_token_logprobs
from ..engine.steered import SteeredLlama
from ..errors import SteerError
from ..evaluation.evalsets import builtin_names, load_eval_set
from ..evaluation.measure import NEUTRAL_TEXT
from .plan import BakePlan

MAX_TOKENS = 512   # of neutral text: enough slots to see a difference, cheap on a CPU
MAX_PROMPTS = 16   # of the eval set


@dataclass
class TextCheck:
    name: str
    tokens: int
    slots: int
    agree: int
    max_weight_diff: float
    mean_kl: float

    @property
    def agreement(self) -> float:
        return self.agree / self.slots if self.slots else 1.0


@dataclass
class CheckReport:
    texts: list[TextCheck] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        slots = sum(t.slots for t in self.texts)
        return sum(t.agree for t in self.texts) / slots if slots else 1.0

    @property
    def max_weight_diff(self) -> float:
        return max((t.max_weight_diff for t in self.texts), default=0.0)

    @property
    def mean_kl(self) -> float:
        n = sum(t.tokens for t in self.texts)
        return sum(t.mean_kl * t.tokens for t in self.texts) / n if n else 0.0

    def verdict(self, plan: BakePlan) -> str:
        grades = {a.grade for a in plan.actions}
        same = self.agreement == 1.0
        if grades == {"exact"}:
            ok = same and self.mean_kl < 1e-6
            return ("as graded: exact (every slot agrees, KL at float noise)" if ok else
                    "NOT as graded: the plan says exact but the baked file routes differently")
        if same and self.mean_kl < 1e-6:
            return "exact in practice on these texts, though not every action is exact by construction"
        return "differs from the steered source, as the plan's grades say (not exact)"

    def report(self, plan: BakePlan) -> str:
        lines = ["check: baked (no profile) vs source (with the profile)"]
        for t in self.texts:
            lines.append(f"  {t.name:<28s} {t.tokens:5d} tokens  slots agree {t.agree}/{t.slots} "
                         f"({100 * t.agreement:.2f}%)  max weight diff {t.max_weight_diff:.2e}  "
                         f"mean KL {t.mean_kl:.2e}")
        lines.append(f"  overall: {100 * self.agreement:.2f}% of slots agree, max weight diff "
                     f"{self.max_weight_diff:.2e}, mean KL {self.mean_kl:.2e}: {self.verdict(plan)}")
        return "\n".join(lines)

    def to_dict(self, plan: BakePlan) -> dict:
        return {"agreement": self.agreement, "max_weight_diff": self.max_weight_diff, "mean_kl": self.mean_kl,
                "verdict": self.verdict(plan), "texts": [{**asdict(t), "agreement": t.agreement} for t in self.texts]}


def _eval_prompts(plan: BakePlan) -> tuple[str, list[list[dict]]] | None:
    ds = str(plan.profile.provenance.get("dataset") or "")
    name = ds.removeprefix("builtin:") if ds.startswith("builtin:") else ""
    if name not in builtin_names():
        return None
    items = load_eval_set(f"builtin:{name}", max_items=MAX_PROMPTS).items
    return f"eval set builtin:{name}", [it.messages for it in items]


def _compare(name: str, toks: list[int], src: SteeredLlama, baked: SteeredLlama,
             kept: dict[int, list[int]] | None) -> TextCheck:
    a = src.trace(tokens=toks)
    b = baked.trace(tokens=toks)
    eb = b.experts.astype(np.int64)
    if kept:  # baked expert i of layer l is source expert kept[l][i]
        for j, il in enumerate(b.layers):
            eb[:, j, :] = np.asarray(kept[il], dtype=np.int64)[eb[:, j, :]]
    ea = a.experts.astype(np.int64)
    sa, sb = np.sort(ea, axis=-1), np.sort(eb, axis=-1)
    agree = np.all(sa == sb, axis=-1)
    wdiff = 0.0
    if agree.any():
        oa = np.take_along_axis(a.weights, np.argsort(ea, axis=-1), -1)
        ob = np.take_along_axis(b.weights, np.argsort(eb, axis=-1), -1)
        wdiff = float(np.abs(oa - ob)[agree].max())
    pa = next(iter(next_token_logprobs(src, [toks])))
    pb = next(iter(next_token_logprobs(baked, [toks])))
    kl = float(np.mean(np.sum(np.exp(pa) * (pa - pb), axis=-1))) if len(pa) else 0.0
    return TextCheck(name, len(toks), int(agree.size), int(agree.sum()), wdiff, max(kl, 0.0))


def check_bake(plan: BakePlan, baked_path: str | os.PathLike, **llama_kwargs) -> CheckReport:
    llama_kwargs.setdefault("n_ctx", 1024)
    src = SteeredLlama(plan.info.path, profile=plan.profile, **llama_kwargs)
    try:
        baked = SteeredLlama(baked_path, profile=None, **llama_kwargs)
    except BaseException:
        src.close()
        raise
    try:
        if baked.n_vocab() != src.n_vocab():
            raise SteerError(f"{baked_path}: vocabulary differs from the source model's")
        report = CheckReport()
        limit = min(MAX_TOKENS, src.n_ctx())
        text = NEUTRAL_TEXT.read_text(encoding="utf-8")
        toks = src.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:limit]
        kept = plan.kept if plan.method == "prune" else None
        report.texts.append(_compare("neutral text", toks, src, baked, kept))
        prompts = _eval_prompts(plan)
        if prompts:
            name, convs = prompts
            seqs = [src.chat_tokens(m, add_generation_prompt=True)[:limit] for m in convs]
            parts = [_compare(name, s, src, baked, kept) for s in seqs if len(s) > 1]
            if parts:
                n = sum(p.tokens for p in parts)
                report.texts.append(TextCheck(name, n, sum(p.slots for p in parts), sum(p.agree for p in parts),
                                              max(p.max_weight_diff for p in parts),
                                              sum(p.mean_kl * p.tokens for p in parts) / n))
        return report
    finally:
        baked.close()
        src.close()
