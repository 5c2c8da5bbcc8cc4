"""Detection table: risk-difference arithmetic, ranking, the profile rule, CSV I/O."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from steer_gguf.detect.risk import DetectionTable, accumulate
from steer_gguf.errors import SteerError
from steer_gguf.model import ModelInfo
from steer_gguf.profile import ModelRef, Profile


# ---- arithmetic -----------------------------------------------------------------------------

def hand_table() -> DetectionTable:
    # layers 2 and 5, 3 experts; 4 behavior-1 tokens, 5 behavior-2 tokens
    c1 = np.array([[3, 1, 0], [2, 2, 4]])
    c2 = np.array([[1, 1, 3], [0, 4, 2]])
    return DetectionTable.from_counts(c1, c2, 4, 5, [2, 5], meta={"dataset": "hand", "pairs": 2})


def as_rows(t: DetectionTable) -> list[tuple]:
    return [(int(t.layer[i]), int(t.expert[i])) for i in range(len(t))]


def test_from_counts_arithmetic():
    t = hand_table()
    # by hand: (layer, expert): a1, d1, a2, d2, p1, p2, risk_diff
    expect = {
        (2, 0): (3, 1, 1, 4, 0.75, 0.2, 0.55),
        (2, 1): (1, 3, 1, 4, 0.25, 0.2, 0.05),
        (2, 2): (0, 4, 3, 2, 0.0, 0.6, -0.6),
        (5, 0): (2, 2, 0, 5, 0.5, 0.0, 0.5),
        (5, 1): (2, 2, 4, 1, 0.5, 0.8, -0.3),
        (5, 2): (4, 0, 2, 3, 1.0, 0.4, 0.6),
    }
    assert len(t) == 6 and t.layers == [2, 5] and t.n_expert == 3
    for i in range(len(t)):
        a1, d1, a2, d2, p1, p2, rd = expect[(int(t.layer[i]), int(t.expert[i]))]
        assert (t.a1[i], t.d1[i], t.a2[i], t.d2[i]) == (a1, d1, a2, d2)
        assert t.p1[i] == pytest.approx(p1) and t.p2[i] == pytest.approx(p2)
        assert t.risk_diff[i] == pytest.approx(rd)
    for col in ("layer", "expert", "a1", "d1", "a2", "d2"):
        assert getattr(t, col).dtype == np.int64
    for col in ("p1", "p2", "risk_diff"):
        assert getattr(t, col).dtype == np.float64
    assert t.meta == {"dataset": "hand", "pairs": 2}


def test_ranking_by_magnitude_then_layer_then_expert():
    # |0.6| twice: layer 2 before layer 5, whatever the sign
    assert as_rows(hand_table()) == [(2, 2), (5, 2), (2, 0), (5, 0), (5, 1), (2, 1)]


def test_ranking_ties_go_to_lower_layer_then_expert():
    c = np.ones((3, 4), dtype=np.int64)
    t = DetectionTable.from_counts(c, 0 * c, 2, 2, [7, 1, 4])  # layers given out of order
    assert as_rows(t) == [(layer, e) for layer in (1, 4, 7) for e in range(4)]


def test_ranking_ties_survive_float_rounding():
    # expert 0: 0.3 - 0.1, expert 1: 0.2 - 0.0; equal as fractions, not as floats
    t = DetectionTable.from_counts(np.array([[3, 2]]), np.array([[1, 0]]), 10, 10, [0])
    assert (0.3 - 0.1) != 0.2
    assert as_rows(t) == [(0, 0), (0, 1)]


def test_zero_tokens_gives_zero_rates():
    t = DetectionTable.from_counts(np.zeros((1, 2), int), np.array([[1, 0]]), 0, 1, [0])
    assert list(t.p1) == [0.0, 0.0]
    assert sorted(t.risk_diff.tolist()) == [-1.0, 0.0]


def test_from_counts_rejects_bad_shapes():
    with pytest.raises(ValueError):
        DetectionTable.from_counts(np.zeros((2, 3)), np.zeros((2, 4)), 1, 1, [0, 1])
    with pytest.raises(ValueError):
        DetectionTable.from_counts(np.zeros((2, 3)), np.zeros((2, 3)), 1, 1, [0])
    with pytest.raises(ValueError):
        DetectionTable.from_counts(np.full((1, 3), 5), np.zeros((1, 3)), 4, 1, [0])  # a > n_tokens


def test_constructor_requires_complete_table():
    z = np.zeros(3, dtype=np.int64)
    with pytest.raises(ValueError):
        DetectionTable(np.array([0, 0, 1]), np.array([0, 1, 0]), z, z, z, z)  # (1, 1) missing


def test_top_and_concentration():
    t = hand_table()
    rows = t.top(2)
    assert [(r.layer, r.expert) for r in rows] == [(2, 2), (5, 2)]
    assert rows[0].risk_diff == pytest.approx(-0.6) and rows[0].a2 == 3 and rows[0].d2 == 2
    assert len(t.top(100)) == 6 and t.top(0) == []
    # |rd| = .6 .6 .55 .5 .3 .05, total 2.6: the first two hold 1.2 < 1.3, three hold 1.75
    assert t.concentration() == 3
    c = np.ones((1, 4), int)
    assert DetectionTable.from_counts(c, c, 1, 1, [0]).concentration() == 0


def test_concentration_exact_half():
    # |rd| = 0.5, 0.5: the first expert holds exactly half
    t = DetectionTable.from_counts(np.array([[1, 0]]), np.array([[0, 1]]), 2, 2, [0])
    assert t.concentration() == 1


# ---- accumulate ----------------------------------------------------------------------------

def test_accumulate_by_hand():
    experts = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]], dtype=np.int32)  # T=2, L=2, k=2
    counts = np.zeros((2, 4), dtype=np.int64)
    out = accumulate(counts, experts)
    assert out is counts
    assert counts.tolist() == [[1, 2, 1, 0], [1, 0, 1, 2]]
    accumulate(counts, experts[:1])
    assert counts.tolist() == [[2, 3, 1, 0], [1, 0, 2, 3]]


def test_accumulate_matches_loop():
    rng = np.random.default_rng(0)
    T, L, E, k = 50, 3, 16, 4
    experts = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(T)])
    expect = np.zeros((L, E), dtype=np.int64)
    for t in range(T):
        for layer in range(L):
            for e in experts[t, layer]:
                expect[layer, e] += 1
    got = accumulate(np.zeros((L, E), dtype=np.int64), experts.astype(np.int32))
    assert np.array_equal(got, expect)
    assert accumulate(got.copy(), np.zeros((0, L, k), np.int32)).tolist() == expect.tolist()


def test_accumulate_errors():
    with pytest.raises(ValueError):
        accumulate(np.zeros((2, 4), int), np.zeros((1, 3, 2), np.int32))  # wrong layer count
    with pytest.raises(ValueError):
        accumulate(np.zeros((2, 4), int), np.full((1, 2, 2), 4, np.int32))  # expert id out of range
    with pytest.raises(ValueError):
        accumulate(np.zeros((2, 4), int), np.full((1, 2, 2), -2, np.int32))


def test_accumulate_skips_the_padding_of_narrower_layers():
    """A per-layer topk profile: layer 0 selects 2 experts, layer 1 one, padded with -1."""
    experts = np.array([[[0, 1], [2, -1]], [[1, 3], [2, -1]]], dtype=np.int32)
    counts = accumulate(np.zeros((2, 4), dtype=np.int64), experts)
    assert counts.tolist() == [[1, 2, 0, 1], [0, 0, 2, 0]]


# ---- the profile rule ------------------------------------------------------------------------

def rd_table(rd: dict[tuple[int, int], float], meta=None) -> DetectionTable:
    """A table whose risk differences are exactly the given hundredths (100 tokens each)."""
    layers = sorted({layer for layer, _ in rd})
    n_expert = max(e for _, e in rd) + 1
    c1 = np.zeros((len(layers), n_expert), dtype=np.int64)
    c2 = np.zeros_like(c1)
    for (layer, e), v in rd.items():
        hundredths = round(v * 100)
        i = layers.index(layer)
        c1[i, e], c2[i, e] = (hundredths, 0) if hundredths >= 0 else (0, -hundredths)
    return DetectionTable.from_counts(c1, c2, 100, 100, layers, meta)


RD = {(0, 0): .9, (0, 1): .8, (0, 2): .7, (0, 3): -.1,
      (1, 0): .6, (1, 1): -.5, (1, 2): -.4, (1, 3): 0.0}


def picked(p: Profile, action: str) -> list[tuple[int, int]]:
    return [(r.layer, r.expert) for r in p.experts if r.action == action]


def test_activate_caps_k_per_layer_and_continues():
    p = rd_table(RD).make_profile(2, activate=3)
    # (0, 2) is skipped (layer 0 already has k=2), the walk continues to (1, 0)
    assert picked(p, "activate") == [(0, 0), (0, 1), (1, 0)]
    assert [r.risk_diff for r in p.experts] == pytest.approx([.9, .8, .6])
    assert picked(p, "deactivate") == []


def test_activate_larger_k_takes_in_ranking_order():
    p = rd_table(RD).make_profile(3, activate=4)
    assert picked(p, "activate") == [(0, 0), (0, 1), (0, 2), (1, 0)]


def test_activate_too_few_says_how_many():
    with pytest.raises(SteerError, match=r"activate 4: only 3 experts .*k=2"):
        rd_table(RD).make_profile(2, activate=4)


def test_zero_risk_diff_never_selected():
    t = rd_table({(0, 0): 0.0, (0, 1): 0.0, (0, 2): .2, (0, 3): 0.0})
    with pytest.raises(SteerError, match="only 1 experts"):
        t.make_profile(1, activate=2)
    with pytest.raises(SteerError, match="only 0 experts have risk_diff < 0"):
        t.make_profile(1, activate=0, deactivate=1)


def test_deactivate_first_negatives():
    p = rd_table(RD).make_profile(2, activate=0, deactivate=2)
    assert picked(p, "deactivate") == [(1, 1), (1, 2)]
    assert [r.risk_diff for r in p.experts] == pytest.approx([-.5, -.4])
    p = rd_table(RD).make_profile(2, activate=1, deactivate=3)
    assert picked(p, "activate") == [(0, 0)]
    assert picked(p, "deactivate") == [(1, 1), (1, 2), (0, 3)]


def test_deactivate_must_leave_k_per_layer():
    # k=3 with 4 experts: layer 1 would keep 2
    with pytest.raises(SteerError, match=r"layer 1 would lose 2 of its 4 experts, leaving 2, fewer than k=3"):
        rd_table(RD).make_profile(3, activate=0, deactivate=2)
    rd_table(RD).make_profile(3, activate=0, deactivate=1)  # one is fine


def test_deactivate_too_few():
    with pytest.raises(SteerError, match=r"deactivate 4: only 3 experts have risk_diff < 0"):
        rd_table(RD).make_profile(2, activate=0, deactivate=4)


def test_reverse_negates_and_records_flipped_sign():
    p = rd_table(RD).make_profile(2, activate=3, deactivate=1, reverse=True)
    assert picked(p, "activate") == [(1, 1), (1, 2), (0, 3)]
    assert [r.risk_diff for r in p.experts if r.action == "activate"] == pytest.approx([.5, .4, .1])
    assert picked(p, "deactivate") == [(0, 0)]
    assert [r.risk_diff for r in p.experts if r.action == "deactivate"] == pytest.approx([-.9])
    assert p.provenance["reverse"] is True


def test_reverse_cap_applies():
    # reversed, layer 1 has three positives but k=2
    t = rd_table({(0, 0): .1, (0, 1): .2, (1, 0): -.9, (1, 1): -.8, (1, 2): -.7, (0, 2): 0.0})
    p = t.make_profile(2, activate=2, reverse=True)
    assert picked(p, "activate") == [(1, 0), (1, 1)]
    # only two can be taken: (1, 2) is over the cap, and layer 0 has none after the flip
    with pytest.raises(SteerError, match=r"activate 3: only 2 experts .*behavior 2"):
        t.make_profile(2, activate=3, reverse=True)


def test_profile_with_bare_k_carries_table_shape():
    t = rd_table(RD, meta={"dataset": "builtin:x", "pairs": 7})
    p = t.make_profile(2, activate=2, eps=0.5, name="mine", provenance={"note": "n"})
    assert p.model == ModelRef(n_expert_used=2, n_layer=None, n_expert=4)
    assert p.eps == 0.5 and p.name == "mine"
    assert p.provenance == {"method": "risk_diff", "dataset": "builtin:x", "pairs": 7, "activate": 2,
                            "deactivate": 0, "reverse": False, "note": "n"}
    # the lead's validator accepts what the rule makes
    again = Profile.from_dict(p.to_dict())
    assert picked(again, "activate") == picked(p, "activate")


def info(**kw) -> ModelInfo:
    base = dict(path="/m/model.gguf", architecture="qwen3moe", n_layer=3, moe_layers=[0, 1, 2], n_expert=4,
                n_expert_used=2, gating="softmax", fingerprint="f" * 32)
    base.update(kw)
    return ModelInfo(**base)


def test_profile_bound_to_model():
    mi = info()
    p = rd_table(RD).make_profile(mi, activate=3)
    assert p.model == ModelRef.of(mi)
    assert picked(p, "activate") == [(0, 0), (0, 1), (1, 0)]
    p.check(mi)


def test_profile_model_mismatch_errors():
    t = rd_table(RD)
    with pytest.raises(SteerError, match="layer 1, which is not a MoE layer of model.gguf"):
        t.make_profile(info(moe_layers=[0, 2]), activate=1)
    with pytest.raises(SteerError, match="4 experts per layer but model.gguf has 8"):
        t.make_profile(info(n_expert=8), activate=1)
    t2 = rd_table(RD, meta={"fingerprint": "a" * 32})
    with pytest.raises(SteerError, match="another model"):
        t2.make_profile(info(), activate=1)


@pytest.mark.parametrize("kw,msg", [
    (dict(activate=0, deactivate=0), "both 0"),
    (dict(activate=-1), "activate: must be a non-negative integer"),
    (dict(activate=1, deactivate=1.5), "deactivate: must be a non-negative integer"),
    (dict(activate=1, eps=-1), "eps"),
])
def test_profile_argument_errors(kw, msg):
    with pytest.raises(SteerError, match=msg):
        rd_table(RD).make_profile(2, **kw)


def test_profile_k_errors():
    t = rd_table(RD)
    with pytest.raises(SteerError, match="k: must be a positive integer"):
        t.make_profile(0, activate=1)
    with pytest.raises(SteerError, match="k: must be a positive integer"):
        t.make_profile(True, activate=1)
    with pytest.raises(SteerError, match="k=5 is more than the table's 4 experts"):
        t.make_profile(5, activate=1)
    with pytest.raises(SteerError, match="k=2 but the detection table was made on a model with k=4"):
        rd_table(RD, meta={"n_expert_used": 4}).make_profile(2, activate=1)


# ---- CSV ----------------------------------------------------------------------------------

def test_csv_round_trip(tmp_path):
    t = hand_table()
    path = tmp_path / "t.csv"
    t.to_csv(path)
    lines = path.read_text().splitlines()
    assert lines[0] == '# steer-gguf.detect/1 {"dataset": "hand", "pairs": 2}'  # where the table came from
    assert lines[1] == "layer,expert,a1,d1,a2,d2,p1,p2,risk_diff"
    assert lines[2].split(",")[:6] == ["2", "2", "0", "4", "3", "2"]
    assert float(lines[2].split(",")[8]) == pytest.approx(-0.6)
    back = DetectionTable.from_csv(path)
    for col in ("layer", "expert", "a1", "d1", "a2", "d2", "p1", "p2", "risk_diff"):
        assert np.array_equal(getattr(back, col), getattr(t, col)), col
    assert back.meta == {"table": str(path), "dataset": "hand", "pairs": 2}
    assert t.make_profile(2, activate=2).experts == back.make_profile(2, activate=2).experts


def test_csv_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t.csv"
    path.write_text("old\n")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        hand_table().to_csv(path)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["t.csv"]


def test_csv_write_missing_dir(tmp_path):
    with pytest.raises(SteerError, match="does not exist"):
        hand_table().to_csv(tmp_path / "no" / "t.csv")


def test_csv_steermoe_column_order(tmp_path):
    # pandas-style index column, SteerMoE's a1,a2,d1,d2 order, a stale risk_diff, extra column
    rows = [",layer,expert,a1,a2,d1,d2,risk_diff,note"]
    counts = {(0, 0): (3, 0, 1, 4), (0, 1): (1, 2, 3, 2), (1, 0): (0, 4, 4, 0), (1, 1): (2, 2, 2, 2)}
    for i, ((layer, e), (a1, a2, d1, d2)) in enumerate(counts.items()):
        rows.append(f"{i},{layer},{e},{a1}.0,{a2},{d1},{d2},99,x")
    path = tmp_path / "steermoe.csv"
    path.write_text("\n".join(rows) + "\n")
    t = DetectionTable.from_csv(path)
    got = {(int(t.layer[i]), int(t.expert[i])): (t.a1[i], t.a2[i], t.d1[i], t.d2[i], t.risk_diff[i])
           for i in range(len(t))}
    assert got[(0, 0)][:4] == (3, 0, 1, 4) and got[(0, 0)][4] == pytest.approx(0.75)
    assert got[(0, 1)][4] == pytest.approx(0.25 - 0.5)
    assert got[(1, 0)][4] == pytest.approx(-1.0)
    assert got[(1, 1)][4] == pytest.approx(0.0)
    assert as_rows(t)[0] == (1, 0)


def csv_text(body: list[str], header: str = "layer,expert,a1,d1,a2,d2") -> str:
    return "\n".join([header] + body) + "\n"


GOOD = ["0,0,1,1,0,2", "0,1,2,0,1,1", "1,0,0,2,2,0", "1,1,1,1,1,1"]


def test_csv_good_minimal(tmp_path):
    p = tmp_path / "ok.csv"
    p.write_text(csv_text(GOOD[:2] + [""] + GOOD[2:]))  # a blank line is ignored
    assert len(DetectionTable.from_csv(p)) == 4


@pytest.mark.parametrize("header,body,pattern", [
    ("layer,expert,a1,d1,d2", GOOD, r":1: missing column\(s\) a2 "),
    ("layer,expert,a1,a1,d1,a2,d2", GOOD, r":1: column 'a1' appears twice"),
    ("layer,expert,a1,d1,a2,d2", GOOD[:2] + ["0,1,5,5,5,5"] + GOOD[2:], r":4: duplicate row for layer 0 expert 1 "
                                                                       r"\(first on line 3\)"),
    ("layer,expert,a1,d1,a2,d2", GOOD[:3], r": missing row for layer 1 expert 1 "),
    ("layer,expert,a1,d1,a2,d2", GOOD[:1] + GOOD[2:], r": missing row for layer 0 expert 1 "),
    ("layer,expert,a1,d1,a2,d2", GOOD[:2] + ["1,0,0,-2,2,0"] + GOOD[3:], r":4: column 'd1': negative count -2"),
    ("layer,expert,a1,d1,a2,d2", ["-1,0,1,1,1,1"], r":2: column 'layer': negative layer -1"),
    ("layer,expert,a1,d1,a2,d2", GOOD[:1] + ["0,1,1.5,0,1,1"] + GOOD[2:], r":3: column 'a1': '1.5' is not an integer"),
    ("layer,expert,a1,d1,a2,d2", GOOD[:1] + ["0,1,2,0,x,1"] + GOOD[2:], r":3: column 'a2': 'x' is not an integer"),
    ("layer,expert,a1,d1,a2,d2", GOOD[:1] + ["0,1,2,0,1"] + GOOD[2:], r":3: column 'd2': missing value"),
    ("layer,expert,a1,d1,a2,d2", [], r": no rows after the header"),
])
def test_csv_errors_name_file_and_line(tmp_path, header, body, pattern):
    p = tmp_path / "bad.csv"
    p.write_text(csv_text(body, header))
    with pytest.raises(SteerError) as e:
        DetectionTable.from_csv(p)
    msg = str(e.value)
    assert msg.startswith(str(p) + ":"), msg
    assert re.search(pattern, msg), msg
    assert "\n" not in msg


def test_csv_empty_and_missing_file(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("")
    with pytest.raises(SteerError, match=rf"^{re.escape(str(p))}: empty file"):
        DetectionTable.from_csv(p)
    with pytest.raises(SteerError, match="no such file"):
        DetectionTable.from_csv(tmp_path / "nope.csv")
