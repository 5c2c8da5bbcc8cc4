"""Split GGUFs (NAME-00001-of-0000N.gguf, as large models ship) are one model: read, steered,
traced and baked as the unsplit file of the same tensors is, whichever part is named."""
from __future__ import annotations

import json
import os
import shutil

import gguf
import numpy as np
import pytest

from clitools import assert_one_line_error, cli
from steer_gguf import ExpertRule, Profile, SteeredLlama, SteerError, bake_profile, model_info
from steer_gguf.engine.scoring import next_token_logprobs

TEXT = "The miller counted 17 sacks of flour while 42 ducks swam past the old wheel."


@pytest.fixture(scope="module")
def pair(make):
    """The same model unsplit and split in parts of 20 tensors (4 parts)."""
    return make("deepseek-v3", n_layer=4), make("deepseek-v3", n_layer=4, split_max_tensors=20)


def _parts(first) -> list[str]:
    return model_info(first).parts


def _on_off(info) -> Profile:
    p = Profile.empty(info, name="on-off")
    p.experts = ([ExpertRule(il, 5, "activate") for il in info.moe_layers]
                 + [ExpertRule(il, 1, "deactivate") for il in info.moe_layers])
    return p


def _run(path, profile=None):
    llm = SteeredLlama(path, profile=profile, n_ctx=128, n_threads=1, n_threads_batch=1)
    try:
        toks = llm.tokenize(TEXT.encode(), add_bos=True)
        tr = llm.trace(tokens=toks)
        return np.sort(tr.experts, axis=-1), next(iter(next_token_logprobs(llm, [toks])))
    finally:
        llm.close()


def test_every_part_names_the_whole_model(pair):
    whole, split = pair
    parts = _parts(split)
    assert len(parts) == 4 and parts[0] == os.fspath(split)
    ref = model_info(whole)
    for p in parts:  # any part: the model it belongs to, as loaded from its first part
        i = model_info(p)
        assert (i.path, i.parts) == (parts[0], parts)
        assert (i.fingerprint, i.moe_layers, i.n_expert, i.has_selection_bias) == \
            (ref.fingerprint, ref.moe_layers, ref.n_expert, ref.has_selection_bias)
    out = cli("info", parts[1])
    assert out.returncode == 0, out.stderr
    assert "(part 1 of 4)" in out.stdout and ref.fingerprint in out.stdout


def test_a_split_model_runs_and_steers_as_the_whole(pair):
    whole, split = pair
    info = model_info(whole)
    prof = _on_off(info)
    for profile in (None, prof):
        e_whole, logits_whole = _run(whole, profile)
        e_split, logits_split = _run(_parts(split)[2], profile)  # named by its last part
        np.testing.assert_array_equal(e_whole, e_split)
        np.testing.assert_array_equal(logits_whole, logits_split)
    # a profile made for the model fits its split file: same fingerprint, no --force
    prof.check(model_info(split))


def _copy_split(split, dst) -> list[str]:
    os.makedirs(dst, exist_ok=True)
    return [shutil.copy(p, dst) for p in _parts(split)]


