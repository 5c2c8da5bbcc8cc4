"""Which architectures steer-gguf takes, as the llama.cpp it builds runs them: models.txt lists
every one whose graph can route (read from the vendored sources at build time), and metadata
is read as llama.cpp reads it: gating fixed in code, keys llama.cpp aborts without, the bare
selection-bias name, architectures whose graph never routes."""
from __future__ import annotations

import pathlib

import gguf
import numpy as np
import pytest

from clitools import assert_one_line_error, cli
from steer_gguf import SteeredLlama, SteerError, model_info
from steer_gguf.model import routing_architectures

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE_ARCHS = {"qwen3moe", "olmoe", "llama", "gpt-oss", "deepseek2"}


def listed() -> dict[str, str]:
    rows = [line.split() for line in (ROOT / "models.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    return {r[0]: r[1] for r in rows}


def test_models_txt_lists_every_architecture_that_routes():
    archs = routing_architectures()
    assert FIXTURE_ARCHS <= archs, "the build's architecture list misses the test fixtures' families"
    assert len(archs) > 40
    rows = listed()
    missing = sorted(archs - rows.keys())
    assert not missing, f"models.txt does not list {missing}: llama.cpp routes them (csrc/moe_archs.py)"
    # listed but never routing: only as refused, saying why (test_arch_matrix checks each refusal)
    assert all(rows[a] == "refused" for a in rows.keys() - archs), "models.txt verifies an architecture that never routes"
    assert set(rows.values()) <= {"verified", "refused"}
    assert FIXTURE_ARCHS <= {a for a, s in rows.items() if s == "verified"}
    assert cli("models").stdout.splitlines() == (ROOT / "models.txt").read_text().splitlines()


def _moe_file(path, arch: str, gating: int | None = None, bias_name: str | None = None) -> pathlib.Path:
    """Metadata and router tensors only: enough for model_info, not for llama.cpp."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_uint32(f"{arch}.expert_count", 4)
    w.add_uint32(f"{arch}.expert_used_count", 2)
    if gating is not None:
        w.add_uint32(f"{arch}.expert_gating_func", gating)
    rng = np.random.default_rng(0)
    for il in range(2):
        w.add_tensor(f"blk.{il}.ffn_gate_inp.weight", rng.standard_normal((4, 16)).astype(np.float32))
        if bias_name:
            w.add_tensor(f"blk.{il}.{bias_name}", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pathlib.Path(path)


def test_a_graph_that_never_routes_is_refused(tmp_path):
    p = _moe_file(tmp_path / "refact.gguf", "refact")
    with pytest.raises(SteerError, match="refact graph never routes"):
        model_info(p)
    assert_one_line_error(cli("info", p), "never routes")


@pytest.mark.parametrize("name", ["exp_probs_b.bias", "exp_probs_b"])
def test_the_selection_bias_under_either_name(tmp_path, name):
    info = model_info(_moe_file(tmp_path / "m.gguf", "hy_v3", gating=2, bias_name=name))
    assert info.has_selection_bias and info.select_stage == "ffn_moe_probs_biased"


def test_gating_as_llama_cpp_runs_it(tmp_path):
    assert model_info(_moe_file(tmp_path / "n.gguf", "nemotron_h_moe")).gating == "sigmoid"
    assert model_info(_moe_file(tmp_path / "d2.gguf", "dots1", gating=2)).gating == "sigmoid"
    for arch in ("dots1", "minimax-m2", "smallthinker"):
        p = _moe_file(tmp_path / f"{arch}.gguf", arch)
        with pytest.raises(SteerError, match=f"{arch}.expert_gating_func is missing; llama.cpp would abort"):
            model_info(p)


def test_diffusion_models_are_refused_before_loading(tmp_path):
    p = _moe_file(tmp_path / "llada.gguf", "llada-moe")
    assert model_info(p).architecture == "llada-moe"  # info still describes it
    with pytest.raises(SteerError, match="diffusion language model"):
        SteeredLlama(p)
