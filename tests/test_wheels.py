"""Wheel builds (issues 34, 37): the pure logic here; the wheelhouse itself is built and installed on
a machine without a compiler by scripts/build_wheels.sh and scripts/check_wheels.sh (CI runs both)."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import zipfile

from steer_gguf.engine import backends, runtime, sysinfo
from steer_gguf.fileio import PACKAGE_DIR

from clitools import assert_one_line_error, cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _wheel_check():
    spec = importlib.util.spec_from_file_location("wheel_check", ROOT / "scripts" / "wheel_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_variant_names():
    assert backends.cpu_variant("libggml-cpu-haswell.so") == "haswell"
    assert backends.cpu_variant("/x/lib/libggml-cpu-sse42.so") == "sse42"
    assert backends.cpu_variant("ggml-cpu-x64.dll") == "x64"
    assert backends.cpu_variant("libggml-cpu-android_armv8.2_1.so") == "android_armv8.2_1"
    assert backends.cpu_variant("libggml-cpu-apple_m1.dylib") == "apple_m1"
    # one CPU backend, linked in or loadable: no variant
    assert backends.cpu_variant("libggml-cpu.so") is None
    assert backends.cpu_variant("libggml-cpu.so.0") is None
    # other backends and ggml itself are no CPU variant
    for name in ("libggml-vulkan.so", "libggml-base.so", "libggml.so", "libggml-cpu-haswell.so.txt",
                 "libggml-cpu-.so", "libllama.so"):
        assert backends.cpu_variant(name) is None, name


def test_cpu_variants_in_a_lib_dir(tmp_path):
    for name in ("libggml-cpu-zen4.so", "libggml-cpu-x64.so", "libggml.so", "libggml-base.so",
                 "libggml-vulkan.so", "libllama.so", "libggml-cpu-haswell.so"):
        (tmp_path / name).write_bytes(b"")
    assert backends.cpu_variants_in(tmp_path) == ["haswell", "x64", "zen4"]


def test_ggml_library_is_found_in_the_lib_dir(tmp_path):
    p = backends.ggml_library(tmp_path)
    assert p.parent == tmp_path and p.name in ("libggml.so", "libggml.dylib", "ggml.dll")


def test_build_kind():
    assert sysinfo.build_kind({"wheel": True, "ggml_native": False, "backend_dl": True}, ["x64"]) == "dispatching"
    # variants shipped mean dispatching whatever the record says (or without one)
    assert sysinfo.build_kind(None, ["haswell"]) == "dispatching"
    assert sysinfo.build_kind({"wheel": False, "ggml_native": True, "backend_dl": False}, []) == "native"
    assert sysinfo.build_kind({"wheel": False, "ggml_native": False, "backend_dl": False}, []) == "portable"
    assert sysinfo.build_kind(None, []) == "unknown"


def test_wheel_content_check(tmp_path):
    wc = _wheel_check()
    pure = tmp_path / "pure-1.0-py3-none-any.whl"
    with zipfile.ZipFile(pure, "w") as z:
        z.writestr("llama_cpp/llama_cpp.py", "x = 1\n")
        z.writestr("llama_cpp/lib/README.txt", "no library\n")
    native = tmp_path / "native-1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(native, "w") as z:
        z.writestr("llama_cpp/lib/libllama.so", b"\x7fELF")
        z.writestr("llama_cpp/lib/libggml-base.so.0", b"\x7fELF")
        z.writestr("llama_cpp/lib/ggml.dll", b"MZ")
    assert wc.native_libraries(pure) == []
    assert sorted(wc.native_libraries(native)) == ["llama_cpp/lib/ggml.dll", "llama_cpp/lib/libggml-base.so.0",
                                                    "llama_cpp/lib/libllama.so"]
    assert wc.main(["no-shared-lib", str(pure)]) == 0
    assert wc.main(["no-shared-lib", str(pure), str(native)]) == 1


def test_pip_log_check():
    wc = _wheel_check()
    wheels_only = ("Looking in links: dist\n"
                   "Processing ./dist/steer_gguf-0.1.0-cp311-cp311-manylinux_2_34_x86_64.whl\n"
                   "Processing ./dist/llama_cpp_python-0.3.36-py3-none-any.whl\n"
                   "Installing collected packages: numpy, llama-cpp-python, steer-gguf\n"
                   "Successfully installed llama-cpp-python-0.3.36 numpy-2.4.0 steer-gguf-0.1.0\n")
    assert wc.pip_build_lines(wheels_only) == []
    built = wheels_only + ("Processing ./dist/llama_cpp_python-0.3.36.tar.gz\n"
                           "  Building wheel for llama-cpp-python (pyproject.toml): started\n")
    assert len(wc.pip_build_lines(built)) == 2


def test_demo_log_check(tmp_path):
    wc = _wheel_check()
    steered = ("3. style rates over the held-out prompts (2 answers each, temperature 0.7)\n"
               "   numbers (48 prompts): unsteered: 44% digits / 56% words; toward digits: 100% digits / 0% words; "
               "toward words: 0% digits / 100% words\n"
               "   restricted (48 prompts): unsteered: 55% refuse / 45% comply; toward refuse: 90% refuse / 10% comply; "
               "toward comply: 5% refuse / 95% comply\n")
    assert wc.demo_shifts(steered) == {"numbers": 100, "restricted": 85}
    unsteered = steered.replace("toward refuse: 90% refuse / 10% comply", "toward refuse: 50% refuse / 50% comply")
    assert wc.demo_shifts(unsteered)["restricted"] == 45
    (tmp_path / "ok.log").write_text(steered)
    (tmp_path / "weak.log").write_text(unsteered)
    (tmp_path / "empty.log").write_text("steer-gguf: error: something\n")
    assert wc.main(["demo-steers", str(tmp_path / "ok.log")]) == 0
    assert wc.main(["demo-steers", str(tmp_path / "weak.log")]) == 1
    assert wc.main(["demo-steers", str(tmp_path / "empty.log")]) == 1


def test_info_system_describes_this_install():
    """Whichever way this package was installed, info --system says so and it is consistent: a
    source install is native with its CPU backend linked in; a wheel dispatches to a variant it ships,
    loaded from inside the package."""
    info = sysinfo.system_info()
    record = json.loads((PACKAGE_DIR / "build_info.json").read_text())
    lib = runtime.lib_dir().resolve()
    assert [b.name for b in info.backends].count("CPU") == 1
    assert info.cpu_library is not None and pathlib.Path(info.cpu_library).resolve().parent == lib
    if record["wheel"]:
        assert info.build == "dispatching" and not record["ggml_native"]
        assert info.cpu_variant in info.cpu_variants_shipped
    else:
        # a source install (scripts/install.sh) keeps -march=native
        assert record["ggml_native"] and not record["backend_dl"]
        assert info.build == "native" and info.cpu_variant is None and info.cpu_variants_shipped == []


def test_loading_backends_twice_registers_them_once():
    runtime.load()
    before = [b.name for b in backends.registered(runtime.lib_dir())]
    backends.load(runtime.lib_dir())
    assert [b.name for b in backends.registered(runtime.lib_dir())] == before


def test_info_system_cli():
    r = cli("info", "--system")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^build: (native|dispatching) ", r.stdout, re.M), r.stdout
    assert re.search(r"^CPU variant loaded: \S+", r.stdout, re.M), r.stdout
    assert re.search(r"^  CPU: ", r.stdout, re.M), r.stdout
    j = cli("info", "--system", "--json")
    assert j.returncode == 0, j.stderr
    d = json.loads(j.stdout)
    assert d["build"] in ("native", "dispatching") and any(b["name"] == "CPU" for b in d["backends"])


def test_info_system_takes_no_model(tmp_path):
    assert_one_line_error(cli("info", "--system", tmp_path / "m.gguf"), "--system")
    # without --system, info still wants a model
    assert_one_line_error(cli("info"), "MODEL")
