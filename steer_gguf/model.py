"""What a GGUF file says about its MoE layout, read without loading the model."""
from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import SteerError, printable

# llama.cpp's llama_expert_gating_func_type
GATING_NAMES = {0: "softmax", 1: "softmax", 2: "sigmoid", 3: "softmax-after-topk", 4: "sqrt-softplus"}
# architectures whose graph fixes the gating function in code (src/models/*.cpp, the gating
# argument of build_moe_ffn), whatever the file's expert_gating_func says
GATING_BY_ARCH = {"gpt-oss": "softmax-after-topk", "llama4": "sigmoid-after-topk", "nemotron_h_moe": "sigmoid",
                  "nemotron_h": "sigmoid", "mimo2": "sigmoid",
                  **{a: "softmax" for a in (
                      "arctic", "bailingmoe", "dbrx", "deepseek", "ernie4_5-moe", "gemma4", "granite", "granite_swa",
                      "granitehybrid", "granitemoe", "grok", "grovemoe", "hunyuan-moe", "jamba", "llada-moe", "llama",
                      "llama-embed", "maple", "mellum", "minimax-01", "mistral3", "nomic-bert-moe", "olmoe", "phimoe",
                      "qwen2moe", "qwen35moe", "qwen3moe", "qwen3next", "qwen3vlmoe", "qwen4exp", "rnd1")}}
# architectures whose graph takes the gating function from the file with no default: llama.cpp
# aborts the process (llama-graph.cpp, build_moe_ffn) on such a file without the key
GATING_KEY_REQUIRED = {"dots1", "minimax-m2", "smallthinker"}
# architectures llama.cpp cannot run the way steer-gguf runs a model (prefill, then decode, on
# its own): refused before loading, with the reason
NOT_RUNNABLE = {
    **{a: "is a diffusion language model, which llama.cpp runs without KV memory; steer-gguf's generation "
          "and tracing need it" for a in ("llada-moe", "rnd1")},
    "llama-embed": "is an embedding model with no language-model head, so llama.cpp computes no logits; "
                   "steer-gguf's generation, scoring and evaluation need them",
    # decoded alone it aborts in llama.cpp (its inputs come from the target model)
    "dflash": "is a speculative-decoding draft model (DeepSeek-V4 DSpark), which llama.cpp runs only beside "
              "its target model, fed the target's hidden states; steer-gguf runs a model on its own",
}
# architectures whose graph routes only every interleave_moe_layer_step-th layer past the dense
# lead, while the loader loads a router in each of them (models/ernie4-5*.cpp): the others run
# their dense FFN, and model_info leaves them out
ROUTES_EVERY_STEP = {"ernie4_5-moe"}
# architectures whose graph calls build_moe_ffn twice per layer on one router's logits (grovemoe:
# its experts, then their groups' adjugate experts): a profile steers those logits, so both calls
# follow it, and the routing recorder sees every token twice per layer
ROUTES_TWICE = {"grovemoe"}


