"""Checks on built wheels, for scripts/build_wheels.sh and scripts/check_wheels.sh.

  wheel_check.py no-shared-lib WHEEL      fail if WHEEL holds a native library (.so, .dylib, .dll, .pyd)
  wheel_check.py sizes DIR...             one line per wheel: its size in MiB and name
  wheel_check.py pip-built-nothing LOG    fail if a pip log shows anything but wheels being installed
  wheel_check.py demo-steers LOG          fail unless a `steer-gguf demo` log shows each behavior's two
                                          profiles at least 50 points apart (steering took effect)
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


# "numbers (48 prompts): unsteered: 44% digits / 56% words; toward digits: 100% digits / 0% words;
#  toward words: 0% digits / 100% words"
_RATES = re.compile(r"^\s*(?P<behavior>[\w/-]+)(?: \([^)]*\))?: unsteered: \d+% (?P<s1>\w+) / \d+% \w+; "
                    r"toward (?P=s1): (?P<r1>\d+)% (?P=s1) / \d+% \w+; toward \w+: (?P<r2>\d+)% (?P=s1) ")


def demo_shifts(log: str) -> dict[str, int]:
    """Per behavior in a demo log: the points between its two profiles' rates of the first style."""
    return {m["behavior"]: int(m["r1"]) - int(m["r2"]) for line in log.splitlines() if (m := _RATES.match(line))}


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "no-shared-lib":
        bad = {w: native_libraries(pathlib.Path(w)) for w in argv[1:]}
        bad = {w: libs for w, libs in bad.items() if libs}
        for w, libs in bad.items():
            print(f"wheel_check: {w} holds native libraries: {', '.join(libs)}", file=sys.stderr)
        return 1 if bad else 0
    if len(argv) >= 2 and argv[0] == "sizes":
        for d in dict.fromkeys(pathlib.Path(d).resolve() for d in argv[1:]):
            for w in sorted(d.glob("*.whl")):
                print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w}")
        return 0
    if len(argv) == 2 and argv[0] == "pip-built-nothing":
        lines = pip_build_lines(pathlib.Path(argv[1]).read_text(errors="replace"))
        for line in lines:
            print(f"wheel_check: pip built from source: {line.strip()}", file=sys.stderr)
        return 1 if lines else 0
    if len(argv) == 2 and argv[0] == "demo-steers":
        shifts = demo_shifts(pathlib.Path(argv[1]).read_text(errors="replace"))
        weak = {b: d for b, d in shifts.items() if d < 50}
        if not shifts or weak:
            print(f"wheel_check: steering did not take effect in {argv[1]}: {weak or 'no style rates found'}",
                  file=sys.stderr)
            return 1
        print("wheel_check: steering shifts " + ", ".join(f"{b} {d} points" for b, d in shifts.items()))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
