"""The any-architecture fixture maker (fixtures/any_arch.py) makes what it is asked for: the
layout knobs reach the file as llama.cpp loads it."""
from __future__ import annotations

import gguf
import pytest

from fixtures.any_arch import BuildError, Layout
from steer_gguf import model_info


def test_layout_knobs_reach_the_file(make_arch):
    lay = Layout(n_layer=5, n_expert=16, n_expert_used=4, n_expert_groups=4, n_group_used=2, n_shared=2,
                 n_dense_lead=2, gating=2)
    info = model_info(make_arch("deepseek2", lay))
    assert (info.n_layer, info.n_expert, info.n_expert_used) == (5, 16, 4)
    assert (info.n_expert_groups, info.n_group_used, info.n_shared_expert) == (4, 2, 2)
    assert info.moe_layers == [2, 3, 4] and info.gating == "sigmoid" and info.has_selection_bias


def test_a_selection_bias_can_be_left_out(make_arch):
    assert model_info(make_arch("glm4moe", Layout(selection_bias=True))).has_selection_bias
    info = model_info(make_arch("glm4moe", Layout(selection_bias=False)))
    assert not info.has_selection_bias and info.select_stage == ""


def test_interleaved_moe_layers(make_arch):
    assert model_info(make_arch("llama4", Layout(n_layer=4, interleave=2, n_dense_lead=0))).moe_layers == [1, 3]
    assert model_info(make_arch("llama4", Layout(n_layer=4, interleave=1, n_dense_lead=0))).moe_layers == [0, 1, 2, 3]


def test_files_carry_the_chat_template_and_vocab(make_arch):
    r = gguf.GGUFReader(str(make_arch("qwen3moe")))
    assert "tokenizer.chat_template" in r.fields
    assert r.get_field("tokenizer.ggml.model").contents() == "gpt2"


def test_hash_routing_exists_in_deepseek4_only(make_arch):
    with pytest.raises(BuildError, match="deepseek4 only"):
        make_arch("qwen3moe", Layout(hash_layers=1))
