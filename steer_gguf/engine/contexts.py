"""A steering profile put in force on one llama.cpp context, by either engine, and second
contexts on a model's weights: the one apply path that SteeredLlama, tracing and batched
generation share."""
from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SteerError
from ..model import ModelInfo
from ..profile import Profile
from . import runtime

if TYPE_CHECKING:
    from .steered import SteeredLlama

llama_cpp, _native = runtime.load()

_STATUS_NAMES = {code: name for name, code in _native.STATUS.items()}


def check_status(rc: int, msg: str, what: str) -> None:
    """A steer.h status as a SteerError naming what was rejected (nothing changed on error)."""
    if rc != _native.STATUS["OK"]:
        raise SteerError(f"{what}: rejected by llama.cpp ({_STATUS_NAMES.get(rc, rc)}): {msg}")


def secondary_context(llm: SteeredLlama, n_ctx: int, n_seq: int, what: str):
    """Another llama.cpp context on llm's weights (threads, KV types and offload as llm's)
    for n_seq sequences in one unified KV stream and batches of up to n_ctx tokens:
    (LlamaContext, its pointer). One unified stream keeps llama.cpp's simple batch split,
    so the routing recorder sees tokens in batch order."""
    from llama_cpp import _internals as internals

    p = llama_cpp.llama_context_default_params()
    for name in ("n_threads", "n_threads_batch", "type_k", "type_v", "offload_kqv", "flash_attn_type"):
        if hasattr(llm.context_params, name):
            setattr(p, name, getattr(llm.context_params, name))
    p.n_ctx = n_ctx
    p.n_batch = n_ctx
    p.n_ubatch = min(n_ctx, 512)
    p.n_seq_max = n_seq
    p.kv_unified = True
    try:
        ctx = internals.LlamaContext(model=llm._model, params=p, verbose=llm.verbose)
    except ValueError:
        raise SteerError(f"llama.cpp could not make a {n_ctx}-token {what} context (out of memory?): "
                         f"use shorter conversations or a smaller batch") from None
    return ctx, ctypes.cast(ctx.ctx, ctypes.c_void_p).value


def install_steering(ptr: int, observer, engine: str, info: ModelInfo, p: Profile | None) -> bool:
    """Put `p` (None: upstream routing) in force on one llama.cpp context, with the engine's
    mechanism, and return whether the observer now steers (hook engine). On error nothing
    has changed: the previous steering stays in force, so a caller's record of the profile
    in force stays true."""
    if p is None:
        _native.clear_table(ptr)
        observer.clear_hook()
        return False
    actions, bias = p.to_arrays(info, _native.ACTIONS)
    if engine == "graph":
        rc, msg = _native.set_table(ptr, actions, bias, float(p.eps), p.topk_array(info))
        check_status(rc, msg, f"profile {p.name!r}")  # llama_steer_set leaves the previous table in place
        observer.clear_hook()
        return False
    if p.topk is not None:
        # the hook rewrites tensors of a graph already built for the model's k
        raise SteerError(f"profile {p.name!r}: topk (experts per token) needs the graph engine, not the hook engine")
    if bias is None:
        bias = np.zeros(actions.shape, dtype=np.float32)
    observer.set_hook(actions, bias, float(p.eps), info.logit_stage, info.select_stage, info.n_expert_groups > 1)
    _native.clear_table(ptr)
    return True
