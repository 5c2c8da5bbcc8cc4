"""Profiles on disk, model identity, and every bad input through the real CLI."""
from __future__ import annotations

import json

import pytest

from clitools import assert_one_line_error, cli
from fixtures.make_models import write_truncated
from steer_gguf import ExpertRule, ModelRef, Profile, SteerError, model_info


@pytest.fixture(scope="module")
def qwen(make):
    return make("qwen3moe", n_layer=4)


@pytest.fixture(scope="module")
def good_profile(qwen, tmp_path_factory):
    info = model_info(qwen)
    p = Profile(ModelRef.of(info), [ExpertRule(1, 3, "activate", 0.5), ExpertRule(2, 4, "deactivate", -0.4)],
                name="good", provenance={"method": "manual"})
    path = tmp_path_factory.mktemp("prof") / "good.json"
    p.save(path)
    return path


def test_profile_round_trip(good_profile, qwen):
    p = Profile.load(good_profile)
    assert [(r.layer, r.expert, r.action) for r in p.experts] == [(1, 3, "activate"), (2, 4, "deactivate")]
    assert p.model.fingerprint == model_info(qwen).fingerprint
    d = json.loads(good_profile.read_text())
    assert d["format"] == "steer-gguf.profile/1" and d["experts"][0]["risk_diff"] == 0.5


def test_same_model_other_quantization_accepted(make, good_profile):
    f16 = make("qwen3moe", n_layer=4, ftype="f16")
    info = model_info(f16)
    assert info.fingerprint == model_info(make("qwen3moe", n_layer=4)).fingerprint
    Profile.load(good_profile).check(info)
    r = cli("profile", "validate", good_profile, "--model", f16)
    assert r.returncode == 0, r.stderr


def test_other_model_refused(make, good_profile, tmp_path):
    other = make("qwen3moe", n_layer=4, seed=7)
    p = Profile.load(good_profile)
    with pytest.raises(SteerError, match="fingerprint"):
        p.check(model_info(other))
    p.check(model_info(other), force=True)  # same shape: allowed when forced
    r = cli("profile", "validate", good_profile, "--model", other)
    assert_one_line_error(r, "fingerprint", "--force")
    assert cli("profile", "validate", good_profile, "--model", other, "--force").returncode == 0
    # a shape mismatch is refused even with --force
    bigger = make("qwen3moe", n_layer=4, n_expert=16)
    r = cli("profile", "validate", good_profile, "--model", bigger, "--force")
    assert_one_line_error(r, "n_expert", "another model")
    r = cli("generate", bigger, "-p", "hi", "--profile", good_profile, "-n", "2")
    assert_one_line_error(r, "n_expert")


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("format"), "format"),
    (lambda d: d.update(eps="big"), "eps"),
    (lambda d: d.update(eps=-1), "eps"),
    (lambda d: d["experts"][0].update(layer=99), "experts[0].layer"),
    (lambda d: d["experts"][0].update(expert=999), "experts[0].expert"),
    (lambda d: d["experts"][0].update(expert=-1), "experts[0].expert"),
    (lambda d: d["experts"][0].update(action="boost"), "experts[0].action"),
    (lambda d: d["experts"][0].update(layer="1"), "experts[0].layer"),
    (lambda d: d["experts"].append(dict(d["experts"][0])), "appears twice"),
    (lambda d: d.update(experts="x"), "experts"),
    (lambda d: d["model"].pop("n_expert_used"), "model.n_expert_used"),
    (lambda d: d.update(bias=[{"layer": 1, "expert": 2, "value": "inf"}]), "bias[0].value"),
    (lambda d: d["experts"].extend({"layer": 1, "expert": e, "action": "activate"} for e in (5, 6)), "more than k"),
])
def test_malformed_profiles(good_profile, tmp_path, qwen, mutate, needle):
    d = json.loads(good_profile.read_text())
    mutate(d)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(SteerError, match=None) as e:
        Profile.load(bad)
    assert str(bad) in str(e.value) and needle in str(e.value)
    assert_one_line_error(cli("profile", "validate", bad), needle)
    assert_one_line_error(cli("generate", qwen, "-p", "hi", "--profile", bad, "-n", "2"), needle)


def test_truncated_and_unreadable_profiles(good_profile, tmp_path):
    cut = tmp_path / "cut.json"
    cut.write_text(good_profile.read_text()[:40])
    assert_one_line_error(cli("profile", "show", cut), str(cut), "not valid JSON")
    assert_one_line_error(cli("profile", "show", tmp_path / "missing.json"), "no such profile")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert_one_line_error(cli("profile", "show", binary), str(binary))


def test_dense_layer_in_profile(make, tmp_path):
    ds = make("deepseek-v3", n_layer=4)
    info = model_info(ds)
    assert 0 not in info.moe_layers
    p = Profile(ModelRef.of(info), [ExpertRule(0, 1, "activate")])
    path = tmp_path / "dense.json"
    p.save(path)
    assert_one_line_error(cli("profile", "validate", path, "--model", ds), "not a MoE layer")


@pytest.mark.parametrize("kind", ["dense", "truncated", "missing", "directory", "not-gguf"])
def test_bad_models(make, tmp_path, kind):
    if kind == "dense":
        path, needle = make("dense"), "not a Mixture-of-Experts"
    elif kind == "truncated":
        path, needle = tmp_path / "t.gguf", "truncated"
        write_truncated(make("qwen3moe", n_layer=4), path)
    elif kind == "missing":
        path, needle = tmp_path / "nope.gguf", "no such file"
    elif kind == "directory":
        path, needle = tmp_path, "not a readable file"
    else:
        path, needle = tmp_path / "x.gguf", "not a GGUF"
        path.write_text("hello")
    for args in (("info", path), ("generate", path, "-p", "hi", "-n", "1"), ("trace", path, "-p", "hi", "-o",
                                                                              tmp_path / "o.json")):
        assert_one_line_error(cli(*args), needle)
    assert not (tmp_path / "o.json").exists()


def test_cli_info_generate_trace(qwen, good_profile, tmp_path):
    r = cli("info", qwen, "--json")
    assert r.returncode == 0
    d = json.loads(r.stdout)
    assert d["architecture"] == "qwen3moe" and d["n_expert"] == 8 and d["moe_layers"] == [0, 1, 2, 3]
    r = cli("generate", qwen, "-p", "hello", "--profile", good_profile, "-n", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["profile"] == "good"
    out = tmp_path / "t.npz"
    r = cli("trace", qwen, "-p", "hello there", "--profile", good_profile, "-o", out)
    assert r.returncode == 0, r.stderr
    from steer_gguf import RoutingTrace

    tr = RoutingTrace.load(out)
    assert tr.experts.shape[1:] == (4, 2)
    assert (tr.experts[:, 1, :] == 3).any(axis=1).all()   # the profile's activation is visible
    assert not (tr.experts[:, 2, :] == 4).any()
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    r = cli("trace", qwen, "--messages", msgs, "-o", tmp_path / "t.json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "t.json").read_text())["tokens"]) > 4
    msgs.write_text('[{"role": 1}]')
    assert_one_line_error(cli("trace", qwen, "--messages", msgs, "-o", tmp_path / "u.json"), "messages[0]")
    assert_one_line_error(cli("trace", qwen, "-p", "x", "-o", tmp_path / "t.txt"), ".json or .npz")
    r = cli("models")
    assert r.returncode == 0 and "qwen3moe" in r.stdout
