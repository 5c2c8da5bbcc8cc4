"""-hf USER/REPO[:QUANT]: the file llama.cpp's -hf would pick, fetched with huggingface_hub from
a fake hub on 127.0.0.1 (HF_ENDPOINT), split models whole, resumed after a dropped connection,
and one error line for everything that can go wrong. Nothing leaves this machine."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from clitools import ENV, NEUTRAL_CWD, assert_one_line_error
from fakehub import FakeHub, running
from steer_gguf import SteerError, model_info
from steer_gguf.hub import parse_spec, pick_file, split_siblings

REPO = "org/moe-GGUF"


@pytest.fixture(scope="module")
def models(make):
    split = make("qwen3moe", n_layer=4, seed=3, split_max_tensors=20)
    # wide experts: files of ~20 MiB, so that a download dropped halfway has written some of
    # huggingface_hub's 10 MiB chunks to disk, which is what a resume starts from
    return {"q4": make("qwen3moe", n_layer=4, seed=1, n_ff_exp=768), "q8": make("qwen3moe", n_layer=4, seed=2, n_ff_exp=768),
            "split": model_info(split).parts}


@pytest.fixture(scope="module")
def hub(models):
    n = len(models["split"])
    files = {"README.md": b"# a model\n",
             "mmproj-moe-Q4_K_M.gguf": b"GGUF not the model",  # a sidecar: never picked
             "moe-Q4_K_M.gguf": pathlib.Path(models["q4"]).read_bytes(),
             "moe-Q8_0.gguf": pathlib.Path(models["q8"]).read_bytes()}
    for i, p in enumerate(models["split"], 1):
        files[f"f16/moe-F16-{i:05d}-of-{n:05d}.gguf"] = pathlib.Path(p).read_bytes()
    h = FakeHub(repos={REPO: files, "org/weights-only": {"README.md": b"x", "model.safetensors": b"\0" * 64}})
    with running(h):
        yield h


def run(hub_url: str, cache, *args, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in ENV.items() if not k.startswith("HF_")}
    e.update(HF_ENDPOINT=hub_url, HF_HUB_CACHE=str(cache), HF_HOME=str(pathlib.Path(cache) / "home"),
             HF_HUB_DISABLE_TELEMETRY="1", **env)
    return subprocess.run([sys.executable, "-m", "steer_gguf", *map(str, args)], capture_output=True, text=True,
                          cwd=NEUTRAL_CWD, env=e, timeout=300)


def fingerprint(path) -> str:
    return model_info(path).fingerprint


def test_the_quant_tag_picks_the_file_llama_cpp_would(hub, models, tmp_path):
    r = run(hub.url, tmp_path, "info", "-hf", REPO)  # no tag: Q4_K_M first
    assert r.returncode == 0, r.stderr
    assert fingerprint(models["q4"]) in r.stdout
    assert f"{REPO}: moe-Q4_K_M.gguf in {tmp_path}" in r.stderr  # where it went
    r = run(hub.url, tmp_path, "info", "-hf", f"{REPO}:q8_0")  # case-insensitive
    assert r.returncode == 0, r.stderr
    assert fingerprint(models["q8"]) in r.stdout
    r = run(hub.url, tmp_path, "info", "-hf", REPO, "--hf-file", "moe-Q8_0.gguf")
    assert r.returncode == 0 and fingerprint(models["q8"]) in r.stdout


def test_a_split_model_comes_whole(hub, models, tmp_path):
    r = run(hub.url, tmp_path, "info", "-hf", f"{REPO}:F16")
    assert r.returncode == 0, r.stderr
    n = len(models["split"])
    assert f"(part 1 of {n})" in r.stdout and fingerprint(models["split"][0]) in r.stdout
    for i in range(1, n + 1):
        assert hub.gets(f"moe-F16-{i:05d}-of-{n:05d}.gguf"), f"part {i} was not fetched"


def test_what_is_not_there_is_one_line(hub, tmp_path):
    assert_one_line_error(run(hub.url, tmp_path, "info", "-hf", f"{REPO}:Q5_K_S"),
                          "has no GGUF model for quant Q5_K_S", "moe-Q4_K_M.gguf")
    assert_one_line_error(run(hub.url, tmp_path, "info", "-hf", REPO, "--hf-file", "nope.gguf"),
                          "has no file nope.gguf", "moe-Q8_0.gguf")
    assert_one_line_error(run(hub.url, tmp_path, "info", "-hf", "org/weights-only"), "has no GGUF model files")
    assert_one_line_error(run(hub.url, tmp_path, "info", "-hf", "org/missing"), "no such repository")
    assert_one_line_error(run(hub.url, tmp_path, "info", "-hf", "not-a-repo"), "USER/REPO[:QUANT]")
    assert_one_line_error(run(hub.url, tmp_path, "info", "x.gguf", "-hf", REPO), "not both")
    assert_one_line_error(run(hub.url, tmp_path, "info", "--hf-file", "a.gguf"), "--hf-file needs -hf")
    assert not _snapshot_files(tmp_path)


def _closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}"


def test_no_network(hub, models, tmp_path):
    assert_one_line_error(run(_closed_port(), tmp_path, "info", "-hf", REPO),
                          "cannot be reached", "not in the local Hugging Face cache")
    assert run(hub.url, tmp_path, "info", "-hf", REPO).returncode == 0  # fetched once...
    for url, env in ((_closed_port(), {}), (hub.url, {"HF_HUB_OFFLINE": "1"})):  # ...found offline after
        before = len(hub.log)
        r = run(url, tmp_path, "info", "-hf", REPO, **env)
        assert r.returncode == 0, r.stderr
        assert fingerprint(models["q4"]) in r.stdout
        assert len(hub.log) == before  # offline: the hub was never asked


def _snapshot_files(cache) -> list[pathlib.Path]:
    return [p for p in pathlib.Path(cache).glob("models--*/snapshots/*/**/*") if p.is_file()]


def _resumed_at(ranges: list[str]) -> int:
    assert len(ranges) == 2 and ranges[0] == "" and ranges[1].startswith("bytes="), ranges
    return int(ranges[1][len("bytes="):-1])


def _cached(cache, name: str) -> bytes:
    (p,) = [p for p in _snapshot_files(cache) if p.name == name]
    return p.read_bytes()


def test_a_dropped_download_resumes(hub, models, tmp_path):
    name = "moe-Q8_0.gguf"
    size = os.path.getsize(models["q8"])
    hub.log.clear()
    hub.drop_after[name] = size * 3 // 4  # the connection drops three quarters of the way in
    r = run(hub.url, tmp_path, "info", "-hf", f"{REPO}:Q8_0")
    assert r.returncode == 0, r.stderr
    assert 0 < _resumed_at(hub.gets(name)) <= size * 3 // 4  # picked up from what was on disk
    assert _cached(tmp_path, name) == pathlib.Path(models["q8"]).read_bytes()


def test_a_failed_download_leaves_nothing_to_load_and_resumes_next_run(hub, models, tmp_path):
    name = "moe-Q4_K_M.gguf"
    size = os.path.getsize(models["q4"])
    hub.log.clear()
    hub.drop_after[name] = size * 3 // 4   # the first GET drops,
    hub.fail_after_drop.add(name)          # and huggingface_hub's retry gets a 500
    try:
        r = run(hub.url, tmp_path, "info", "-hf", REPO)
    finally:
        hub.fail_after_drop.clear()
        hub.fail_gets.clear()
    assert_one_line_error(r, "downloading moe-Q4_K_M.gguf failed", "run the command again")
    assert _resumed_at(hub.gets(name)) > 0  # the retry asked for the rest
    # nothing where a later run would load it from, and no partial file: huggingface_hub 2.x
    # resumes within a run but starts a failed file over (its temporaries are per process)
    assert not _snapshot_files(tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and "gguf" in p.name or p.suffix == ".incomplete"]
    hub.log.clear()
    r = run(hub.url, tmp_path, "info", "-hf", REPO)
    assert r.returncode == 0, r.stderr
    assert hub.gets(name) == [""]
    assert _cached(tmp_path, name) == pathlib.Path(models["q4"]).read_bytes()
    assert fingerprint(models["q4"]) in r.stdout


# ---- the choice itself, as llama.cpp's common/download.cpp makes it ----------------------------------

def test_pick_file_follows_llama_cpp():
    files = ["README.md", "mmproj-m-Q4_K_M.gguf", "m-Q4_K.gguf", "m-Q8_0.gguf", "m-Q4_K_M.gguf",
             "big/m-Q2_K-00002-of-00002.gguf", "big/m-Q2_K-00001-of-00002.gguf", "m-imatrix.gguf"]
    assert pick_file(files, "") == "m-Q4_K_M.gguf"         # default Q4_K_M, sidecars never
    assert pick_file(files, "q4_k") == "m-Q4_K.gguf"       # the tag ends at '.' or '-'
    assert pick_file(files, "Q2_K") == "big/m-Q2_K-00001-of-00002.gguf"  # a split model by its first part
    assert pick_file(files, "Q6_K") is None                # a named tag that is absent: no fallback
    assert pick_file(["a-F16.gguf", "a-Q8_0.gguf"], "") == "a-Q8_0.gguf"  # then Q8_0
    assert pick_file(["b-F16.gguf", "a-BF16.gguf"], "") == "b-F16.gguf"   # then the first GGUF
    assert pick_file(["mmproj-x.gguf"], "") is None
    assert split_siblings(files, "big/m-Q2_K-00001-of-00002.gguf") == \
        ["big/m-Q2_K-00001-of-00002.gguf", "big/m-Q2_K-00002-of-00002.gguf"]
    with pytest.raises(SteerError, match="lacks m-00002-of-00003.gguf"):
        split_siblings(["m-00001-of-00003.gguf", "m-00003-of-00003.gguf"], "m-00001-of-00003.gguf")
    assert parse_spec("u/r:Q4_K_M") == ("u/r", "Q4_K_M") and parse_spec("u/r") == ("u/r", "")
    for bad in ("u", "u/r/x", "/r", "u/", "u/r:a:b", "u /r"):
        with pytest.raises(SteerError, match="USER/REPO"):
            parse_spec(bad)
