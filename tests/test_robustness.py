"""Issue 11: no input crashes the library or the CLI, and a failed profile switch never
leaves steering silently off. One regression test (or more) per item of the issue."""
from __future__ import annotations

import json
import os
import pathlib
import re
import stat
import struct
import subprocess
import sys
import threading

import numpy as np

import pytest

from clitools import ENV, NEUTRAL_CWD, assert_one_line_error, cli
from steer_gguf import BiasRule, ExpertRule, Profile, SteeredLlama, SteerError, fileio, model_info
from steer_gguf.engine.locking import ModelLock

import llama_cpp  # isort: skip  (after steer_gguf, which points it at the patched library)

X = 2  # the fixture routes digits to this expert and keeps every other token off it
TEXT = "hello there, how are you"


@pytest.fixture(scope="module")
def model(make) -> pathlib.Path:
    return make("qwen3moe", n_layer=4, route_digits_to=X)


@pytest.fixture(scope="module")
def llm(model):
    m = SteeredLlama(model, n_ctx=256, n_threads=1)
    yield m
    m.close()


def force_x(info, name: str = "force-x", **kw) -> Profile:
    p = Profile.empty(info, name=name)
    p.experts = [ExpertRule(il, X, "activate") for il in info.moe_layers]
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def x_share(llm: SteeredLlama) -> float:
    """Share of (token, layer) routings that include expert X: 0 unsteered, 1 under force_x."""
    tr = llm.trace(text=TEXT)
    return float((tr.experts == X).any(axis=2).mean())


def patch_u32(src: pathlib.Path, dst: pathlib.Path, key: str, value: int) -> pathlib.Path:
    """Copy a GGUF with one uint32 metadata value replaced (key, u32 type, then the value)."""
    data = bytearray(src.read_bytes())
    k = key.encode()
    at = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    assert struct.unpack_from("<I", data, at)[0] == 4, "not a uint32 field"
    struct.pack_into("<I", data, at + 4, value)
    dst.write_bytes(bytes(data))
    return dst


# ---- item 1: a grammar llama.cpp cannot parse --------------------------------------------------
BAD_GRAMMARS = {
    "syntax": "root ::= (",
    "undefined rule": "root ::= foo",
    "left recursion": 'root ::= root "a"',
    "nested 20,000 deep": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000,
    "no root": 'start ::= "a"',
    "lone surrogate": 'root ::= "\ud800"',
}


@pytest.mark.parametrize("grammar", BAD_GRAMMARS.values(), ids=BAD_GRAMMARS.keys())
def test_bad_grammar_is_a_steer_error_and_the_model_keeps_working(llm, grammar):
    with pytest.raises(SteerError, match="grammar"):
        llm.create_completion("hi", max_tokens=2, grammar=llama_cpp.LlamaGrammar.from_string(grammar))
    with pytest.raises(SteerError, match="grammar"):
        llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                   grammar=llama_cpp.LlamaGrammar.from_string(grammar))
    ok = llama_cpp.LlamaGrammar.from_string('root ::= "yes" | "no"')
    text = llm.create_completion("hi", max_tokens=4, grammar=ok)["choices"][0]["text"]
    assert text in ("yes", "no")


def test_deep_but_legal_grammar_nesting_is_accepted(llm):
    g = "root ::= " + "(" * 200 + '"a"' + ")" * 200
    llm.check_grammar(g)
    # parentheses inside literals, classes and comments are not nesting
    llm.check_grammar('root ::= "((((" [(] # ((((((\n')


