"""Atomic file writes: an error or Ctrl-C never leaves a half-written output."""
from __future__ import annotations

import os
import tempfile

from .errors import SteerError


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise SteerError(f"{path}: directory {d} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".steer-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
