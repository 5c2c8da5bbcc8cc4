"""Property tests (issue 11): every reader of user input gives a result or a SteerError,
nothing else, on any input; and the CLI ends every bad file with exit code 2 and one error
line, never a traceback, never an output file."""
from __future__ import annotations

import json
import os
import pathlib
import struct
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from steer_gguf import ExpertRule, Profile, SteerError, model_info  # noqa: E402
from steer_gguf.front.cli import main  # noqa: E402
from steer_gguf.detect.datasets import read_messages  # noqa: E402
from steer_gguf.detect.datasets import load_pairs, load_prompts, parse_pair  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON values as json.loads can make them, including the awkward ones: lone surrogates,
# control characters, huge and negative numbers, floats beyond float32
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                    st.sampled_from(["activate", "deactivate", "\ud800", "steer-gguf.profile/1", "", "1e39"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def write(tmp: pathlib.Path, name: str, data: bytes | str) -> pathlib.Path:
    p = tmp / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", errors="surrogatepass"))
    return p


def result_or_steer_error(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except SteerError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        return None


# ---- the profile parser ---------------------------------------------------------------------
GOOD = {"format": "steer-gguf.profile/1", "name": "p",
        "model": {"architecture": "qwen3moe", "n_layer": 4, "n_expert": 8, "n_expert_used": 2},
        "eps": 0.01, "experts": [{"layer": 1, "expert": 2, "action": "activate", "risk_diff": 0.5}],
        "bias": [{"layer": 2, "expert": 3, "value": -1.5}], "provenance": {"dataset": "x"}}


def paths(d, prefix=()):
    """Every (path, container) into a JSON value, for mutating one spot."""
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from paths(v, prefix + (i,))


def mutate(d, path, value, delete: bool):
    d = json.loads(json.dumps(d))
    if not path:
        return value
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return d


# format /2: experts per token (topk), per layer
GOOD_TOPK = {**GOOD, "format": "steer-gguf.profile/2", "topk": [{"layer": 1, "k": 3}, {"layer": 2, "k": 1}]}
GOOD_PATHS = [(GOOD, p) for p in paths(GOOD)] + [(GOOD_TOPK, p) for p in paths(GOOD_TOPK)]


@FUZZ
@given(st.sampled_from(GOOD_PATHS), json_values, st.booleans())
def test_profile_parser_on_mutated_profiles(good_path, value, delete):
    good, path = good_path
    data = mutate(good, path, value, delete and bool(path))
    p = result_or_steer_error(Profile.from_dict, data, source="fuzz.json")
    if p is not None:
        p.validate()  # what loads is valid, and comes back the same from its own JSON
        again = Profile.from_dict(json.loads(json.dumps(p.to_dict())))
        assert again.to_dict() == p.to_dict()


@FUZZ
@given(json_values)
def test_profile_parser_on_any_json(value):
    result_or_steer_error(Profile.from_dict, value)


@FUZZ
@given(st.binary(max_size=300))
def test_profile_file_of_any_bytes(tmp_path, data):
    result_or_steer_error(Profile.load, write(tmp_path, "p.json", data))


@FUZZ
@given(layer=scalars, expert=scalars, action=scalars, eps=scalars, value=scalars)
def test_hand_built_profiles(layer, expert, action, eps, value):
    from steer_gguf import BiasRule, ModelRef

    p = Profile(ModelRef(2, n_layer=4, n_expert=8), [ExpertRule(layer, expert, action)], [BiasRule(1, 1, value)],
                eps=eps)
    result_or_steer_error(p.validate)


# ---- the pairs, prompts and messages readers -------------------------------------------------
PAIR_KEYS = ["messages_0", "messages_1", "messages_0_target", "messages_1_target", "prompt", "response_0",
             "response_1", "system", "messages", "role", "content"]
pair_like = st.dictionaries(st.sampled_from(PAIR_KEYS), json_values | st.lists(
    st.fixed_dictionaries({"role": scalars, "content": scalars}), max_size=3), max_size=5)


@FUZZ
@given(st.one_of(json_values, pair_like))
def test_pair_parser_on_any_json(value):
    result_or_steer_error(parse_pair, value, "fuzz.jsonl:1", 1)


lines = st.lists(st.one_of(pair_like.map(lambda d: json.dumps(d)), st.text(max_size=30),
                           st.just('{"prompt": ' + "[" * 3000 + "]" * 3000 + "}"),
                           st.just('{"prompt": ' + "9" * 5000 + "}")), max_size=5)


@FUZZ
@given(lines, st.booleans(), st.binary(max_size=20))
def test_dataset_readers_on_any_lines(tmp_path, text_lines, skip_bad, junk):
    data = "\n".join(text_lines).encode("utf-8", errors="surrogatepass") + junk
    path = write(tmp_path, "d.jsonl", data)
    ps = result_or_steer_error(load_pairs, path, skip_bad=skip_bad)
    if ps is not None:
        assert len(ps) >= 1 and all(p.target_0.strip() and p.target_1.strip() for p in ps)
    result_or_steer_error(load_prompts, path)


@FUZZ
@given(st.one_of(json_values.map(json.dumps), st.binary(max_size=200)))
def test_messages_reader_on_anything(tmp_path, data):
    msgs = result_or_steer_error(read_messages, str(write(tmp_path, "m.json", data)))
    if msgs is not None:
        assert all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in msgs)


# ---- the GGUF metadata reader ----------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_bytes(make) -> bytes:
    return pathlib.Path(make("qwen3moe", n_layer=2, n_embd=16, n_expert=4, n_ff_exp=8)).read_bytes()


def header_end(data: bytes) -> int:
    """Where the metadata ends (roughly: the tensor data is what follows the last name)."""
    return min(len(data), 8192)


@FUZZ
@given(st.data())
def test_gguf_reader_on_corrupted_files(tmp_path, gguf_bytes, data):
    b = bytearray(gguf_bytes)
    end = header_end(b)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(4, end - 1))
        kind = data.draw(st.sampled_from(["byte", "u32", "u64", "cut"]))
        if kind == "byte":
            b[at] = data.draw(st.integers(0, 255))
        elif kind == "u32" and at + 4 <= len(b):
            struct.pack_into("<I", b, at, data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 7, 513, 1025])))
        elif kind == "u64" and at + 8 <= len(b):
            struct.pack_into("<Q", b, at, data.draw(st.sampled_from([0, 2**63, 2**40, 3])))
        else:
            b = b[:at]
            end = min(end, len(b))
            if end <= 5:
                break
    info = result_or_steer_error(model_info, write(tmp_path, "m.gguf", bytes(b)))
    if info is not None:
        assert 0 < info.n_expert_used <= info.n_expert and 0 < info.n_layer


