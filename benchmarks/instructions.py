"""Instructions per token, counted by callgrind: a deterministic measure of what steering and
tracing cost, free of the timing noise of a shared machine.

    python benchmarks/instructions.py [--ggml-cpu LIB] [--quick] [--json OUT]

Configurations: no profile, a 10% profile, the no-op profile (steering op, routing unchanged)
context-wide and in a profile slot bound to the sequence (the per-sequence graph), the hook
engine, tracing (prefill: trace_many, every token traced; decode: the batch engine with
steer_trace, against the batch engine without it). One single-threaded process per
(configuration, phase) under callgrind, on the overhead benchmark's model.

Each process runs its set-up (imports, model load) uninstrumented and counts only the measured
section, every thread of it, Python included (callgrind client requests through a tiny shim);
the batch engine's prompt pass is counted alone and subtracted from its decode. (Counting only
inside llama_decode with --toggle-collect does not work here: ggml computes in its worker
thread, outside the decode call's stack as callgrind sees it.)

valgrind cannot decode AVX-512: on a -march=native build for an AVX-512 machine, give --ggml-cpu
a libggml-cpu.so built from the same llama.cpp source with GGML_NATIVE=OFF (benchmarks/
ggml_cpu_avx2.sh builds one); it is preloaded in the measured processes, the rest of the install
is used as it is. No hardware counters here: perf_event_open gives no instruction counter in this
VM (`perf stat -e instructions` says "not supported"), so callgrind is the counter.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from common import QUICK_SHAPE, bench_profiles, machine, synthetic_model

PREFILL, DECODE = 128, 16
CONFIGS = ("plain", "graph", "noop", "slots", "hook", "trace", "engine", "engine-trace")
PHASES = {"trace": ("prefill",), "engine": ("decode",), "engine-trace": ("decode",)}
RATIOS = [  # (figure, configuration, reference, phase)
    *[(f"{c}/plain {ph}", c, "plain", ph) for c in ("graph", "noop", "slots", "hook") for ph in ("prefill", "decode")],
    ("trace/plain prefill", "trace", "plain", "prefill"),
    ("engine-trace/engine decode", "engine-trace", "engine", "decode"),
    # TOP-K HOOK (design.md "Experts per token"): once profiles carry "topk", add configurations
    # "topk" (a profile with topk=k', no rules) and "stock-k" (the model loaded with
    # expert_used_count=k') to child() and the ratios ("topk/stock-k prefill", ...) here.
]


SHIM = r"""
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
"""


def shim_path() -> str:
    """A tiny library that issues callgrind's client requests, so the measured process runs its
    set-up (imports, model load, weight repacking) uninstrumented, several times faster, and
    counts exactly the measured section. Compiled once from valgrind's own header."""
    from common import CACHE

    out = CACHE / "callgrind_shim.so"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        src = CACHE / "callgrind_shim.c"
        src.write_text(SHIM)
        subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return str(out)


def child(config: str, phase: str, preload: str | None, quick: bool) -> None:
    import ctypes

    import numpy as np

    from steer_gguf import SteeredLlama, model_info

    if preload and preload not in open("/proc/self/maps").read():
        raise SystemExit(f"{preload} was not loaded: the counts would be of the installed build")
    cg = ctypes.CDLL(shim_path())
    path = synthetic_model(**QUICK_SHAPE) if quick else synthetic_model()
    info = model_info(path)
    profile, noop = bench_profiles(info)
    if config == "noop":
        profile = noop
    llm = SteeredLlama(path, n_ctx=512, n_batch=PREFILL, n_ubatch=PREFILL, n_threads=1, n_threads_batch=1,
                       engine="hook" if config == "hook" else "graph",
                       profile=profile if config in ("graph", "noop", "hook") else None)
    if config == "slots":
        # the no-op profile in a profile slot bound to sequence 0: the per-sequence graph
        # (a table per slot, each token's looked up) with routing exactly upstream's
        from steer_gguf.engine.slots import ContextSlots

        slots = ContextSlots(llm._ctx_ptr, info)
        slots.bind(0, slots.acquire(noop))
    toks = [int(t) for t in np.random.default_rng(1).integers(0, 256, PREFILL + DECODE)]
    if config.startswith("engine"):
        from steer_gguf.engine.batch import BatchEngine, Request, SamplerSpec

        eng = BatchEngine(llm, 1, 64)
        # an 8-token prompt whose pass samples the first token, then one decode per further
        # token ("prompt": none, subtracted); greedy, so both configurations decode the same tokens
        n = 1 if phase == "prompt" else DECODE + 1
        req = [(0, Request(toks[:8], max_tokens=n, sampling=SamplerSpec(temperature=0),
                           trace=config == "engine-trace"))]
        out = []
        cg.cg_start()
        eng.run(lambda idle: req.pop(0) if req else None, lambda k, r: out.append(r))
        cg.cg_stop()
        if isinstance(out[0], Exception) or len(out[0].tokens) != n:
            raise SystemExit(f"engine run stopped early: {out[0]!r}")
        return
    if phase == "prefill":
        cg.cg_start()
        if config == "trace":
            llm.trace_many([toks[:PREFILL]], batch_tokens=PREFILL)
        else:
            llm.eval(toks[:PREFILL])
        cg.cg_stop()
        return
    llm.eval(toks[:8])
    cg.cg_start()
    for t in toks[PREFILL:]:
        llm.eval([t])
    cg.cg_stop()


