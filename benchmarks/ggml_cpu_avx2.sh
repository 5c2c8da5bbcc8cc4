#!/usr/bin/env bash
# A libggml-cpu.so that valgrind can run: the same llama.cpp source as the install, built with
# GGML_NATIVE=OFF and AVX2 (valgrind cannot decode AVX-512, which -march=native emits on an
# AVX-512 machine). Only the CPU backend (and ggml-base, its dependency) is built, in its own
# folder; the installed package is left as it is. benchmarks/instructions.py --ggml-cpu preloads it.
#
#   bash benchmarks/ggml_cpu_avx2.sh [LLAMA_CPP_SOURCE] [OUT_DIR]
#
# LLAMA_CPP_SOURCE: the patched llama.cpp the build unpacked (default: build/*/steer-src/llama.cpp);
# prints the library's path.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-$(ls -d build/*/steer-src/llama.cpp 2>/dev/null | head -n1)}
out=${2:-build/ggml-cpu-avx2}
[ -d "$src/ggml" ] || { echo "no llama.cpp source at '$src': build the package first" >&2; exit 1; }
# ggml's own CMake project wants files the package's source copy leaves out; work on a copy
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$src/ggml" "$work/ggml"
touch "$work/ggml/ggml.pc.in"
cmake -S "$work/ggml" -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF -DGGML_CCACHE=OFF >/dev/null
cmake --build "$out" --target ggml-cpu >/dev/null
echo "$PWD/$out/src/libggml-cpu.so"
