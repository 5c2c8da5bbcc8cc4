"""One-command GPU check: build with CUDA, run the steering tests on the GPU, show that steered
layers keep the fused top-k-MoE kernel, measure the overhead; one JSON with everything.

    python benchmarks/gpu_check.py [--cuda-arch 90] [--out FILE.json] [--reps 7]

On a machine with an NVIDIA GPU, the CUDA toolkit, CMake, Ninja, pybind11 and the Python
packages steer-gguf needs (llama-cpp-python's Python layer, numpy, gguf, pytest). Offline:
point STEER_GGUF_LLAMA_SOURCE at the llama-cpp-python sdist or a llama.cpp tree. Steps:

1. build: CMake + Ninja into --build-dir with -DGGML_CUDA=ON and one CUDA architecture (the
   GPU's own unless --cuda-arch says otherwise), timed; installed into a staging copy of the
   package (the source tree and any installed steer-gguf are left alone);
2. tests: the steering, profile-slot, batch and fusion tests with STEER_GGUF_TEST_NGL=99,
   every layer of every test model on the GPU;
3. fusion: per gating type, which MoE layers the patched ggml-cuda dispatched to its fused
   top-k-MoE kernel (STEER_GGUF_LOG_FUSION=1 prints each dispatch), unsteered and with every MoE
   layer steered, and the same with GGML_CUDA_DISABLE_FUSION=1 as the control (no dispatch
   may be logged, logits must agree);
4. benchmarks/overhead.py and benchmarks/batched.py (per-sequence steering) with
   --n-gpu-layers 99.

--backend vulkan runs the same steps on a Vulkan build (-DGGML_VULKAN=ON).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

BACKENDS = {
    "cuda": {"cmake": ["-DGGML_CUDA=ON"], "disable_fusion": {"GGML_CUDA_DISABLE_FUSION": "1"}},
    "vulkan": {"cmake": ["-DGGML_VULKAN=ON"], "disable_fusion": {"GGML_VK_DISABLE_FUSION": "1"}},
    "cpu": {"cmake": [], "disable_fusion": {}},
}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(shlex.quote(str(c)) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], **kw)


def gpu_info() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    name, driver, cap, mem = [x.strip() for x in out.splitlines()[0].split(",")]
    info = {"name": name, "driver": driver, "compute_capability": cap, "memory": mem}
    try:
        v = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
        info["nvcc"] = re.findall(r"release ([\d.]+)", v)[0]
    except (OSError, IndexError):
        pass
    return info


def stage_python(stage: pathlib.Path) -> None:
    """The source tree's Python files into the staged package, beside its native parts: after a
    build, and again under --skip-build, so the tests always run the current Python code."""
    pkg = stage / "steer_gguf"
    for old in pkg.rglob("*.py"):
        old.unlink()
    shutil.copytree(ROOT / "steer_gguf", pkg, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("lib", "include", "_native*", "__pycache__"))


def build(args, backend: str) -> dict:
    bdir = pathlib.Path(args.build_dir).resolve()
    pybind11_dir = os.environ.get("pybind11_DIR")
    if not pybind11_dir:
        import pybind11

        pybind11_dir = pybind11.get_cmake_dir()
    cfg = ["cmake", "-S", ROOT, "-B", bdir, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
           f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11_dir}",
           *BACKENDS[backend]["cmake"]]
    if backend == "cuda":
        cfg.append(f"-DCMAKE_CUDA_ARCHITECTURES={args.cuda_arch}")
    launcher = os.environ.get("STEER_GGUF_COMPILER_LAUNCHER")
    if launcher:
        cfg += [f"-DCMAKE_C_COMPILER_LAUNCHER={launcher}", f"-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}"]
    cfg += shlex.split(os.environ.get("CMAKE_ARGS", ""))
    t0 = time.perf_counter()
    sh(cfg, check=True)
    t1 = time.perf_counter()
    sh(["cmake", "--build", bdir, "--parallel", str(args.jobs)], check=True)
    t2 = time.perf_counter()
    stage = bdir / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage_python(stage)
    sh(["cmake", "--install", bdir, "--prefix", stage], check=True, stdout=subprocess.DEVNULL)
    return {"configure_s": round(t1 - t0, 1), "build_s": round(t2 - t1, 1), "jobs": args.jobs,
            "cmake_args": [str(c) for c in cfg[3:]], "stage": str(stage)}


def child_env(stage: pathlib.Path, ngl: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stage), env.get("PYTHONPATH", "")) if p)
    env["STEER_GGUF_TEST_NGL"] = str(ngl)
    env.pop("STEER_GGUF_LIB_DIR", None)
    env["PYTHONUNBUFFERED"] = "1"
    if sys.platform.startswith("linux"):
        # Seen on an H100 host (CUDA 13.0, GCC 13, Python 3.12): with the CUDA build, a process
        # that imported numpy before libllama was loaded crashed in libllama's std::regex (the
        # tokenizer, at model load); with libllama loaded first it did not. The tests import
        # numpy first, so every child process gets libllama preloaded.
        lib = stage / "steer_gguf" / "lib" / "libllama.so"
        env["LD_PRELOAD"] = " ".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    return env


def run_tests(args, env: dict) -> dict:
    xml = pathlib.Path(args.build_dir).resolve() / "tests.xml"
    t0 = time.perf_counter()
    # -P: the source tree's steer_gguf (the CPU build's) must not shadow the staged one
    p = sh([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
            *args.tests], cwd=ROOT, env=env)
    counts = {}
    if xml.exists():
        import xml.etree.ElementTree as ET

        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["skipped_reasons"] = sorted({s.get("message", "") for s in suite.iter("skipped")})
    return {"files": args.tests, "returncode": p.returncode, "seconds": round(time.perf_counter() - t0, 1), **counts}


def fusion(args, backend: str, env: dict) -> dict:
    import numpy as np

    from fixtures.make_models import make_model
    from fusion_probe import run_probe
    from test_gpu_fusion import CASES

    os.environ.update({k: env[k] for k in ("PYTHONPATH", "STEER_GGUF_TEST_NGL")})
    mdir = pathlib.Path(args.build_dir).resolve() / "fusion-models"
    mdir.mkdir(parents=True, exist_ok=True)
    out = {}
    for case, (kind, kw) in CASES.items():
        path = make_model(kind, mdir / (kind + "".join(f"-{k}{v}" for k, v in sorted(kw.items())) + ".gguf"), **kw)
        on = run_probe(path, 99)
        off = run_probe(path, 99, env=BACKENDS[backend]["disable_fusion"])
        plain, steered = set(on["fused"].get("plain", [])), set(on["fused"].get("steered", []))
        moe = on["moe_layers"]
        if not plain:
            verdict = "not fused unsteered either"
        elif steered >= plain:
            verdict = "yes"
        else:
            verdict = "no"
        out[case] = {
            "model": kind, "make_model": kw, "gating": on["gating"], "moe_layers": moe,
            "fused_layers_unsteered": sorted(plain), "fused_layers_steered": sorted(steered),
            "fused_layers_with_fusion_disabled": off["fused"],
            "steered_layers_stay_fused": verdict,
            "steering_changed_logits": bool(not np.allclose(on["scores"]["steered"], on["scores"]["plain"])),
            "max_abs_logit_diff_fused_vs_unfused": {
                ph: float(np.max(np.abs(on["scores"][ph] - off["scores"][ph]))) for ph in ("plain", "steered")},
        }
        print(f"fusion: {case}: unsteered {sorted(plain)}, steered {sorted(steered)} of MoE layers {moe} -> {verdict}",
              file=sys.stderr, flush=True)
    return out


def benchmark(args, env: dict, script: str) -> dict:
    js = pathlib.Path(args.build_dir).resolve() / f"{script}.json"
    cmd = [sys.executable, ROOT / "benchmarks" / f"{script}.py", "--n-gpu-layers", "99", "--json", js,
           "--reps", str(args.reps), "--decode-tokens", str(args.decode_tokens)]
    if args.quick:
        cmd.append("--quick")
    env = dict(env)
    env.pop("STEER_GGUF_TEST_NGL", None)
    p = sh(cmd, cwd=ROOT, env=env)
    if p.returncode != 0 or not js.exists():
        return {"returncode": p.returncode}
    return json.loads(js.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="cuda")
    ap.add_argument("--cuda-arch", help="one CUDA architecture, e.g. 90 (default: the GPU's own)")
    ap.add_argument("--build-dir", default=None, help="default: build/<backend>")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--skip-build", action="store_true", help="reuse the staged build in --build-dir")
    ap.add_argument("--tests", nargs="*", default=["tests/test_steering.py", "tests/test_gpu_fusion.py",
                                                    "tests/test_slots.py", "tests/test_batch.py",
                                                    "tests/test_gpu_fusion_slots.py", "tests/test_route_outputs.py"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="a smaller benchmark model (smoke run)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "fusion", "overhead", "batched"])
    ap.add_argument("--out", help="the JSON to write (default: <build-dir>/gpu_check.json)")
    args = ap.parse_args()
    args.build_dir = args.build_dir or str(ROOT / "build" / args.backend)

    result: dict = {"backend": args.backend, "gpu": gpu_info(), "host": {
        "system": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}}
    try:
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip()
    except OSError:
        pass
    if args.backend == "cuda" and not args.cuda_arch:
        cap = result["gpu"].get("compute_capability")
        if not cap:
            sys.exit("gpu_check: no NVIDIA GPU found (nvidia-smi); pass --cuda-arch to build anyway")
        args.cuda_arch = cap.replace(".", "")
    out = pathlib.Path(args.out or pathlib.Path(args.build_dir) / "gpu_check.json")

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))

    stage = pathlib.Path(args.build_dir).resolve() / "stage"
    if not args.skip_build:
        result["build"] = build(args, args.backend)
        save()
    elif not (stage / "steer_gguf" / "lib").is_dir():
        sys.exit(f"gpu_check: --skip-build, but {stage} holds no build: run once without it")
    else:
        stage_python(stage)
    ngl = 0 if args.backend == "cpu" else 99
    env = child_env(stage, ngl)
    if "tests" not in args.skip:
        result["tests"] = run_tests(args, env)
        save()
    if "fusion" not in args.skip and ngl:
        result["fusion"] = fusion(args, args.backend, env)
        save()
    for script in ("overhead", "batched"):
        if script not in args.skip:
            result[script] = benchmark(args, env, script)
            save()
    print(json.dumps({k: v for k, v in result.items() if k not in ("overhead", "batched")}, indent=2, default=str))
    if "overhead" in result and "ratios" in result["overhead"]:
        print("overhead ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in result["overhead"]["ratios"].items()))
    for n, row in result.get("batched", {}).get("by_seqs", {}).items():
        print(f"batched, {n} sequences: " + ", ".join(f"{k} {v:.3f}" for k, v in row["ratios"].items()))
    print(f"wrote {out}")
    failed = result.get("tests", {}).get("returncode", 0) != 0 or any(
        f["steered_layers_stay_fused"] == "no" for f in result.get("fusion", {}).values())
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
