"""Detection statistics (design.md, "The method, exactly"): per (layer, expert) counts of
router selections on behavior-1 and behavior-2 target tokens, the risk difference, the
ranking, and the rule that turns a ranking into a steering profile. Pure numpy; the
model-driving part is at the bottom."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SteerError
from ..fileio import MAX_DATASET_BYTES, decode_text, parse_json, read_bytes
from ..fileio import atomic_write
from ..model import ModelInfo
from ..profile import ExpertRule, ModelRef, Profile
from .confidence import DEFAULT_BOOTSTRAP, DEFAULT_PERMUTATIONS, DEFAULT_SPLITS, PairCounts, assess

COUNT_COLUMNS = ("layer", "expert", "a1", "d1", "a2", "d2")
CSV_COLUMNS = COUNT_COLUMNS + ("p1", "p2", "risk_diff")
# causal tables (steer_gguf/causal.py) add the measured effects of forcing each expert on and
# off (empty = not measured) and their difference; greedy tables add each chosen move's step
EFFECT_COLUMNS = ("effect_on", "effect_off")
GREEDY_COLUMNS = ("greedy_on", "greedy_off")
# 95% bootstrap intervals over pairs (detect/confidence.py) and the share of resamples with the
# estimate's sign; any table may carry them (empty = not computed), old tables simply lack them
RD_CI_COLUMNS = ("rd_lo", "rd_hi", "rd_conf")
EFFECT_CI_COLUMNS = ("effect_on_lo", "effect_on_hi", "on_conf", "effect_off_lo", "effect_off_hi", "off_conf")
FLOAT_COLUMNS = EFFECT_COLUMNS + RD_CI_COLUMNS + EFFECT_CI_COLUMNS
OPTIONAL_GROUPS = (EFFECT_COLUMNS, GREEDY_COLUMNS, RD_CI_COLUMNS, EFFECT_CI_COLUMNS)
# risk differences that are equal as fractions can differ in the last bits as floats;
# ranking on a rounded key keeps such ties resolved by (layer, expert), reproducibly
_RANK_DECIMALS = 12


@dataclass
class Row:
    layer: int
    expert: int
    a1: int
    d1: int
    a2: int
    d2: int
    p1: float
    p2: float
    risk_diff: float
    effect_on: float | None = None
    effect_off: float | None = None

    @property
    def effect(self) -> float | None:
        if self.effect_on is None or self.effect_off is None:
            return None
        return self.effect_on - self.effect_off


def _rate(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    n = a + d
    out = np.zeros(a.shape, dtype=np.float64)
    np.divide(a, n, out=out, where=n > 0)
    return out


def ranking(layer: np.ndarray, expert: np.ndarray, risk_diff: np.ndarray) -> np.ndarray:
    """Indices ordering rows by |risk_diff| descending, then layer, then expert."""
    key = np.round(np.abs(risk_diff), _RANK_DECIMALS)
    return np.lexsort((expert, layer, -key))


@dataclass(eq=False)  # numpy columns: elementwise == would make the generated __eq__ ambiguous
class DetectionTable:
    """One row per (layer, expert), always complete (every expert 0..n_expert-1 of every
    layer present) and sorted by the ranking. `meta` keys, when known: architecture,
    fingerprint, n_layer, n_expert, n_expert_used, dataset, pairs, table (a CSV it came from).

    Causal tables also carry effect_on / effect_off (float, NaN = not measured): the change
    in the mean of log P(behavior-1 target) - log P(behavior-2 target) when the expert alone
    is forced on / off; they are ranked by |effect| = |effect_on - effect_off| (measured rows
    first). Greedy tables add greedy_on / greedy_off (int): +s if the greedy search toward
    behavior 1 took that move at step s, -s toward behavior 2, 0 if never taken."""
    layer: np.ndarray
    expert: np.ndarray
    a1: np.ndarray
    d1: np.ndarray
    a2: np.ndarray
    d2: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    effect_on: np.ndarray | None = None
    effect_off: np.ndarray | None = None
    greedy_on: np.ndarray | None = None
    greedy_off: np.ndarray | None = None
    rd_lo: np.ndarray | None = None
    rd_hi: np.ndarray | None = None
    rd_conf: np.ndarray | None = None
    effect_on_lo: np.ndarray | None = None
    effect_on_hi: np.ndarray | None = None
    on_conf: np.ndarray | None = None
    effect_off_lo: np.ndarray | None = None
    effect_off_hi: np.ndarray | None = None
    off_conf: np.ndarray | None = None
    p1: np.ndarray = field(init=False)
    p2: np.ndarray = field(init=False)
    risk_diff: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        cols = [np.asarray(getattr(self, c), dtype=np.int64).reshape(-1) for c in COUNT_COLUMNS]
        if len({c.shape for c in cols}) != 1:
            raise ValueError("DetectionTable columns must have the same length")
        if any((c < 0).any() for c in cols):
            raise ValueError("DetectionTable columns must be non-negative")
        layer, expert = cols[0], cols[1]
        if len(layer):
            keys = layer * (int(expert.max()) + 1) + expert
            n_layers = len(np.unique(layer))
            if len(np.unique(keys)) != len(keys) or len(keys) != n_layers * (int(expert.max()) + 1):
                raise ValueError("DetectionTable must have exactly one row per (layer, expert)")
        p1, p2 = _rate(cols[2], cols[3]), _rate(cols[4], cols[5])
        rd = p1 - p2
        extra = self._extra_columns(len(layer))
        if "effect_on" in extra:
            # measured experts by |effect|, then the unmeasured ones by |risk_diff|
            eff = extra["effect_on"] - extra["effect_off"]
            mag = np.where(np.isnan(eff), -1.0, np.round(np.abs(eff), _RANK_DECIMALS))
            order = np.lexsort((expert, layer, -np.round(np.abs(rd), _RANK_DECIMALS), -mag))
        else:
            order = ranking(layer, expert, rd)
        for name, c in zip(COUNT_COLUMNS, cols):
            setattr(self, name, c[order])
        for name, c in extra.items():
            setattr(self, name, c[order])
        self.p1, self.p2, self.risk_diff = p1[order], p2[order], rd[order]
        self.meta = dict(self.meta or {})

    def _extra_columns(self, n: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        given = {c: getattr(self, c) for group in OPTIONAL_GROUPS for c in group if getattr(self, c) is not None}
        if any(c in given for c in GREEDY_COLUMNS + EFFECT_CI_COLUMNS) and not all(c in given for c in EFFECT_COLUMNS):
            raise ValueError("a causal DetectionTable needs both effect_on and effect_off")
        for group in OPTIONAL_GROUPS:
            if any(c in given for c in group) and not all(c in given for c in group):
                raise ValueError(f"a DetectionTable with {group[0]} needs all of {', '.join(group)}")
        for c, v in given.items():
            a = np.asarray(v, dtype=np.float64 if c in FLOAT_COLUMNS else np.int64).reshape(-1)
            if a.shape != (n,):
                raise ValueError(f"DetectionTable column {c} has {a.size} values for {n} rows")
            if c in FLOAT_COLUMNS and np.isinf(a).any():
                raise ValueError(f"DetectionTable column {c} must be finite or NaN")
            out[c] = a
        return out

    # ---- what kind of table ------------------------------------------------------------
    @property
    def method(self) -> str:
        if self.greedy_on is not None:
            return "causal-greedy"
        return "causal" if self.effect_on is not None else "risk_diff"

    @property
    def effect(self) -> np.ndarray | None:
        """effect_on - effect_off: how far the expert pushes toward behavior 1 between
        forced on and forced off (NaN where not measured); None for a risk-difference table."""
        if self.effect_on is None:
            return None
        return self.effect_on - self.effect_off

    @property
    def score(self) -> np.ndarray:
        """The signed statistic the table is ranked by: risk_diff, or a causal table's
        effect (0 where not measured)."""
        e = self.effect
        return self.risk_diff if e is None else np.nan_to_num(e, nan=0.0)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_counts(cls, counts_1: np.ndarray, counts_2: np.ndarray, n_tokens_1: int, n_tokens_2: int,
                    layers: list[int], meta: dict[str, Any] | None = None, intervals=None) -> "DetectionTable":
        """counts_b: int [len(layers), n_expert], how many behavior-b target tokens selected
        each expert in each layer; n_tokens_b: the number of those tokens (d = n_tokens - a).
        intervals: a confidence.Intervals of the risk differences, layer-major like counts."""
        c1, c2 = np.asarray(counts_1, dtype=np.int64), np.asarray(counts_2, dtype=np.int64)
        if c1.ndim != 2 or c1.shape != c2.shape:
            raise ValueError(f"counts must be two equal 2-D arrays, got {c1.shape} and {c2.shape}")
        if c1.shape[0] != len(layers):
            raise ValueError(f"counts have {c1.shape[0]} rows but {len(layers)} layers were given")
        if len(set(layers)) != len(layers):
            raise ValueError("layers must be distinct")
        for c, n in ((c1, n_tokens_1), (c2, n_tokens_2)):
            if c.size and (c.min() < 0 or c.max() > n):
                raise ValueError(f"counts must lie in 0..n_tokens ({n})")
        n_expert = c1.shape[1]
        layer = np.repeat(np.asarray(layers, dtype=np.int64), n_expert)
        expert = np.tile(np.arange(n_expert, dtype=np.int64), len(layers))
        a1, a2 = c1.reshape(-1), c2.reshape(-1)
        ci = {} if intervals is None else {"rd_lo": intervals.lo, "rd_hi": intervals.hi, "rd_conf": intervals.conf}
        return cls(layer, expert, a1, n_tokens_1 - a1, a2, n_tokens_2 - a2, dict(meta or {}), **ci)

    # ---- shape -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layer)

    @property
    def n_expert(self) -> int:
        return int(self.expert.max()) + 1 if len(self) else 0

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in np.unique(self.layer)]

    def row(self, i: int) -> Row:
        on = off = None
        if self.effect_on is not None and not np.isnan(self.effect_on[i]):
            on, off = float(self.effect_on[i]), float(self.effect_off[i])
        return Row(int(self.layer[i]), int(self.expert[i]), int(self.a1[i]), int(self.d1[i]), int(self.a2[i]),
                   int(self.d2[i]), float(self.p1[i]), float(self.p2[i]), float(self.risk_diff[i]), on, off)

    def top(self, n: int) -> list[Row]:
        """The n best-ranked rows. Rows, not a table: a table is always complete."""
        return [self.row(i) for i in range(min(max(n, 0), len(self)))]

    def concentration(self, share: float = 0.5) -> int:
        """How many of the best-ranked experts hold `share` (half) of the total |risk_diff|: small
        means the behavior lives in a few experts. 0 when nothing differs. Causal tables:
        of the total |effect| of the measured experts."""
        mags = np.abs(self.score)  # already in ranking order, i.e. descending
        total = float(mags.sum())
        if total <= 0:
            return 0
        cum = np.cumsum(mags)
        return int(np.searchsorted(cum, total * share - 1e-12 * total, side="left")) + 1

    def by_layer(self) -> list[tuple[int, float, float]]:
        """Where the signal lives: (layer, max |risk_diff|, mean |risk_diff|) per layer."""
        out = []
        for layer in self.layers:
            rd = np.abs(self.risk_diff[self.layer == layer])
            out.append((layer, float(rd.max()), float(rd.mean())))
        return out

    # ---- CSV ---------------------------------------------------------------------------
    def to_csv(self, path: str | os.PathLike) -> None:
        """Write atomically: an error or Ctrl-C never leaves a partial table."""
        causal, greedy = self.effect_on is not None, self.greedy_on is not None
        floats = [c for c in RD_CI_COLUMNS + EFFECT_COLUMNS + EFFECT_CI_COLUMNS if getattr(self, c) is not None]
        if causal:
            floats.insert(floats.index("effect_off") + 1, "effect")
        header = CSV_COLUMNS + tuple(floats) + (GREEDY_COLUMNS if greedy else ())
        lines = _meta_line(self.meta) + [",".join(header)]
        cells = [self.effect if c == "effect" else getattr(self, c) for c in floats]
        for i in range(len(self)):
            line = (f"{self.layer[i]},{self.expert[i]},{self.a1[i]},{self.d1[i]},{self.a2[i]},{self.d2[i]},"
                    f"{self.p1[i]:.6f},{self.p2[i]:.6f},{self.risk_diff[i]:.6f}")
            # not measured / not computed: empty cells
            line += "".join("," + ("" if np.isnan(col[i]) else f"{col[i]:.6f}") for col in cells)
            if greedy:
                line += f",{self.greedy_on[i]},{self.greedy_off[i]}"
            lines.append(line)
        atomic_write(os.fspath(path), "\n".join(lines) + "\n")

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> "DetectionTable":
        """Read our table or any CSV with SteerMoE's count columns (layer, expert, a1, a2,
        d1, d2) in any order; other columns are ignored and p/risk_diff are recomputed."""
        path = os.fspath(path)
        text = decode_text(read_bytes(path, "file", MAX_DATASET_BYTES), path)
        try:
            table = cls._read_csv(path, csv.reader(io.StringIO(text, newline="")))
        except csv.Error as e:
            raise SteerError(f"{path}: bad CSV: {e}") from None
        table.meta.update(_read_meta(path, text))
        return table

    @classmethod
    def _read_csv(cls, path: str, reader) -> "DetectionTable":
        header = next(reader, None)
        while header and header[0].startswith("#"):  # our metadata line (see _meta_line)
            header = next(reader, None)
        if header is None:
            raise SteerError(f"{path}: empty file (expected a header with {', '.join(COUNT_COLUMNS)})")
        hline = reader.line_num
        names = [h.strip() for h in header]
        index: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in COUNT_COLUMNS and name in index:
                raise SteerError(f"{path}:{hline}: column '{name}' appears twice")
            index.setdefault(name, i)
        missing = [c for c in COUNT_COLUMNS if c not in index]
        if missing:
            raise SteerError(f"{path}:{hline}: missing column(s) {', '.join(missing)} "
                             f"(a detection table needs {', '.join(COUNT_COLUMNS)})")
        values: dict[str, list[int]] = {c: [] for c in COUNT_COLUMNS}
        extra = [c for group in OPTIONAL_GROUPS for c in group if c in index]
        for group in (EFFECT_COLUMNS, GREEDY_COLUMNS):
            have = [c for c in group if c in index]
            if have and len(have) != len(group):
                other = next(c for c in group if c not in index)
                raise SteerError(f"{path}:{hline}: column '{have[0]}' needs column '{other}' too")
        if "greedy_on" in index and "effect_on" not in index:
            raise SteerError(f"{path}:{hline}: greedy columns need effect_on and effect_off too")
        for c in extra:
            if names.count(c) > 1:
                raise SteerError(f"{path}:{hline}: column '{c}' appears twice")
        extra_values: dict[str, list[float]] = {c: [] for c in extra}
        seen: dict[tuple[int, int], int] = {}
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue  # blank lines carry nothing
            parsed = {}
            for c in COUNT_COLUMNS:
                i = index[c]
                if i >= len(row) or not row[i].strip():
                    raise SteerError(f"{path}:{line}: column '{c}': missing value")
                v = _parse_count(row[i])
                if v is None:
                    raise SteerError(f"{path}:{line}: column '{c}': {row[i].strip()!r} is not an integer")
                if v < 0:
                    what = "count" if c not in ("layer", "expert") else c
                    raise SteerError(f"{path}:{line}: column '{c}': negative {what} {v}")
                parsed[c] = v
            key = (parsed["layer"], parsed["expert"])
            if key in seen:
                raise SteerError(f"{path}:{line}: duplicate row for layer {key[0]} expert {key[1]} "
                                 f"(first on line {seen[key]})")
            seen[key] = line
            for c in COUNT_COLUMNS:
                values[c].append(parsed[c])
            for c in extra:
                cell = row[index[c]].strip() if index[c] < len(row) else ""
                extra_values[c].append(_parse_extra(path, line, c, cell))
        if not seen:
            raise SteerError(f"{path}: no rows after the header")
        n_expert = max(e for _, e in seen) + 1
        layers = sorted({layer for layer, _ in seen})
        if len(seen) != len(layers) * n_expert:
            n_missing = len(layers) * n_expert - len(seen)
            layer, expert = next((layer, e) for layer in layers for e in range(n_expert) if (layer, e) not in seen)
            raise SteerError(f"{path}: missing row for layer {layer} expert {expert} ({n_missing} missing in all: "
                             f"the table needs experts 0..{n_expert - 1} for each of its {len(layers)} layers)")
        cols = {c: np.asarray(v, dtype=np.float64 if c in FLOAT_COLUMNS else np.int64)
                for c, v in extra_values.items()}
        try:
            return cls(*(np.asarray(values[c], dtype=np.int64) for c in COUNT_COLUMNS), meta={"table": path}, **cols)
        except ValueError as e:  # a partial group of optional columns
            raise SteerError(f"{path}:{hline}: {str(e).replace('a DetectionTable', 'a table')}") from None

    # ---- profile rule ------------------------------------------------------------------
    def make_profile(self, info_or_k: ModelInfo | int, activate: int, deactivate: int = 0, reverse: bool = False,
                     eps: float = 0.01, name: str = "profile", provenance: dict[str, Any] | None = None,
                     deactivate_per_layer: int = 0, min_confidence: float | None = None) -> Profile:
        """design.md's rule. activate N: walk the ranking, take experts with risk_diff > 0,
        at most k per layer (an expert over the cap is skipped, the walk goes on), until N.
        deactivate M: the first M experts with risk_diff < 0; each layer must keep >= k.
        reverse: steer toward behavior 2 (risk_diff negated; |risk_diff| and so the ranking
        are unchanged). Each rule records the signed risk_diff used, i.e. after the flip.
        Causal tables walk other orders (see _walk); their rules record the risk_diff too.
        info_or_k: a ModelInfo binds the profile to that model; a bare k gives a profile
        that carries only the table's shape (n_expert) and k.
        deactivate_per_layer N (instead of deactivate): the N best-ranked experts to deactivate in
        every MoE layer, the uniform form that `bake --method prune` can write into a file.
        min_confidence C: skip experts whose bootstrap confidence (the share of resamples of the
        pairs in which the statistic the rule uses has the estimate's sign) is below C; 0.975
        is about "the 95% interval excludes 0". The walk goes on past them."""
        k, ref = self._model_ref(info_or_k)
        min_conf = self._check_min_confidence(min_confidence)
        for what, v in (("activate", activate), ("deactivate", deactivate),
                        ("deactivate_per_layer", deactivate_per_layer)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise SteerError(f"{what}: must be a non-negative integer, got {v!r}")
        if deactivate and deactivate_per_layer:
            raise SteerError("give deactivate or deactivate_per_layer, not both")
        if activate == 0 and deactivate == 0 and deactivate_per_layer == 0:
            raise SteerError("activate and deactivate are both 0: the profile would be empty")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise SteerError(f"eps: must be a finite number >= 0, got {eps!r}")
        rd = -self.risk_diff if reverse else self.risk_diff
        direction = "behavior 2 (reversed)" if reverse else "behavior 1"

        rules: list[ExpertRule] = []
        per_layer: dict[int, int] = {}
        if activate:
            for i in self._walk("activate", reverse, min_conf):
                layer = int(self.layer[i])
                if per_layer.get(layer, 0) >= k:
                    continue
                per_layer[layer] = per_layer.get(layer, 0) + 1
                rules.append(ExpertRule(layer, int(self.expert[i]), "activate", float(rd[i])))
                if len(rules) == activate:
                    break
            if len(rules) < activate:
                raise SteerError(f"activate {activate}: only {len(rules)} experts with "
                                 f"{self._why('activate', min_conf)} toward {direction} can be activated "
                                 f"(at most k={k} per layer)")
        if deactivate:
            # a causal table can show an expert helping both when forced on and forced off
            # (effects are measured one at a time): one taken to activate is not deactivated too
            taken = {(r.layer, r.expert) for r in rules}
            neg = [i for i in self._walk("deactivate", reverse, min_conf)
                   if (int(self.layer[i]), int(self.expert[i])) not in taken]
            if len(neg) < deactivate:
                raise SteerError(f"deactivate {deactivate}: only {len(neg)} experts have "
                                 f"{self._why('deactivate', min_conf)} toward {direction}")
            n_expert = ref.n_expert if ref.n_expert is not None else self.n_expert
            off: dict[int, int] = {}
            for i in neg[:deactivate]:
                layer = int(self.layer[i])
                off[layer] = off.get(layer, 0) + 1
                rules.append(ExpertRule(layer, int(self.expert[i]), "deactivate", float(rd[i])))
            for layer, c in sorted(off.items()):
                if n_expert - c < k:
                    raise SteerError(f"deactivate {deactivate}: layer {layer} would lose {c} of its {n_expert} experts, "
                                     f"leaving {n_expert - c}, fewer than k={k}")
        if deactivate_per_layer:
            rules += self._per_layer_off(info_or_k, deactivate_per_layer, reverse, rd, k, rules, min_conf)
        prov: dict[str, Any] = {"method": self.method, "dataset": self.meta.get("dataset"),
                                "pairs": self.meta.get("pairs"), "activate": int(activate),
                                "deactivate": int(deactivate), "reverse": bool(reverse)}
        if deactivate_per_layer:
            prov["deactivate_per_layer"] = int(deactivate_per_layer)
        if self.meta.get("table"):
            prov["table"] = self.meta["table"]
        if min_confidence is not None:
            prov["min_confidence"] = float(min_confidence)
        if self.verdict:
            prov["verdict"] = self.verdict
        prov.update(provenance or {})
        return Profile(model=ref, experts=rules, eps=float(eps), name=name, provenance=prov)

    def _per_layer_off(self, info_or_k: ModelInfo | int, n: int, reverse: bool, rd: np.ndarray, k: int,
                       taken_rules: list[ExpertRule], min_conf: float | None = None) -> list[ExpertRule]:
        layers = list(info_or_k.moe_layers) if isinstance(info_or_k, ModelInfo) else sorted({int(x) for x in self.layer})
        n_expert = info_or_k.n_expert if isinstance(info_or_k, ModelInfo) else self.n_expert
        if n_expert - n < k:
            raise SteerError(f"deactivate_per_layer {n}: would leave {n_expert - n} of {n_expert} experts per layer, "
                             f"fewer than k={k}")
        taken = {(r.layer, r.expert) for r in taken_rules}
        by_layer: dict[int, list[int]] = {il: [] for il in layers}
        for i in self._walk("deactivate", reverse, min_conf):
            il = int(self.layer[i])
            if il in by_layer and len(by_layer[il]) < n and (il, int(self.expert[i])) not in taken:
                by_layer[il].append(int(i))
        short = [il for il, rows in by_layer.items() if len(rows) < n]
        if short:
            raise SteerError(f"deactivate_per_layer {n}: layers {','.join(map(str, short))} have fewer than {n} "
                             f"experts with {self._why('deactivate', min_conf)}")
        return [ExpertRule(il, int(self.expert[i]), "deactivate", float(rd[i]))
                for il in layers for i in by_layer[il]]

    def _walk(self, action: str, reverse: bool, min_conf: float | None = None) -> np.ndarray:
        """Row indices eligible for `action` toward the chosen behavior, best first.
        risk_diff: the ranking's rows with risk_diff > 0 (activate) or < 0 (deactivate).
        causal: rows whose own forcing moved the margin toward the behavior, by that move's
        effect (effect_on to activate, effect_off to deactivate): the effect of the action
        taken, not of its opposite. causal-greedy: the moves the greedy search took, in its
        order. min_conf: only rows whose bootstrap confidence reaches it."""
        sign = -1.0 if reverse else 1.0
        if self.method == "risk_diff":
            rd = sign * self.risk_diff
            idx = np.flatnonzero(rd > 0 if action == "activate" else rd < 0)  # keeps ranking order
        elif self.method == "causal-greedy":
            step = sign * (self.greedy_on if action == "activate" else self.greedy_off)
            idx = np.flatnonzero(step > 0)
            idx = idx[np.argsort(step[idx], kind="stable")]
        else:
            v = sign * (self.effect_on if action == "activate" else self.effect_off)
            idx = np.flatnonzero(np.nan_to_num(v, nan=0.0) > 0)
            key = np.round(v[idx], _RANK_DECIMALS)
            idx = idx[np.lexsort((self.expert[idx], self.layer[idx], -key))]
        if min_conf is not None:
            conf = self.interval_of(action)[2]
            idx = idx[np.nan_to_num(conf[idx], nan=0.0) >= min_conf]
        return idx

    # ---- uncertainty -------------------------------------------------------------------
    @property
    def verdict(self) -> str | None:
        """detect's verdict on the table (confidence.Trust.verdict), if it recorded one."""
        trust = self.meta.get("trust")
        v = trust.get("verdict") if isinstance(trust, dict) else None
        return v if isinstance(v, str) else None

    def interval_of(self, action: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lo, hi, conf) of the statistic a rule of `action` is chosen by: risk_diff, or a
        causal table's effect_on (activate) / effect_off (deactivate). NaN where not computed."""
        if self.method == "risk_diff":
            cols = RD_CI_COLUMNS
        else:
            cols = EFFECT_CI_COLUMNS[:3] if action == "activate" else EFFECT_CI_COLUMNS[3:]
        got = [getattr(self, c) for c in cols]
        if any(c is None for c in got):
            nan = np.full(len(self), np.nan)
            return nan, nan, nan
        return got[0], got[1], got[2]

    @property
    def has_intervals(self) -> bool:
        return not np.isnan(self.interval_of("activate")[2]).all()

    def crossing_zero(self, rules: list[ExpertRule]) -> list[tuple[ExpertRule, float, float]]:
        """The rules whose expert's 95% interval (of the statistic the rule was chosen by)
        contains 0, with that interval: the data cannot tell their sign."""
        where = {(int(la), int(e)): i for i, (la, e) in enumerate(zip(self.layer, self.expert))}
        out = []
        for r in rules:
            lo, hi, _ = self.interval_of(r.action)
            i = where.get((r.layer, r.expert))
            if i is not None and not np.isnan(lo[i]) and lo[i] <= 0 <= hi[i]:
                out.append((r, float(lo[i]), float(hi[i])))
        return out

    def _check_min_confidence(self, c: float | None) -> float | None:
        if c is None:
            return None
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c <= 1:
            raise SteerError(f"min_confidence: must be a number in 0..1, got {c!r}")
        if not self.has_intervals:
            src = self.meta.get("table") or "the detection table"
            raise SteerError(f"{src}: has no confidence columns (detected without a bootstrap, or before they "
                             f"existed): run detect again to use a minimum confidence")
        return float(c)

    def _why(self, action: str, min_conf: float | None = None) -> str:
        conf = "" if min_conf is None else f" and confidence >= {min_conf:g}"
        if self.method == "risk_diff":
            return ("risk_diff > 0" if action == "activate" else "risk_diff < 0") + conf
        if self.method == "causal-greedy":
            return f"a greedy step ({'on' if action == 'activate' else 'off'}){conf}"
        return f"an effect when forced {'on' if action == 'activate' else 'off'}{conf}"

    def _model_ref(self, info_or_k: ModelInfo | int) -> tuple[int, ModelRef]:
        if not len(self):
            raise SteerError("the detection table is empty")
        if isinstance(info_or_k, ModelInfo):
            info = info_or_k
            src = os.path.basename(info.path) or "the model"
            fp = self.meta.get("fingerprint")
            if fp and info.fingerprint and fp != info.fingerprint:
                raise SteerError(f"the detection table was computed on another model than {src} (fingerprint differs)")
            if self.n_expert != info.n_expert:
                raise SteerError(f"the detection table has {self.n_expert} experts per layer but {src} has "
                                 f"{info.n_expert}")
            bad = [layer for layer in self.layers if layer not in set(info.moe_layers)]
            if bad:
                raise SteerError(f"the detection table has layer {bad[0]}, which is not a MoE layer of {src}")
            return info.n_expert_used, ModelRef.of(info)
        k = info_or_k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SteerError(f"k: must be a positive integer, got {k!r}")
        k = int(k)
        if k > self.n_expert:
            raise SteerError(f"k={k} is more than the table's {self.n_expert} experts per layer")
        known = self.meta.get("n_expert_used")
        if known is not None and int(known) != k:
            raise SteerError(f"k={k} but the detection table was made on a model with k={known}")
        return k, ModelRef(n_expert_used=k, n_layer=None, n_expert=self.n_expert)


# ---- what `steer-gguf detect` shows ----------------------------------------------------------
def summary(table: DetectionTable, output: str, seconds: float, n_top: int) -> str:
    """A risk-difference table's summary: its size, its concentration, its top rows with their
    intervals, the null and stability, and the verdict last, where it is read."""
    lines = [f"{table.meta.get('pairs')} pairs, {len(table)} (layer, expert) rows -> {output} ({seconds:.1f} s)",
             f"signal concentration: {table.concentration()} experts hold half of the total |risk_diff|"]
    ci = table.rd_lo is not None
    if n_top:
        lines.append("  rank layer expert   p1      p2      risk_diff" + ("  95% interval       conf" if ci else ""))
        for i, r in enumerate(table.top(n_top)):
            line = f"  {i + 1:4d} {r.layer:5d} {r.expert:6d}   {r.p1:.4f}  {r.p2:.4f}  {r.risk_diff:+.4f}"
            if ci:
                line += f"    [{table.rd_lo[i]:+.3f}, {table.rd_hi[i]:+.3f}]  {table.rd_conf[i]:.3f}"
            lines.append(line)
    if len(table):
        lines.append("per layer max |risk_diff|: "
                     + " ".join(f"{layer}:{mx:.2f}" for layer, mx, _ in table.by_layer()))
    trust = table.meta.get("trust")
    if trust:
        null, stab = trust["null"], trust["stability"]
        # a 48-layer model would fill the screen: the 8 layers furthest beyond their null, the rest in meta
        ratio = [o / t if t > 0 else float("inf") for o, t in zip(null["observed_max"], null["threshold"])]
        show = sorted(sorted(range(len(ratio)), key=lambda j: -ratio[j])[:8])
        layers = table.layers
        shown = ", ".join(f"layer {layers[j]} {null['observed_max'][j]:.3f}/{null['threshold'][j]:.3f}" for j in show)
        more = f" (+{len(ratio) - len(show)} layers in the table's metadata)" if len(ratio) > len(show) else ""
        lines.append(f"permutation null ({null['permutations']} pair swaps), {null['beyond']} experts beyond: max "
                     f"|risk_diff| / null {int(100 * null['quantile'])}th pct: {shown}{more}")
        lines.append(f"split-half stability ({stab['splits']} splits): "
                     + ", ".join(f"top-{n} {v:.1f}/{n}" for n, v in stab["overlap"].items()))
        lines.append(f"verdict: {trust['verdict']}")
    return "\n".join(lines)


def _parse_extra(path: str, line: int, column: str, cell: str) -> float:
    """An effect (empty: not measured, NaN) or a greedy step (an integer)."""
    if column in FLOAT_COLUMNS:
        if not cell:
            return math.nan
        try:
            v = float(cell)
        except ValueError:
            v = math.nan
        if math.isfinite(v):
            return v
        raise SteerError(f"{path}:{line}: column '{column}': {cell!r} is not a finite number (or empty)")
    v = _parse_count(cell)
    if v is None:
        raise SteerError(f"{path}:{line}: column '{column}': {cell!r} is not an integer")
    return v


# where a table came from (model identity, dataset), so that `profile make --model` can refuse
# a table detected on another model: the first line of our CSVs, a comment line (pandas reads
# the table with comment="#"); SteerMoE's count CSVs have none
META_PREFIX = "# steer-gguf.detect/1 "
_META_TYPES = {"architecture": str, "fingerprint": str, "n_layer": int, "n_expert": int, "n_expert_used": int,
               "dataset": str, "pairs": int, "trust": dict}


def _meta_line(meta: dict[str, Any]) -> list[str]:
    known = {k: meta[k] for k in _META_TYPES if meta.get(k) is not None}
    return [META_PREFIX + json.dumps(known, sort_keys=True)] if known else []


def _read_meta(path: str, text: str) -> dict[str, Any]:
    first = text.split("\n", 1)[0].rstrip("\r")
    if not first.startswith(META_PREFIX):
        return {}
    meta = parse_json(first[len(META_PREFIX):], f"{path}:1", one_line=True)
    if not isinstance(meta, dict):
        raise SteerError(f"{path}:1: the metadata line must hold a JSON object")
    for k, want in _META_TYPES.items():
        v = meta.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, want)):
            raise SteerError(f"{path}:1: metadata {k!r} must be a {want.__name__}, got {type(v).__name__}")
    return {k: v for k, v in meta.items() if k in _META_TYPES}  # later versions may add keys


