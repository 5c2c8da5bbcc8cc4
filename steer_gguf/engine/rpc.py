"""llama.cpp's RPC backend: layers offloaded to `rpc-server` processes on other machines.

connect(["HOST:PORT", ...]) registers each server's devices with llama.cpp for this whole
process; a model loaded afterwards with n_gpu_layers > 0 puts its last layers on them (llama.cpp
lists RPC devices first, and splits across several by their free memory or tensor_split).
Steering, tracing and slots work as on a GPU: layers on a remote device take the portable op
chain, never the CPU custom op. STEER_GGUF_RPC="HOST:PORT,..." does the same for every
SteeredLlama (and the CLI's --rpc).

A server that stops answering without closing the connection (a frozen machine, a suspended
process) would leave llama.cpp's client waiting for ever: every connection to a registered server
gets a send/receive timeout (STEER_GGUF_RPC_TIMEOUT seconds, default 300, 0 for none), after which
the process ends with one error line, as it does when a server dies.
"""
from __future__ import annotations

import math
import os
import pathlib
import socket
import stat
import struct
import sys
from typing import Iterable

from ..errors import SteerError
from ..fileio import PACKAGE_DIR

ENV = "STEER_GGUF_RPC"
TIMEOUT_ENV = "STEER_GGUF_RPC_TIMEOUT"
# the longest one request may wait for its answer: a graph computed on a slow remote CPU answers
# within it, a server that froze does not
DEFAULT_TIMEOUT = 300.0
_registered: set[str] = set()


def parse_endpoints(spec: str | Iterable[str]) -> list[str]:
    """'HOST:PORT,HOST:PORT' (or a list of them) as checked endpoints, in order, each once."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        e = str(raw).strip()
        if not e:
            continue
        host, sep, port = e.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SteerError(f"RPC server {e!r}: expected HOST:PORT (e.g. 192.168.1.20:50052)")
        if e not in out:
            out.append(e)
    if not out:
        raise SteerError("no RPC server given: expected HOST:PORT[,HOST:PORT...]")
    return out


def _probe(endpoint: str, timeout: float) -> None:
    # ggml's RPC client aborts the process on a server it cannot reach; ask first
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise SteerError(f"RPC server {endpoint}: cannot connect ({reason}); start it there with "
                         f"`rpc-server -H HOST -p PORT`") from None


def connect(endpoints: str | Iterable[str], timeout: float = 5.0) -> dict[str, int]:
    """Register the servers' devices with llama.cpp (once per endpoint, for the process).
    Returns {endpoint: devices added now} (0 for one registered before)."""
    from .runtime import load

    _, native = load()
    if not native.rpc_available():
        raise SteerError("this steer-gguf build has no RPC backend: reinstall with CMAKE_ARGS=-DGGML_RPC=ON "
                         "(see docs/rpc.md)")
    added: dict[str, int] = {}
    for e in parse_endpoints(endpoints):
        if e in _registered:
            added[e] = 0  # its connection is ours already: a probe would queue behind it
            continue
        _probe(e, timeout)
        n, err = native.rpc_add_server(e)
        if err:
            raise SteerError(f"RPC server {e}: {err}")
        _registered.add(e)
        added[e] = n
    bound_waits()
    return added


def answer_timeout() -> float:
    """Seconds a request to a server may wait (STEER_GGUF_RPC_TIMEOUT; 0: for ever)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not (v >= 0 and math.isfinite(v)):
        raise SteerError(f"{TIMEOUT_ENV}: expected seconds >= 0 (0 waits for ever), got {raw!r}")
    return v


def _peers() -> set[tuple[str, int]]:
    out = set()
    for e in _registered:
        host, _, port = e.rpartition(":")
        try:
            for *_, addr in socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM):
                out.add((addr[0], addr[1]))
        except OSError:
            pass
    return out


def bound_waits(seconds: float | None = None) -> int:
    """Give this process's connections to the registered servers a send/receive timeout (ggml's
    client opens them itself, so they are found among the process's sockets by their peer).
    Returns how many were set; 0 where there is nothing to do or no way to list the sockets."""
    # not runtime.load(): it routes ggml's log again, over the handler that rpc_add_server put
    # there to catch the client's last words
    from .. import _native

    if not _registered:
        return 0
    seconds = answer_timeout() if seconds is None else seconds
    fd_dir = next((d for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), None)
    if seconds <= 0 or fd_dir is None or sys.platform == "win32":
        return 0
    _native.rpc_set_timeout(float(seconds))
    peers = _peers()
    whole = int(seconds)
    tv = struct.pack("ll", whole, int(round((seconds - whole) * 1e6)))
    n = 0
    for name in os.listdir(fd_dir):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            dup = os.dup(fd)  # a duplicate to wrap: options are the socket's, shared by both
        except (OSError, ValueError):
            continue
        try:
            s = socket.socket(fileno=dup)
        except (OSError, ValueError):
            os.close(dup)
            continue
        try:
            if s.type == socket.SOCK_STREAM and tuple(s.getpeername()[:2]) in peers:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
                n += 1
        except OSError:
            pass
        finally:
            s.close()
    return n


def connect_from_env() -> dict[str, int]:
    """connect() to the servers STEER_GGUF_RPC names, if it names any."""
    spec = os.environ.get(ENV, "").strip()
    return connect(spec) if spec else {}


def server_binary() -> pathlib.Path | None:
    """The rpc-server built with this package (an RPC build installs it), or None."""
    p = PACKAGE_DIR / "bin" / "rpc-server"
    return p if p.is_file() and os.access(p, os.X_OK) else None


def main(argv: list[str]) -> None:
    """`python -m steer_gguf.engine.rpc [rpc-server options]`: run the bundled rpc-server."""
    binary = server_binary()
    if binary is None:
        raise SystemExit("steer-gguf: error: this build installed no rpc-server: reinstall with "
                         "CMAKE_ARGS=-DGGML_RPC=ON (see docs/rpc.md)")
    os.execv(binary, [str(binary), *argv])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
