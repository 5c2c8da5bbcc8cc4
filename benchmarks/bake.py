"""Bake time, size and exactness on the synthetic benchmark model (Q4_K_M qwen3moe).

    python benchmarks/bake.py [--quick] [--json OUT]

Prunes the two experts per MoE layer of a uniform deactivation profile, times the write, and
runs the check (baked file unsteered vs source with the profile). A copy of the file with no
expert removed (bias method is not available on qwen3moe) would be I/O alone: the figure to
compare with is the time to copy the source file, measured too.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from common import QUICK_SHAPE, machine, synthetic_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    from steer_gguf import ExpertRule, Profile, bake_profile, model_info
    from steer_gguf.bake.check import check_bake

    path = synthetic_model(**QUICK_SHAPE) if args.quick else synthetic_model()
    info = model_info(path)
    prof = Profile.empty(info, name="off2")
    prof.experts = [ExpertRule(il, e, "deactivate") for il in info.moe_layers for e in (3, 11)]
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as d:
        t = time.perf_counter()
        shutil.copyfile(path, os.path.join(d, "copy.gguf"))
        copy_s = time.perf_counter() - t
        out = os.path.join(d, "baked.gguf")
        plan, res = bake_profile(path, prof, out)
        rep = check_bake(plan, out, n_threads=args.threads, n_threads_batch=args.threads)
        doc = {"machine": machine(), "model": os.path.basename(path), "source_bytes": os.path.getsize(path),
               "baked_bytes": res.bytes, "bake_seconds": res.seconds, "copy_seconds": copy_s,
               "plan": plan.counts(), "n_expert": [info.n_expert, plan.n_expert_out],
               "check": rep.to_dict(plan)}
    print(plan.report().splitlines()[0])
    print(f"source {doc['source_bytes'] / 2**20:.1f} MiB -> baked {res.bytes / 2**20:.1f} MiB in "
          f"{res.seconds:.2f} s (a plain copy of the source: {copy_s:.2f} s)")
    print(rep.report(plan))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