def count(config: str, phase: str, preload: str | None, quick: bool = False) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")  # Python's own work the same from run to run
    if preload:
        env["LD_PRELOAD"] = preload
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cg.out")
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, __file__, "--child", config, phase,
               *(["--ggml-cpu", preload] if preload else []), *(["--quick"] if quick else [])]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        m = re.search(r"Collected : (\d+)", r.stderr)
        if "Illegal opcode" in r.stderr or "unhandled instruction" in r.stderr:
            raise SystemExit("valgrind cannot decode this build's instructions (AVX-512 under -march=native): "
                             "pass --ggml-cpu with a GGML_NATIVE=OFF libggml-cpu.so (benchmarks/ggml_cpu_avx2.sh)")
        if r.returncode != 0 or not m:
            raise SystemExit(f"callgrind failed for {config}/{phase}:\n{r.stderr[-2000:]}")
        return int(m.group(1))


# the engine's decode count has its prompt pass (run alone, "prompt") subtracted; the other
# phases count only the measured section, started and stopped by the shim
BASE = {"engine": "prompt", "engine-trace": "prompt"}
TOKENS = {"prefill": PREFILL, "decode": DECODE}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--json")
    ap.add_argument("--ggml-cpu", help="a GGML_NATIVE=OFF libggml-cpu.so to preload (see above)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="the overhead benchmark's --quick model (4 layers, d=512)")
    ap.add_argument("--note", default="", help="how the measured build was made (stored in the JSON)")
    args = ap.parse_args()
    preload = os.path.abspath(args.ggml_cpu) if args.ggml_cpu else None
    if args.child:
        child(*args.child, preload, args.quick)
        return
    path = synthetic_model(**QUICK_SHAPE) if args.quick else synthetic_model()  # made outside valgrind
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    res: dict[str, dict[str, float]] = {}
    raw: dict[str, int] = {}
    for config in configs:
        for phase in PHASES.get(config, ("prefill", "decode")):
            raw[f"{config}/{phase}"] = count(config, phase, preload, args.quick)
            n = raw[f"{config}/{phase}"]
            if config in BASE:
                raw[f"{config}/{BASE[config]}"] = count(config, BASE[config], preload, args.quick)
                n -= raw[f"{config}/{BASE[config]}"]
            res.setdefault(config, {})[phase] = n / TOKENS[phase]
            print(f"{config:12s} {phase:8s} {res[config][phase] / 1e6:10.3f} M instructions/token", flush=True)
    ratios = {name: res[c][ph] / res[ref][ph] for name, c, ref, ph in RATIOS
              if ph in res.get(c, {}) and ph in res.get(ref, {})}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "model": path.name, "build": args.note,
                       "preloaded_ggml_cpu": bool(preload), "prefill_tokens": PREFILL, "decode_tokens": DECODE,
                       "instructions_per_token": res, "cost_ratios": ratios,
                       "raw_counts": raw}, f, indent=2)
    print("instruction ratios (cost, lower is better): " + ", ".join(f"{k} {v:.4f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
