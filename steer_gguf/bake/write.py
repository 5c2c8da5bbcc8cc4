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
from ..fileio import check_output, publish, temp_beside
from ..model import BAKED_PREFIX, _open
from .plan import ROUTER_FORCE, SELECTION_MARGIN, BakePlan, bias_kind, plan_bake

# per-expert tensors of a MoE layer: the expert is the outermost ggml dimension (numpy axis 0)
# the tensors that hold one slice per expert; a router's .scale (gemma4) is per input dimension
PER_EXPERT = re.compile(r"blk\.(\d+)\.(?!ffn_gate_inp\.scale$)(ffn_gate_inp|exp_probs_b|ffn_(?:gate|up|down|gate_up)_exps)"
                        r"(?:\.(weight|bias|scale))?")
SKIP_KEYS = {"general.architecture", "general.alignment"}  # the writer sets these itself


@dataclass
class BakeResult:
    path: str
    bytes: int
    seconds: float
    tensors_edited: list[str]


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
    acts = [a for a in plan.actions if a.layer == il and a.grade != "dropped"]
    if not acts:
        return None
    import gguf

    if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        raise SteerError(f"{plan.info.path}: {name} is {t.tensor_type.name}, not F32/F16: cannot edit it")
    b = np.array(t.data, dtype=np.float32).reshape(-1)
    if b.shape[0] != plan.info.n_expert:
        raise SteerError(f"{plan.info.path}: {name} has {b.shape[0]} values, not one per expert ({plan.info.n_expert})")
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
    return out.astype(np.float16 if t.tensor_type == gguf.GGMLQuantizationType.F16 else np.float32)


def _copy_fields(reader, writer, plan: BakePlan, phash: str, version: str) -> None:
    import gguf

    arch = plan.info.architecture
    overrides = {}
    if plan.method == "prune":
        overrides[f"{arch}.expert_count"] = plan.n_expert_out
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in SKIP_KEYS or key.startswith(BAKED_PREFIX):
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
    for k, v in meta.items():
        writer.add_key_value(BAKED_PREFIX + k, str(v), gguf.GGUFValueType.STRING)


def write_baked(plan: BakePlan, output: str, version: str, progress: bool = False) -> BakeResult:
    """Write `plan.info`'s file baked with `plan` to `output`, whole or not at all."""
    import gguf

    output = check_output(output, "baked model")
    src = plan.info.path
    if os.path.exists(output) and os.path.samefile(output, src):
        raise SteerError(f"{output}: is the source model; write the baked model to another file")
    reader = _open(src)
    split = reader.fields.get("split.count")
    if split is not None and int(split.contents()) > 1:
        raise SteerError(f"{src}: a split GGUF (part of {int(split.contents())}): bake a merged file "
                         f"(llama-gguf-split --merge) for now")
    t0 = time.perf_counter()
    edited: list[str] = []
    with temp_beside(output, ".gguf") as tmp:
        writer = gguf.GGUFWriter(tmp, plan.info.architecture)
        try:
            align = reader.fields.get("general.alignment")
            if align is not None:
                writer.data_alignment = int(align.contents())
                writer.add_key_value("general.alignment", writer.data_alignment, gguf.GGUFValueType.UINT32)
            _copy_fields(reader, writer, plan, profile_hash(plan), version)
            kept = plan.kept if plan.method == "prune" else {}
            for t in reader.tensors:
                data = t.data
                new = _edited_bias(t.name, t, plan)
                if new is not None:
                    writer.add_tensor(t.name, new.reshape(data.shape), raw_dtype=t.tensor_type)
                    edited.append(t.name)
                    continue
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
                    continue
                if kept and m and m.group(2).endswith("_exps"):
                    raise SteerError(f"{src}: {t.name}: layer {m.group(1)} holds experts that llama.cpp's "
                                     f"{plan.info.architecture} graph never routes to, so pruning cannot renumber "
                                     f"them consistently")
                # one slice per expert under a name bake does not know: refused rather than
                # copied whole into a file with fewer experts (arctic's ffn_norm_exps is a norm)
                if kept and "_exps" in t.name and data.shape and data.shape[0] == plan.info.n_expert:
                    raise SteerError(f"{src}: {t.name}: a per-expert tensor that bake does not know how to slice")
                writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=progress)
            writer.close()
        finally:
            writer.close()
        publish(tmp, output)
    return BakeResult(output, os.path.getsize(output), time.perf_counter() - t0, edited)


def bake_profile(model: str | os.PathLike, profile, output: str | os.PathLike, method: str = "auto",
                 drop_unbakeable: bool = False, force: bool = False) -> tuple[BakePlan, BakeResult]:
    """Bake `profile` (a Profile or a path) into a copy of `model` written to `output`."""
    from ..model import model_info
    from ..profile import Profile, as_profile

    p = as_profile(profile)
    if not isinstance(p, Profile):
        raise SteerError("bake needs a profile")
    info = model_info(model)
    plan = plan_bake(info, p, method, drop_unbakeable,
                     source=os.fspath(profile) if isinstance(profile, (str, os.PathLike)) else None, force=force)
    return plan, write_baked(plan, os.fspath(output), package_version())
