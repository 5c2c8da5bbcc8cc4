"""Does a GPU backend still run its fused top-k-MoE kernel on steered layers?

The patched ggml prints "steer-gguf: fused topk_moe <ids tensor>" for every fused top-k-MoE
dispatch when STEER_GGUF_LOG_FUSION=1 (csrc/patch_llama.py; CUDA and Vulkan). This probe
loads a model with every layer offloaded, evaluates a prompt and one decode unsteered, then
with a profile that activates one expert and deactivates another in every MoE layer, and
then unsteered with the graph recording routing, and reports which layers took the fused
kernel in each phase, with the logits of each.

    run_probe(model, n_gpu_layers=99) -> {"plain": [layers], "steered": [layers], ...}

Run as a script it is the child process: `python fusion_probe.py MODEL NGL OUT.npz`.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

TEXT = "The quick brown fox jumps over the lazy dog 0123456789 again and again."
MARK = "steer-gguf probe phase: "
FUSED = re.compile(r"^steer-gguf: fused topk_moe \S*?-(\d+)\b")


def _child(model: str, ngl: int, out: str) -> None:
    import numpy as np

    from steer_gguf import ExpertRule, ModelRef, Profile, SteeredLlama, model_info

    info = model_info(model)
    llm = SteeredLlama(model, n_ctx=256, n_threads=1, n_threads_batch=1, n_gpu_layers=ngl, logits_all=True)
    toks = llm.tokenize(TEXT.encode(), add_bos=True, special=True)
    # one expert on and one off in every MoE layer: every MoE layer is steered
    rules = [r for il in info.moe_layers
             for r in (ExpertRule(il, 1, "activate"), ExpertRule(il, 0, "deactivate"))]
    profile = Profile(ModelRef.of(info), rules, name="probe")
    scores = {}
    # "traced": unsteered, with the graph recording routing (steer.h API 3): its kept outputs
    # must leave the fused kernel in place
    for phase, prof in (("plain", None), ("steered", profile), ("traced", None)):
        llm.set_profile(prof)
        print(MARK + phase, file=sys.stderr, flush=True)
        with llm.lock:
            llm.reset()
            if phase == "traced":
                llm._recorder.on()
            try:
                llm.eval(toks)           # prefill: a many-token graph
                llm.eval(toks[:1])       # one decode: the one-token graph
                if phase == "traced":
                    llm._recorder.take()
            finally:
                if phase == "traced":
                    llm._recorder.off()
        scores[phase] = np.array(llm.scores[: len(toks) + 1])
        print(MARK + "end", file=sys.stderr, flush=True)
    llm.close()
    np.savez(out, **scores)
    print(json.dumps({"moe_layers": list(info.moe_layers), "gating": info.gating,
                      "architecture": info.architecture, "n_expert": info.n_expert,
                      "n_expert_used": info.n_expert_used}))


def parse(stderr: str) -> dict[str, list[int]]:
    """Layers with a fused top-k-MoE dispatch, per phase, from the child's stderr."""
    fused: dict[str, set[int]] = {}
    phase = None
    for line in stderr.splitlines():
        if line.startswith(MARK):
            phase = line[len(MARK):].strip()
            phase = None if phase == "end" else phase
            if phase:
                fused.setdefault(phase, set())
            continue
        m = FUSED.match(line)
        if m and phase:
            fused[phase].add(int(m.group(1)))
    return {k: sorted(v) for k, v in fused.items()}


def run_probe(model, n_gpu_layers: int = 99, env: dict | None = None, timeout: float = 300) -> dict:
    import numpy as np

    full_env = dict(os.environ, STEER_GGUF_LOG_FUSION="1", **(env or {}))
    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "scores.npz"
        p = subprocess.run([sys.executable, __file__, str(model), str(n_gpu_layers), str(out)],
                           capture_output=True, text=True, env=full_env, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"fusion probe failed ({p.returncode}):\n{p.stderr[-4000:]}")
        result = json.loads(p.stdout.strip().splitlines()[-1])
        with np.load(out) as z:
            result["scores"] = {k: z[k] for k in z.files}
    result["fused"] = parse(p.stderr)
    return result


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
