"""`steer-gguf chat --profiles-dir`: profiles named as the server names them (registry.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from clitools import ENV, NEUTRAL_CWD, assert_one_line_error, cli
from steer_gguf import ExpertRule, Profile, model_info


@pytest.fixture(scope="module")
def model(make):
    return make("qwen3moe", n_layer=4)


@pytest.fixture(scope="module")
def profiles_dir(model, make, tmp_path_factory):
    d = tmp_path_factory.mktemp("chat-profiles")
    info = model_info(model)
    force = Profile.empty(info, name="force2")
    force.experts = [ExpertRule(il, 2, "activate") for il in info.moe_layers]
    force.save(d / "force.json")
    alien = Profile.empty(model_info(make("olmoe", n_layer=4)), name="alien")
    alien.experts = [ExpertRule(0, 1, "deactivate")]
    alien.save(d / "alien.json")
    return d


def chat(model, script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steer_gguf", "chat", str(model), "-n", "2", "-t", "1",
                           "--temperature", "0", *map(str, args)], input=script, capture_output=True, text=True,
                          cwd=NEUTRAL_CWD, env=ENV, timeout=120)


def test_profile_names_and_paths(model, profiles_dir, tmp_path):
    outside = tmp_path / "elsewhere.json"
    p = Profile.empty(model_info(model), name="outside")
    p.experts = [ExpertRule(model_info(model).moe_layers[0], 1, "activate")]
    p.save(outside)
    script = (f"/profile force\n/profile alien\n/profile missing\n/profile {outside}\n/profile none\n"
              f"/profile\n/quit\n")
    r = chat(model, script, "--profiles-dir", profiles_dir)
    assert r.returncode == 0, r.stderr
    out, err = r.stdout, r.stderr
    assert "Traceback" not in err
    assert "profile: none. /profile NAME|PATH|off" in out  # the banner: no default given
    assert "warning: profile 'alien' excluded" in err  # told at startup, as serve does
    assert "profile: force2" in out  # a name of the directory
    assert "error: profile 'alien' is not usable on this model" in err  # its startup reason
    assert "error: profile 'missing': no such profile in" in err and "(available: none, force)" in err
    assert "profile: outside" in out  # a path still works
    assert out.count("profile: none") == 2  # the banner and /profile none
    assert "usage: /profile NAME|PATH|off" in out


def test_default_profile_by_name(model, profiles_dir):
    r = chat(model, "/quit\n", "--profiles-dir", profiles_dir, "--profile", "force")
    assert r.returncode == 0, r.stderr
    assert "profile: force2" in r.stdout


def test_bad_directory_or_default_is_one_line_error(model, profiles_dir, tmp_path):
    assert_one_line_error(cli("chat", model, "--profiles-dir", tmp_path / "nowhere"), "not a directory")
    assert_one_line_error(cli("chat", model, "--profiles-dir", profiles_dir, "--profile", "alien"),
                          "default profile 'alien'")
    assert_one_line_error(cli("chat", model, "--profiles-dir", profiles_dir, "--profile", "nosuch"),
                          "no such profile in")


def test_without_a_directory_profile_takes_paths_only(model, profiles_dir):
    r = chat(model, "/profile force\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "no such profile" in r.stderr  # "force" is a path here, and there is none
    assert "/profile PATH|off" in r.stdout and "NAME" not in r.stdout
