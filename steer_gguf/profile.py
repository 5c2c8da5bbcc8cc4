"""Steering profiles: which experts to force on or off, as a JSON file (design.md)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import SteerError, printable
from .fileio import atomic_write, read_json
from .model import ModelInfo, layer_ranges

FORMAT = "steer-gguf.profile/1"
# /2 adds "topk" (experts per token) and refuses unknown fields; a profile without topk is
# still written as /1, so readers older than topk keep reading plain profiles
FORMAT_TOPK = "steer-gguf.profile/2"
FORMATS = (FORMAT, FORMAT_TOPK)
# every field a profile may carry, by object: anything else is refused, never ignored (an
# ignored "topk" would run the model with its own k and say nothing)
FIELDS = {
    "": ("format", "name", "model", "eps", "experts", "bias", "topk", "provenance"),
    "model": ("n_expert_used", "architecture", "n_layer", "n_expert", "fingerprint"),
    "experts": ("layer", "expert", "action", "risk_diff"),
    "bias": ("layer", "expert", "value"),
    "topk": ("layer", "k"),
}
FLOAT32_MAX = float(np.finfo(np.float32).max)
INT32_MAX = 2**31 - 1
ACTIONS = ("activate", "deactivate")  # their codes come from the native module (steer.h)


@dataclass
class ModelRef:
    """The model a profile was made for. Only n_expert_used is required: a profile made
    from a bare table with --k carries no identity and is checked by shape alone."""
    n_expert_used: int
    architecture: str | None = None
    n_layer: int | None = None
    n_expert: int | None = None
    fingerprint: str | None = None

    @classmethod
    def of(cls, info: ModelInfo) -> "ModelRef":
        return cls(info.n_expert_used, info.architecture, info.n_layer, info.n_expert, info.fingerprint)


@dataclass
class ExpertRule:
    layer: int
    expert: int
    action: str  # "activate" | "deactivate"
    risk_diff: float | None = None


@dataclass
class BiasRule:
    layer: int
    expert: int
    value: float


@dataclass
class LayerK:
    """Experts per token in one layer (topk)."""
    layer: int
    k: int


@dataclass
class Profile:
    model: ModelRef
    experts: list[ExpertRule] = field(default_factory=list)
    bias: list[BiasRule] = field(default_factory=list)
    eps: float = 0.01
    name: str = "profile"
    provenance: dict[str, Any] = field(default_factory=dict)
    # experts per token: None (the model's own k), one K for every router-chosen MoE layer,
    # or [LayerK] for the layers named (the others keep the model's k)
    topk: "int | list[LayerK] | None" = None

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def empty(cls, info: ModelInfo, name: str = "none") -> "Profile":
        return cls(model=ModelRef.of(info), name=name)

    @property
    def is_empty(self) -> bool:
        return not self.experts and not any(b.value != 0.0 for b in self.bias) and self.topk is None

    @property
    def steers_experts(self) -> bool:
        """Whether it forces or biases any expert (topk aside)."""
        return bool(self.experts) or any(b.value != 0.0 for b in self.bias)

    def k_of(self, layer: int, default: int) -> int:
        """Experts per token this profile gives `layer` (default: the model's k there)."""
        if self.topk is None:
            return default
        if isinstance(self.topk, list):
            return next((t.k for t in self.topk if t.layer == layer), default)
        return self.topk

    def topk_layers(self, info: ModelInfo) -> dict[int, int]:
        """{layer: K} for every layer whose experts per token this profile sets on `info`: a
        global K sets every MoE layer whose experts the router chooses (a hash-routed layer's
        experts come from a fixed table and keep their count)."""
        if self.topk is None:
            return {}
        if isinstance(self.topk, list):
            return {t.layer: t.k for t in self.topk}
        return {il: self.topk for il in info.moe_layers if il not in info.fixed_layers}

    def topk_array(self, info: ModelInfo) -> np.ndarray | None:
        """int32 [n_layer]: K per layer, 0 where the model's own k stays; None: no topk."""
        if self.topk is None:
            return None
        a = np.zeros(info.n_layer, dtype=np.int32)
        for il, k in self.topk_layers(info).items():
            if 0 <= il < info.n_layer:  # check() refuses the others
                a[il] = k
        return a

    @property
    def topk_global(self) -> int | None:
        """The one K of a global topk, else None (per-layer or none)."""
        return self.topk if self.topk is not None and not isinstance(self.topk, list) else None

    def count(self, action: str) -> int:
        return sum(1 for r in self.experts if r.action == action)

    # ---- file I/O ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        model = {k: v for k, v in asdict(self.model).items() if v is not None}
        experts = []
        for r in self.experts:
            d = {"layer": r.layer, "expert": r.expert, "action": r.action}
            if r.risk_diff is not None:
                d["risk_diff"] = round(float(r.risk_diff), 6)
            experts.append(d)
        d = {
            "format": FORMAT if self.topk is None else FORMAT_TOPK,
            "name": self.name,
            "model": model,
            "eps": self.eps,
            "experts": experts,
            "bias": [asdict(b) for b in self.bias],
        }
        if self.topk is not None:
            d["topk"] = [asdict(t) for t in self.topk] if isinstance(self.topk, list) else self.topk
        d["provenance"] = self.provenance
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a crash or Ctrl-C never leaves a half-written profile. A profile
        that would not load again (or that llama.cpp would refuse) is never written."""
        self.validate()
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        path = os.fspath(path)
        return cls.from_dict(read_json(path, "profile file"), source=path)

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> "Profile":
        """A profile from its JSON form; every field is checked by validate()."""
        v = _Validator(source)
        if not isinstance(data, dict):
            v.fail("", "must be a JSON object")
        fmt = data.get("format")
        if fmt not in FORMATS:
            v.fail("format", f"must be {FORMAT!r} or {FORMAT_TOPK!r}, got {_short(fmt)}")
        v.known(data, "")
        m = data.get("model")
        if not isinstance(m, dict):
            v.fail("model", "missing or not an object")
        v.known(m, "model")
        model = ModelRef(m.get("n_expert_used"), m.get("architecture"), m.get("n_layer"), m.get("n_expert"),
                         m.get("fingerprint"))
        # a profile that only sets topk needs no expert rules
        experts = [ExpertRule(e.get("layer"), e.get("expert"), e.get("action"), e.get("risk_diff"))
                   for e in v.objects(data, "experts", required="topk" not in data)]
        bias = [BiasRule(b.get("layer"), b.get("expert"), b.get("value"))
                for b in v.objects(data, "bias", required=False)]
        topk = data.get("topk")
        if isinstance(topk, list):
            topk = [LayerK(t.get("layer"), t.get("k")) for t in v.objects(data, "topk", required=True)]
        name = data.get("name")
        if name is None or name == "":
            name = os.path.splitext(os.path.basename(source))[0]
        prof = cls(model=model, experts=experts, bias=bias, eps=data.get("eps", 0.01), name=name,
                   provenance=data.get("provenance", {}), topk=topk)
        prof.validate(source)
        return prof

    # ---- checks ------------------------------------------------------------------------
    def validate(self, source: str | None = None) -> None:
        """Raise SteerError unless every field has the type and range steering needs, checked
        against the profile's own model shape and the method's per-layer limits. A profile
        built in code is held to exactly what a profile file is."""
        src = source or f"profile {_short(self.name)}"
        v = _Validator(src)
        if not isinstance(self.model, ModelRef):
            v.fail("model", f"must be a ModelRef, got {type(self.model).__name__}")
        m = self.model
        k = v.int(m.n_expert_used, "model.n_expert_used", minimum=1)
        v.opt_str(m.architecture, "model.architecture")
        v.opt_int(m.n_layer, "model.n_layer", minimum=1)
        v.opt_int(m.n_expert, "model.n_expert", minimum=2)
        v.opt_str(m.fingerprint, "model.fingerprint")
        v.float32(self.eps, "eps", minimum=0.0)
        if not isinstance(self.name, str):
            v.fail("name", f"must be a string, got {_short(self.name)}")
        if not isinstance(self.provenance, dict):
            v.fail("provenance", "must be an object")
        per_layer: dict[int, list[int]] = {}
        for kind, rules, rule_type in (("experts", self.experts, ExpertRule), ("bias", self.bias, BiasRule)):
            if not isinstance(rules, list):
                v.fail(kind, "must be a list")
            seen: set[tuple[int, int]] = set()
            for i, r in enumerate(rules):
                at = f"{kind}[{i}]"
                if not isinstance(r, rule_type):
                    v.fail(at, f"must be a {rule_type.__name__}, got {type(r).__name__}")
                layer = v.int(r.layer, at + ".layer", minimum=0)
                expert = v.int(r.expert, at + ".expert", minimum=0)
                if m.n_layer is not None and layer >= m.n_layer:
                    v.fail(at + ".layer", f"{layer} out of range (model has {m.n_layer} layers)")
                if m.n_expert is not None and expert >= m.n_expert:
                    v.fail(at + ".expert", f"{expert} out of range (model has {m.n_expert} experts)")
                if isinstance(r, ExpertRule):
                    if not isinstance(r.action, str) or r.action not in ACTIONS:
                        v.fail(at + ".action", f"must be 'activate' or 'deactivate', got {_short(r.action)}")
                    if r.risk_diff is not None:
                        v.float32(r.risk_diff, at + ".risk_diff")
                    per_layer.setdefault(layer, [0, 0])[0 if r.action == "activate" else 1] += 1
                else:
                    v.float32(r.value, at + ".value")
                if (layer, expert) in seen:
                    v.fail(at, f"layer {layer} expert {expert} appears twice")
                seen.add((layer, expert))
        self._validate_topk(v)
        for layer, (n_act, n_deact) in sorted(per_layer.items()):
            kl = self.k_of(layer, k)  # activated experts count inside the layer's K
            what = f"k={kl}" if kl == k else f"topk K={kl}"
            if n_act > kl:
                v.fail("experts", f"layer {layer} activates {n_act} experts, more than {what} per token")
            if m.n_expert is not None and m.n_expert - n_deact < kl:
                v.fail("experts", f"layer {layer} deactivates {n_deact} of {m.n_expert} experts, "
                                  f"leaving fewer than {what}")

    def _validate_topk(self, v: "_Validator") -> None:
        m, t = self.model, self.topk
        if t is None:
            return

        def k_in_range(x, path):
            kk = v.int(x, path, minimum=1)
            if m.n_expert is not None and kk > m.n_expert:
                v.fail(path, f"{kk} experts per token, but the model has {m.n_expert} experts")

        if not isinstance(t, list):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                v.fail("topk", f"must be an integer K or a list of {{\"layer\": L, \"k\": K}}, got {_short(t)}")
            k_in_range(t, "topk")
            return
        if not t:
            v.fail("topk", "an empty list sets nothing: leave topk out")
        seen: set[int] = set()
        for i, r in enumerate(t):
            at = f"topk[{i}]"
            if not isinstance(r, LayerK):
                v.fail(at, f"must be a LayerK, got {type(r).__name__}")
            layer = v.int(r.layer, at + ".layer", minimum=0)
            if m.n_layer is not None and layer >= m.n_layer:
                v.fail(at + ".layer", f"{layer} out of range (model has {m.n_layer} layers)")
            k_in_range(r.k, at + ".k")
            if layer in seen:
                v.fail(at, f"layer {layer} appears twice")
            seen.add(layer)

    def check(self, info: ModelInfo, force: bool = False, source: str | None = None) -> None:
        """Raise SteerError unless this profile fits the model. A shape mismatch is always an
        error; another model of the same shape only with force=True."""
        self.validate(source)
        src = source or f"profile {_short(self.name)}"
        m = self.model
        if info.baked and not force and m.fingerprint and m.fingerprint == info.baked.get("source_fingerprint"):
            raise SteerError(f"{src}: {os.path.basename(info.path)} already has profile "
                             f"{_short(info.baked.get('profile'))} baked in ({info.baked.get('method')}); a profile "
                             f"made for its source model would steer it twice: steer the source model instead "
                             f"(or --force)")
        for fld, mine, theirs in (("n_layer", m.n_layer, info.n_layer), ("n_expert", m.n_expert, info.n_expert),
                                  ("n_expert_used", m.n_expert_used, info.n_expert_used)):
            if mine is not None and mine != theirs:
                raise SteerError(f"{src}: model.{fld} is {mine} but {os.path.basename(info.path)} has {theirs}: "
                                 f"this profile was made for another model")
        if not force:
            if m.architecture and m.architecture != info.architecture:
                raise SteerError(f"{src}: made for a {m.architecture} model, not {info.architecture} "
                                 f"(use --force to apply anyway)")
            if m.fingerprint and m.fingerprint != info.fingerprint:
                raise SteerError(f"{src}: model.fingerprint does not match {os.path.basename(info.path)}: "
                                 f"made for another model (use --force to apply anyway)")
        moe = set(info.moe_layers)
        fixed = sorted({r.layer for r in [*self.experts, *self.bias]} & set(info.fixed_layers))
        if fixed:
            raise SteerError(f"{src}: touches layers {layer_ranges(fixed)} of {os.path.basename(info.path)}, whose "
                             f"experts {info.architecture} takes from a fixed per-token table (hash routing), not "
                             f"the router: a profile cannot change them (steerable: "
                             f"{layer_ranges([il for il in info.moe_layers if il not in info.fixed_layers])})")
        for kind, rules in (("experts", self.experts), ("bias", self.bias)):
            for i, r in enumerate(rules):
                if r.layer >= info.n_layer:
                    raise SteerError(f"{src}: {kind}[{i}].layer: {r.layer} out of range (model has {info.n_layer} layers)")
                if r.layer not in moe:
                    raise SteerError(f"{src}: {kind}[{i}].layer: layer {r.layer} is not a MoE layer "
                                     f"(MoE layers: {layer_ranges(info.moe_layers) or 'none'})")
                if r.expert >= info.n_expert:
                    raise SteerError(f"{src}: {kind}[{i}].expert: {r.expert} out of range (model has {info.n_expert} experts)")
        if isinstance(self.topk, list):
            for i, t in enumerate(self.topk):
                if t.layer >= info.n_layer:
                    raise SteerError(f"{src}: topk[{i}].layer: {t.layer} out of range (model has {info.n_layer} layers)")
                if t.layer not in moe:
                    raise SteerError(f"{src}: topk[{i}].layer: layer {t.layer} has no experts "
                                     f"(MoE layers: {layer_ranges(info.moe_layers) or 'none'})")
                if t.layer in info.fixed_layers:
                    raise SteerError(f"{src}: topk[{i}].layer: layer {t.layer} of {os.path.basename(info.path)} is "
                                     f"hash-routed (each token's experts come from a fixed table), so its experts "
                                     f"per token cannot change")
        elif self.topk is not None and not self.topk_layers(info):
            raise SteerError(f"{src}: topk: {os.path.basename(info.path)} has no router-chosen MoE layer to set")
        full = Profile(ModelRef(info.n_expert_used, n_layer=info.n_layer, n_expert=info.n_expert),
                       self.experts, self.bias, self.eps, self.name, topk=self.topk)
        full.validate(src)

    def to_arrays(self, info: ModelInfo, codes: dict[str, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """The table the C API takes: actions int8 [n_layer, n_expert] with the C API's action
        `codes` (_native.ACTIONS), bias float32 or None."""
        actions = np.full((info.n_layer, info.n_expert), codes["none"], dtype=np.int8)
        for r in self.experts:
            actions[r.layer, r.expert] = codes[r.action]
        bias = None
        if self.bias:
            bias = np.zeros((info.n_layer, info.n_expert), dtype=np.float32)
            for b in self.bias:
                bias[b.layer, b.expert] = b.value
        return actions, bias

    def summary(self) -> str:
        layers = sorted({r.layer for r in self.experts} | {b.layer for b in self.bias})
        return (f"{printable(self.name)}: {self.count('activate')} activated, {self.count('deactivate')} deactivated, "
                f"{len(self.bias)} biased experts in {len(layers)} layers (eps={self.eps})"
                + ("" if self.topk is None else f"; {self.topk_summary()}"))

    def topk_summary(self) -> str:
        """The experts-per-token part, one phrase."""
        if self.topk is None:
            return f"k={self.model.n_expert_used} per token (the model's)"
        if isinstance(self.topk, list):
            return "topk " + ", ".join(f"layer {t.layer}: {t.k}" for t in self.topk) + " (other layers: the model's k)"
        return f"topk {self.topk} experts per token in every MoE layer (model's k={self.model.n_expert_used})"

    def report(self) -> str:
        """What `steer-gguf profile show` prints: the summary, the model, every rule."""
        m = self.model
        lines = [self.summary(),
                 f"model: {printable(m.architecture or '?')} n_layer={m.n_layer or '?'} n_expert={m.n_expert or '?'} "
                 f"k={m.n_expert_used} fingerprint={printable(m.fingerprint or '(none: checked by shape)')}"]
        for r in self.experts:
            rd = f"  risk_diff={r.risk_diff:+.4f}" if r.risk_diff is not None else ""
            lines.append(f"  layer {r.layer:3d} expert {r.expert:4d} {r.action}{rd}")
        for b in self.bias:
            lines.append(f"  layer {b.layer:3d} expert {b.expert:4d} bias {b.value:+g}")
        if self.topk is not None:
            lines.append(f"experts per token: {self.topk_summary()}")
        if self.provenance:
            lines.append(f"provenance: {json.dumps(self.provenance)}")
        return "\n".join(lines)

    def extent(self) -> tuple[int, int]:
        """(n_layer, n_expert) of its model, or as far as its rules reach when the file does not say."""
        m = self.model
        n_layer = m.n_layer or 1 + max([r.layer for r in self.experts] + [b.layer for b in self.bias], default=0)
        n_expert = m.n_expert or 1 + max([r.expert for r in self.experts] + [b.expert for b in self.bias], default=0)
        return n_layer, n_expert


def with_topk(p: "Profile | str | os.PathLike | None", topk: "int | list[LayerK] | None",
              info: ModelInfo) -> "Profile | None":
    """`p` (a profile, its path, or None: no expert rules) with `topk` in place of its own;
    topk None: `p` unchanged. What --topk K and the API's topk= do."""
    p = as_profile(p)
    if topk is None:
        return p
    base = p if p is not None else Profile.empty(info, name=f"topk{topk if isinstance(topk, int) else ''}")
    return dataclasses.replace(base, topk=topk)


def as_profile(p: "Profile | str | os.PathLike | None") -> "Profile | None":
    if p is None or isinstance(p, Profile):
        return p
    if not isinstance(p, (str, os.PathLike)):
        raise SteerError(f"profile: must be a Profile, a path or None, got {type(p).__name__}")
    return Profile.load(p)


def _short(v: Any) -> str:
    """repr() cut to one short line: a message must not carry a whole file's worth of value."""
    try:
        r = repr(v)
    except (RecursionError, ValueError):  # a nested structure, an int of 5,000 digits
        return f"a {type(v).__name__}"
    return r if len(r) <= 60 else r[:57] + "..."


class _Validator:
    """Field checks whose errors name the file and the field's JSON path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, msg: str):
        where = f"{self.source}: {path}: " if path else f"{self.source}: "
        raise SteerError(where + msg)

    def objects(self, d: dict, key: str, required: bool) -> list[dict]:
        if key not in d and not required:
            return []
        items = d.get(key)
        if not isinstance(items, list):
            self.fail(key, "missing or not a list")
        for i, x in enumerate(items):
            if not isinstance(x, dict):
                self.fail(f"{key}[{i}]", "must be an object")
            self.known(x, key, f"{key}[{i}]")
        return items

    def known(self, d: dict, kind: str, at: str | None = None) -> None:
        """Refuse a field this version does not know: ignoring it would run something else
        than the file says, silently."""
        for name in d:
            if name not in FIELDS[kind]:
                where = f"{at if at is not None else kind}.{printable(str(name))}".lstrip(".")
                self.fail(where, f"unknown field (known here: {', '.join(FIELDS[kind])}); "
                                 f"written by a newer steer-gguf?")

    def int(self, v: Any, path: str, minimum: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            self.fail(path, f"must be an integer, got {_short(v)}")
        if minimum is not None and v < minimum:
            self.fail(path, f"must be >= {minimum}, got {v}")
        if v > INT32_MAX:
            self.fail(path, f"{_short(v)} is too large")
        return int(v)

    def opt_int(self, v: Any, path: str, minimum: int | None = None) -> int | None:
        return None if v is None else self.int(v, path, minimum)

    def opt_str(self, v: Any, path: str) -> str | None:
        if v is not None and not isinstance(v, str):
            self.fail(path, f"must be a string, got {_short(v)}")
        return v

    def float32(self, v: Any, path: str, minimum: float | None = None) -> float:
        """A finite number that stays finite as llama.cpp's float32."""
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            self.fail(path, f"must be a finite number, got {_short(v)}")
        try:
            x = float(v)
        except OverflowError:
            x = math.inf
        if not math.isfinite(x):
            self.fail(path, f"must be a finite number, got {_short(v)}")
        with np.errstate(over="ignore"):
            representable = bool(np.isfinite(np.float32(x)))
        if not representable:
            self.fail(path, f"{x:g} is not representable as a 32-bit float (|value| <= {FLOAT32_MAX:.4g})")
        if minimum is not None and x < minimum:
            self.fail(path, f"must be >= {minimum:g}, got {x:g}")
        return x
