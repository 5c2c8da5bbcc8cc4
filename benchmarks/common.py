"""Shared pieces of the benchmarks: the synthetic model, timing, machine description."""
from __future__ import annotations

import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fixture writer

CACHE = pathlib.Path(os.environ.get("STEER_GGUF_BENCH_CACHE", ROOT / "build" / "bench"))


def synthetic_model(n_layer: int = 8, n_embd: int = 1024, n_expert: int = 32, n_expert_used: int = 4,
                    n_ff_exp: int = 512, quant: str = "Q4_K_M") -> pathlib.Path:
    """A random-weight qwen3moe with realistic widths, quantized with llama.cpp's own
    quantizer; made once and cached."""
    import steer_gguf  # noqa: F401  (points llama_cpp at the patched library)
    import llama_cpp

    from fixtures.make_models import make_model

    CACHE.mkdir(parents=True, exist_ok=True)
    stem = f"qwen3moe-L{n_layer}-d{n_embd}-E{n_expert}-k{n_expert_used}-ff{n_ff_exp}"
    out = CACHE / f"{stem}-{quant}.gguf"
    if out.exists():
        return out
    f16 = CACHE / f"{stem}-F16.gguf"
    if not f16.exists():
        make_model("qwen3moe", f16, n_layer=n_layer, n_embd=n_embd, n_expert=n_expert,
                   n_expert_used=n_expert_used, n_ff_exp=n_ff_exp, ftype="f16", seed=1)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = os.cpu_count() or 1
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    tmp.replace(out)
    return out


# --quick: a smaller model of the same family, for a fast look
QUICK_SHAPE = dict(n_layer=4, n_embd=512, n_expert=16, n_expert_used=4, n_ff_exp=256)


def thread_kwargs(n: int | None) -> dict:
    """--threads N as SteeredLlama arguments. None: the physical cores, fixed, as llama.cpp's
    default; not steer-gguf's default, which follows the machine's load and would move the
    thread count between the configurations a benchmark compares (benchmarks/contention.py
    measures that default)."""
    if n is None:
        from steer_gguf.engine.threads import physical_cores

        n = physical_cores()
    return {"n_threads": n, "n_threads_batch": n}


def bench_profiles(info):
    """The benchmarks' two profiles: ~10% of the experts of every MoE layer, activated and
    deactivated alternately; and "noop", the steering op in every MoE layer with routing left
    exactly as upstream's (a 1e-30 bias, lost to rounding)."""
    import numpy as np

    from steer_gguf import BiasRule, ExpertRule, ModelRef, Profile

    n_steer = max(1, round(0.1 * info.n_expert))
    rng = np.random.default_rng(0)
    rules = []
    for il in info.moe_layers:
        for j, e in enumerate(rng.choice(info.n_expert, n_steer, replace=False)):
            rules.append(ExpertRule(il, int(e), "activate" if j % 2 == 0 and j // 2 < info.n_expert_used
                                    else "deactivate"))
    profile = Profile(ModelRef.of(info), rules, name="bench-10pct")
    noop = Profile(ModelRef.of(info), [], [BiasRule(il, 0, 1e-30) for il in info.moe_layers], name="bench-noop")
    return profile, noop


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summary(xs: list[float]) -> dict:
    """Median and spread (min, max) of a list of rates."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "all": xs}


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(), "python": platform.python_version(),
            "commit": commit, "libraries": libraries()}


def libraries() -> dict:
    """Size and time of the measured native libraries: runs compared with each other must be of
    one build, and a shared machine's install can be rebuilt between them."""
    from steer_gguf.engine.runtime import lib_dir

    out = {}
    for name in ("libllama.so", "libggml-cpu.so"):
        p = lib_dir() / name
        if p.exists():
            st = p.stat()
            out[name] = {"bytes": st.st_size, "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime))}
    return out
