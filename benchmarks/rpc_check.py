"""One-command RPC check: build with llama.cpp's RPC backend, start two rpc-server processes on
127.0.0.1, run the steering, tracing and slot tests with their layers on those servers; print
each check's pass/fail, write one JSON, exit non-zero on any failure.

    python benchmarks/rpc_check.py [--build-dir build/rpc] [--skip-build] [--out FILE.json]

Needs what benchmarks/gpu_check.py needs for a CPU build (CMake, Ninja, pybind11, numpy, gguf,
pytest, llama-cpp-python's Python layer); no GPU. Steps:

1. build: -DGGML_RPC=ON (plus CMAKE_ARGS) into --build-dir, staged as gpu_check stages it;
   the staged package holds steer_gguf/bin/rpc-server;
2. rpc: tests/test_rpc.py (its own servers): routing over RPC against the local run, bit for
   bit, on the five MoE families with every layer remote and split local/remote; a server
   killed mid-run; an unreachable server;
3. remote and split: test_steering, test_slots and test_route_outputs (the hook engine, the
   eval-callback recorder and the graph recorder as each other's oracles) with
   STEER_GGUF_RPC naming two servers started here and STEER_GGUF_TEST_NGL=99 (every layer
   remote), then =3 (layers 0-1 here, the rest remote).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import gpu_check  # noqa: E402  (the build, staging and test-running steps are the same)
from rpcserver import start_server, stop  # noqa: E402

TESTS = ["tests/test_steering.py", "tests/test_slots.py", "tests/test_route_outputs.py"]
# the test models have 4 layers (+ output): 3 offloaded keeps layers 0-1 on this CPU
STAGES = {"rpc": (["tests/test_rpc.py"], 0), "remote": (TESTS, 99), "split": (TESTS, 3)}


def run_stage(args, name: str, env: dict) -> dict:
    files, ngl = STAGES[name]
    env = dict(env, STEER_GGUF_TEST_NGL=str(ngl))
    ns = argparse.Namespace(build_dir=str(pathlib.Path(args.build_dir) / name), tests=files)
    pathlib.Path(ns.build_dir).mkdir(parents=True, exist_ok=True)
    return gpu_check.run_tests(ns, env)


def per_test(args, name: str) -> list[tuple[str, str]]:
    """Each test of a stage and its outcome, from the JUnit XML gpu_check.run_tests wrote."""
    import xml.etree.ElementTree as ET

    xml = pathlib.Path(args.build_dir).resolve() / name / "tests.xml"
    if not xml.exists():
        return []
    rows = []
    for tc in ET.parse(xml).getroot().iter("testcase"):
        kids = {c.tag for c in tc}
        outcome = "FAIL" if kids & {"failure", "error"} else "skip" if "skipped" in kids else "pass"
        rows.append((f"{tc.get('classname', '')}::{tc.get('name', '')}", outcome))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default=str(ROOT / "build" / "rpc"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--skip-build", action="store_true", help="reuse the staged build in --build-dir")
    ap.add_argument("--stages", nargs="*", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--out", help="the JSON to write (default: <build-dir>/rpc_check.json)")
    args = ap.parse_args()
    result: dict = {"host": {"system": platform.platform(), "python": platform.python_version(),
                             "cores": os.cpu_count()}}
    out = pathlib.Path(args.out or pathlib.Path(args.build_dir) / "rpc_check.json")

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))

    stage = pathlib.Path(args.build_dir).resolve() / "stage"
    # CMake and Ninja installed by pip into this interpreter's environment, active or not
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    if not args.skip_build:
        os.environ["CMAKE_ARGS"] = (os.environ.get("CMAKE_ARGS", "") + " -DGGML_RPC=ON").strip()
        result["build"] = gpu_check.build(argparse.Namespace(build_dir=args.build_dir, jobs=args.jobs), "cpu")
        save()
    elif not (stage / "steer_gguf" / "lib").is_dir():
        sys.exit(f"rpc_check: --skip-build, but {stage} holds no build: run once without it")
    else:
        gpu_check.stage_python(stage)
    binary = stage / "steer_gguf" / "bin" / "rpc-server"
    if not binary.is_file():
        sys.exit(f"rpc_check: the build installed no {binary}: was it configured with -DGGML_RPC=ON?")
    env = gpu_check.child_env(stage, 0)

    servers = []
    try:
        if {"remote", "split"} & set(args.stages):
            # the test processes register them; they must outlive every model load there
            servers = [start_server(binary) for _ in range(2)]
            env["STEER_GGUF_RPC"] = ",".join(e for _, e in servers)
            result["servers"] = env["STEER_GGUF_RPC"]
        for name in args.stages:
            t0 = time.perf_counter()
            result[name] = run_stage(args, name, env if name != "rpc" else {k: v for k, v in env.items()
                                                                            if k != "STEER_GGUF_RPC"})
            r = result[name]
            verdict = "pass" if r["returncode"] == 0 and r.get("tests", 0) > 0 else "FAIL"
            print(f"rpc_check: {name}: {verdict} ({r.get('tests', 0)} tests, {r.get('failures', 0)} failed, "
                  f"{r.get('errors', 0)} errors, {r.get('skipped', 0)} skipped, {time.perf_counter() - t0:.0f} s)",
                  flush=True)
            r["verdict"] = verdict
            for case, outcome in per_test(args, name):
                print(f"  {outcome:4} {case}")
            save()
    finally:
        for p, _ in servers:
            stop(p)
    print(f"wrote {out}")
    failed = [n for n in args.stages if result[n]["verdict"] != "pass"]
    if failed:
        print(f"rpc_check: FAILED: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
