"""Reading user files with bounds, and writing outputs atomically.

Every input file goes through read_bytes/read_json: one place decides what a bad file looks
like to the user (one line naming it), whatever the failure (missing, a directory, a FIFO,
/dev/zero, not UTF-8, JSON nested too deep, an integer of 10,000 digits, a lone surrogate).
Every output goes through atomic_write: an error or Ctrl-C never leaves a half-written file.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import pathlib
import stat
import tempfile
from typing import Any, Iterator

from .errors import SteerError

# the installed package: its data/, lib/ and models.txt sit here
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "data"

MiB = 1024 * 1024
# far above any profile, trace request or message list; big enough for pair datasets of
# hundreds of thousands of lines
MAX_JSON_BYTES = 64 * MiB
MAX_DATASET_BYTES = 1024 * MiB
# json's C decoder recurses per nesting level; no file of ours nests more than a few levels
MAX_JSON_DEPTH = 64


def read_bytes(path: str | os.PathLike, what: str = "file", limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole content of a regular file of at most `limit` bytes."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SteerError(f"{path}: no such {what}") from None
    except OSError as e:
        raise SteerError(f"{path}: cannot read: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SteerError(f"{path}: is a directory, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        # a FIFO blocks until someone writes, a device like /dev/zero never ends
        raise SteerError(f"{path}: not a regular file (a pipe, device or socket)")
    if st.st_size > limit:
        raise SteerError(f"{path}: {st.st_size / MiB:.0f} MiB, more than the {limit // MiB} MiB a {what} may have")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise SteerError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > limit:
        raise SteerError(f"{path}: more than the {limit // MiB} MiB a {what} may have")
    return data


def decode_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SteerError(f"{where}:{line}: not UTF-8 text") from None


def parse_json(text: str, where: str, one_line: bool = False) -> Any:
    """json.loads, with every way it can fail (and every value our readers cannot use) as one
    SteerError naming `where` (with one_line, `where` names the line already: FILE:LINE)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if one_line:
            raise SteerError(f"{where}: bad JSON: {e.msg} (column {e.colno})") from None
        raise SteerError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise SteerError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise SteerError(f"{where}: not usable JSON ({str(e).splitlines()[0]})") from None
    check_json_value(data, where, MAX_JSON_DEPTH)
    return data


def check_json_value(data: Any, where: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse nesting deeper than max_depth and strings that are not valid Unicode (a JSON
    \\ud800 escape decodes to a lone surrogate, which no printer or tokenizer accepts)."""
    stack = [(data, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > max_depth:
            raise SteerError(f"{where}: JSON nested more than {max_depth} levels deep")
        if isinstance(v, str):
            _check_unicode(v, where)
        elif isinstance(v, dict):
            for k, x in v.items():
                _check_unicode(k, where)
                stack.append((x, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def _check_unicode(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SteerError(f"{where}: a string holds a lone surrogate ({s[e.start]!r}): not valid Unicode") from None


def read_json(path: str | os.PathLike, what: str = "file", limit: int = MAX_JSON_BYTES) -> Any:
    path = os.fspath(path)
    return parse_json(decode_text(read_bytes(path, what, limit), path), path)


def check_output(path: str | os.PathLike, what: str = "output") -> str:
    """Fail now, before any work or any other output, if `path` cannot be written."""
    path = os.fspath(path)
    if not path:
        raise SteerError(f"the {what} file name is empty")
    if os.path.isdir(path):
        raise SteerError(f"{path}: is a directory; give a file name for the {what}")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise SteerError(f"{path}: directory {d} does not exist")
    if os.path.exists(path) and not os.path.isfile(path):
        raise SteerError(f"{path}: exists and is not a regular file")
    # the only sure test of a directory (read-only mounts, /proc, /sys, root's access()
    # saying yes to everything) is to make a file there
    try:
        fd, probe = tempfile.mkstemp(prefix=".steer-", dir=d)
    except OSError as e:
        raise SteerError(f"{path}: cannot write in {d}: {e.strerror or e}") from None
    os.close(fd)
    _unlink(probe)
    return path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    path = check_output(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with temp_beside(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        publish(tmp, path)


@contextlib.contextmanager
def temp_beside(path: str, suffix: str = "") -> Iterator[str]:
    """A temporary file in `path`'s directory (so the rename into place is atomic), removed
    unless published; an OSError becomes one line naming `path`."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".steer-", suffix=suffix, dir=d)
    except OSError as e:
        raise SteerError(f"{path}: cannot write: {e.strerror}") from None
    os.close(fd)
    try:
        yield tmp
    except OSError as e:
        _unlink(tmp)
        raise SteerError(f"{path}: cannot write: {e.strerror or e}") from None
    except BaseException:
        _unlink(tmp)
        raise


@contextlib.contextmanager
def temp_dir_beside(path: str) -> Iterator[str]:
    """A temporary folder in `path`'s directory for outputs of several files (a split GGUF),
    removed with whatever is still in it when the block ends."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        tmp = tempfile.mkdtemp(prefix=".steer-", dir=d)
    except OSError as e:
        raise SteerError(f"{path}: cannot write: {e.strerror}") from None
    try:
        yield tmp
    except OSError as e:
        raise SteerError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: str, path: str) -> None:
    """Move a finished temporary file into place, with the mode any new file would get
    (mkstemp makes it 0600)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def _unlink(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _read_umask() -> int:
    # reading the umask means setting it: done once, at import, before any thread runs
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
