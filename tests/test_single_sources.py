"""Facts kept in one place (issue 11): the llama-cpp-python pin lives in pyproject.toml and
everything else reads it from there; the C API's codes come from the native module."""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

from steer_gguf import profile

from steer_gguf.engine import runtime

import llama_cpp  # isort: skip  (after steer_gguf, which points it at the patched library)

ROOT = pathlib.Path(__file__).resolve().parent.parent
_, native = runtime.load()


def pin() -> str:
    m = re.search(r'^\s*"llama-cpp-python==([^"]+)",?$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert m, "pyproject.toml must pin llama-cpp-python"
    return m.group(1)


def test_the_pin_has_one_home():
    assert native.LLAMA_CPP_PYTHON_VERSION == pin() == llama_cpp.__version__
    # the build and the installer read it from pyproject.toml instead of repeating it
    for f in ("CMakeLists.txt", "scripts/install.sh"):
        assert pin() not in (ROOT / f).read_text(), f
    # the README's install commands name it, and so do docs pages (offline builds): they are
    # copied by hand, and every copy must name this one
    version = r"llama-cpp-python[= ]=?([0-9][0-9A-Za-z.+]*[0-9A-Za-z])"
    assert set(re.findall(version, (ROOT / "README.md").read_text())) == {pin()}
    for page in sorted((ROOT / "docs").glob("*.md")):
        named = set(re.findall(version, page.read_text()))
        assert named <= {pin()}, (page.name, named)


def test_the_installer_finds_the_pin():
    line = next(l for l in (ROOT / "scripts/install.sh").read_text().splitlines() if l.startswith("LLAMA_CPP_PYTHON="))
    r = subprocess.run(["bash", "-c", line + '; printf %s "$LLAMA_CPP_PYTHON"'], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.stdout == pin(), r.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_finds_the_pin(tmp_path):
    text = (ROOT / "CMakeLists.txt").read_text()
    start = text.index("file(READ \"${CMAKE_CURRENT_SOURCE_DIR}/pyproject.toml\"")
    end = text.index("set(STEER_LLAMA_CPP_PYTHON_VERSION", start)
    script = tmp_path / "pin.cmake"
    script.write_text(text[start:text.index("\n", end) + 1].replace("${CMAKE_CURRENT_SOURCE_DIR}", str(ROOT))
                      + 'message(STATUS "pin=${STEER_LLAMA_CPP_PYTHON_VERSION}")\n')
    r = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True)
    assert f"pin={pin()}" in r.stdout + r.stderr, r.stdout + r.stderr


def test_c_api_codes_come_from_the_module():
    header = (ROOT / "csrc/steer.h").read_text()
    for name, code in native.STATUS.items():
        assert re.search(rf"LLAMA_STEER_{name}\s*=\s*{code}\b", header), name
    assert set(native.STATUS) == set(re.findall(r"LLAMA_STEER_(OK|ERR_\w+)\s*=", header))
    assert set(profile.ACTIONS) == set(native.ACTIONS) - {"none"}
