"""`detect`'s verdict and interval columns on the bundled models, `profile make`'s warning,
`detect compare` (including a table of a Q8_0 quantization made here with llama.cpp's own
quantizer) and its bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clitools import assert_one_line_error, cli
from steer_gguf.detect.compare import compare, rank_average, spearman
from steer_gguf.detect.risk import DetectionTable
from steer_gguf.fileio import DATA_DIR

DEMO, NATURAL = DATA_DIR / "demo.gguf", DATA_DIR / "natural.gguf"


def _detect(model, out, *extra):
    r = cli("detect", model, "--pairs", "builtin:demo-restricted", "-o", out, "-t", "1", *extra)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    out = {"demo": d / "demo.csv", "natural": d / "natural.csv", "natural-few": d / "natural-few.csv"}
    out["demo-stdout"] = _detect(DEMO, out["demo"]).stdout
    out["natural-stdout"] = _detect(NATURAL, out["natural"]).stdout
    _detect(NATURAL, out["natural-few"], "--max-pairs", "12", "--seed", "1")
    return out


def test_verdicts_of_the_bundled_models(tables):
    demo, natural = DetectionTable.from_csv(tables["demo"]), DetectionTable.from_csv(tables["natural"])
    assert demo.meta["trust"]["level"] == "strong"
    assert natural.meta["trust"]["level"] == "weak"  # real routing differences, far too small to steer
    for t, key in ((demo, "demo-stdout"), (natural, "natural-stdout")):
        last = tables[key].strip().splitlines()[-1]
        assert last == f"verdict: {t.verdict}"
        assert "permutation null (1000 pair swaps), " in tables[key]
        assert ((t.rd_lo <= t.risk_diff + 1e-6) & (t.risk_diff <= t.rd_hi + 1e-6)).all()
    assert demo.meta["trust"]["null"]["beyond"] >= 8


def test_same_seed_same_table_other_seed_other_intervals(tables, tmp_path):
    again = tmp_path / "again.csv"
    _detect(NATURAL, again, "--max-pairs", "12", "--seed", "1")
    assert again.read_text() == tables["natural-few"].read_text()
    other = tmp_path / "other.csv"
    _detect(NATURAL, other, "--max-pairs", "12", "--seed", "2")
    a, b = DetectionTable.from_csv(tables["natural-few"]), DetectionTable.from_csv(other)
    assert np.array_equal(a.risk_diff, b.risk_diff) and not np.array_equal(a.rd_lo, b.rd_lo)


def test_profile_make_warns_and_min_confidence_refuses(tables, tmp_path):
    t = DetectionTable.from_csv(tables["natural-few"])
    neg = np.flatnonzero(t.risk_diff < 0)  # the deactivation walk, in ranking order
    cross = [j for j, i in enumerate(neg) if t.rd_lo[i] <= 0 <= t.rd_hi[i]]
    assert cross, "12 pairs of the natural model should leave some interval across 0"
    n_off = str(cross[0] + 1)  # just far enough down the walk to take one such expert
    r = cli("profile", "make", tables["natural-few"], "--model", NATURAL, "--deactivate", n_off,
            "-o", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    assert "detection: " in r.stdout and "crosses 0" in r.stderr and "--min-confidence 0.975" in r.stderr
    prov = json.loads((tmp_path / "p.json").read_text())["provenance"]
    assert prov["verdict"] == t.verdict
    r = cli("profile", "make", tables["natural-few"], "--model", NATURAL, "--deactivate", n_off,
            "--min-confidence", "0.975", "-o", tmp_path / "q.json")
    confident = [i for i in neg if t.rd_conf[i] >= 0.975]
    if len(confident) >= int(n_off):  # the walk went on past the uncertain expert
        assert r.returncode == 0 and "crosses 0" not in r.stderr
    else:
        assert_one_line_error(r, "confidence >= 0.975")
        assert not (tmp_path / "q.json").exists()
    r = cli("profile", "make", tables["natural-few"], "--model", NATURAL, "--deactivate", str(len(neg)),
            "--min-confidence", "0.975", "-o", tmp_path / "q.json")
    assert_one_line_error(r, f"only {len(confident)} experts have risk_diff < 0 and confidence >= 0.975")


def test_compare_a_quantization(tables, tmp_path):
    import steer_gguf  # noqa: F401  (points llama_cpp at the patched library)
    import llama_cpp

    q8 = tmp_path / "natural-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(NATURAL).encode(), str(q8).encode(), params) == 0
    _detect(q8, tmp_path / "q8.csv")
    plot = tmp_path / "cmp.png"
    r = cli("detect", "compare", tables["natural"], tmp_path / "q8.csv", tables["natural-few"], "--plot", plot)
    assert r.returncode == 0, r.stderr
    c = compare(DetectionTable.from_csv(tables["natural"]), DetectionTable.from_csv(tmp_path / "q8.csv"))
    # Q8_0 keeps the ranking of a weak but real signal; 12 pairs of the same set keep less of it
    few = compare(DetectionTable.from_csv(tables["natural"]), DetectionTable.from_csv(tables["natural-few"]))
    assert c.spearman > 0.9 and c.spearman > few.spearman
    assert c.sign_agree == c.both_significant > 0
    assert f"rank correlation (Spearman) of risk_diff: {c.spearman:+.3f}" in r.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_compare_a_steermoe_count_table(tables, tmp_path):
    t = DetectionTable.from_csv(tables["demo"])
    steermoe = tmp_path / "steermoe.csv"
    # SteerMoE's column order, no metadata line, no interval columns
    steermoe.write_text("layer,expert,a1,a2,d1,d2\n" + "".join(
        f"{t.layer[i]},{t.expert[i]},{t.a1[i]},{t.a2[i]},{t.d1[i]},{t.d2[i]}\n" for i in range(len(t))))
    r = cli("detect", "compare", tables["demo"], steermoe)
    assert r.returncode == 0, r.stderr
    assert "Spearman) of risk_diff: +1.000" in r.stdout and "needs interval columns" in r.stdout
    assert "none (equal tables)" in r.stdout


def test_spearman_by_hand():
    assert list(rank_average(np.array([3.0, 1.0, 3.0, 2.0]))) == [3.5, 1.0, 3.5, 2.0]
    x = np.array([0.1, 0.4, -0.2, 0.3])
    assert spearman(x, x ** 3) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    # ranks 2,4,1,3 vs 1,4,2,3: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert spearman(x, np.array([0.0, 0.9, 0.1, 0.5])) == pytest.approx(0.8)


def test_detect_and_compare_bad_input(tables, tmp_path):
    out = tmp_path / "x.csv"
    for opt in ("--bootstrap", "--permutations", "--splits"):
        r = cli("detect", NATURAL, "--pairs", "builtin:demo-restricted", "-o", out, opt, "0")
        assert_one_line_error(r, f"--{opt[2:]} must be >= 1")
    assert not out.exists()
    r = cli("detect", "compare", tmp_path / "missing.csv", tables["natural"])
    assert_one_line_error(r, "missing.csv: no such file")
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,expert,a1,d1\n0,0,1,1\n")
    r = cli("detect", "compare", tables["natural"], bad)
    assert_one_line_error(r, "bad.csv:1: missing column(s) a2, d2")
    small = tmp_path / "small.csv"
    small.write_text("layer,expert,a1,d1,a2,d2\n0,0,1,1,0,2\n0,1,1,1,2,0\n")
    plot = tmp_path / "never.png"
    r = cli("detect", "compare", tables["natural"], small, "--plot", plot)
    assert_one_line_error(r, "small.csv", "different model shapes")
    assert not plot.exists()
    r = cli("detect", "compare", tables["natural"], tables["demo"])
    assert_one_line_error(r, "demo.csv: detected on another model")
    r = cli("detect", "compare", tables["natural"], tables["demo"], "--sizes", "0")
    assert_one_line_error(r, "--sizes")
    r = cli("profile", "make", tables["natural"], "--k", "2", "--activate", "1", "--min-confidence", "2",
            "-o", tmp_path / "p.json")
    assert_one_line_error(r, "--min-confidence must lie in 0..1")
