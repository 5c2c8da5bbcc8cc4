"""What a profile becomes when it is written into the model file, and how exact that is.

A stock llama.cpp (Ollama, LM Studio) has no steering table, so a baked file must route as
the profile says through what the file itself holds (design.md, "Baking a profile"):
- bias: where the file has a selection bias (exp_probs_b) or a router bias (gpt-oss), forced
  experts get a bias that always puts them in (or keeps them out of) the top-k;
- prune: elsewhere, deactivated experts are removed from every MoE layer.
Router weight rows are never edited: no row keeps an expert out for every input.

Each action is graded against the patched runtime with the profile:
  exact            routing and weights as the runtime's, to float rounding
  selection-exact  the same experts chosen; their weights differ
  approximate      the forced experts hold; other choices may differ (expert groups)
  dropped          not expressible in this file (only with drop_unbakeable)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import SteerError
from ..model import ROUTES_TWICE, ModelInfo, layer_ranges
from ..profile import Profile

METHODS = ("auto", "bias", "prune")
GRADES = ("exact", "selection-exact", "approximate", "dropped")
# softmax gating: whether the graph renormalizes the chosen experts' weights (build_moe_ffn's
# norm_w), per architecture, where it is fixed in code; a file's {arch}.expert_weights_norm wins
NORM_W_BY_ARCH = {"qwen3moe": True, "llama": True, "olmoe": False, "qwen2moe": False}
# gating functions that score each expert on its own (no shared denominator): removing an
# expert changes no other expert's weight
ELEMENTWISE = {"sigmoid", "sqrt-softplus", "softmax-after-topk", "sigmoid-after-topk"}
# a router-bias edit that no router logit can overcome (gpt-oss logits are O(10))
ROUTER_FORCE = 1.0e4
# a selection-bias edit: the patched runtime's own rule (llama-steer.cpp), scores are in [0, 1]
SELECTION_MARGIN = 2.0
# architectures whose loader takes exp_probs_b as optional (TENSOR_NOT_REQUIRED in the vendored
# src/models/*.cpp) and whose graph then adds it to the selection scores: a bake may add one
# to a file that lacks it, so that activation can be baked there too
OPTIONAL_SELECTION_BIAS = {"deepseek2", "deepseek2-ocr", "deepseek32", "bailingmoe2", "dots1", "ernie4_5-moe",
                           "exaone-moe", "glm-dsa", "hy_v3", "hy_v4"}


@dataclass
class Graded:
    layer: int
    expert: int
    action: str          # "activate" | "deactivate" | "bias"
    grade: str           # one of GRADES
    why: str = ""
    value: float = 0.0   # a bias rule's value


@dataclass
class BakePlan:
    method: str                                          # "bias" | "prune"
    info: ModelInfo
    profile: Profile
    actions: list[Graded] = field(default_factory=list)
    removed: dict[int, list[int]] = field(default_factory=dict)  # prune: layer -> experts taken out
    # a global topk K, written as {arch}.expert_used_count (exact: stock llama.cpp then builds
    # every MoE layer with K, which is what the patched runtime does with the profile)
    topk: int | None = None
    topk_dropped: str = ""  # why the profile's topk is not baked (only with drop_unbakeable)

    @property
    def kept(self) -> dict[int, list[int]]:
        """prune: layer -> the source experts the baked file keeps, in the baked file's order."""
        gone = {il: set(v) for il, v in self.removed.items()}
        return {il: [e for e in range(self.info.n_expert) if e not in gone.get(il, ())]
                for il in self.info.moe_layers}

    @property
    def adds_bias(self) -> bool:
        """bias: the file has no selection bias and the bake writes one in."""
        return self.method == "bias" and not self.info.has_selection_bias and bias_kind(self.info) == "selection"

    @property
    def n_expert_out(self) -> int:
        return self.info.n_expert - (len(next(iter(self.removed.values()))) if self.removed else 0)

    @property
    def all_exact(self) -> bool:
        """Every action that is baked is exact (dropped ones are reported apart)."""
        kept = [a for a in self.actions if a.grade != "dropped"]
        # a global topk is exact (expert_used_count): a plan of it alone is all exact
        return (bool(kept) or self.topk is not None) and all(a.grade == "exact" for a in kept)

    def counts(self) -> dict[str, int]:
        return {g: sum(1 for a in self.actions if a.grade == g) for g in GRADES}

    def report(self) -> str:
        c = self.counts()
        head = (f"bake: method {self.method}, {len(self.actions)} actions: "
                + ", ".join(f"{n} {g}" for g, n in c.items() if n))
        if self.method == "prune":
            head += f"; {self.info.n_expert} -> {self.n_expert_out} experts in every MoE layer"
        if self.topk is not None:
            head += f"; experts per token {self.info.n_expert_used} -> {self.topk} (expert_used_count, exact)"
        if self.topk_dropped:
            head += f"; topk dropped ({self.topk_dropped})"
        if self.adds_bias:
            head += (f"; adds a selection bias (exp_probs_b, zero but for the forced experts) to the steered layers, "
                     f"which llama.cpp's {self.info.architecture} loader takes as optional")
        lines = [head]
        for a in self.actions:
            what = f"{a.action} {a.value:+g}" if a.action == "bias" else a.action
            lines.append(f"  layer {a.layer:3d} expert {a.expert:4d}  {what:<12s} {a.grade}"
                         + (f" ({a.why})" if a.why else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"method": self.method, "counts": self.counts(),
                "n_expert": {"source": self.info.n_expert, "baked": self.n_expert_out},
                "n_expert_used": {"source": self.info.n_expert_used,
                                  "baked": self.info.n_expert_used if self.topk is None else self.topk},
                **({"topk_dropped": self.topk_dropped} if self.topk_dropped else {}),
                "actions": [{"layer": a.layer, "expert": a.expert, "action": a.action, "grade": a.grade,
                             "why": a.why, **({"value": a.value} if a.action == "bias" else {})}
                            for a in self.actions]}


def weights_normalized(info: ModelInfo) -> bool | None:
    """Whether softmax gating renormalizes the chosen weights; None where not known."""
    v = info.extra.get("expert_weights_norm")
    if isinstance(v, bool):
        return v
    return NORM_W_BY_ARCH.get(info.architecture)


def bias_kind(info: ModelInfo) -> str:
    """The bias a bake can edit (or add): "selection", "router" or ""."""
    selection_gating = info.gating in ("sigmoid", "softmax")
    if info.has_selection_bias and selection_gating:
        return "selection"
    if info.has_router_bias:
        return "router"
    if selection_gating and info.architecture in OPTIONAL_SELECTION_BIAS:
        return "selection"
    return ""


def plan_bake(info: ModelInfo, profile: Profile, method: str = "auto", drop_unbakeable: bool = False,
              source: str | None = None, force: bool = False) -> BakePlan:
    """Grade every action of `profile` for baking into `info`'s file; raise SteerError (one line)
    for what cannot be baked, unless drop_unbakeable."""
    if method not in METHODS:
        raise SteerError(f"--method {method!r}: must be one of {', '.join(METHODS)}")
    src = source or f"profile {profile.name!r}"
    profile.check(info, force=force, source=src)
    if info.baked:
        raise SteerError(f"{os.path.basename(info.path)} is already baked (profile "
                         f"{info.baked.get('profile', '?')!r}, method {info.baked.get('method', '?')}): "
                         f"bake the source model instead")
    if profile.is_empty:
        raise SteerError(f"{src}: the profile forces no expert and has no bias: nothing to bake")
    kind = bias_kind(info)
    if method == "auto":
        method = "bias" if kind else "prune"
    if method == "bias" and not kind:
        raise SteerError(f"{os.path.basename(info.path)} ({info.architecture}, {info.gating} gating) has no router "
                         f"or selection bias to edit: only --method prune (deactivation) can be baked")
    if method == "prune" and profile.steers_experts:  # a topk alone removes no expert
        _check_prunable(info)
    plan = BakePlan(method, info, profile)
    unbakeable: list[str] = []

    def cannot(a: Graded, why: str) -> None:
        a.grade, a.why = "dropped", why
        unbakeable.append(f"layer {a.layer} expert {a.expert} {a.action}: {why}")

    by_layer: dict[int, list[Graded]] = {}
    for r in profile.experts:
        by_layer.setdefault(r.layer, []).append(Graded(r.layer, r.expert, r.action, ""))
    for b in profile.bias:
        if b.value != 0.0:
            by_layer.setdefault(b.layer, []).append(Graded(b.layer, b.expert, "bias", "", value=b.value))
    for il in sorted(by_layer):
        acts = by_layer[il]
        has_act = any(a.action == "activate" for a in acts)
        for a in acts:
            if method == "bias":
                _grade_bias(info, kind, a, has_act, cannot)
            else:
                _grade_prune(info, a, cannot)
        plan.actions += acts
    topk_why = _topk_unbakeable(info, profile)
    if topk_why:
        unbakeable.append(f"topk: {topk_why}")
        plan.topk_dropped = topk_why
    else:
        plan.topk = profile.topk_global
    if unbakeable and not drop_unbakeable:
        more = f" (and {len(unbakeable) - 1} more)" if len(unbakeable) > 1 else ""
        raise SteerError(f"{src}: cannot bake into {os.path.basename(info.path)} by {method}: {unbakeable[0]}{more}; "
                         f"{_what_can(info, kind)}; --drop-unbakeable bakes the rest")
    if method == "prune":
        plan.removed = _uniform_removal(info, plan, src)
    if not any(a.grade != "dropped" for a in plan.actions) and plan.topk is None:
        raise SteerError(f"{src}: nothing left to bake once the unbakeable actions are dropped")
    return plan


def _topk_unbakeable(info: ModelInfo, profile: Profile) -> str:
    """Why the profile's topk cannot be written as the file's expert_used_count ("" if it can,
    or if there is none)."""
    if profile.topk is None:
        return ""
    if isinstance(profile.topk, list):
        return ("a per-layer K is not bakeable: stock runtimes read one expert_used_count for every layer "
                "(use a global topk, or run the profile)")
    if info.fixed_layers:
        return (f"layers {layer_ranges(info.fixed_layers)} are hash-routed: their token table holds k="
                f"{info.n_expert_used} experts per token, and llama.cpp refuses the file with another count")
    return ""


def _check_prunable(info: ModelInfo) -> None:
    """Pruning renumbers the experts; a file that names experts by number elsewhere breaks."""
    name = os.path.basename(info.path)
    if info.fixed_layers:
        raise SteerError(f"{name}: cannot bake by prune: layers {layer_ranges(info.fixed_layers)} take their experts "
                         f"from a fixed per-token table (hash routing) that names experts by number, which removing "
                         f"experts would break")
    if info.architecture in ROUTES_TWICE:
        raise SteerError(f"{name}: cannot bake by prune: {info.architecture} maps each expert to its group's "
                         f"adjugate expert by number, which removing experts would break")


def _what_can(info: ModelInfo, kind: str) -> str:
    if kind == "router":
        return "this file has a router bias: activation, deactivation and bias rules can be baked"
    if kind == "selection":
        return "this file has a selection bias: activation and deactivation can be baked, bias rules cannot"
    return "this file has no bias tensor: only deactivation can be baked, by pruning"


def _grade_bias(info: ModelInfo, kind: str, a: Graded, layer_has_act: bool, cannot) -> None:
    grouped = info.n_expert_groups > 1
    if a.action == "bias":
        if kind != "router":
            cannot(a, "a soft bias on the router logits needs a router bias; a selection bias is added "
                      "after the gating function")
            return
        a.grade = "exact"
        return
    if grouped:
        a.grade, a.why = "approximate", "expert groups: the edited bias also moves which groups are chosen"
        return
    if a.action == "activate":
        a.grade = "selection-exact"
        a.why = ("weight: the runtime lifts the logit to max + eps, the bias leaves it" if kind == "selection"
                 else "weight: the forcing router bias makes its softmax weight ~1")
        return
    # deactivate
    if layer_has_act:
        a.grade, a.why = "selection-exact", "an activation in this layer changes the weights"
    elif kind == "router" or info.gating == "sigmoid" or weights_normalized(info):
        a.grade = "exact"
    else:
        a.grade, a.why = "selection-exact", "softmax without renormalization: the denominator differs"


def _grade_prune(info: ModelInfo, a: Graded, cannot) -> None:
    if a.action == "activate":
        cannot(a, "activation cannot be pruned into a file without a bias tensor")
        return
    if a.action == "bias":
        cannot(a, "a soft bias needs a router bias tensor")
        return
    if info.n_expert_groups > 1:
        cannot(a, f"the model groups its experts ({info.n_expert_groups} groups): pruning would unbalance them")
        return
    if info.gating in ELEMENTWISE:
        a.grade = "exact"
        return
    norm = weights_normalized(info)
    if norm:
        a.grade = "exact"
    else:
        a.grade = "selection-exact"
        a.why = ("softmax without renormalization: the removed expert leaves the denominator" if norm is False
                 else "softmax; whether the weights are renormalized is not known for this architecture")


def _uniform_removal(info: ModelInfo, plan: BakePlan, src: str) -> dict[int, list[int]]:
    removed = {il: sorted(a.expert for a in plan.actions if a.layer == il and a.action == "deactivate"
                          and a.grade != "dropped") for il in info.moe_layers}
    counts = {il: len(v) for il, v in removed.items()}
    if len(set(counts.values())) > 1:
        by_count: dict[int, list[int]] = {}
        for il, n in counts.items():
            by_count.setdefault(n, []).append(il)
        detail = "; ".join(f"{n} in layers {layer_ranges(ls)}" for n, ls in sorted(by_count.items()))
        raise SteerError(f"{src}: prune removes the same number of experts from every MoE layer (n_expert is one "
                         f"number for the file), but the profile deactivates {detail}; make a profile with the "
                         f"same count in every layer (profile make --deactivate-per-layer N)")
    n = next(iter(counts.values()))
    if info.n_expert - n < info.n_expert_used:
        raise SteerError(f"{src}: pruning {n} experts would leave {info.n_expert - n}, fewer than "
                         f"k={info.n_expert_used}")
    return removed