@FUZZ
@given(st.binary(max_size=200))
def test_gguf_reader_on_any_bytes(tmp_path, tail):
    result_or_steer_error(model_info, write(tmp_path, "m.gguf", b"GGUF" + tail))


# ---- the CLI on a few hundred bad files -------------------------------------------------------
@pytest.fixture(scope="module")
def demo_model(make) -> pathlib.Path:
    return make("qwen3moe", n_layer=2, n_embd=16, n_expert=4, n_ff_exp=8)


def run_cli(*args) -> "click.testing.Result":  # noqa: F821
    r = CliRunner().invoke(main, [str(a) for a in args])
    # exit 0 or 2 (a SteerError, one line); anything else is a crash
    assert r.exit_code in (0, 2), (args, r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    if r.exit_code == 2:
        errors = [l for l in r.output.splitlines() if l.startswith("steer-gguf: error:")]
        assert len(errors) == 1, r.output
    return r


# what json_values cannot make: text json.dumps never writes
NASTY_JSON = ["[" * 3000 + "]" * 3000, json.dumps(GOOD).replace('"layer": 1', '"layer": ' + "9" * 5000),
              json.dumps(GOOD).replace('"p"', '"\\udc80\\n\\u001b[31m"'), json.dumps(GOOD).replace("0.01", "NaN"),
              json.dumps(GOOD).replace("0.01", "1e999"), json.dumps(GOOD).replace('"activate"', '["activate"]'),
              json.dumps({**GOOD, "provenance": {"x": "[" * 100}}).replace('"[[', "[[").replace('[["', "[[")]
bad_profiles = st.one_of(
    st.tuples(st.sampled_from(GOOD_PATHS), json_values, st.booleans()).map(
        lambda t: json.dumps(mutate(t[0][0], t[0][1], t[1], t[2] and bool(t[0][1])))),
    st.sampled_from(NASTY_JSON),
    st.binary(max_size=120),
    st.text(max_size=120),
)


@FUZZ
@given(bad_profiles)
def test_cli_profile_show_and_validate_on_bad_files(demo_model, data):
    with tempfile.TemporaryDirectory() as d:
        path = write(pathlib.Path(d), "p.json", data)
        run_cli("profile", "show", path)
        run_cli("profile", "validate", path)
        run_cli("profile", "validate", path, "--model", demo_model)


bad_datasets = st.one_of(lines.map(lambda ls: "\n".join(ls)), st.binary(max_size=120))


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bad_datasets, st.booleans())
def test_cli_detect_on_bad_datasets(demo_model, data, skip_bad):
    with tempfile.TemporaryDirectory() as d:
        path = write(pathlib.Path(d), "pairs.jsonl", data)
        out = pathlib.Path(d) / "t.csv"
        r = run_cli("detect", demo_model, "--pairs", path, "-o", out, "-t", "1", *(["--skip-bad"] * skip_bad))
        assert out.exists() == (r.exit_code == 0)
        assert not [f for f in os.listdir(d) if f.startswith(".steer-")]  # no temporary left behind
