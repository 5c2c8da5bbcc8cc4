"""Shared fixtures: tiny GGUF models made on the fly (no downloads)."""
from __future__ import annotations

import pathlib

import pytest

from fixtures.make_models import make_model

MOE_KINDS = ("qwen3moe", "olmoe", "mixtral", "gpt-oss", "deepseek-v3")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def make(model_dir):
    """make(kind, **kw) -> path, cached per argument set for the session."""
    cache: dict = {}

    def _make(kind: str, **kw) -> pathlib.Path:
        key = (kind, tuple(sorted(kw.items())))
        if key not in cache:
            name = kind + "".join(f"-{k}{v}" for k, v in sorted(kw.items())) + ".gguf"
            cache[key] = make_model(kind, model_dir / name, **kw)
        return cache[key]

    return _make


@pytest.fixture(scope="session", params=MOE_KINDS)
def moe_path(request, make) -> pathlib.Path:
    # 4 layers so that a DeepSeek-V3 model (1 dense lead layer) still has 3 MoE layers
    return make(request.param, n_layer=4)


@pytest.fixture(scope="session")
def make_arch(model_dir):
    """make_arch(arch, layout=Layout(), **build_kw) -> path: a tiny model of any architecture,
    built by llama.cpp's own model builder (fixtures/any_arch.py), cached for the session."""
    from fixtures.any_arch import Layout, build

    cache: dict = {}

    def _make(arch: str, layout: "Layout | None" = None, **kw) -> pathlib.Path:
        layout = layout or Layout()
        key = (arch, layout.key, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build(arch, model_dir / f"arch-{arch}-{layout.key}.gguf", layout, **kw)
        return cache[key]

    return _make

