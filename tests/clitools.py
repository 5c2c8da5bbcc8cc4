"""Running the real `steer-gguf` CLI from tests."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

import steer_gguf

# the subprocess must run the very package these tests imported (installed, or a source
# tree with its native parts built in place), never whatever `python -m` finds in the cwd
NEUTRAL_CWD = tempfile.gettempdir()
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(pathlib.Path(steer_gguf.__file__).resolve().parent.parent)] +
    ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))


def cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steer_gguf", *map(str, args)], capture_output=True,
                          text=True, cwd=NEUTRAL_CWD, env=ENV, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r.stdout
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("steer-gguf: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
