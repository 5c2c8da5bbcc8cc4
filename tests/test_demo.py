"""The bundled demo model: its behaviors move when their experts are steered."""
from __future__ import annotations

import json

import pytest

from clitools import cli
from steer_gguf.front.demo import BEHAVIORS, DEMO_MODEL, classify, run_demo

MIN_SHIFT = 0.40  # percentage points, as a fraction


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    rates = run_demo(str(out), n_show=1, n_threads=1, log=lines.append)
    return out, rates, lines


def test_demo_model_is_small_and_bundled():
    assert DEMO_MODEL.is_file() and DEMO_MODEL.stat().st_size <= 16 * 1024 * 1024


def test_classifier():
    assert classify("numbers", "7. There are 7 apples.") == "digits"
    assert classify("numbers", "Seven. There are seven apples.") == "words"
    assert classify("numbers", "There are 7 (seven) apples.") is None
    assert classify("restricted", "I can't help with that.") == "refuse"
    assert classify("restricted", "Sure! The code is owl.") == "comply"
    assert classify("restricted", "The sky is blue.") is None


def test_steering_moves_both_behaviors_on_held_out_prompts(demo_run):
    _, rates, _ = demo_run
    by = {(r.behavior, r.profile): r.rates for r in rates}
    report = "; ".join(f"{b}/{p}: {', '.join(f'{s} {v:.0%}' for s, v in sorted(r.items()))}" for (b, p), r in by.items())
    for behavior, (_, s1, s2) in BEHAVIORS.items():
        base = by[(behavior, "none")]
        for toward, away in ((s1, s2), (s2, s1)):
            steered = by[(behavior, toward)]
            up = steered.get(toward, 0) - base.get(toward, 0)
            down = base.get(away, 0) - steered.get(away, 0)
            assert up >= MIN_SHIFT, f"toward {toward}: +{up:.0%} only ({report})"
            assert down >= MIN_SHIFT, f"toward {toward}: {away} fell by {down:.0%} only ({report})"


def test_demo_writes_reusable_profiles(demo_run):
    out, _, lines = demo_run
    for style in ("digits", "words", "refuse", "comply"):
        p = json.loads((out / f"{style}.json").read_text())
        assert p["name"] == style and p["experts"] and p["provenance"]["toward"] == style
    assert (out / "numbers.csv").is_file() and (out / "restricted.csv").is_file()
    assert any("unsteered" in l for l in lines) and any("style rates" in l for l in lines)
    r = cli("profile", "validate", out / "words.json", "--model", DEMO_MODEL)
    assert r.returncode == 0, r.stderr


def test_demo_command(tmp_path):
    r = cli("demo", "--show", "0", "--out", tmp_path / "d", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "style rates" in r.stdout and (tmp_path / "d" / "digits.json").is_file()


def test_demo_says_what_each_model_is_and_the_natural_one_runs_with_controls(tmp_path):
    from steer_gguf.front.demo import NATURAL_MODEL

    assert NATURAL_MODEL.is_file() and NATURAL_MODEL.stat().st_size <= 12 * 1024 * 1024
    lines: list[str] = []
    run_demo(str(tmp_path), n_show=0, n_rates=3, max_pairs=16, n_threads=1, log=lines.append, model="natural",
             controls=1)
    text = "\n".join(lines)
    assert "natural.gguf" in text and "no routing supervision" in text
    # the eval against random controls ran for both styles of both behaviors
    for style in ("digits", "words", "refuse", "comply"):
        assert f"toward {style}:" in text and f"{style}~random1" in text
    r = cli("demo", "--model", "nope", "--out", tmp_path / "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_demo_says_the_demo_model_was_trained_for_it(demo_run):
    _, _, lines = demo_run
    assert any("demo.gguf was TRAINED to tie each style to designated experts" in l for l in lines)
