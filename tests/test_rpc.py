"""A model split across machines with llama.cpp's RPC backend (issue 34), on two local
rpc-server processes: routing over RPC equals the local run bit for bit (the servers run the
same CPU code) on every MoE family, with every layer remote and with the layers split between
this process and the servers, unsteered, steered and with per-sequence slots; a server that
dies mid-run ends the process with one error line; an unreachable one is refused up front.

Needs a build with the RPC backend (CMAKE_ARGS=-DGGML_RPC=ON installs steer_gguf/bin/rpc-server):
benchmarks/rpc_check.py builds one and runs this file; elsewhere it is skipped.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from clitools import ENV, NEUTRAL_CWD, assert_one_line_error, cli
from rpcserver import free_port, start_server, stop
from steer_gguf import ExpertRule, ModelRef, Profile, SteeredLlama, model_info
from steer_gguf.engine import rpc
from steer_gguf.engine.contexts import _native

if not _native.rpc_available() or rpc.server_binary() is None:
    pytest.skip("this build has no RPC backend or rpc-server (build with CMAKE_ARGS=-DGGML_RPC=ON; "
                "benchmarks/rpc_check.py does)", allow_module_level=True)

LLAMA = dict(n_ctx=256, n_threads=1, n_threads_batch=1)
TEXT = "The quick brown fox jumps over the lazy dog 0123456789 again and again."
OK = _native.STATUS["OK"]
# moe_path models have 4 layers (+ the output layer, which llama.cpp offloads first): 99 puts
# everything on the servers; 3 keeps layers 0-1 here, on the CPU custom op, and 2-3 remote
MODES = {"remote": 99, "split": 3}


@pytest.fixture(scope="session")
def servers():
    """Two servers for the whole session: llama.cpp asks every registered device for its memory
    at each model load, so a registered server must outlive every later load in this process."""
    started = [start_server(rpc.server_binary()) for _ in range(2)]
    endpoints = [e for _, e in started]
    rpc.connect(endpoints)
    yield endpoints
    for p, _ in started:
        stop(p)


def devices_of_layers(log: str) -> dict[int, str]:
    return {int(m[1]): m[2] for m in re.finditer(r"layer\s+(\d+) assigned to device (\S+),", log)}


def _profile(info, base):
    first, last = info.moe_layers[0], info.moe_layers[-1]
    on = int(np.argmin(np.bincount(base.experts[:, -1, :].ravel(), minlength=info.n_expert)))
    off = int(np.argmax(np.bincount(base.experts[:, 0, :].ravel(), minlength=info.n_expert)))
    return Profile(ModelRef.of(info), [ExpertRule(last, on, "activate"), ExpertRule(first, off, "deactivate")],
                   [], name="t")


def _slots(llm, info, prof, toks):
    """Three copies of the text in one batch: sequence 0 bound to a slot holding `prof`, 1 to an
    empty slot, 2 unbound; routing and next-token logits."""
    tc = llm._trace_context(256)
    actions, bias = prof.to_arrays(info, _native.ACTIONS)
    seqs, rows = [toks] * 3, [list(range(len(toks)))] * 3
    try:
        assert _native.slot_set(tc.ptr, 1, actions, bias, float(prof.eps))[0] == OK
        assert _native.seq_bind(tc.ptr, 0, 1)[0] == OK
        return tc.run(seqs, rows), tc.run(seqs, rows, logits=True)
    finally:
        _native.slot_clear(tc.ptr, 1)
        _native.seq_bind(tc.ptr, 0, -1)


def _assert_same_trace(a, b, what):
    np.testing.assert_array_equal(a.experts, b.experts, err_msg=f"{what}: experts")
    np.testing.assert_array_equal(a.weights, b.weights, err_msg=f"{what}: weights")


@pytest.mark.parametrize("mode", MODES)
def test_routing_over_rpc_equals_local(servers, moe_path, mode, capsys):
    info = model_info(moe_path)
    local = SteeredLlama(moe_path, **LLAMA)
    capsys.readouterr()
    remote = SteeredLlama(moe_path, n_gpu_layers=MODES[mode], verbose=True, **LLAMA)
    where = devices_of_layers(capsys.readouterr().err)
    try:
        # where the layers went (layer n_layer: the output layer): all on the servers (both of
        # them), or the first two here
        assert sorted(where) == list(range(info.n_layer + 1)), where
        rpc_layers = {il for il, d in where.items() if d.startswith("RPC")}
        if mode == "remote":
            assert rpc_layers == set(range(info.n_layer + 1)), where
            assert {where[il] for il in rpc_layers} == {"RPC0", "RPC1"}, where
        else:
            assert rpc_layers == {2, 3, 4} and {where[0], where[1]} == {"CPU"}, where
            assert set(info.moe_layers) & {0, 1} and set(info.moe_layers) & rpc_layers

        toks = local.tokenize(TEXT.encode(), add_bos=True, special=True)[:18]
        base = local.trace(tokens=toks)
        _assert_same_trace(base, remote.trace(tokens=toks), "unsteered")
        prof = _profile(info, base)
        with local.steering(prof), remote.steering(prof):
            steered = local.trace(tokens=toks)
            assert not np.array_equal(steered.experts, base.experts), "fixture: the profile changes nothing"
            _assert_same_trace(steered, remote.trace(tokens=toks), "steered")
        ex_l, lg_l = _slots(local, info, prof, toks)
        ex_r, lg_r = _slots(remote, info, prof, toks)
        for j in range(3):
            np.testing.assert_array_equal(ex_l[j], ex_r[j], err_msg=f"slots: sequence {j} routing")
            np.testing.assert_array_equal(lg_l[j], lg_r[j], err_msg=f"slots: sequence {j} logits")
        assert not np.array_equal(ex_l[0], ex_l[2]), "fixture: the slot changes nothing"
    finally:
        remote.close()
        local.close()
    # a custom op sent to a server would run a pointer of this process there and kill it
    for e in servers:
        host, port = e.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()


WORKER = """
import sys
from steer_gguf import SteeredLlama
llm = SteeredLlama(sys.argv[1], rpc=sys.argv[2], n_gpu_layers=99, n_ctx=256, n_threads=1, n_threads_batch=1)
llm.trace(text="before the server dies 0123")
print("ready", flush=True)
sys.stdin.readline()
llm.trace(text="after the server died 4567")
print("no error", flush=True)
"""


def test_a_server_killed_mid_run_is_one_error_line(make):
    path = make("qwen3moe", n_layer=4)
    server, endpoint = start_server(rpc.server_binary())
    w = subprocess.Popen([sys.executable, "-c", WORKER, str(path), endpoint], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=NEUTRAL_CWD, env=ENV)
    try:
        assert w.stdout.readline().strip() == "ready", w.stderr.read() if w.poll() is not None else "no ready"
        server.kill()
        server.wait()
        out, err = w.communicate("\n", timeout=120)  # a hang fails here
    finally:
        stop(w)
        stop(server)
    assert w.returncode == 2, (w.returncode, err)
    assert "no error" not in out
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"steer-gguf: error: lost the connection to an RPC server ({endpoint})"), lines[0]


def test_a_server_that_stops_answering_is_one_error_line(make):
    """A server that hangs without closing its connection (stopped with SIGSTOP): the client's
    next request runs out of STEER_GGUF_RPC_TIMEOUT and the process ends with one line, exit 2,
    instead of waiting for ever."""
    import os
    import signal

    path = make("qwen3moe", n_layer=4)
    server, endpoint = start_server(rpc.server_binary())
    env = dict(ENV, STEER_GGUF_RPC_TIMEOUT="5")
    w = subprocess.Popen([sys.executable, "-c", WORKER, str(path), endpoint], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=NEUTRAL_CWD, env=env)
    try:
        assert w.stdout.readline().strip() == "ready", w.stderr.read() if w.poll() is not None else "no ready"
        os.kill(server.pid, signal.SIGSTOP)
        out, err = w.communicate("\n", timeout=120)  # without the timeout this would wait for ever
    finally:
        stop(w)
        if server.poll() is None:
            os.kill(server.pid, signal.SIGCONT)
        stop(server)
    assert w.returncode == 2, (w.returncode, err)
    assert "no error" not in out
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"steer-gguf: error: an RPC server stopped answering ({endpoint}): no answer "
                               "within 5 s"), lines[0]


def test_a_bad_timeout_is_one_line(make):
    path = make("qwen3moe", n_layer=4)
    server, endpoint = start_server(rpc.server_binary())
    try:
        r = subprocess.run([sys.executable, "-m", "steer_gguf", "generate", str(path), "-p", "hello", "-n", "2",
                            "-ngl", "99", "--rpc", endpoint], capture_output=True, text=True, cwd=NEUTRAL_CWD,
                           env=dict(ENV, STEER_GGUF_RPC_TIMEOUT="soon"), timeout=300)
    finally:
        stop(server)
    assert_one_line_error(r, "STEER_GGUF_RPC_TIMEOUT: expected seconds >= 0")


def test_an_unreachable_server_is_refused_before_loading(make):
    path = make("qwen3moe", n_layer=4)
    r = cli("generate", path, "-p", "hello", "-n", "2", "-ngl", "99", "--rpc", f"127.0.0.1:{free_port()}")
    assert_one_line_error(r, "cannot connect")
    assert_one_line_error(cli("generate", path, "-p", "hello", "--rpc", "no-port-here"), "HOST:PORT")