@dataclass
class ModelInfo:
    path: str
    architecture: str
    n_layer: int
    moe_layers: list[int]
    n_expert: int
    n_expert_used: int
    gating: str
    n_expert_groups: int = 0
    n_group_used: int = 0
    n_shared_expert: int = 0
    has_selection_bias: bool = False     # exp_probs_b (DeepSeek-V3 style)
    has_router_bias: bool = False        # ffn_gate_inp.bias (gpt-oss)
    # MoE layers whose experts come from a fixed per-token table, not the router (DeepSeek V4's
    # hash-routed layers, blk.N.ffn_gate_tid2eid): a profile cannot change them
    fixed_layers: list[int] = field(default_factory=list)
    n_embd: int = 0
    n_ctx_train: int = 0
    fingerprint: str = ""
    parts: list[str] = field(default_factory=list)  # the files, in order: more than one for a split GGUF
    extra: dict = field(default_factory=dict)
    baked: dict = field(default_factory=dict)  # steer_gguf.baked.* metadata: what `bake` wrote in

    @property
    def logit_stage(self) -> str:
        """Name of the graph tensor that holds the final router logits (the hook engine
        rewrites it). With softmax-after-top-k gating llama.cpp uses the logits themselves
        as probs, and that tensor ends up named ffn_moe_probs."""
        if self.gating == "softmax-after-topk":
            return "ffn_moe_probs"
        return "ffn_moe_logits_biased" if self.has_router_bias else "ffn_moe_logits"

    @property
    def select_stage(self) -> str:
        """Graph tensor whose values pick the experts, when it differs from the logits."""
        if self.n_expert_groups > 1:
            return "ffn_moe_probs_masked"
        if self.has_selection_bias:
            return "ffn_moe_probs_biased"
        return ""

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        """What `steer-gguf info` prints. The path and the architecture come from the user and
        the file: shown escaped."""
        lines = [f"model         {printable(self.path)}"
                 + (f" (part 1 of {len(self.parts)})" if len(self.parts) > 1 else ""),
                 f"architecture  {printable(self.architecture)}",
                 f"layers        {self.n_layer} ({len(self.moe_layers)} MoE: {layer_ranges(self.moe_layers)})",
                 f"experts       {self.n_expert}, {self.n_expert_used} per token"
                 + (f", {self.n_shared_expert} shared" if self.n_shared_expert else "")]
        if self.fixed_layers:
            lines.append(f"hash-routed   layers {layer_ranges(self.fixed_layers)}: experts from a fixed per-token table, "
                         f"not steerable")
        if self.n_expert_groups > 1:
            lines.append(f"groups        {self.n_expert_groups}, {self.n_group_used} used per token")
        lines += [f"gating        {self.gating}" + (" + selection bias" if self.has_selection_bias else "")
                  + (" + router bias" if self.has_router_bias else ""),
                  f"fingerprint   {self.fingerprint}"]
        if self.baked:
            b = self.baked
            lines.append(f"baked         profile {printable(str(b.get('profile', '?')))} by {printable(str(b.get('method', '?')))}"
                         f" (steer-gguf {printable(str(b.get('version', '?')))}), from a model with fingerprint "
                         f"{printable(str(b.get('source_fingerprint', '?')))}")
            if "prune" in b:
                lines.append(f"pruned by     {printable(str(b['prune']))}")
        return "\n".join(lines)


def layer_ranges(xs: list[int]) -> str:
    """"3..7" for a run of consecutive layers, else "1,4,9"."""
    if len(xs) > 1 and xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}..{xs[-1]}"
    return ",".join(map(str, xs))


def supported_models() -> str:
    """models.txt: the architectures we support and how far each is verified. Installed next
    to the package; in a source tree it is at the top, and that one wins (the copy beside the
    package is a build output, stale until the next build)."""
    from .fileio import PACKAGE_DIR

    top = PACKAGE_DIR.parent
    in_tree = (top / "pyproject.toml").is_file()
    for p in ((top / "models.txt", PACKAGE_DIR / "models.txt") if in_tree else (PACKAGE_DIR / "models.txt",)):
        if p.is_file():
            return p.read_text()
    raise SteerError("models.txt is missing from the installation")


@functools.lru_cache(maxsize=1)
def routing_architectures() -> frozenset[str]:
    """The architectures whose llama.cpp graph routes to experts, as listed at build time from
    the vendored sources (csrc/moe_archs.py); empty when run from a source tree."""
    from .fileio import PACKAGE_DIR

    p = PACKAGE_DIR / "moe_archs.txt"
    return frozenset(p.read_text().split()) if p.is_file() else frozenset()


def verification(arch: str) -> str | None:
    """models.txt's status of `arch` ("verified", "untested", "refused"), None if unlisted."""
    for line in supported_models().splitlines():
        cols = line.split()
        if cols and not line.startswith("#") and cols[0] == arch:
            return cols[1] if len(cols) > 1 else None
    return None


