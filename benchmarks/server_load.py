"""The server under load: requests/s and p50/p95 latency with concurrent clients, --parallel 1 vs 4.

    python benchmarks/server_load.py [--quick] [--threads N] [--reps R] [--max-tokens T] [--json OUT]

For each --parallel P (default 1 and 4) one `steer-gguf serve` runs on the synthetic benchmark
model, with a profiles dir holding "steer" (~10% of the experts of every MoE layer steered).
After one warm-up request, for each client count C (default 1, 4, 8), C client threads start
together and each sends R chat completions back to back (non-streaming, temperature 0,
max_tokens T, a short prompt), alternating "steer_profile": "steer" and "none" so that half
the requests of every cell are steered. Per cell: requests/s and completion tokens/s over the
cell's wall time, p50 and p95 of the per-request latency (queueing included). R defaults to
enough for 48 requests per cell (4 with --quick). Every response must be 200 with
usage.completion_tokens > 0, or the run stops.

The last column is req/s at --parallel 4 over req/s at --parallel 1 for the same clients: what
decoding requests together buys (with 1 client it should be ~1).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from common import QUICK_SHAPE, ROOT, bench_profiles, machine, synthetic_model

PROMPTS = ["Tell me a short story about the sea.", "What is the capital of France?",
           "Write a haiku about autumn leaves.", "Explain why the sky is blue.",
           "List three uses for a paperclip.", "Describe a cat in one sentence.",
           "How do bees make honey?", "Give me a recipe for toast."]


class Server:
    """`steer-gguf serve MODEL --port 0 ...` in a subprocess; its URL from the first stdout line."""

    def __init__(self, model: pathlib.Path, args: list[str], startup_s: float = 300):
        self.err = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        self.proc = subprocess.Popen([sys.executable, "-m", "steer_gguf", "serve", str(model), "--port", "0",
                                      *args], stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     cwd=tempfile.gettempdir(), env=env)
        line = ""
        deadline = time.monotonic() + startup_s
        while "serving" not in line and time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline()
        if "serving" not in line:
            self.stop()
            raise SystemExit(f"server did not start ({' '.join(args)}): {line!r}\n{self.stderr()[-3000:]}")
        self.url = line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self.proc.stdout.close()


def request(client, url: str, prompt: str, profile: str, max_tokens: int) -> dict:
    """One non-streaming chat completion; its latency and token counts. Aborts on a bad answer."""
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "steer_profile": profile}
    t = time.perf_counter()
    r = client.post(url + "/chat/completions", json=body)
    latency = time.perf_counter() - t
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code} for steer_profile={profile!r}: {r.text[:500]}")
    usage = r.json().get("usage") or {}
    if not usage.get("completion_tokens", 0) > 0:
        raise RuntimeError(f"no completion tokens for steer_profile={profile!r}: {r.text[:500]}")
    return {"profile": profile, "latency_s": latency, "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage["completion_tokens"]}


def run_cell(url: str, clients: int, per_client: int, max_tokens: int, timeout: float) -> dict:
    """`clients` threads start together, each sends `per_client` requests back to back."""
    import httpx

    records: list[list[dict]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client_thread(c: int) -> None:
        with httpx.Client(timeout=timeout) as client:
            start.wait()
            try:
                for j in range(per_client):
                    profile = "steer" if (c + j) % 2 == 0 else "none"
                    prompt = PROMPTS[(c * per_client + j) % len(PROMPTS)]
                    rec = request(client, url, prompt, profile, max_tokens)
                    rec["client"] = c
                    records[c].append(rec)
            except Exception as e:  # noqa: BLE001  (reported by the main thread)
                errors.append(f"client {c}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client_thread, args=(c,), daemon=True) for c in range(clients)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit("request failed: " + "; ".join(errors))
    flat = [r for rs in records for r in rs]
    lat = np.array([r["latency_s"] for r in flat])
    tokens = sum(r["completion_tokens"] for r in flat)
    by_profile = {p: float(np.median([r["latency_s"] for r in flat if r["profile"] == p]))
                  for p in ("steer", "none") if any(r["profile"] == p for r in flat)}
    return {"clients": clients, "requests": len(flat), "per_client": per_client, "wall_s": wall,
            "req_per_s": len(flat) / wall, "tokens_per_s": tokens / wall, "completion_tokens": tokens,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "mean_s": float(lat.mean()), "max_s": float(lat.max()), "p50_by_profile_s": by_profile,
            "records": flat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model and fewer requests (smoke run)")
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument("--reps", type=int, default=None,
                    help="requests per client [default: enough for 48 requests per cell, 4 with --quick]")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--parallel", default="1,4", help="server --parallel values to compare")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256, help="server --ctx: tokens per request (prompt + answer)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds one request may take (queueing included)")
    args = ap.parse_args()

    from steer_gguf import model_info

    path = synthetic_model(**QUICK_SHAPE) if args.quick else synthetic_model()
    info = model_info(path)
    clients = [int(x) for x in args.clients.split(",")]
    parallels = [int(x) for x in args.parallel.split(",")]
    min_cell = 4 if args.quick else 48
    per_client = {c: args.reps or max(1, math.ceil(min_cell / c)) for c in clients}

    cells: dict[int, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="steer-bench-profiles-") as pdir:
        bench_profiles(info)[0].save(pathlib.Path(pdir) / "steer.json")
        for p in parallels:
            server_args = ["--profiles-dir", pdir, "--parallel", str(p), "--max-queue", str(max(clients) * 2),
                           "--ctx", str(args.ctx), "--n-gpu-layers", str(args.n_gpu_layers)]
            if args.threads is not None:
                server_args += ["-t", str(args.threads)]
            server = Server(path, server_args)
            try:
                import httpx

                with httpx.Client(timeout=args.timeout) as warm:
                    request(warm, server.url, PROMPTS[0], "steer", args.max_tokens)
                cells[p] = {}
                for c in clients:
                    cells[p][c] = run_cell(server.url, c, per_client[c], args.max_tokens, args.timeout)
                    cell = cells[p][c]
                    print(f"parallel {p}, {c} clients: {cell['requests']} requests in {cell['wall_s']:.1f} s",
                          file=sys.stderr)
            except RuntimeError as e:  # the warm-up request
                raise SystemExit(f"request failed: {e}") from None
            finally:
                server.stop()

    result = {"machine": machine(), "model": path.name, "threads": args.threads, "n_gpu_layers": args.n_gpu_layers,
              "max_tokens": args.max_tokens, "ctx": args.ctx, "clients": clients, "parallel": parallels,
              "requests_per_client": {str(c): n for c, n in per_client.items()},
              "cells": {str(p): {str(c): cell for c, cell in row.items()} for p, row in cells.items()},
              "req_per_s_ratio": {}}
    print(f"{'parallel':>8} {'clients':>7} {'reqs':>5} {'req/s':>8} {'tok/s':>8} {'p50 s':>8} {'p95 s':>8}")
    for p in parallels:
        for c in clients:
            cell = cells[p][c]
            print(f"{p:>8} {c:>7} {cell['requests']:>5} {cell['req_per_s']:>8.2f} {cell['tokens_per_s']:>8.1f} "
                  f"{cell['p50_s']:>8.2f} {cell['p95_s']:>8.2f}")
    if 1 in cells and 4 in cells:
        print(f"\n{'clients':>7} {'req/s parallel 4 / parallel 1':>30}")
        for c in clients:
            ratio = cells[4][c]["req_per_s"] / cells[1][c]["req_per_s"]
            result["req_per_s_ratio"][str(c)] = ratio
            print(f"{c:>7} {ratio:>30.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
