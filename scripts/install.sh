#!/usr/bin/env bash
# Install steer-gguf into the current Python environment from this checkout.
#
# 1. llama-cpp-python's Python layer only (LLAMA_BUILD=OFF): steer-gguf builds the
#    patched libllama it runs on, so llama-cpp-python's own native build would be wasted.
# 2. steer-gguf itself: downloads the matching llama-cpp-python sdist with pip, patches the
#    llama.cpp inside it, builds libllama + ggml + the pybind11 module (CPU by default;
#    pass CMAKE_ARGS="-DGGML_CUDA=on" for CUDA). About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if command -v ccache >/dev/null 2>&1; then
    export STEER_GGUF_COMPILER_LAUNCHER=${STEER_GGUF_COMPILER_LAUNCHER:-ccache}
    export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
fi
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install "llama-cpp-python==0.3.36"
"$PY" -m pip install ".[${STEER_GGUF_EXTRAS:-test}]"
