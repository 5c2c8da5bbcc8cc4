"""Detection end to end on a model whose router sends digit tokens to a known expert."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clitools import cli
from steer_gguf import Profile, SteeredLlama, model_info
from steer_gguf.detect.datasets import load_pairs
from steer_gguf.detect.risk import DetectionTable, detect, target_rows

DIGIT_EXPERT = 2
LLAMA = dict(n_ctx=512, n_threads=1, n_threads_batch=1)


@pytest.fixture(scope="module")
def digits_model(make):
    return make("qwen3moe", n_layer=4, route_digits_to=DIGIT_EXPERT)


@pytest.fixture(scope="module")
def llm(digits_model):
    m = SteeredLlama(digits_model, **LLAMA)
    yield m
    m.close()


def test_target_span_is_the_assistant_reply(llm):
    pair = load_pairs("builtin:digits-words", max_pairs=1).pairs[0]
    toks, span = target_rows(llm, pair.messages_0, pair.target_0)
    assert span is not None
    text = llm.detokenize(toks[span[0]:span[1]], special=True).decode()
    assert pair.target_0.strip() in text and "<|im_start|>" not in text
    # the reply sits after the user's turn
    before = llm.detokenize(toks[: span[0]], special=True).decode()
    assert before.rstrip().endswith("assistant") and pair.messages_0[-2]["content"] in before


def test_batched_trace_matches_single_sequence_trace(llm):
    ps = load_pairs("builtin:digits-words", max_pairs=6)
    seqs, rows = [], []
    for p in ps:
        t, s = target_rows(llm, p.messages_1, p.target_1)
        seqs.append(t)
        rows.append(list(range(*s)))
    many = llm.trace_many(seqs, rows, batch_tokens=256)  # several batches, several sequences each
    for t, r, m in zip(seqs, rows, many):
        one = llm.trace(tokens=t).experts[r]
        np.testing.assert_array_equal(np.sort(m, -1), np.sort(one, -1))


def test_detect_finds_the_digit_expert_and_its_profile_steers(llm, tmp_path):
    info = llm.info
    table = detect(llm, load_pairs("builtin:digits-words", max_pairs=40))
    top = table.top(len(info.moe_layers))
    assert {(r.layer, r.expert) for r in top} == {(il, DIGIT_EXPERT) for il in info.moe_layers}
    assert all(r.p1 > 0 and r.p2 == 0 for r in top)  # digits only in behavior 1's replies
    # counts are consistent: every target token selects k experts in every layer
    for il in info.moe_layers:
        rows = table.layer == il
        assert table.a1[rows].sum() + table.d1[rows].sum() == info.n_expert * (table.a1[rows].sum() // info.n_expert_used)
    path = tmp_path / "dw.csv"
    table.to_csv(path)
    profile = DetectionTable.from_csv(path).make_profile(info, activate=len(info.moe_layers), name="digits")
    assert {(r.layer, r.expert) for r in profile.experts} == {(il, DIGIT_EXPERT) for il in info.moe_layers}
    words = "There are seven apples and twelve pears."
    assert not (llm.trace(text=words).experts == DIGIT_EXPERT).any()
    with llm.steering(profile):
        tr = llm.trace(text=words)
    assert (tr.experts == DIGIT_EXPERT).any(axis=2).all()


def test_cli_detect_and_profile_make(digits_model, tmp_path):
    out = tmp_path / "t.csv"
    r = cli("detect", digits_model, "--pairs", "builtin:digits-words", "--max-pairs", "12", "-o", out, "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "signal concentration" in r.stdout
    rows = out.read_text().splitlines()
    meta = json.loads(rows[0].removeprefix("# steer-gguf.detect/1 "))
    assert meta["fingerprint"] == model_info(digits_model).fingerprint and meta["dataset"] == "builtin:digits-words"
    assert rows[1] == "layer,expert,a1,d1,a2,d2,p1,p2,risk_diff,rd_lo,rd_hi,rd_conf"
    assert rows[2].split(",")[1] == str(DIGIT_EXPERT)
    prof = tmp_path / "p.json"
    r = cli("profile", "make", out, "--model", digits_model, "--activate", "4", "-o", prof)
    assert r.returncode == 0, r.stderr
    p = Profile.load(prof)
    assert p.model.fingerprint == model_info(digits_model).fingerprint
    assert {r.expert for r in p.experts} == {DIGIT_EXPERT}
    # reverse steers toward words: the digit expert can only be among the deactivated
    r = cli("profile", "make", out, "--k", "2", "--deactivate", "4", "--activate", "0", "--reverse", "-o",
            tmp_path / "q.json")
    assert r.returncode == 0, r.stderr
    q = json.loads((tmp_path / "q.json").read_text())
    assert {(e["expert"], e["action"]) for e in q["experts"]} == {(DIGIT_EXPERT, "deactivate")}
    assert "fingerprint" not in q["model"] and q["model"]["n_expert_used"] == 2


def test_cli_detect_bad_dataset_line(digits_model, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "response_0": "b", "response_1": "c"}\n{"prompt": "a", "response_0": 5}\n')
    out = tmp_path / "t.csv"
    r = cli("detect", digits_model, "--pairs", data, "-o", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{data}:2" in r.stderr.strip().splitlines()[-1]
    assert not out.exists()
    r = cli("detect", digits_model, "--pairs", data, "-o", out, "--skip-bad", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "1 bad lines or pairs skipped" in r.stderr and out.exists()
    r = cli("detect", digits_model, "--pairs", "builtin:nope", "-o", out)
    assert r.returncode == 2 and "digits-words" in r.stderr


def test_cli_stats(digits_model, tmp_path):
    out = tmp_path / "s.json"
    r = cli("stats", digits_model, "--prompts", "builtin:digits-words", "--max-prompts", "8", "-o", out, "-t", "1")
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    assert [l["layer"] for l in s["layers"]] == model_info(digits_model).moe_layers
    for l in s["layers"]:
        assert sum(l["counts"]) == s["tokens"] * 2
        assert 0 < l["entropy_bits"] <= l["max_entropy_bits"]
        assert l["counts"][DIGIT_EXPERT] > 0


def test_cli_stats_heatmap(digits_model, tmp_path):
    out, png = tmp_path / "s.json", tmp_path / "usage.png"
    r = cli("stats", digits_model, "--prompts", "builtin:digits-words", "--max-prompts", "4", "-o", out,
            "--plot", png, "-t", "1")
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert str(png) in r.stdout
