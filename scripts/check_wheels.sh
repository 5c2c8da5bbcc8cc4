#!/usr/bin/env bash
# Proof that the wheelhouse (scripts/build_wheels.sh) installs and runs where nothing can compile:
#
# 1. A fresh virtual environment whose PATH holds python and a few basic tools only (no cc, gcc,
#    c++, clang, cmake, ninja, make: checked), an empty environment (env -i) and no pip
#    configuration: `pip install --no-index --find-links dist steer-gguf` takes under 60 s
#    (STEER_GGUF_INSTALL_LIMIT) and its log shows wheels only, nothing built.
# 2. `steer-gguf info --system` says the build dispatches; `steer-gguf demo` passes; a short test
#    subset runs on the installed wheel.
# 3. Under qemu-user with older CPU models (Nehalem: x86-64-v2; Haswell: AVX2), the variant ggml
#    loads is the one that CPU model supports, and the demo's detection, steered generation and
#    style rates run, steering taking effect: no SIGILL. Emulation is ~70x slower than this CPU, so
#    by default (STEER_GGUF_QEMU=quick, what CI runs) the demo runs on 16 pairs per behavior and 4
#    rate prompts per group (~5 min per CPU model); STEER_GGUF_QEMU=full runs `steer-gguf demo`
#    itself (~15 min each); STEER_GGUF_QEMU=0 skips the step (and says so). Needs qemu-x86_64
#    (apt-get install qemu-user).
#
#   bash scripts/check_wheels.sh [DIST]        DIST: the wheelhouse, default dist
#   STEER_GGUF_CHECK_LOGS=DIR                  copy the logs there before the scratch folder goes
#   STEER_GGUF_CHECK_VARIANT=vulkan            a GPU variant (build_wheels.sh with CMAKE_ARGS):
#       installed from DIST/vulkan beside DIST, its backend must be found, and the test subset runs
#       with every layer on device 0 (GGML_VK_VISIBLE_DEVICES=0: Mesa's llvmpipe where there is no
#       GPU); no qemu step (an emulated CPU has no Vulkan device to speak of)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIST=$(cd "${1:-dist}" && pwd)
LIMIT=${STEER_GGUF_INSTALL_LIMIT:-60}
PYREAL=$(readlink -f "$(command -v "${PYTHON:-python3}")")
ls "$DIST"/steer_gguf-*.whl >/dev/null 2>&1 || { echo "check_wheels: no steer-gguf wheel in $DIST: run scripts/build_wheels.sh" >&2; exit 1; }