def _parse_count(s: str) -> int | None:
    """An integer, also written as a float with a zero fraction ("12.0": pandas writes
    integer columns that way once they held a NaN)."""
    s = s.strip()
    m = re.fullmatch(r"([+-]?\d+)(?:\.0*)?", s)
    return int(m.group(1)) if m else None


def accumulate(counts: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """Add the selections of T target tokens to counts [n_layers, n_expert], in place.
    experts: int [T, n_layers, k], the experts each token selected in each traced layer
    (layer axis in the same order as counts' rows); -1 pads a layer that selects fewer than k
    (a profile's per-layer topk). Returns counts."""
    e = np.asarray(experts)
    if e.ndim != 3 or counts.ndim != 2 or e.shape[1] != counts.shape[0]:
        raise ValueError(f"experts must be [T, {counts.shape[0]}, k], got {e.shape}")
    if e.size == 0:
        return counts
    n_layers, n_expert = counts.shape
    if int(e.min()) < -1 or int(e.max()) >= n_expert:
        raise ValueError(f"expert ids must lie in 0..{n_expert - 1} (-1: none)")
    flat = np.arange(n_layers, dtype=np.int64)[None, :, None] * n_expert + e.astype(np.int64)
    flat = flat[e >= 0]
    counts += np.bincount(flat, minlength=n_layers * n_expert).reshape(n_layers, n_expert).astype(
        counts.dtype, copy=False)
    return counts


# ---- driving a model (lead) ----


def target_rows(llm, messages: list[dict], target: str) -> tuple[list[int], tuple[int, int] | None]:
    """Tokens of a conversation rendered with the model's chat template, and the token range
    of the last occurrence of `target` in it (None if it cannot be found)."""
    from .datasets import locate_target_text

    toks = llm.chat_tokens(messages)
    pieces = [llm.detokenize([t], special=True) for t in toks]
    # latin-1 maps bytes 1:1 to characters, so character offsets are byte offsets and a
    # token that holds part of a multi-byte character still has an exact extent
    text = b"".join(pieces).decode("latin-1")
    offsets, at = [], 0
    for p in pieces:
        offsets.append((at, at + len(p)))
        at += len(p)
    return toks, locate_target_text(text, target.encode("utf-8").decode("latin-1"), offsets)


def detect(llm, pairs, *, batch_tokens: int = 2048, skip_bad: bool = False, on_progress=None,
           bootstrap: int = DEFAULT_BOOTSTRAP,
           permutations: int = DEFAULT_PERMUTATIONS, splits: int = DEFAULT_SPLITS, seed: int = 0) -> DetectionTable:
    """Risk-difference table of a model on a PairSet: prefill both conversations of every
    pair (many per batch; never generation) and count, per MoE layer and expert, how often
    the target tokens of behavior 1 and of behavior 2 were routed to it. With bootstrap > 0
    the table carries per-expert 95% intervals over pairs and meta["trust"] the permutation
    null, split-half stability and the verdict (detect/confidence.py); bootstrap=0: neither.

    on_progress(done_conversations, total_conversations, target_tokens) is called per batch."""
    pc, meta = pair_counts(llm, pairs, batch_tokens=batch_tokens, skip_bad=skip_bad, on_progress=on_progress)
    c1, c2, n1, n2 = pc.totals()
    if not bootstrap:
        return DetectionTable.from_counts(c1, c2, n1, n2, pc.layers, meta)
    trust = assess(pc, llm.info.n_expert_used, bootstrap, permutations, splits, seed)
    return DetectionTable.from_counts(c1, c2, n1, n2, pc.layers, dict(meta, trust=trust.to_meta()),
                                      intervals=trust.intervals)


def pair_counts(llm, pairs, *, batch_tokens: int = 2048, skip_bad: bool = False, on_progress=None):
    """The routing counts of every usable pair, kept per pair (confidence.PairCounts) so that
    intervals, the null and stability can resample pairs; and the table's metadata."""

    info = llm.info
    seqs, rows, sides = [], [], []
    for pair in pairs:
        found = []
        for side, msgs, target in ((0, pair.messages_0, pair.target_0), (1, pair.messages_1, pair.target_1)):
            toks, span = target_rows(llm, msgs, target)
            if span is None:
                msg = f"{pairs.source}:{pair.line}: target of messages_{side} not found in the rendered conversation"
                if not skip_bad:
                    raise SteerError(msg)
                pairs.skipped.append(msg)
                break
            found.append((side, toks, list(range(*span))))
        else:
            # only whole pairs count, so both behaviors see the same prompts
            for side, toks, r in found:
                seqs.append(toks)
                rows.append(r)
                sides.append(side)
    if not seqs:
        raise SteerError(f"{pairs.source}: no usable pairs")
    n_moe = len(info.moe_layers)
    # int32: 400 pairs of a 48 x 128-expert model take 39 MB; a count never nears 2^31
    counts = np.zeros((len(seqs) // 2, 2, n_moe, info.n_expert), dtype=np.int32)
    n_tok = np.zeros((len(seqs) // 2, 2), dtype=np.int64)
    # chunks of conversations, so progress shows and Ctrl-C lands between batches
    chunk = 64
    for start in range(0, len(seqs), chunk):
        stop = min(len(seqs), start + chunk)
        for j, ex in zip(range(start, stop), llm.trace_many(seqs[start:stop], rows[start:stop],
                                                            batch_tokens=batch_tokens)):
            accumulate(counts[j // 2, sides[j]], ex)
            n_tok[j // 2, sides[j]] += ex.shape[0]
        if on_progress is not None:
            on_progress(stop, len(seqs), sum(len(r) for r in rows[start:stop]))
    meta = {"architecture": info.architecture, "fingerprint": info.fingerprint, "n_layer": info.n_layer,
            "n_expert": info.n_expert, "n_expert_used": info.n_expert_used, "dataset": pairs.source,
            "pairs": len(seqs) // 2}
    # layers routed by a fixed table (hash routing) cannot be steered: left out of the table
    keep = [j for j, il in enumerate(info.moe_layers) if il not in info.fixed_layers]
    return PairCounts(counts[:, :, keep], n_tok, [info.moe_layers[j] for j in keep]), meta
