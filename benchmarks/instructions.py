"""Instructions per token, counted by callgrind: a deterministic measure of what steering and
tracing cost, free of the timing noise of a shared machine.

    python benchmarks/instructions.py [--json OUT]

Configurations: no profile, a 10% profile, the no-op profile (steering op, routing
unchanged) context-wide and in a profile slot bound to the sequence (the per-sequence graph),
the hook engine, tracing. Runs one single-threaded process per (configuration, phase) under
callgrind on the overhead benchmark's model, plus one per configuration that loads and sets up
everything and decodes nothing; the difference is the work of the tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from common import bench_profiles, machine, synthetic_model

PREFILL, DECODE = 128, 16


def child(config: str, phase: str) -> None:
    import numpy as np

    from steer_gguf import SteeredLlama, model_info

    path = synthetic_model()
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
    if phase == "none":
        return
    if phase == "prefill":
        if config == "trace":
            llm.trace_many([toks[:PREFILL]], batch_tokens=PREFILL)
        else:
            llm.eval(toks[:PREFILL])
    else:
        llm.eval(toks[:8])
        for t in toks[PREFILL:]:
            llm.eval([t])


def count(config: str, phase: str) -> int:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cg.out")
        r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                            "--child", config, phase],
                           capture_output=True, text=True)
        m = re.search(r"Collected : (\d+)", r.stderr)
        if "Illegal opcode" in r.stderr:
            raise SystemExit("valgrind cannot decode this build's instructions (AVX-512 under -march=native): "
                             "count on a build made with CMAKE_ARGS=-DGGML_NATIVE=OFF")
        if r.returncode != 0 or not m:
            raise SystemExit(f"callgrind failed for {config}/{phase}:\n{r.stderr[-2000:]}")
        return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--json")
    ap.add_argument("--note", default="", help="how the measured build was made (stored in the JSON)")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    synthetic_model()  # make it outside valgrind
    res: dict[str, dict[str, float]] = {}
    configs = ("plain", "graph", "noop", "slots", "hook", "trace")
    # each configuration's own set-up (profile checks in Python, table upload) is subtracted:
    # over 16 decoded tokens it would otherwise read as a per-token cost
    base = {c: count(c, "none") for c in configs}
    print(f"start-up and load: {base['plain'] / 1e6:.0f} M instructions", flush=True)
    for config in configs:
        for phase in ("prefill", "decode"):
            if config == "trace" and phase == "decode":
                continue
            n = count(config, phase) - base[config]
            # the decode run also prefills 8 tokens; it is the same work in every configuration
            per_tok = n / (PREFILL if phase == "prefill" else DECODE)
            res.setdefault(config, {})[phase] = per_tok
            print(f"{config:6s} {phase:8s} {per_tok / 1e6:10.2f} M instructions/token", flush=True)
    ratios = {f"{c}/plain {ph}": res[c][ph] / res["plain"][ph] for c in configs[1:]
              for ph in ("prefill", "decode") if ph in res[c]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "build": args.note, "prefill_tokens": PREFILL, "decode_tokens": DECODE,
                       "instructions_per_token": res, "cost_ratios": ratios}, f, indent=2)
    print("instruction ratios (cost, lower is better): " + ", ".join(f"{k} {v:.4f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
