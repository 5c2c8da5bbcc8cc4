"""ggml's backends: load them from the package in a dispatching build, and say which were loaded.

A wheel is built with GGML_BACKEND_DL: the CPU backend is not linked into libggml but sits next to
it as one module per x86-64 instruction-set level (libggml-cpu-haswell.so, ...), and ggml loads the
best one this CPU runs. ggml's own default search looks beside the executable (python's bin/) and in
the current directory, neither of which is ours, so we load from the package's lib/ by path, before
anything calls llama_backend_init. A source build links its one CPU backend in, and loading is a
no-op there.
"""
from __future__ import annotations

import ctypes
import pathlib
import re
import sys
from dataclasses import dataclass

from ..errors import SteerError

_CPU_MODULE = re.compile(r"^(?:lib)?ggml-cpu(?:-(?P<variant>[A-Za-z0-9_.]+))?\.(?:so|dylib|dll)$")


def ggml_library(lib_dir: pathlib.Path) -> pathlib.Path:
    """The path of libggml (the backend registry) in lib_dir, for this platform."""
    if sys.platform == "win32":
        return lib_dir / "ggml.dll"
    if sys.platform == "darwin":
        return lib_dir / "libggml.dylib"
    return lib_dir / "libggml.so"


def cpu_variant(path: str | pathlib.Path) -> str | None:
    """'haswell' for libggml-cpu-haswell.so; None for a single CPU backend (libggml-cpu.so) or
    a library that is no CPU backend at all."""
    m = _CPU_MODULE.match(pathlib.PurePath(path).name)
    return m.group("variant") if m else None


def cpu_variants_in(lib_dir: pathlib.Path) -> list[str]:
    """The CPU variants a dispatching build ships in lib_dir, sorted by name."""
    return sorted(v for p in lib_dir.iterdir() if (v := cpu_variant(p)) is not None)


class _Dl_info(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    vp, sz, cs = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    for name, res, args in (("ggml_backend_reg_count", sz, []), ("ggml_backend_reg_get", vp, [sz]),
                            ("ggml_backend_reg_name", cs, [vp]), ("ggml_backend_reg_by_name", vp, [cs]),
                            ("ggml_backend_reg_dev_count", sz, [vp]), ("ggml_backend_reg_dev_get", vp, [vp, sz]),
                            ("ggml_backend_dev_description", cs, [vp]),
                            ("ggml_backend_reg_get_proc_address", vp, [vp, cs]),
                            ("ggml_backend_load_all_from_path", None, [cs])):
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib


_libs: dict[pathlib.Path, ctypes.CDLL] = {}


def _ggml(lib_dir: pathlib.Path) -> ctypes.CDLL:
    # the same file libllama already pulled in, so the same registry
    path = ggml_library(lib_dir).resolve()
    if path not in _libs:
        try:
            _libs[path] = _bind(ctypes.CDLL(str(path)))
        except (OSError, AttributeError) as e:
            raise SteerError(f"cannot use ggml's backend registry in {path} ({e}); reinstall steer-gguf")
    return _libs[path]


def load(lib_dir: pathlib.Path) -> None:
    """Make sure a CPU backend is registered: in a dispatching build, load every backend module in
    lib_dir (ggml keeps the best-scoring CPU variant). Idempotent."""
    g = _ggml(lib_dir)
    if g.ggml_backend_reg_by_name(b"CPU"):
        return  # linked in (a source build), or loaded already
    g.ggml_backend_load_all_from_path(str(lib_dir).encode())
    if not g.ggml_backend_reg_by_name(b"CPU"):
        shipped = ", ".join(cpu_variants_in(lib_dir)) or "none"
        raise SteerError(f"no CPU backend in {lib_dir} runs on this CPU (variants there: {shipped}); "
                         f"reinstall steer-gguf, or build it from source (scripts/install.sh)")


@dataclass
class Backend:
    name: str               # the registry's name: CPU, Vulkan, CUDA, ...
    devices: list[str]      # each device's description


@dataclass
class CpuBackend:
    library: str | None     # the file the CPU backend's code lives in
    variant: str | None     # its instruction-set level (dispatching builds), else None
    features: dict[str, str]  # what it was compiled for (ggml_backend_get_features)


def registered(lib_dir: pathlib.Path) -> list[Backend]:
    g = _ggml(lib_dir)
    out = []
    for i in range(g.ggml_backend_reg_count()):
        reg = g.ggml_backend_reg_get(i)
        devs = [(g.ggml_backend_dev_description(g.ggml_backend_reg_dev_get(reg, j)) or b"").decode(errors="replace")
                for j in range(g.ggml_backend_reg_dev_count(reg))]
        out.append(Backend((g.ggml_backend_reg_name(reg) or b"?").decode(errors="replace"), devs))
    return out


def _library_of(address: int) -> str | None:
    info = _Dl_info()
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None  # Windows: no dladdr
    dladdr.argtypes, dladdr.restype = [ctypes.c_void_p, ctypes.POINTER(_Dl_info)], ctypes.c_int
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return info.dli_fname.decode(errors="replace")


def cpu_backend(lib_dir: pathlib.Path) -> CpuBackend | None:
    g = _ggml(lib_dir)
    reg = g.ggml_backend_reg_by_name(b"CPU")
    if not reg:
        return None
    get_features = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    features: dict[str, str] = {}
    library = None
    if get_features:
        # the function lives in the CPU backend's own library: where it is says which was loaded
        library = _library_of(get_features)
        fn = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(get_features)
        feats = fn(reg)
        i = 0
        while feats[i].name:
            features[feats[i].name.decode()] = (feats[i].value or b"").decode()
            i += 1
    return CpuBackend(library, cpu_variant(library) if library else None, features)
