"""steer-gguf: steer Mixture-of-Experts GGUF models by their experts (SteerMoE for llama.cpp).

Importing this package points llama-cpp-python at steer-gguf's patched libllama; the
native parts load on first use of SteeredLlama.
"""
from __future__ import annotations

import os as _os

from .engine import runtime as _runtime
from .errors import SteerError
from .model import ModelInfo, model_info
from .profile import BiasRule, ExpertRule, LayerK, ModelRef, Profile
from .trace import RoutingTrace

if "llama_cpp" not in __import__("sys").modules:
    _os.environ["LLAMA_CPP_LIB_PATH"] = str(_runtime.lib_dir())

# eager, as before the subpackages: importing the package loads the patched library (through
# the engine these use), so a llama_cpp imported first on another library is refused here
from .evaluation.audit import audit  # noqa: E402
from .evaluation.measure import EvalReport, Sampling, evaluate  # noqa: E402
from .evaluation.tune import tune  # noqa: E402

__version__ = "0.1.0"
# loaded on first use: name -> module under the package
_LAZY = {"SteeredLlama": "engine.steered", "BatchEngine": "engine.batch", "Request": "engine.batch",
         "SamplerSpec": "engine.batch", "GenJob": "engine.batch",
         "generate_batch": "engine.batch", "load_eval_set": "evaluation.evalsets",
         "behavior": "evaluation.judges", "GGUFJudge": "evaluation.judges", "bake_profile": "bake.write",
         "fetch_model": "hub"}
__all__ = ["SteerError", "ModelInfo", "model_info", "Profile", "ModelRef", "ExpertRule", "BiasRule", "LayerK",
           "RoutingTrace", "evaluate", "Sampling", "EvalReport", "tune", "audit", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
