"""Writing the baked GGUF: every tensor copied byte for byte (quantized blocks included)
except the edited biases and, when pruning, the per-expert tensors, of which only the kept
experts' byte ranges are copied. Written to a temporary file beside the output and renamed
into place: an error or Ctrl-C never leaves a half-written model."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
import numpy as np

from ..errors import SteerError
from ..fileio import check_output, publish, temp_dir_beside
from ..model import BAKED_PREFIX, SPLIT_NAME, open_parts
from .plan import ROUTER_FORCE, SELECTION_MARGIN, BakePlan, bias_kind, plan_bake

# per-expert tensors of a MoE layer: the expert is the outermost ggml dimension (numpy axis 0)
# the tensors that hold one slice per expert; a router's .scale (gemma4) is per input dimension
PER_EXPERT = re.compile(r"blk\.(\d+)\.(?!ffn_gate_inp\.scale$)(ffn_gate_inp|exp_probs_b|ffn_(?:gate|up|down|gate_up)_exps)"
                        r"(?:\.(weight|bias|scale))?")
SKIP_KEYS = {"general.architecture", "general.alignment"}  # the writer sets these itself


@dataclass
class BakeResult:
    path: str           # the file to load: the first part of a split output
    bytes: int          # all parts together
    seconds: float
    tensors_edited: list[str]
    parts: list[str]


class _Experts:
    """A lazily copied subset of a per-expert tensor: only `keep`'s rows of axis 0."""

    def __init__(self, data: np.ndarray, keep: list[int]):
        self.data, self.keep = data, keep
        self.nbytes = int(data[0].nbytes) * len(keep) if len(keep) else 0

    def tofile(self, f) -> None:
        for e in self.keep:
            np.ascontiguousarray(self.data[e]).tofile(f)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steer-gguf")
    except PackageNotFoundError:  # run from a source tree
        return "unknown"


