"""Make llama-cpp-python run on our patched libllama, and load the native bridge.

llama-cpp-python picks its library when `llama_cpp` is first imported (LLAMA_CPP_LIB_PATH),
so this must run before anything imports `llama_cpp`.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pathlib
import sys

from ..errors import SteerError
from ..fileio import PACKAGE_DIR
from . import backends


def lib_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("STEER_GGUF_LIB_DIR") or PACKAGE_DIR / "lib")


def _loaded_lib_path(llama_cpp_module) -> str | None:
    lib = getattr(getattr(llama_cpp_module, "llama_cpp", None), "_lib", None)
    return getattr(lib, "_name", None)


def load():
    """Import llama_cpp on our library and return (llama_cpp, _native)."""
    d = lib_dir()
    if not any(d.glob("*llama.*")):
        raise SteerError(f"steer-gguf's patched libllama is missing from {d}: reinstall with `pip install .` "
                         f"(or set STEER_GGUF_LIB_DIR)")
    if "llama_cpp" in sys.modules:
        loaded = _loaded_lib_path(sys.modules["llama_cpp"])
        if loaded is None or pathlib.Path(loaded).resolve().parent != d.resolve():
            raise SteerError(f"llama_cpp was imported before steer_gguf and uses another library ({loaded}); "
                             f"import steer_gguf first, before llama_cpp")
    else:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(d)
    import llama_cpp

    try:
        from .. import _native
    except ImportError as e:
        raise SteerError(f"steer-gguf's native module failed to load ({e}); reinstall with `pip install .`") from None
    if llama_cpp.__version__ != _native.LLAMA_CPP_PYTHON_VERSION:
        raise SteerError(f"llama-cpp-python {llama_cpp.__version__} is installed but steer-gguf was built for "
                         f"{_native.LLAMA_CPP_PYTHON_VERSION}: pip install llama-cpp-python=={_native.LLAMA_CPP_PYTHON_VERSION} "
                         f"(see README: install it without its own native build)")
    _route_log(llama_cpp)
    # a wheel's backends are modules in lib/: registered before llama_backend_init looks elsewhere.
    # ggml says which CPU variant it loaded at INFO, before any Llama(verbose=False) quiets the log:
    # `steer-gguf info --system` says it instead
    from llama_cpp import _logger

    level = _logger.logger.level
    _logger.logger.setLevel(max(level, logging.WARNING))
    try:
        backends.load(d)
    finally:
        _logger.logger.setLevel(level)
    return llama_cpp, _native


# ggml's log levels in the llama.cpp we build (ggml.h): the pinned llama-cpp-python maps an older
# numbering, which shows every warning even with verbose=False
_GGML_TO_LOGGING = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_log_state = {"last": logging.ERROR}


def _route_log(llama_cpp) -> None:
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        lvl = _log_state["last"] if level == 5 else _GGML_TO_LOGGING.get(level, logging.ERROR)  # 5: continuation
        _log_state["last"] = lvl
        if _logger.logger.level <= lvl:
            print(text.decode("utf-8", errors="replace"), end="", flush=True, file=sys.stderr)

    _log_state["callback"] = callback  # ctypes must keep it alive
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