# ---- item 2: a failed switch keeps the previous profile in force -----------------------------
def test_failed_native_switch_keeps_the_previous_profile(llm, monkeypatch):
    good = force_x(llm.info)
    llm.set_profile(good)
    assert x_share(llm) == 1.0
    # a profile the Python checks let through but llama.cpp refuses (eps not a float32):
    # whatever the reason, the table must stay the one llm.profile names
    monkeypatch.setattr(Profile, "check", lambda self, *a, **k: None)
    with pytest.raises(SteerError, match=r"rejected by llama.cpp \(ERR_NONFINITE\)"):
        llm.set_profile(force_x(llm.info, name="huge-eps", eps=1e39))
    assert llm.profile is good
    assert x_share(llm) == 1.0
    monkeypatch.undo()
    llm.set_profile(None)
    assert llm.profile is None and x_share(llm) == 0.0


@pytest.mark.parametrize("engine", ["graph", "hook"])
def test_rejected_switch_keeps_previous_profile_on_both_engines(model, engine):
    llm = SteeredLlama(model, n_ctx=256, n_threads=1, engine=engine)
    try:
        good = force_x(llm.info)
        llm.set_profile(good)
        for bad in (force_x(llm.info, name="e", eps=1e39), force_x(llm.info, name="b", eps=float("nan"))):
            with pytest.raises(SteerError):
                llm.set_profile(bad)
            assert llm.profile is good and x_share(llm) == 1.0
    finally:
        llm.close()


# ---- item 3: expert_used_count > expert_count ----------------------------------------------
def test_more_experts_used_than_exist_is_refused_before_llama_cpp(model, tmp_path):
    bad = patch_u32(model, tmp_path / "k99.gguf", "qwen3moe.expert_used_count", 99)
    with pytest.raises(SteerError, match=r"expert_used_count \(99\) exceeds qwen3moe.expert_count \(8\)"):
        model_info(bad)
    for cmd in (["info", bad], ["generate", bad, "-p", "hi", "-n", "1"],
                ["trace", bad, "-p", "hi", "-o", tmp_path / "t.json"]):
        r = cli(*cmd)
        assert r.returncode == 2, r.stderr
        assert_one_line_error(r, "k99.gguf", "expert_used_count")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("key,value,needle", [
    ("qwen3moe.block_count", 0, "block_count"),
    ("qwen3moe.block_count", 600, "block_count"),
    ("qwen3moe.expert_count", 5000, "expert_count"),
    # llama-cpp-python sizes its tokenizer buffer by the training context, as an int32
    ("qwen3moe.context_length", 2**31, "context_length"),
    ("qwen3moe.embedding_length", 2**32 - 1, "embedding_length"),
    ("deepseek2.expert_gating_func", 100000, "expert_gating_func"),
])
def test_layouts_llama_cpp_would_abort_on_are_refused(make, tmp_path, key, value, needle):
    model = make("deepseek-v3", n_layer=4) if key.startswith("deepseek2") else make("qwen3moe", n_layer=4)
    bad = patch_u32(model, tmp_path / "bad.gguf", key, value)
    with pytest.raises(SteerError, match=needle):
        model_info(bad)