def test_a_missing_or_foreign_part_is_one_line(pair, tmp_path):
    whole, split = pair
    parts = _copy_split(split, tmp_path / "a")
    os.unlink(parts[1])
    for p in (parts[0], parts[2]):
        with pytest.raises(SteerError, match=r"-00002-of-00004\.gguf: missing: part 2 of the split GGUF"):
            model_info(p)
    assert_one_line_error(cli("info", parts[0]), "missing: part 2")
    # a part that is not this model's second: the plain file under the part's name
    shutil.copy(whole, parts[1])
    with pytest.raises(SteerError, match="not part 2 of 4"):
        model_info(parts[0])
    # a part renamed so that its siblings cannot be found
    odd = tmp_path / "renamed.gguf"
    shutil.copy(_parts(split)[0], odd)
    with pytest.raises(SteerError, match="does not follow NAME-00001-of-00004.gguf"):
        model_info(odd)
    with open(parts[2], "r+b") as f:  # a truncated later part
        f.truncate(os.path.getsize(parts[2]) // 2)
    shutil.copy(_parts(split)[1], parts[1])
    with pytest.raises(SteerError, match=r"-00003-of-00004\.gguf: truncated"):
        model_info(parts[0])


def _tensor_bytes(first) -> dict[str, bytes]:
    out = {}
    for p in model_info(first).parts:
        for t in gguf.GGUFReader(p).tensors:
            out[t.name] = bytes(np.asarray(t.data).tobytes())
    return out


def test_bake_writes_a_split_model_like_the_source_or_one_file(pair, tmp_path):
    whole, split = pair
    info = model_info(whole)
    prof = _on_off(info)
    _, ref = bake_profile(whole, prof, tmp_path / "whole-baked.gguf")
    _, res = bake_profile(_parts(split)[1], prof, tmp_path / "split-baked.gguf")
    assert [os.path.basename(p) for p in res.parts] == [f"split-baked-{i:05d}-of-00004.gguf" for i in (1, 2, 3, 4)]
    assert res.path == res.parts[0] and res.bytes == sum(os.path.getsize(p) for p in res.parts)
    # the same parts as the source: each output part holds the tensors its source part held
    for src, out in zip(_parts(split), res.parts):
        assert [t.name for t in gguf.GGUFReader(src).tensors] == [t.name for t in gguf.GGUFReader(out).tensors]
    _, merged = bake_profile(split, prof, tmp_path / "merged.gguf", merge=True)
    assert merged.parts == [os.fspath(tmp_path / "merged.gguf")]
    assert "split.count" not in gguf.GGUFReader(merged.path).fields
    want = _tensor_bytes(ref.path)
    assert _tensor_bytes(res.path) == want and _tensor_bytes(merged.path) == want
    baked = model_info(res.parts[2])
    assert baked.baked["source_fingerprint"] == info.fingerprint and baked.parts == res.parts
    # llama.cpp loads the baked parts as one model: as it runs the baked unsplit file
    for a, b in zip(_run(res.path), _run(ref.path)):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["whole-baked.gguf", "merged.gguf", *map(os.path.basename, res.parts)])  # no temporaries left


def test_bake_cli_on_a_split_model(pair, tmp_path):
    whole, split = pair
    info = model_info(whole)
    prof_path = tmp_path / "p.json"
    _on_off(info).save(prof_path)
    r = cli("bake", split, "--profile", prof_path, "-o", tmp_path / "out.gguf")
    assert r.returncode == 0, r.stderr
    assert "out-00001-of-00004.gguf (part 1 of 4" in r.stdout
    assert "--merge" in r.stdout  # Ollama takes one file: say how to get one
    r = cli("bake", split, "--profile", prof_path, "-o", tmp_path / "one.gguf", "--merge")
    assert r.returncode == 0, r.stderr
    assert "ollama create one" in r.stdout


def test_a_first_part_of_metadata_alone_is_kept(make, tmp_path):
    """llama.cpp's converter can write the metadata alone in part 1 (--split --small-first-shard)."""
    split = make("qwen3moe", n_layer=4, split_max_tensors=20, small_first_shard=True)
    info = model_info(split)
    assert len(gguf.GGUFReader(info.parts[0]).tensors) == 0
    prof = Profile.empty(info, name="off")
    prof.experts = [ExpertRule(il, 3, "deactivate") for il in info.moe_layers]
    _, res = bake_profile(split, prof, tmp_path / "b.gguf")
    assert [len(gguf.GGUFReader(p).tensors) for p in res.parts] == \
        [len(gguf.GGUFReader(p).tensors) for p in info.parts]
    baked = model_info(res.path)
    assert baked.n_expert == info.n_expert - 1  # pruned: expert 3 is gone, the rest renumbered
    kept = json.loads(baked.baked["kept"])
    e, _ = _run(res.path)
    source_ids = np.stack([np.asarray(kept[str(il)])[e[:, j]] for j, il in enumerate(info.moe_layers)], axis=1)
    assert not (source_ids == 3).any()
