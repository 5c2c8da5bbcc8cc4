"""Files steer-gguf writes, run by stock llama.cpp: the llama.cpp this release patches, built as it
ships (no patch), loads each baked or pruned file and computes the logits steer-gguf computes for
the source under the profile.

    python benchmarks/stock_check.py [--build-dir build/stock] [--skip-build] [--out FILE.json]

1. build: the vendored llama.cpp of the pinned llama-cpp-python sdist (the one scripts/install.sh
   and scripts/build_wheels.sh cache), unpatched, shared libraries only, into --build-dir; checked
   to be stock (it has no llama_steer_* symbol).
2. cases, each written by steer-gguf's own commands on test-fixture models and the demo model:
   - `bake --method prune` of a deactivation profile (2 experts off per layer) on qwen3moe and
     Mixtral (softmax renormalized over the top-k: exact);
   - `bake --method bias` of a deactivation profile on gpt-oss (router bias, softmax after top-k:
     exact);
   - `bake` of a profile with only `topk` = 1 (written as expert_used_count), qwen3moe;
   - `prune --keep 0.5` of the demo model by REAP on builtin:demo-numbers (the file against the
     source with the dropped experts deactivated).
3. for each: the file's logits on 256 tokens of the built-in neutral text from the stock library
   (llama-cpp-python's Python layer on it, in a subprocess that never imports steer_gguf) against
   steer-gguf's logits for the source with the profile: next-token top-1 agreement, mean
   KL(steer-gguf || stock), largest logit difference. Pass: top-1 agreement >= 0.99 and mean KL
   <= 1e-4 (the files are exact by construction; what is left is float rounding of other shapes).
   A control, the first file against the source without its profile, must fail those bounds.
Exit status 1 when a case fails.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
N_TOKENS = 256
MIN_TOP1, MAX_KL = 0.99, 1e-4

# run by the stock library: llama-cpp-python's Python layer, LLAMA_CPP_LIB_PATH set, no steer_gguf
STOCK_LOGITS = r"""
import ctypes, pathlib, sys
import numpy as np
import llama_cpp
lib = pathlib.Path(sys.argv[4])
assert pathlib.Path(llama_cpp.llama_cpp._lib._name).resolve().parent == lib.resolve(), llama_cpp.llama_cpp._lib._name
try:
    llama_cpp.llama_cpp._lib.llama_steer_api_version
    sys.exit("stock_check: the library has llama_steer_api_version: it is steer-gguf's, not stock")
except AttributeError:
    pass
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, logits_all=True, n_threads=1, n_threads_batch=1,
                      verbose=False)
