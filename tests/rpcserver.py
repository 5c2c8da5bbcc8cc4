"""llama.cpp rpc-server processes on 127.0.0.1 for the RPC tests and benchmarks/rpc_check.py."""
from __future__ import annotations

import ctypes
import pathlib
import signal
import socket
import subprocess
import sys
import time


def _die_with_parent() -> None:
    # a test process that ends abruptly (a failed RPC check exits from C) must not leave its
    # servers behind: Linux kills the child when its parent dies
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary: str | pathlib.Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start one server (one thread) and wait until it listens; returns it and its HOST:PORT."""
    port = port or free_port()
    p = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    deadline = time.monotonic() + 120  # a bound on a hang, not a speed: it listens in well under a second
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, f"127.0.0.1:{port}"
        except OSError:
            if p.poll() is not None:
                raise RuntimeError(f"rpc-server on port {port} exited with {p.returncode}") from None
            time.sleep(0.05)
    p.kill()
    raise RuntimeError(f"rpc-server on port {port} never listened")


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()