def profile_hash(plan: BakePlan) -> str:
    return hashlib.sha256(json.dumps(plan.profile.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _edited_bias(name: str, t, plan: BakePlan) -> np.ndarray | None:
    """The new values of a bias tensor the plan edits, or None to copy it unchanged."""
    m = PER_EXPERT.fullmatch(name)
    if plan.method != "bias" or not m:
        return None
    # hy_v3 names its selection bias bare: blk.N.exp_probs_b
    suffix = m.group(3) or ("bias" if m.group(2) == "exp_probs_b" else "weight")
    il, what = int(m.group(1)), f"{m.group(2)}.{suffix}"
    kind = "selection" if what == "exp_probs_b.bias" else "router" if what == "ffn_gate_inp.bias" else ""
    if not kind or kind != bias_kind(plan.info):
        return None
    acts = _layer_actions(plan, il)
    if not acts:
        return None
    import gguf

    if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        raise SteerError(f"{plan.info.path}: {name} is {t.tensor_type.name}, not F32/F16: cannot edit it")
    b = np.array(t.data, dtype=np.float32).reshape(-1)
    if b.shape[0] != plan.info.n_expert:
        raise SteerError(f"{plan.info.path}: {name} has {b.shape[0]} values, not one per expert ({plan.info.n_expert})")
    out = _biased(b, acts, kind)
    return out.astype(np.float16 if t.tensor_type == gguf.GGMLQuantizationType.F16 else np.float32)


def _layer_actions(plan: BakePlan, il: int) -> list:
    return [a for a in plan.actions if a.layer == il and a.grade != "dropped"]


def _biased(b: np.ndarray, acts: list, kind: str) -> np.ndarray:
    """Bias values `b` with the plan's actions on one layer applied."""
    out = b.copy()
    # the runtime's rule on a selection bias (llama-steer.cpp): from the unedited extremes
    hi, lo = (float(b.max()) + SELECTION_MARGIN, float(b.min()) - SELECTION_MARGIN) if kind == "selection" else (0, 0)
    for a in acts:
        if a.action == "bias":
            out[a.expert] += np.float32(a.value)
        elif kind == "selection":
            out[a.expert] = hi if a.action == "activate" else lo
        else:
            out[a.expert] = b[a.expert] + (ROUTER_FORCE if a.action == "activate" else -ROUTER_FORCE)
    return out


def _added_bias(writer, router_name: str, plan: BakePlan, edited: list[str]) -> None:
    """After a layer's router: the selection bias a file without one gets, where steered."""
    m = re.fullmatch(r"blk\.(\d+)\.ffn_gate_inp\.weight", router_name)
    acts = _layer_actions(plan, int(m.group(1))) if m and plan.adds_bias else []
    if not acts:
        return
    # hy_v3's loader wants the bare name, the others the .bias suffix
    name = f"blk.{m.group(1)}.exp_probs_b" + ("" if plan.info.architecture == "hy_v3" else ".bias")
    writer.add_tensor(name, _biased(np.zeros(plan.info.n_expert, dtype=np.float32), acts, "selection"))
    edited.append(name)


def _copy_fields(reader, writer, plan: BakePlan, phash: str, version: str) -> None:
    import gguf

    arch = plan.info.architecture
    overrides = {}
    if plan.method == "prune":
        overrides[f"{arch}.expert_count"] = plan.n_expert_out
    if plan.topk is not None:
        overrides[f"{arch}.expert_used_count"] = plan.topk
    for key, f in reader.fields.items():
        # split.*: the writer numbers the output's own parts
        if key.startswith(("GGUF.", "split.", BAKED_PREFIX)) or key in SKIP_KEYS:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 2:
            raise SteerError(f"{plan.info.path}: metadata {key} is an array of arrays: not copied by bake")
        value = overrides.pop(key, None)
        writer.add_key_value(key, f.contents() if value is None else value, vtype, sub_type=sub)
    for key, value in overrides.items():  # a key the file lacked
        writer.add_key_value(key, value, gguf.GGUFValueType.UINT32)
    meta = {"source_fingerprint": plan.info.fingerprint, "profile": plan.profile.name,
            "profile_sha256": phash, "method": plan.method, "version": version,
            "grades": json.dumps(plan.counts(), sort_keys=True)}
    if plan.method == "prune":
        meta["kept"] = json.dumps({str(il): ks for il, ks in plan.kept.items()})
        prune = (plan.profile.provenance or {}).get("prune")
        if prune:  # `steer-gguf prune`: the criterion and the data that chose what was kept
            meta["prune"] = json.dumps(prune, sort_keys=True)
    for k, v in meta.items():
        writer.add_key_value(BAKED_PREFIX + k, str(v), gguf.GGUFValueType.STRING)


def output_parts(output: str, n: int) -> list[str]:
    """The files a baked model of `n` parts is written to: OUT.gguf itself for one part,
    OUT-00001-of-0000n.gguf... for more (a name already in that form gives its prefix)."""
    if n == 1:
        return [output]
    d, base = os.path.split(output)
    m = SPLIT_NAME.match(base)
    prefix = m["prefix"] if m else base[:-5] if base.endswith(".gguf") else base
    return [os.path.join(d, f"{prefix}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def write_baked(plan: BakePlan, output: str, version: str, progress: bool = False,
                merge: bool = False) -> BakeResult:
    """Write `plan.info`'s model baked with `plan` to `output`, whole or not at all: a split
    source gives a split output with the same parts, unless `merge` asks for one file."""
    import gguf

    output = check_output(output, "baked model")
    src = plan.info.path
    parts = open_parts(src)
    outs = output_parts(output, 1 if merge else len(parts))
    for o in outs:
        if os.path.exists(o) and any(os.path.samefile(o, p) for p, _ in parts):
            raise SteerError(f"{o}: is the source model; write the baked model to another file")
    reader = parts[0][1]
    t0 = time.perf_counter()
    edited: list[str] = []
    with temp_dir_beside(output) as tmpdir:
        writer = gguf.GGUFWriter(os.path.join(tmpdir, "baked.gguf"), plan.info.architecture)
        try:
            align = reader.fields.get("general.alignment")
            if align is not None:
                writer.data_alignment = int(align.contents())
                writer.add_key_value("general.alignment", writer.data_alignment, gguf.GGUFValueType.UINT32)
            _copy_fields(reader, writer, plan, profile_hash(plan), version)
            kept = plan.kept if plan.method == "prune" else {}
            for i, (part_path, part) in enumerate(parts):
                if len(outs) > 1 and i:
                    # each output part holds what its source part held (a first part may hold
                    # metadata alone)
                    writer.tensors.append({})
                for t in part.tensors:
                    _add_tensor(writer, t, plan, kept, part_path, edited)
                    _added_bias(writer, t.name, plan, edited)
            written = [os.path.join(tmpdir, os.path.basename(p))
                       for p in writer.format_shard_names(writer.path)]
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=progress)
            writer.close()
        finally:
            writer.close()
        # the first part last: llama.cpp opens a split model by its first part, so until that
        # is in place no half-published model can be loaded
        for tmp, out in reversed(list(zip(written, outs))):
            publish(tmp, out)
    return BakeResult(outs[0], sum(os.path.getsize(o) for o in outs), time.perf_counter() - t0, edited, outs)


def _add_tensor(writer, t, plan: BakePlan, kept: dict[int, list[int]], src: str, edited: list[str]) -> None:
    data = t.data
    new = _edited_bias(t.name, t, plan)
    if new is not None:
        writer.add_tensor(t.name, new.reshape(data.shape), raw_dtype=t.tensor_type)
        edited.append(t.name)
        return
    m = PER_EXPERT.fullmatch(t.name)
    if kept and m and int(m.group(1)) in kept:
        if data.shape[0] != plan.info.n_expert:
            raise SteerError(f"{src}: {t.name} does not hold one slice per expert "
                             f"(outer dimension {data.shape[0]}, {plan.info.n_expert} experts)")
        lazy = _Experts(data, kept[int(m.group(1))])
        writer.add_tensor_info(t.name, (len(lazy.keep), *data.shape[1:]), data.dtype, lazy.nbytes,
                               raw_dtype=t.tensor_type)
        writer.tensors[-1][t.name].tensor = lazy
        edited.append(t.name)
        return
    if kept and m and m.group(2).endswith("_exps"):
        raise SteerError(f"{src}: {t.name}: layer {m.group(1)} holds experts that llama.cpp's "
                         f"{plan.info.architecture} graph never routes to, so pruning cannot renumber "
                         f"them consistently")
    # one slice per expert under a name bake does not know: refused rather than
    # copied whole into a file with fewer experts (arctic's ffn_norm_exps is a norm)
    if kept and "_exps" in t.name and data.shape and data.shape[0] == plan.info.n_expert:
        raise SteerError(f"{src}: {t.name}: a per-expert tensor that bake does not know how to slice")
    writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)


def bake_profile(model: str | os.PathLike, profile, output: str | os.PathLike, method: str = "auto",
                 drop_unbakeable: bool = False, force: bool = False,
                 merge: bool = False) -> tuple[BakePlan, BakeResult]:
    """Bake `profile` (a Profile or a path) into a copy of `model` written to `output` (split
    like the source, or one file with `merge`)."""
    from ..model import model_info
    from ..profile import Profile, as_profile

    p = as_profile(profile)
    if not isinstance(p, Profile):
        raise SteerError("bake needs a profile")
    info = model_info(model)
    plan = plan_bake(info, p, method, drop_unbakeable,
                     source=os.fspath(profile) if isinstance(profile, (str, os.PathLike)) else None, force=force)
    return plan, write_baked(plan, os.fspath(output), package_version(), merge=merge)