W=$(mktemp -d "${TMPDIR:-/tmp}/steer-wheels.XXXXXX")
KEEP=${STEER_GGUF_CHECK_LOGS:-}
keep_logs() { if [ -n "$KEEP" ]; then mkdir -p "$KEEP" && cp "$W"/*.log "$W"/*.json "$W"/*.txt "$KEEP"/ 2>/dev/null || true; fi; }
trap 'keep_logs; rm -rf "$W"' EXIT
QEMU_MODE=${STEER_GGUF_QEMU:-quick}
case $QEMU_MODE in 0|quick|full) ;; *) echo "check_wheels: STEER_GGUF_QEMU must be 0, quick or full, got '$QEMU_MODE'" >&2; exit 2 ;; esac
fail() { echo "check_wheels: FAIL: $*" >&2; exit 1; }
VARIANT=${STEER_GGUF_CHECK_VARIANT:-}
FIND=(--find-links "$DIST")
GPU_ENV=()
case $VARIANT in
    "") ;;
    vulkan)
        ls "$DIST/$VARIANT"/steer_gguf-*+"$VARIANT"-*.whl >/dev/null 2>&1 || fail "no $VARIANT wheel in $DIST/$VARIANT: run CMAKE_ARGS=-DGGML_VULKAN=ON scripts/build_wheels.sh"
        FIND=(--find-links "$DIST/$VARIANT" --find-links "$DIST")
        GPU_ENV=(GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0} STEER_GGUF_TEST_NGL=99)
        QEMU_MODE=0 ;;
    *) echo "check_wheels: STEER_GGUF_CHECK_VARIANT must be vulkan or empty, got '$VARIANT'" >&2; exit 2 ;;
esac

# ---- a machine without a compiler -----------------------------------------------------------------
mkdir -p "$W/bin" "$W/home"
for t in sh bash env cat ls rm mkdir mv cp ln readlink dirname basename uname tail head grep sed tr sort wc \
         date mktemp id nproc getconf ldconfig; do
    p=$(command -v "$t" 2>/dev/null) && ln -s "$p" "$W/bin/$t"
done
ln -s "$PYREAL" "$W/bin/python3"
for t in cc gcc g++ c++ clang clang++ cmake ninja make ld; do
    if PATH=$W/bin command -v "$t" >/dev/null 2>&1; then fail "$t is on the clean PATH"; fi
done
# env -i: no CC, CMAKE_ARGS, PIP_* or VIRTUAL_ENV from the caller; PIP_CONFIG_FILE=/dev/null: no
# find-links or index from a pip.conf
clean() { env -i HOME="$W/home" PATH="$W/bin" LANG=C.UTF-8 PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"; }
clean python3 -m venv "$W/venv"
VPY=$W/venv/bin/python

t0=$(date +%s.%N)
clean "$VPY" -m pip install --no-index "${FIND[@]}" steer-gguf >"$W/pip.log" 2>&1 || { cat "$W/pip.log"; fail "pip install"; }
t1=$(date +%s.%N)
secs=$("$VPY" -c "print(f'{$t1 - $t0:.1f}')")
cat "$W/pip.log"
"$VPY" "$ROOT/scripts/wheel_check.py" pip-built-nothing "$W/pip.log" || fail "pip built something from source"
grep -q "^Successfully installed .*steer-gguf-" "$W/pip.log" || fail "pip did not install steer-gguf"
echo "check_wheels: installed from $DIST in $secs s (limit $LIMIT s), wheels only"
"$VPY" -c "import sys; sys.exit(0 if $secs < $LIMIT else 1)" || fail "the install took $secs s, over $LIMIT s"

# ---- it runs -------------------------------------------------------------------------------------
cd "$W"  # never the checkout: `import steer_gguf` must find the installed wheel
clean "$W/venv/bin/steer-gguf" info --system | tee "$W/info.txt"
grep -q "^build: dispatching" "$W/info.txt" || fail "the wheel's build is not the dispatching one"
if [ -n "$VARIANT" ]; then
    grep -q "^Successfully installed .*steer-gguf-[0-9.]*+$VARIANT" "$W/pip.log" || fail "pip did not pick the $VARIANT wheel"
    clean env "${GPU_ENV[@]}" "$W/venv/bin/steer-gguf" info --system --json >"$W/info-$VARIANT.json"
    "$VPY" -c "import json, sys; d = json.load(open(sys.argv[1])); sys.exit(0 if any(b['name'].lower() == sys.argv[2] and b['devices'] for b in d['backends']) else 1)" \
        "$W/info-$VARIANT.json" "$VARIANT" || { cat "$W/info-$VARIANT.json"; fail "the $VARIANT backend was not found"; }
fi
clean "$W/venv/bin/steer-gguf" demo --out "$W/demo" --show 1 >"$W/demo.log" 2>&1 || { cat "$W/demo.log"; fail "steer-gguf demo"; }
tail -4 "$W/demo.log"
"$VPY" "$ROOT/scripts/wheel_check.py" demo-steers "$W/demo.log" || fail "the demo's steering took no effect"
clean "$VPY" -m pip install -q --no-index --find-links "$DIST" pytest hypothesis
# the pytest script, not `python -m pytest`: the checkout's root must not shadow the installed package
(cd "$ROOT" && clean env "${GPU_ENV[@]}" "$W/venv/bin/pytest" -q -p no:cacheprovider tests/test_wheels.py \
    tests/test_steering.py ${VARIANT:+tests/test_slots.py}) || fail "the test subset on the installed wheel"

# ---- older CPUs under qemu-user -------------------------------------------------------------------
# still in $W: `python -m steer_gguf` puts the current directory first on sys.path
if [ "$QEMU_MODE" = 0 ]; then
    echo "check_wheels: qemu step skipped (STEER_GGUF_QEMU=0)"
    exit 0
fi
command -v qemu-x86_64 >/dev/null || fail "qemu-x86_64 missing (apt-get install qemu-user), or STEER_GGUF_QEMU=0"
[ "$(uname -m)" = x86_64 ] || fail "the qemu step emulates x86-64 CPU models on an x86-64 host"
QEMU=$(command -v qemu-x86_64)
# model -> the variant ggml must pick: Nehalem (x86-64-v2: SSE4.2, no AVX) -> sse42; Haswell -> haswell
# the demo (detection, profiles, steered generations) runs on the CPU models of
# STEER_GGUF_QEMU_DEMO (default Nehalem, the acceptance's x86-64-v2); the others load the wheel,
# report their variant and run one steered generation with a profile that demo wrote: emulated
# AVX2 is slow (a quick demo took 10 min as Haswell here), and CI has 90 minutes in all
DEMO_CPUS=" ${STEER_GGUF_QEMU_DEMO:-Nehalem} "
DEMO_MODEL=$(clean "$VPY" -c "from steer_gguf.front.demo import DEMO_MODEL; print(DEMO_MODEL)")
for pair in Nehalem:sse42 Haswell:haswell; do
    model=${pair%%:*} want=${pair##*:}
    # a console script is a Python script: qemu runs the interpreter; rc 132 would be SIGILL
    set +e
    clean "$QEMU" -cpu "$model" "$VPY" -m steer_gguf info --system --json >"$W/q-$model.json" 2>"$W/q-$model.err"
    rc=$?
    set -e
    [ $rc = 132 ] && fail "SIGILL under qemu -cpu $model (info --system)"
    [ $rc = 0 ] || { cat "$W/q-$model.err"; fail "info --system under qemu -cpu $model: exit $rc"; }
    got=$("$VPY" -c "import json, sys; print(json.load(open(sys.argv[1]))['cpu_variant'])" "$W/q-$model.json")
    [ "$got" = "$want" ] || fail "qemu -cpu $model loaded the CPU variant '$got', expected '$want'"
    echo "check_wheels: qemu -cpu $model: CPU variant $got"
    t0=$(date +%s)
    if [ "${DEMO_CPUS#* $model }" = "$DEMO_CPUS" ]; then
        prof=$(ls "$W"/q-demo-*/*.json 2>/dev/null | head -1)
        [ -n "$prof" ] || fail "qemu -cpu $model: no profile from an earlier demo to steer with"
        set +e
        clean "$QEMU" -cpu "$model" "$VPY" -m steer_gguf generate "$DEMO_MODEL" --profile "$prof" -p "3 apples" \
            -n 8 -t 1 >"$W/q-gen-$model.log" 2>&1
        rc=$?
        set -e
        [ $rc = 132 ] && fail "SIGILL under qemu -cpu $model (steered generation)"
        [ $rc = 0 ] || { tail -20 "$W/q-gen-$model.log"; fail "steered generation under qemu -cpu $model: exit $rc"; }
        echo "check_wheels: qemu -cpu $model: steered generation with $(basename "$prof") ran in $(( $(date +%s) - t0 )) s"
        continue
    fi
    set +e
    if [ "$QEMU_MODE" = full ]; then
        demo=(-m steer_gguf demo --out "$W/q-demo-$model" --show 1)
    else
        demo=(-c "from steer_gguf.front.demo import run_demo; run_demo('$W/q-demo-$model', n_show=1, n_rates=4, max_pairs=16)")
    fi
    (clean "$QEMU" -cpu "$model" "$VPY" "${demo[@]}" >"$W/q-demo-$model.log" 2>&1)
    rc=$?
    set -e
    [ $rc = 132 ] && fail "SIGILL under qemu -cpu $model (demo)"
    [ $rc = 0 ] || { tail -20 "$W/q-demo-$model.log"; fail "steer-gguf demo under qemu -cpu $model: exit $rc"; }
    grep -q "profiles written to" "$W/q-demo-$model.log" || fail "the demo under qemu -cpu $model wrote no profiles"
    "$VPY" "$ROOT/scripts/wheel_check.py" demo-steers "$W/q-demo-$model.log" || fail "steering took no effect under qemu -cpu $model"
    echo "check_wheels: qemu -cpu $model: demo ($QEMU_MODE) passed, steering took effect, in $(( $(date +%s) - t0 )) s"
done
echo "check_wheels: all passed"
