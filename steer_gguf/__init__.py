"""steer-gguf: steer Mixture-of-Experts GGUF models by their experts (SteerMoE for llama.cpp).

Importing this package points llama-cpp-python at steer-gguf's patched libllama; the
native parts load on first use of SteeredLlama.
"""
from __future__ import annotations

import os as _os

from . import runtime as _runtime
from .errors import SteerError
from .model import ModelInfo, model_info
from .profile import BiasRule, ExpertRule, ModelRef, Profile
from .trace import RoutingTrace

if "llama_cpp" not in __import__("sys").modules:
    _os.environ["LLAMA_CPP_LIB_PATH"] = str(_runtime.lib_dir())

__version__ = "0.1.0"
__all__ = ["SteerError", "ModelInfo", "model_info", "Profile", "ModelRef", "ExpertRule", "BiasRule",
           "RoutingTrace", "SteeredLlama"]


def __getattr__(name: str):
    if name == "SteeredLlama":
        from .steered import SteeredLlama
        return SteeredLlama
    raise AttributeError(name)
