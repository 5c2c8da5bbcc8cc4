"""Checks on built wheels, for scripts/build_wheels.sh and scripts/check_wheels.sh.

  wheel_check.py no-shared-lib WHEEL      fail if WHEEL holds a native library (.so, .dylib, .dll, .pyd)
  wheel_check.py sizes DIR...             one line per wheel: its size in MiB and name
  wheel_check.py pip-built-nothing LOG    fail if a pip log shows anything but wheels being installed
"""
from __future__ import annotations

import pathlib
import re
import sys
import zipfile

_NATIVE = re.compile(r"\.(so(\.\d+)*|dylib|dll|pyd)$")
# what pip prints when it builds or prepares a source distribution
_BUILDS = re.compile(r"Building wheel|Running setup\.py|Preparing metadata \(pyproject\.toml\)|"
                     r"Getting requirements to build|Building editable|\.tar\.gz|\.zip\b")


def native_libraries(wheel: pathlib.Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return [n for n in z.namelist() if _NATIVE.search(n)]


def pip_build_lines(log: str) -> list[str]:
    """The lines of a pip log that show a build from source (none where only wheels installed)."""
    return [line for line in log.splitlines() if _BUILDS.search(line)]


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "no-shared-lib":
        bad = {w: native_libraries(pathlib.Path(w)) for w in argv[1:]}
        bad = {w: libs for w, libs in bad.items() if libs}
        for w, libs in bad.items():
            print(f"wheel_check: {w} holds native libraries: {', '.join(libs)}", file=sys.stderr)
        return 1 if bad else 0
    if len(argv) >= 2 and argv[0] == "sizes":
        for d in argv[1:]:
            for w in sorted(pathlib.Path(d).glob("*.whl")):
                print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w}")
        return 0
    if len(argv) == 2 and argv[0] == "pip-built-nothing":
        lines = pip_build_lines(pathlib.Path(argv[1]).read_text(errors="replace"))
        for line in lines:
            print(f"wheel_check: pip built from source: {line.strip()}", file=sys.stderr)
        return 1 if lines else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