def _field(reader, key: str, default=None):
    f = reader.get_field(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _int_field(reader, path: str, key: str) -> int:
    """A count from the metadata (0 when absent). llama.cpp lets expert_used_count be an array
    (one per layer); the largest is what every limit must hold for."""
    v = _field(reader, key, 0)
    values = v if isinstance(v, list) else [v]
    if not values or not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        raise SteerError(f"{path}: metadata {key} must be an unsigned integer, got {_short(v)}")
    if min(values) < 0:
        raise SteerError(f"{path}: metadata {key} is negative ({min(values)})")
    if max(values) > INT32_MAX:  # llama.cpp and llama-cpp-python hold these in int32
        raise SteerError(f"{path}: metadata {key} is {max(values)}, out of range")
    return max(values)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# llama.cpp's limits (llama-hparams.h); it aborts the process, with no message, on a file
# beyond them, so they are checked here first
LLAMA_MAX_LAYERS = 512
INT32_MAX = 2**31 - 1
LLAMA_MAX_EXPERTS = 1024


def _check_layout(path: str, arch: str, n_layer: int, n_expert: int, n_used: int, n_groups: int,
                  n_group_used: int, n_nextn: int) -> None:
    """What llama.cpp asserts while loading the hyperparameters (llama-model.cpp, load_hparams)."""
    def bad(msg: str):
        raise SteerError(f"{path}: inconsistent MoE metadata: {msg}")

    if not 0 < n_layer <= LLAMA_MAX_LAYERS:
        bad(f"{arch}.block_count is {n_layer}, must be 1..{LLAMA_MAX_LAYERS}")
    if n_nextn > n_layer:
        bad(f"{arch}.nextn_predict_layers ({n_nextn}) exceeds {arch}.block_count ({n_layer})")
    if n_expert > LLAMA_MAX_EXPERTS:
        bad(f"{arch}.expert_count is {n_expert}, more than llama.cpp's {LLAMA_MAX_EXPERTS}")
    if n_used > n_expert:
        bad(f"{arch}.expert_used_count ({n_used}) exceeds {arch}.expert_count ({n_expert})")
    if n_groups >= n_expert:
        bad(f"{arch}.expert_group_count ({n_groups}) must be less than {arch}.expert_count ({n_expert})")
    if n_groups > 1:
        if n_expert % n_groups:
            bad(f"{arch}.expert_count ({n_expert}) is not a multiple of {arch}.expert_group_count ({n_groups})")
        if not 0 < n_group_used < n_groups:
            bad(f"{arch}.expert_group_used_count ({n_group_used}) must be 1..{n_groups - 1}")


def _open(path: str | os.PathLike):
    import gguf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise SteerError(f"{path}: no such file")
    if os.path.isdir(path) or not os.access(path, os.R_OK):
        raise SteerError(f"{path}: not a readable file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SteerError(f"{path}: cannot read: {e.strerror}") from None
    if magic != b"GGUF":
        raise SteerError(f"{path}: not a GGUF file (bad magic)")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises assorted errors on truncation
        raise SteerError(f"{path}: truncated or corrupt GGUF ({type(e).__name__}: {e})".splitlines()[0]) from None


def _tensor_data(t) -> np.ndarray:
    """A tensor's values as float32, dequantizing when needed."""
    import gguf

    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, dtype=np.float32)
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


# llama.cpp's split naming (llama_split_prefix): NAME-00001-of-00003.gguf
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_count(reader) -> int:
    f = reader.get_field("split.count")
    return int(f.contents()) if f is not None else 1


def open_parts(path: str | os.PathLike) -> list[tuple[str, object]]:
    """The (path, reader) of every file of the model `path` names, in order: one for a plain
    GGUF, all of them for a split one, whichever part `path` is (llama.cpp itself wants the
    first; the others are found by name, as llama.cpp finds them)."""
    path = os.fspath(path)
    r = _open(path)
    n = split_count(r)
    if n <= 1:
        check_complete(path, r)
        return [(path, r)]
    m = SPLIT_NAME.match(os.path.basename(path))
    if not m or int(m["count"]) != n:
        raise SteerError(f"{path}: part of a split GGUF ({n} parts) whose name does not follow "
                         f"NAME-00001-of-{n:05d}.gguf, so its other parts cannot be found")
    d = os.path.dirname(path)
    out = []
    for i in range(1, n + 1):
        p = os.path.join(d, f"{m['prefix']}-{i:05d}-of-{n:05d}.gguf")
        if not os.path.exists(p):
            raise SteerError(f"{p}: missing: part {i} of the split GGUF {path} (every part must be in the same folder)")
        ri = r if os.path.samefile(p, path) else _open(p)
        no = ri.get_field("split.no")
        if split_count(ri) != n or no is None or int(no.contents()) != i - 1:
            raise SteerError(f"{p}: not part {i} of {n} of the split GGUF {path} (its split.no/split.count differ)")
        check_complete(p, ri)
        out.append((p, ri))
    return out


def model_info(path: str | os.PathLike) -> ModelInfo:
    """Read the MoE layout of a GGUF model, all parts of a split one. Raises SteerError for a
    missing, truncated, non-GGUF or non-MoE file."""
    path = os.fspath(path)
    parts = open_parts(path)
    try:
        return _read_info(parts)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
        # the gguf reader decodes lazily: corrupt fields and tensor headers fail only here
        raise SteerError(f"{path}: corrupt GGUF ({type(e).__name__}: {e})".splitlines()[0]) from None


def check_complete(path: str, reader) -> None:
    """llama.cpp maps tensor data by offset; a file cut short would be read past its end."""
    size = os.path.getsize(path)
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise SteerError(f"{path}: truncated GGUF (tensor data needs {end} bytes, file has {size})")


def _read_info(parts: list[tuple[str, object]]) -> ModelInfo:
    path, r = parts[0]  # a split model's metadata is all in its first part
    arch = _field(r, "general.architecture")
    if not arch:
        raise SteerError(f"{path}: GGUF has no general.architecture")
    if not isinstance(arch, str):
        raise SteerError(f"{path}: general.architecture must be a string, got {_short(arch)}")
    n_layer = _int_field(r, path, f"{arch}.block_count")
    n_expert = _int_field(r, path, f"{arch}.expert_count")
    n_used = _int_field(r, path, f"{arch}.expert_used_count")
    if n_expert <= 1 or n_used <= 0:
        raise SteerError(f"{path}: not a Mixture-of-Experts model ({arch} has no {arch}.expert_count)")
    routing = routing_architectures()
    if routing and arch not in routing:
        raise SteerError(f"{path}: not a Mixture-of-Experts model as llama.cpp runs it: its {arch} graph never "
                         f"routes to experts (dense layers), so there is nothing to steer")
    n_groups = _int_field(r, path, f"{arch}.expert_group_count")
    n_group_used = _int_field(r, path, f"{arch}.expert_group_used_count")
    _check_layout(path, arch, n_layer, n_expert, n_used, n_groups, n_group_used,
                  _int_field(r, path, f"{arch}.nextn_predict_layers"))
    routers: dict[int, object] = {}
    fixed: set[int] = set()
    sel_bias = router_bias = False
    for t in (t for _, ri in parts for t in ri.tensors):
        # the selection bias is exp_probs_b.bias in most converters, bare exp_probs_b in hy_v3's
        m = re.fullmatch(r"blk\.(\d+)\.(ffn_gate_inp\.weight|exp_probs_b(?:\.bias)?|ffn_gate_inp\.bias|"
                         r"ffn_gate_tid2eid\.weight)", t.name)
        if not m:
            continue
        il = int(m.group(1))
        if m.group(2) == "ffn_gate_tid2eid.weight":
            fixed.add(il)
        elif m.group(2) == "ffn_gate_inp.weight":
            routers[il] = t
        elif m.group(2).startswith("exp_probs_b"):
            sel_bias = True
        else:
            router_bias = True
    if not routers:
        raise SteerError(f"{path}: not a Mixture-of-Experts model (no router tensors blk.N.ffn_gate_inp)")
    moe_layers = sorted(il for il in routers if il < n_layer)
    if arch in ROUTES_EVERY_STEP:
        step = _int_field(r, path, f"{arch}.interleave_moe_layer_step")
        moe_layers = [il for il in moe_layers if step and (il + 1) % step == 0]
        if not moe_layers:
            raise SteerError(f"{path}: no layer routes: {arch}.interleave_moe_layer_step is {step}")

    if arch == "llama4" and n_layer < 4 and _field(r, f"{arch}.attention.sliding_window", 1) != 0:
        # every 4th layer attends without RoPE and takes a temperature input; with none of them
        # the input is left out of the graph and llama.cpp aborts setting it (llama-graph.cpp)
        raise SteerError(f"{path}: a llama4 file with {n_layer} layers: llama.cpp aborts on fewer than 4 (its "
                         f"every-4th-layer attention without RoPE needs one)")
    gating_id = _int_field(r, path, f"{arch}.expert_gating_func")
    if gating_id not in GATING_NAMES:  # llama.cpp aborts on a gating function it does not know
        raise SteerError(f"{path}: metadata {arch}.expert_gating_func is {gating_id}, not a gating function "
                         f"llama.cpp knows (0..{max(GATING_NAMES)})")
    if gating_id == 0 and arch in GATING_KEY_REQUIRED:
        raise SteerError(f"{path}: metadata {arch}.expert_gating_func is missing; llama.cpp would abort on this "
                         f"file (a {arch} graph takes its gating function from the file)")
    gating = GATING_BY_ARCH.get(arch, GATING_NAMES[gating_id])

    # router weights are never quantized by llama.cpp, and a float's sign survives every
    # float conversion (F32/F16/BF16), so the sign pattern identifies the model at any quant
    h = hashlib.sha256(f"{arch}|{n_layer}|{n_expert}|{n_used}".encode())
    for il in moe_layers:
        w = _tensor_data(routers[il]).reshape(-1)
        h.update(np.packbits(np.signbit(w[: 1 << 16])).tobytes())
    return ModelInfo(
        path=path,
        architecture=str(arch),
        n_layer=n_layer,
        moe_layers=moe_layers,
        n_expert=n_expert,
        n_expert_used=n_used,
        gating=gating,
        n_expert_groups=n_groups,
        n_group_used=n_group_used,
        n_shared_expert=_int_field(r, path, f"{arch}.expert_shared_count"),
        has_selection_bias=sel_bias,
        has_router_bias=router_bias,
        fixed_layers=sorted(il for il in fixed if il in routers and il < n_layer),
        n_embd=_int_field(r, path, f"{arch}.embedding_length"),
        n_ctx_train=_int_field(r, path, f"{arch}.context_length"),
        fingerprint=h.hexdigest()[:32],
        parts=[p for p, _ in parts],
        extra=_extra(r, arch),
        baked=_baked(r),
    )


BAKED_PREFIX = "steer_gguf.baked."


def _baked(reader) -> dict:
    out = {}
    for key in reader.fields:
        if key.startswith(BAKED_PREFIX):
            v = _field(reader, key)
            out[key[len(BAKED_PREFIX):]] = v if isinstance(v, (str, int, float, bool)) else str(v)
    return out


def _extra(reader, arch: str) -> dict:
    """Metadata that only some methods need."""
    norm = _field(reader, f"{arch}.expert_weights_norm")
    return {"expert_weights_norm": norm} if isinstance(norm, bool) else {}
