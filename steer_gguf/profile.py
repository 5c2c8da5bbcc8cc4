"""Steering profiles: which experts to force on or off, as a JSON file (design.md)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import SteerError
from .fileio import atomic_write
from .model import ModelInfo

FORMAT = "steer-gguf.profile/1"
ACTIONS = {"activate": 1, "deactivate": 2}  # codes of csrc/steer.h's llama_steer_action


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
class Profile:
    model: ModelRef
    experts: list[ExpertRule] = field(default_factory=list)
    bias: list[BiasRule] = field(default_factory=list)
    eps: float = 0.01
    name: str = "profile"
    provenance: dict[str, Any] = field(default_factory=dict)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def empty(cls, info: ModelInfo, name: str = "none") -> "Profile":
        return cls(model=ModelRef.of(info), name=name)

    @property
    def is_empty(self) -> bool:
        return not self.experts and not any(b.value != 0.0 for b in self.bias)

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
        return {
            "format": FORMAT,
            "name": self.name,
            "model": model,
            "eps": self.eps,
            "experts": experts,
            "bias": [asdict(b) for b in self.bias],
            "provenance": self.provenance,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a crash or Ctrl-C never leaves a half-written profile."""
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise SteerError(f"{path}: no such profile file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SteerError(f"{path}: cannot read profile: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SteerError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> "Profile":
        v = _Validator(source)
        if not isinstance(data, dict):
            v.fail("", "must be a JSON object")
        fmt = data.get("format")
        if fmt != FORMAT:
            v.fail("format", f"must be {FORMAT!r}, got {fmt!r}")
        m = v.obj(data, "model")
        model = ModelRef(
            n_expert_used=v.int(m, "n_expert_used", "model.", minimum=1),
            architecture=v.opt_str(m, "architecture", "model."),
            n_layer=v.opt_int(m, "n_layer", "model.", minimum=1),
            n_expert=v.opt_int(m, "n_expert", "model.", minimum=2),
            fingerprint=v.opt_str(m, "fingerprint", "model."),
        )
        eps = v.float(data, "eps", "", default=0.01)
        if eps < 0:
            v.fail("eps", "must be >= 0")
        name = v.opt_str(data, "name", "") or os.path.splitext(os.path.basename(source))[0]
        experts, seen = [], set()
        for i, e in enumerate(v.list(data, "experts")):
            p = f"experts[{i}]."
            if not isinstance(e, dict):
                v.fail(f"experts[{i}]", "must be an object")
            layer = v.int(e, "layer", p, minimum=0)
            expert = v.int(e, "expert", p, minimum=0)
            action = e.get("action")
            if action not in ACTIONS:
                v.fail(p + "action", f"must be 'activate' or 'deactivate', got {action!r}")
            rd = e.get("risk_diff")
            if rd is not None:
                rd = v.float(e, "risk_diff", p)
            if (layer, expert) in seen:
                v.fail(f"experts[{i}]", f"layer {layer} expert {expert} appears twice")
            seen.add((layer, expert))
            experts.append(ExpertRule(layer, expert, action, rd))
        bias, seen_b = [], set()
        for i, b in enumerate(v.list(data, "bias", required=False)):
            p = f"bias[{i}]."
            if not isinstance(b, dict):
                v.fail(f"bias[{i}]", "must be an object")
            layer = v.int(b, "layer", p, minimum=0)
            expert = v.int(b, "expert", p, minimum=0)
            if (layer, expert) in seen_b:
                v.fail(f"bias[{i}]", f"layer {layer} expert {expert} appears twice")
            seen_b.add((layer, expert))
            bias.append(BiasRule(layer, expert, v.float(b, "value", p)))
        prov = data.get("provenance", {})
        if not isinstance(prov, dict):
            v.fail("provenance", "must be an object")
        prof = cls(model=model, experts=experts, bias=bias, eps=eps, name=name, provenance=prov)
        prof._check_self(source)
        return prof

    # ---- checks ------------------------------------------------------------------------
    def _check_self(self, source: str) -> None:
        """What can be checked without the model: ranges against the profile's own shape,
        and the per-layer limits of the method."""
        m, k = self.model, self.model.n_expert_used
        per_layer: dict[int, list[int]] = {}
        for i, r in enumerate(self.experts):
            if m.n_layer is not None and r.layer >= m.n_layer:
                raise SteerError(f"{source}: experts[{i}].layer: {r.layer} out of range (model has {m.n_layer} layers)")
            if m.n_expert is not None and r.expert >= m.n_expert:
                raise SteerError(f"{source}: experts[{i}].expert: {r.expert} out of range (model has {m.n_expert} experts)")
            c = per_layer.setdefault(r.layer, [0, 0])
            c[0 if r.action == "activate" else 1] += 1
        for i, b in enumerate(self.bias):
            if m.n_layer is not None and b.layer >= m.n_layer:
                raise SteerError(f"{source}: bias[{i}].layer: {b.layer} out of range (model has {m.n_layer} layers)")
            if m.n_expert is not None and b.expert >= m.n_expert:
                raise SteerError(f"{source}: bias[{i}].expert: {b.expert} out of range (model has {m.n_expert} experts)")
        for layer, (n_act, n_deact) in sorted(per_layer.items()):
            if n_act > k:
                raise SteerError(f"{source}: experts: layer {layer} activates {n_act} experts, more than k={k} per token")
            if m.n_expert is not None and m.n_expert - n_deact < k:
                raise SteerError(f"{source}: experts: layer {layer} deactivates {n_deact} of {m.n_expert} experts, "
                                 f"leaving fewer than k={k}")

    def check(self, info: ModelInfo, force: bool = False, source: str | None = None) -> None:
        """Raise SteerError unless this profile fits the model. A shape mismatch is always an
        error; another model of the same shape only with force=True."""
        src = source or f"profile {self.name!r}"
        m = self.model
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
        for kind, rules in (("experts", self.experts), ("bias", self.bias)):
            for i, r in enumerate(rules):
                if r.layer >= info.n_layer:
                    raise SteerError(f"{src}: {kind}[{i}].layer: {r.layer} out of range (model has {info.n_layer} layers)")
                if r.layer not in moe:
                    raise SteerError(f"{src}: {kind}[{i}].layer: layer {r.layer} is not a MoE layer "
                                     f"(MoE layers: {_ranges(info.moe_layers)})")
                if r.expert >= info.n_expert:
                    raise SteerError(f"{src}: {kind}[{i}].expert: {r.expert} out of range (model has {info.n_expert} experts)")
        full = Profile(ModelRef(info.n_expert_used, n_layer=info.n_layer, n_expert=info.n_expert),
                       self.experts, self.bias, self.eps, self.name)
        full._check_self(src)

    def to_arrays(self, info: ModelInfo) -> tuple[np.ndarray, np.ndarray | None]:
        """The table the C API takes: actions int8 [n_layer, n_expert], bias float32 or None."""
        actions = np.zeros((info.n_layer, info.n_expert), dtype=np.int8)
        for r in self.experts:
            actions[r.layer, r.expert] = ACTIONS[r.action]
        bias = None
        if self.bias:
            bias = np.zeros((info.n_layer, info.n_expert), dtype=np.float32)
            for b in self.bias:
                bias[b.layer, b.expert] = b.value
        return actions, bias

    def summary(self) -> str:
        layers = sorted({r.layer for r in self.experts} | {b.layer for b in self.bias})
        return (f"{self.name}: {self.count('activate')} activated, {self.count('deactivate')} deactivated, "
                f"{len(self.bias)} biased experts in {len(layers)} layers (eps={self.eps})")


def as_profile(p: "Profile | str | os.PathLike | None") -> "Profile | None":
    if p is None or isinstance(p, Profile):
        return p
    return Profile.load(p)


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    return f"{xs[0]}..{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else ",".join(map(str, xs))


class _Validator:
    """Field checks whose errors name the file and the JSON path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, msg: str):
        where = f"{self.source}: {path}: " if path else f"{self.source}: "
        raise SteerError(where + msg)

    def obj(self, d: dict, key: str) -> dict:
        v = d.get(key)
        if not isinstance(v, dict):
            self.fail(key, "missing or not an object")
        return v

    def list(self, d: dict, key: str, required: bool = True) -> list:
        if key not in d and not required:
            return []
        v = d.get(key)
        if not isinstance(v, list):
            self.fail(key, "missing or not a list")
        return v

    def int(self, d: dict, key: str, prefix: str, minimum: int | None = None) -> int:
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(prefix + key, f"must be an integer, got {v!r}")
        if minimum is not None and v < minimum:
            self.fail(prefix + key, f"must be >= {minimum}, got {v}")
        return v

    def opt_int(self, d: dict, key: str, prefix: str, minimum: int | None = None) -> int | None:
        return None if d.get(key) is None else self.int(d, key, prefix, minimum)

    def opt_str(self, d: dict, key: str, prefix: str) -> str | None:
        v = d.get(key)
        if v is not None and not isinstance(v, str):
            self.fail(prefix + key, f"must be a string, got {v!r}")
        return v

    def float(self, d: dict, key: str, prefix: str, default: float | None = None) -> float:
        v = d.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(prefix + key, f"must be a finite number, got {v!r}")
        return float(v)