# ---- helpers for the CLI items ---------------------------------------------------------------
@pytest.fixture(scope="module")
def good_profile(model, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("good") / "force.json"
    force_x(model_info(model)).save(path)
    return path


def profile_text(good_profile: pathlib.Path, **changes) -> str:
    d = json.loads(good_profile.read_text())
    d.update(changes)
    return json.dumps(d)


def exit_2(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert_one_line_error(r, *needles)


TABLE = "layer,expert,a1,a2,d1,d2\n0,0,3,1,1,3\n0,1,1,3,3,1\n0,2,2,2,2,2\n"
PAIR = {"prompt": "what is two plus two", "response_0": "4", "response_1": "four"}


# ---- items 4, 5: malformed profiles give the one-line error ------------------------------------
def _bad_profiles(good_profile) -> dict[str, str]:
    good = json.loads(good_profile.read_text())
    e0 = good["experts"][0]
    return {
        "action list": profile_text(good_profile, experts=[{**e0, "action": ["x"]}]),
        "action object": profile_text(good_profile, experts=[{**e0, "action": {"a": 1}}]),
        "layer list": profile_text(good_profile, experts=[{**e0, "layer": [1]}]),
        "nested 2000": "[" * 2000 + "]" * 2000,
        "nested in provenance": profile_text(good_profile).replace('"provenance": {}',
                                                                   '"provenance": ' + "[" * 900 + "]" * 900),
        "huge int": profile_text(good_profile).replace('"layer": 0', '"layer": ' + "9" * 5000, 1),
        "big int": profile_text(good_profile, experts=[{**e0, "expert": 2**70}]),
        "surrogate name": profile_text(good_profile).replace('"force-x"', '"\\udc80"'),
        "eps 1e39": profile_text(good_profile, eps=1e39),
        "bias -1e39": profile_text(good_profile, bias=[{"layer": 0, "expert": 1, "value": -1e39}]),
        "model list": profile_text(good_profile, model=[]),
        "name number": profile_text(good_profile, name=5),
    }


def test_malformed_profiles_one_line_error_everywhere(good_profile, model, tmp_path):
    for what, text in _bad_profiles(good_profile).items():
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        for cmd in (["profile", "show", bad], ["profile", "validate", bad],
                    ["generate", model, "-p", "hi", "-n", "1", "--profile", bad]):
            r = cli(*cmd)
            assert r.returncode == 2, (what, cmd[:2], r.stderr)
            assert_one_line_error(r, "bad.json")
        with pytest.raises(SteerError):
            Profile.load(bad)


# ---- item 6: the chat REPL survives its user ---------------------------------------------------
def chat_session(model, lines: bytes, *args: str):
    return subprocess.run([sys.executable, "-m", "steer_gguf", "chat", str(model), "-t", "1",
                           "--temperature", "0", *args], input=lines, capture_output=True, cwd=NEUTRAL_CWD,
                          env=ENV, timeout=300)


def test_chat_trims_history_and_refuses_what_cannot_fit(model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[" * 3000)
    script = (b"hi\n" * 120 + ("word " * 200).encode() + b"\n" + b"caf\xe9 \xff\n"
              + f"/profile {bad}\n/profile /dev/zero\n/profile {tmp_path}\n".encode() + b"still here\n/quit\n")
    r = chat_session(model, script, "--ctx", "64", "-n", "2")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err
    assert err.count("oldest turns are left out") == 1  # told once
    assert "that line does not fit the context" in err
    assert "not UTF-8" in err
    assert "bad.json" in err and "/dev/zero" in err and "is a directory" in err
    # every line was answered or refused, and the session was at its prompt at the end
    assert out.count("> ") >= 120 + 6 and out.rstrip().endswith(">")


def test_chat_failed_profile_switch_keeps_the_current_profile(model, good_profile, tmp_path):
    bad = tmp_path / "eps.json"
    bad.write_text(profile_text(good_profile, eps=1e39))
    r = chat_session(model, f"/profile {bad}\n/quit\n".encode(), "--profile", str(good_profile))
    assert r.returncode == 0 and "32-bit float" in r.stderr.decode()
    assert "profile: force-x" in r.stdout.decode()  # the banner; no switch happened


# ---- items 7, 15: outputs checked before any work ---------------------------------------------
@pytest.mark.parametrize("out", ["dir", "/proc/x.json", "/sys/x.csv", "/nonexistent/x.json", ""])
def test_unwritable_outputs_are_one_line_errors(model, tmp_path, good_profile, out):
    if out == "dir":
        out = str(tmp_path)
    table = tmp_path / "t.csv"
    table.write_text(TABLE)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(PAIR) + "\n")
    for cmd in (["profile", "make", table, "--k", "2", "--activate", "1", "-o", out],
                ["trace", model, "-p", "hi", "-o", out],
                ["detect", model, "--pairs", pairs, "-o", out],
                ["stats", model, "--prompts", pairs, "-o", out]):
        r = cli(*cmd)
        assert r.returncode == 2, (cmd[0], r.stderr)
        assert_one_line_error(r)
        line = r.stderr.strip()
        assert (out and out in line) or "empty" in line or "must end in" in line or ".csv file" in line, line


def test_stats_checks_every_output_before_writing_any(model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "s.json"
    r = cli("stats", model, "--prompts", prompts, "-o", out, "--plot", "/nonexistent/x.png", "-t", "1")
    exit_2(r, "/nonexistent/x.png")
    assert not out.exists()


# ---- item 8: a prompt longer than the context ----------------------------------------------
def test_context_rounded_up_by_llama_cpp_is_usable(model):
    # llama.cpp makes --ctx 64 a 256-token context; llama-cpp-python sized its token buffer
    # for 64, so a 100-token prompt failed inside eval with a numpy broadcast error
    m = SteeredLlama(model, n_ctx=64, n_threads=1)
    try:
        assert m.n_ctx() >= 64
        n = m.n_ctx() - 8
        out = m.create_completion([1] * n, max_tokens=2)
        assert out["usage"]["prompt_tokens"] == n
    finally:
        m.close()


def test_generate_prompt_longer_than_the_context(model):
    for extra in ([], ["--chat"]):
        r = cli("generate", model, "-p", "word " * 600, "--ctx", "64", "-n", "2", *extra)
        exit_2(r, "tokens", "--ctx")


# ---- item 9: bad dataset lines never crash detect/stats/trace --------------------------------
BAD_LINES = {
    "surrogate": json.dumps({**PAIR, "prompt": "\udc80"}),
    "nested": '{"prompt": ' + "[" * 3000 + "]" * 3000 + "}",
    "huge int": '{"prompt": ' + "9" * 5000 + "}",
}


@pytest.mark.parametrize("line", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_dataset_lines_are_errors_or_skipped(model, tmp_path, line):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(PAIR) + "\n" + line + "\n", encoding="utf-8", errors="surrogatepass")
    out = tmp_path / "t.csv"
    exit_2(cli("detect", model, "--pairs", data, "-o", out), f"{data}:2")
    assert not out.exists()
    r = cli("detect", model, "--pairs", data, "-o", out, "--skip-bad", "-t", "1")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"{data}:2" in r.stderr and out.exists()
    exit_2(cli("stats", model, "--prompts", data, "-o", tmp_path / "s.json"), f"{data}:2")


def test_trace_messages_with_a_lone_surrogate(model, tmp_path):
    msgs = tmp_path / "m.json"
    msgs.write_text('[{"role": "user", "content": "\\ud800"}]')
    out = tmp_path / "t.json"
    exit_2(cli("trace", model, "--messages", msgs, "-o", out), "m.json", "surrogate")
    assert not out.exists()


# ---- item 10: validate checks what use checks ---------------------------------------------
def test_validate_and_make_refuse_what_llama_cpp_would(model, good_profile, tmp_path):
    for name, text in (("eps", profile_text(good_profile, eps=1e39)),
                       ("bias", profile_text(good_profile, bias=[{"layer": 0, "expert": 1, "value": 3.5e38}]))):
        bad = tmp_path / f"{name}.json"
        bad.write_text(text)
        exit_2(cli("profile", "validate", bad, "--model", model), "32-bit float")
    table = tmp_path / "t.csv"
    table.write_text(TABLE)
    out = tmp_path / "p.json"
    exit_2(cli("profile", "make", table, "--k", "2", "--activate", "1", "--eps", "1e39", "-o", out), "eps")
    assert not out.exists()


# ---- item 13: hand-built profiles are held to the file's rules ------------------------------
@pytest.mark.parametrize("change,needle", [
    (lambda p: setattr(p.experts[0], "expert", -1), "experts[0].expert"),
    (lambda p: setattr(p.experts[0], "action", "boost"), "experts[0].action"),
    (lambda p: setattr(p.experts[0], "layer", "1"), "experts[0].layer"),
    (lambda p: setattr(p.experts[0], "action", ["x"]), "experts[0].action"),
    (lambda p: setattr(p, "eps", None), "eps"),
    (lambda p: setattr(p, "eps", float("inf")), "eps"),
    (lambda p: p.bias.append(BiasRule(0, -3, 1.0)), "bias[0].expert"),
    (lambda p: p.experts.append("x"), "experts[4]"),
    (lambda p: setattr(p, "name", None), "name"),
])
def test_hand_built_profiles_get_steer_errors(llm, change, needle):
    p = force_x(llm.info)
    change(p)
    before = llm.profile
    with pytest.raises(SteerError, match=re.escape(needle)):
        llm.set_profile(p)
    assert llm.profile is before
    with pytest.raises(SteerError, match=re.escape(needle)):
        p.check(llm.info)


def test_profile_argument_of_a_wrong_type(llm, model):
    with pytest.raises(SteerError, match="must be a Profile, a path or None"):
        llm.set_profile(123)
    with pytest.raises(SteerError, match="must be a Profile"):
        SteeredLlama(model, profile=123, n_ctx=64)


# ---- item 14: long prompts in stats and detect ---------------------------------------------
def test_stats_and_detect_take_prompts_longer_than_the_batch(model, tmp_path):
    long = "word " * 700  # more tokens than a 2048-token batch, fewer than the model's context
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": long}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    out = tmp_path / "s.json"
    r = cli("stats", model, "--prompts", prompts, "-o", out, "-t", "1", "--batch", "256")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["tokens"] > 256
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({**PAIR, "prompt": "word " * 150}) + "\n" + json.dumps(PAIR) + "\n")
    r = cli("detect", model, "--pairs", pairs, "-o", tmp_path / "t.csv", "-t", "1", "--batch", "64")
    assert r.returncode == 0, r.stderr


# ---- item 16: outputs respect the umask ------------------------------------------------------
def test_outputs_get_the_umask_mode(good_profile, tmp_path):
    for mask in (0o022, 0o077):
        old = os.umask(mask)
        try:
            fileio._UMASK = mask  # read once at import; the test changes it on purpose
            out = tmp_path / f"p{mask:o}.json"
            Profile.load(good_profile).save(out)
        finally:
            os.umask(old)
            fileio._UMASK = old
        assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask


# ---- item 17: a detection table knows its model and dataset ------------------------------------
def test_table_detected_on_one_model_is_refused_for_another(model, make, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(PAIR) + "\n" + json.dumps({**PAIR, "prompt": "two and two"}) + "\n")
    table = tmp_path / "t.csv"
    assert cli("detect", model, "--pairs", pairs, "-o", table, "-t", "1").returncode == 0
    other = make("qwen3moe", n_layer=4, seed=7)  # same shape, other weights
    out = tmp_path / "p.json"
    exit_2(cli("profile", "make", table, "--model", other, "--activate", "1", "-o", out), "another model")
    assert not out.exists()
    assert cli("profile", "make", table, "--model", model, "--activate", "1", "-o", out).returncode == 0
    prov = json.loads(out.read_text())["provenance"]
    assert prov["dataset"] == str(pairs) and prov["pairs"] == 2


# ---- item 18: reads are bounded --------------------------------------------------------------
def test_devices_and_fifos_are_refused_at_once(model, tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        for cmd in (["profile", "show", path], ["generate", model, "-p", "hi", "--profile", path],
                    ["detect", model, "--pairs", path, "-o", tmp_path / "t.csv"],
                    ["trace", model, "--messages", path, "-o", tmp_path / "t.json"]):
            exit_2(cli(*cmd, timeout=60), "not a regular file")


def test_oversized_inputs_are_refused_before_reading(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:  # sparse: 80 MiB that take no disk
        f.truncate(80 * fileio.MiB)
    with pytest.raises(SteerError, match="80 MiB, more than the 64 MiB"):
        Profile.load(big)
    with pytest.raises(SteerError, match="more than the 1 MiB"):
        fileio.read_bytes(big, limit=fileio.MiB)


# ---- item 19: names cannot forge output --------------------------------------------------------
def test_profile_show_escapes_control_characters(good_profile, tmp_path):
    p = tmp_path / "p.json"
    p.write_text(profile_text(good_profile, name="x\nsteer-gguf: error: forged\x1b[31m",
                              model={**json.loads(good_profile.read_text())["model"], "architecture": "a\rb"}))
    r = cli("profile", "show", p)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\r" not in r.stdout
    assert not any(l.startswith("steer-gguf: error:") for l in r.stdout.splitlines())
    assert "\\n" in r.stdout and "\\x1b" in r.stdout


# ---- item 20: a stream closed from another thread --------------------------------------------
def test_stream_closed_from_another_thread_frees_the_lock(llm):
    stream = llm.create_completion("hello", max_tokens=50, stream=True)
    next(stream)  # now holding llm.lock in this thread
    errors = []

    def close():
        try:
            stream.close()
        except BaseException as e:  # the bug: RuntimeError, and the lock stays held
            errors.append(e)

    t = threading.Thread(target=close)
    t.start()
    t.join(30)
    assert not errors
    got = []
    other = threading.Thread(target=lambda: got.append(llm.lock.acquire(timeout=10) and llm.lock.release() is None))
    other.start()
    other.join(30)
    assert got == [True]
    assert llm.create_completion("hi", max_tokens=2)["choices"]


def test_model_lock_is_reentrant_and_owned():
    lock = ModelLock()
    with lock:
        with lock:
            assert lock.locked()
        assert lock.locked()
        t = threading.Thread(target=lambda: errs.append(lock.acquire(timeout=0.1)))
        errs: list = []
        t.start()
        t.join()
        assert errs == [False]
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


# ---- item 21: trace_many steers with the instance's own engine -----------------------------------
def test_trace_many_on_the_hook_engine_steers_with_hooks(model):
    seqs = [[1, 5, 9, 13, 17], [2, 4, 6]]
    got = {}
    for engine in ("graph", "hook"):
        m = SteeredLlama(model, n_ctx=256, n_threads=1, engine=engine)
        try:
            m.set_profile(force_x(m.info))
            got[engine] = m.trace_many(seqs)
            # before the fix the tracing context always got the graph table
            assert m._tctx.rec.hooking == (engine == "hook")
            m.set_profile(None)
            assert not (m.trace_many(seqs)[0] == X).any(axis=2).all()
        finally:
            m.close()
    for g, h in zip(got["graph"], got["hook"]):
        assert (h == X).any(axis=2).all()
        assert np.array_equal(np.sort(g, axis=2), np.sort(h, axis=2))


def test_serve_with_a_malformed_default_profile_is_a_one_line_error(model, good_profile, tmp_path):
    bad = tmp_path / "deep.json"
    bad.write_text("[" * 5000 + "]" * 5000)
    exit_2(cli("serve", model, "--profile", bad, "--port", "0", "-t", "1"), "deep.json", "nested")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "bad.json").write_text(profile_text(good_profile, experts=[{"layer": 0, "expert": 1, "action": ["x"]}]))
    exit_2(cli("serve", model, "--profiles-dir", d, "--profile", "bad", "--port", "0", "-t", "1"),
           "bad.json", "action")


def test_info_escapes_a_path_with_control_characters(model, tmp_path):
    odd = tmp_path / "m\nsteer-gguf: error: forged\x1b[2J.gguf"
    odd.symlink_to(model)
    r = cli("info", odd)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and not any(l.startswith("steer-gguf: error:") for l in r.stdout.splitlines())
    r = cli("generate", odd, "-p", "hi", "--profile", tmp_path / "missing\n.json")
    exit_2(r, "missing\\n.json")
