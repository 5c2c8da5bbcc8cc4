#!/usr/bin/env bash
# Install steer-gguf from this checkout.
#
# Where no virtual environment is active, it makes one in .venv: a distribution's system
# Python (Debian 12, Ubuntu 24.04, Homebrew) is "externally managed" (PEP 668) and refuses
# `pip install` outside one.
#
# 1. llama-cpp-python's Python layer only (LLAMA_BUILD=OFF): steer-gguf builds the
#    patched libllama it runs on, so llama-cpp-python's own native build would be wasted.
# 2. steer-gguf itself: downloads the matching llama-cpp-python sdist with pip, patches the
#    llama.cpp inside it, builds libllama + ggml + the pybind11 module (CPU by default;
#    pass CMAKE_ARGS="-DGGML_CUDA=on" for CUDA). About 3 minutes on 2 cores for the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# the pin's one home: pyproject.toml's dependencies (CMakeLists.txt reads it from there too)
LLAMA_CPP_PYTHON=$(sed -n 's/^ *"llama-cpp-python==\([^"]*\)",*$/\1/p' pyproject.toml)
[ -n "$LLAMA_CPP_PYTHON" ] || { echo "steer-gguf: pyproject.toml pins no llama-cpp-python==VERSION" >&2; exit 1; }
if [ -n "${VIRTUAL_ENV:-}" ]; then
    PY=${PYTHON:-python}
else
    if [ ! -x .venv/bin/python ]; then
        echo "steer-gguf: no virtual environment active; creating .venv (activate it with: . .venv/bin/activate)"
        "${PYTHON:-python3}" -m venv .venv || {
            echo "steer-gguf: error: could not create .venv; on Debian/Ubuntu: apt-get install python3-venv" >&2
            exit 1; }
    fi
    PY=.venv/bin/python
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if command -v ccache >/dev/null 2>&1; then
    export STEER_GGUF_COMPILER_LAUNCHER=${STEER_GGUF_COMPILER_LAUNCHER:-ccache}
    export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
fi
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install "llama-cpp-python==$LLAMA_CPP_PYTHON"
"$PY" -m pip install ".[${STEER_GGUF_EXTRAS:-test}]"
