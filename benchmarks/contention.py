"""Throughput on a busy CPU: decode and `serve --parallel 1/4`, quiet and with one competing
busy process (`yes > /dev/null`), with llama.cpp's fixed thread count and with steer-gguf's
default (the cores other processes leave free, engine/threads.py).

    python benchmarks/contention.py [--quick] [--json OUT]

Decode: one sequence, N single-token decodes after a short prompt (as llama-bench's tg),
median of --reps runs, tokens/s. Serve: 4 clients at once, each sending --requests
chat completions back to back (temperature 0, --max-tokens), completion tokens/s over the
cell's wall time. Every figure is measured quiet and then with the competitor running; the
ratio busy/quiet is the target (>= 0.6), and --parallel 4 must not fall below --parallel 1.
Each cell also records how busy the rest of the machine was while it ran (other processes'
cores, from /proc/stat), so a "quiet" figure taken on a machine that was not quiet shows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from common import QUICK_SHAPE, bench_profiles, machine, synthetic_model
from server_load import Server, run_cell


class Competitor:
    """One busy process for the length of a `with` block."""

    def __enter__(self):
        self.proc = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
        time.sleep(0.5)  # let the scheduler see it
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time (all its threads)."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        cols = f.read().rsplit(")", 1)[1].split()
    return (int(cols[11]) + int(cols[12])) / os.sysconf("SC_CLK_TCK")


class Others:
    """Cores kept busy, while a cell ran, by processes other than this one and `pids` (the
    server measured): the competitor, and whatever else shares the machine."""

    def __init__(self, *pids: int):
        import os

        self.pids = (os.getpid(), *pids)

    def __enter__(self):
        from steer_gguf.engine.threads import CpuLoad

        self.load = CpuLoad(own_cpu=lambda: sum(cpu_seconds(p) for p in self.pids))
        return self

    def __exit__(self, *exc):
        self.busy = self.load.other_busy()


def decode_rate(model, threads: int | None, n_tokens: int, reps: int) -> dict:
    from steer_gguf import SteeredLlama

    kw = {} if threads is None else {"n_threads": threads, "n_threads_batch": threads}
    llm = SteeredLlama(model, n_ctx=n_tokens + 64, **kw)
    try:
        prompt = llm.tokenize(b"The quick brown fox jumps over the lazy dog", add_bos=True)
        rates = []
        with Others() as o:
            for _ in range(reps):
                llm.reset()
                llm.eval(prompt)
                t = time.perf_counter()
                for _ in range(n_tokens):
                    llm.eval([prompt[-1]])
                rates.append(n_tokens / (time.perf_counter() - t))
        used = llm.governor.current()[0] if llm.governor else threads
        return {"tok_per_s": statistics.median(rates), "all": rates, "threads_at_end": used,
                "other_cores_busy": o.busy}
    finally:
        llm.close()


def serve_rate(model, profiles_dir, parallel: int, threads: int | None, requests: int, max_tokens: int) -> dict:
    args = ["--profiles-dir", str(profiles_dir), "--parallel", str(parallel), "--ctx", "256"]
    if threads is not None:
        args += ["--threads", str(threads)]
    srv = Server(model, args)
    try:
        run_cell(srv.url, 1, 1, 8, 600)  # warm-up
        with Others(srv.proc.pid) as o:
            cell = run_cell(srv.url, 4, requests, max_tokens, 1200)
        return {**{k: cell[k] for k in ("tokens_per_s", "req_per_s", "p50_s", "p95_s", "wall_s", "completion_tokens")},
                "other_cores_busy": o.busy}
    finally:
        srv.stop()


def measure(fn) -> dict:
    quiet = fn()
    with Competitor():
        busy = fn()
    return {"quiet": quiet, "busy": busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="decoded tokens per decode run")
    ap.add_argument("--requests", type=int, default=4, help="requests per serve client")
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()

    import tempfile

    from steer_gguf import model_info
    from steer_gguf.engine.threads import physical_cores

    model = synthetic_model(**(QUICK_SHAPE if a.quick else {}))
    steer, _ = bench_profiles(model_info(model))
    fixed = physical_cores()  # llama.cpp's default thread count
    settings = {f"fixed {fixed} threads (llama.cpp)": fixed, "steer-gguf default (free cores)": None}
    res = {"machine": machine(), "model": model.name, "physical_cores": fixed, "decode": {}, "serve": {}}
    with tempfile.TemporaryDirectory() as d:
        steer.save(f"{d}/steer.json")
        for name, threads in settings.items():
            res["decode"][name] = measure(lambda: decode_rate(model, threads, a.tokens, a.reps))
            for p in (1, 4):
                res["serve"][f"{name}, --parallel {p}"] = measure(
                    lambda: serve_rate(model, d, p, threads, a.requests, a.max_tokens))
    print(f"{'':52s} {'quiet':>9s} {'busy':>9s} {'ratio':>6s}   (others' cores: quiet / busy)")
    for kind, unit, key in (("decode", "tok/s", "tok_per_s"), ("serve", "tok/s", "tokens_per_s")):
        for name, r in res[kind].items():
            q, b = r["quiet"][key], r["busy"][key]
            r["ratio"] = b / q
            print(f"{kind + ' ' + name:52s} {q:9.1f} {b:9.1f} {b / q:6.2f}   "
                  f"({r['quiet']['other_cores_busy']:.2f} / {r['busy']['other_cores_busy']:.2f}) {unit}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