toks = [int(t) for t in pathlib.Path(sys.argv[2]).read_text().split()]
llm.eval(toks)
np.save(sys.argv[3], np.asarray(llm.scores[:len(toks)], dtype=np.float32))
"""


def sdist(cache: pathlib.Path, pin: str) -> pathlib.Path:
    path = cache / f"llama_cpp_python-{pin}.tar.gz"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={pin}", "-d", str(cache)], check=True)
    return path


def build(build_dir: pathlib.Path, jobs: int) -> pathlib.Path:
    """The stock shared libraries; returns the folder that holds libllama."""
    import tomllib

    pin = next(d.split("==")[1] for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if d.startswith("llama-cpp-python=="))
    cache = pathlib.Path(os.environ.get("STEER_GGUF_CACHE") or
                         pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "steer-gguf")
    src = build_dir / "src"
    if not (src / "CMakeLists.txt").exists():
        shutil.rmtree(src, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(sdist(cache, pin)) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # Python < 3.11.4 (Debian 12's 3.11.2): no extraction filters; refuse what they would
                bad = [m.name for m in tf.getmembers() if m.name.startswith("/") or ".." in pathlib.PurePath(m.name).parts
                       or m.issym() or m.islnk() or m.isdev()]
                if bad:
                    raise SystemExit(f"stock_check: the sdist holds unsafe entries: {bad[:3]}")
                tf.extractall(tmp)
            shutil.move(str(next(pathlib.Path(tmp).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"), src)
    b = build_dir / "b"
    # the build tools next to this Python first (CI installs them into the venv), then PATH
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    cmake, ninja = shutil.which("cmake", path=path), shutil.which("ninja", path=path)
    if cmake is None or ninja is None:
        raise SystemExit("stock_check: needs cmake and ninja (pip install cmake ninja)")
    args = [cmake, "-S", str(src), "-B", str(b), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}", "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]
    if shutil.which("ccache"):
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--build", str(b), "--target", "llama", "-j", str(jobs)], check=True)
    lib = next((p.parent for p in b.rglob("libllama.so")), None)
    if lib is None:
        raise SystemExit(f"stock_check: no libllama.so under {b}")
    return lib


def cli(*args) -> None:
    r = subprocess.run([sys.executable, "-m", "steer_gguf", *map(str, args)], capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise SystemExit(f"stock_check: steer-gguf {' '.join(map(str, args[:2]))} failed:\n{r.stderr[-2000:]}")


def stock_logits(lib: pathlib.Path, model: pathlib.Path, toks_file: pathlib.Path, out: pathlib.Path) -> np.ndarray:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEER_GGUF", "LLAMA_CPP"))}
    env["LLAMA_CPP_LIB_PATH"] = str(lib)
    r = subprocess.run([sys.executable, "-c", STOCK_LOGITS, str(model), str(toks_file), str(out), str(lib)],
                       capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise SystemExit(f"stock_check: stock llama.cpp could not run {model.name}:\n{r.stderr[-2000:]}")
    return np.load(out)


def compare(ours: np.ndarray, stock: np.ndarray) -> dict:
    from steer_gguf.engine.scoring import kl_divergence, log_softmax

    kl = kl_divergence(log_softmax(ours), log_softmax(stock))
    top1 = float((ours.argmax(axis=1) == stock.argmax(axis=1)).mean())
    res = {"positions": int(ours.shape[0]), "top1_agreement": top1, "mean_kl": float(kl.mean()),
           "max_kl": float(kl.max()), "max_abs_logit_diff": float(np.abs(ours - stock).max())}
    res["pass"] = bool(top1 >= MIN_TOP1 and res["mean_kl"] <= MAX_KL)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default=str(ROOT / "build" / "stock"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--skip-build", action="store_true", help="reuse the stock build in --build-dir")
    ap.add_argument("--out", help="the JSON to write (default: <build-dir>/stock_check.json)")
    args = ap.parse_args()
    build_dir = pathlib.Path(args.build_dir).resolve()
    if args.skip_build:
        lib = next((p.parent for p in (build_dir / "b").rglob("libllama.so")), None)
        if lib is None:
            raise SystemExit(f"stock_check: no stock build in {build_dir}; drop --skip-build")
    else:
        lib = build(build_dir, args.jobs)

    from fixtures.make_models import make_model
    from steer_gguf import ExpertRule, ModelRef, Profile, SteeredLlama, model_info
    from steer_gguf.bake.prune import drop_profile
    from steer_gguf.evaluation.measure import NEUTRAL_TEXT
    from steer_gguf.front.demo import DEMO_MODEL

    result = {"host": {"system": platform.platform(), "python": platform.python_version()}, "library": str(lib),
              "bounds": {"top1_agreement": MIN_TOP1, "mean_kl": MAX_KL}, "cases": {}}
    work = pathlib.Path(tempfile.mkdtemp(prefix="stock-check-"))
    try:
        def off_two(info) -> Profile:
            # the two highest-numbered experts off in every MoE layer: the form prune can bake
            rules = [ExpertRule(il, e, "deactivate") for il in info.moe_layers for e in (info.n_expert - 2, info.n_expert - 1)]
            return Profile(ModelRef.of(info), rules, name="off2")

        cases = []
        for kind, method in (("qwen3moe", "prune"), ("mixtral", "prune"), ("gpt-oss", "bias")):
            src = make_model(kind, work / f"{kind}.gguf", n_layer=4)
            cases.append((f"{kind}: bake --method {method}, 2 experts off per layer", src, off_two(model_info(src)),
                          method))
        src = make_model("qwen3moe", work / "qwen3moe-k.gguf", n_layer=4, n_expert_used=4)
        info = model_info(src)
        cases.append(("qwen3moe: bake of topk = 1 (expert_used_count)", src,
                      Profile(ModelRef.of(info), [], name="k1", topk=1), "auto"))
        for i, (name, src, prof, method) in enumerate(cases):
            pf, out = work / f"{prof.name}-{src.stem}.json", work / f"baked-{src.stem}.gguf"
            prof.save(pf)
            cli("bake", src, "--profile", pf, "-o", out, "--method", method, "-t", "1")
            result["cases"][name] = run_case(lib, work, src, prof, out, SteeredLlama, NEUTRAL_TEXT)
            if i == 0:
                # the control: the same file against the source *without* the profile must fail
                # the bounds, or they could not tell a baked file from an unsteered one
                result["control"] = run_case(lib, work, src, None, out, SteeredLlama, NEUTRAL_TEXT)
                result["control"]["case"] = f"{name}, against the unsteered source"
        # `prune` by REAP on the demo model: the file against the source with the drops deactivated
        out, rep = work / "demo-pruned.gguf", work / "prune.json"
        cli("prune", DEMO_MODEL, "--calibration", "builtin:demo-numbers", "--keep", "0.5", "-o", out, "--json", rep,
            "-t", "1")
        d = json.loads(rep.read_text())
        keep = min(p["keep"] for p in d["points"])
        kept = next(p["kept"] for p in d["points"] if p["criterion"] == "reap" and p["keep"] == keep)
        prof = drop_profile(model_info(DEMO_MODEL), {int(k): v for k, v in kept.items()}, "reap")
        result["cases"]["demo: prune --keep 0.5 (REAP)"] = run_case(lib, work, pathlib.Path(DEMO_MODEL), prof, out,
                                                                     SteeredLlama, NEUTRAL_TEXT)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    control = result["control"]
    ok = all(c["pass"] for c in result["cases"].values()) and not control["pass"]
    print(f"{'pass' if not control['pass'] else 'FAIL'}  control ({control['case']}) fails the bounds as it must: "
          f"top-1 {control['top1_agreement']:.4f}, mean KL {control['mean_kl']:.2e}")
    for name, c in result["cases"].items():
        print(f"{'pass' if c['pass'] else 'FAIL'}  {name}: top-1 {c['top1_agreement']:.4f}, mean KL "
              f"{c['mean_kl']:.2e}, max |logit diff| {c['max_abs_logit_diff']:.2e} over {c['positions']} positions")
    out_json = pathlib.Path(args.out or build_dir / "stock_check.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_json}")
    return 0 if ok else 1


def run_case(lib, work, src, prof, baked, steered_cls, neutral) -> dict:
    llm = steered_cls(str(src), profile=prof, n_ctx=512, logits_all=True, n_threads=1, n_threads_batch=1)
    try:
        toks = llm.tokenize(neutral.read_text(encoding="utf-8").encode(), add_bos=True, special=False)[:N_TOKENS]
        llm.eval(toks)
        ours = np.asarray(llm.scores[:len(toks)], dtype=np.float32)
    finally:
        llm.close()
    tf = work / "tokens.txt"
    tf.write_text(" ".join(map(str, toks)))
    return compare(ours, stock_logits(lib, baked, tf, work / "stock.npy"))


if __name__ == "__main__":
    sys.exit(main())
