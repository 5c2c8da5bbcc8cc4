"""Issue 11: no input crashes the library or the CLI, and a failed profile switch never
leaves steering silently off. One regression test (or more) per item of the issue."""
from __future__ import annotations

import pathlib
import struct

import pytest

from clitools import assert_one_line_error, cli
from steer_gguf import ExpertRule, Profile, SteeredLlama, SteerError, model_info

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
    with pytest.raises(SteerError, match="rejected by llama.cpp"):
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
])
def test_layouts_llama_cpp_would_abort_on_are_refused(model, tmp_path, key, value, needle):
    bad = patch_u32(model, tmp_path / "bad.gguf", key, value)
    with pytest.raises(SteerError, match=needle):
        model_info(bad)
