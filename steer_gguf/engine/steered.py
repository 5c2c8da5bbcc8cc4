"""SteeredLlama: a llama_cpp.Llama whose MoE routing follows a steering profile."""
from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator

import numpy as np

from ..errors import SteerError
from ..grammar import check_grammar
from ..model import NOT_RUNNABLE, ModelInfo, model_info
from ..profile import Profile, as_profile, with_topk
from .contexts import _native, install_steering, llama_cpp
from .locking import ModelLock
from .rpc import bound_waits as rpc_bound_waits
from .rpc import connect as rpc_connect
from .rpc import connect_from_env as rpc_connect_from_env
from .threads import ThreadGovernor, physical_cores
from .tracing import RECORDERS, Recorder, Tracing, recorder_kw

ENGINES = ("graph", "hook")


class SteeredLlama(Tracing, llama_cpp.Llama):
    """A `llama_cpp.Llama` with expert steering.

    engine="graph" steers inside llama.cpp's MoE gating (the patched graph: no extra cost
    on unsteered layers, works with every backend); engine="hook" rewrites the router
    logits from the scheduler's eval callback instead (slower; the test oracle).
    recorder="graph" records routing from the graph's own outputs; recorder="callback" through
    the eval callback (slower; the test oracle of the first).

    rpc="HOST:PORT,...": llama.cpp rpc-server processes whose devices take the offloaded layers
    (n_gpu_layers), for the whole process (engine/rpc.py); STEER_GGUF_RPC does the same.

    Safe to share between threads: generation, tracing and profile switches take one lock.
    """

    def __init__(self, model_path: str | os.PathLike, profile: Profile | str | os.PathLike | None = None, *,
                 engine: str = "graph", force: bool = False, recorder: str = "graph", topk: int | None = None,
                 rpc: str | list[str] | None = None, **llama_kwargs):
        if engine not in ENGINES:
            raise SteerError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if recorder not in RECORDERS:
            raise SteerError(f"recorder must be one of {', '.join(RECORDERS)}, got {recorder!r}")
        self.info: ModelInfo = model_info(model_path)
        if self.info.architecture in NOT_RUNNABLE:
            raise SteerError(f"{model_path}: {self.info.architecture} {NOT_RUNNABLE[self.info.architecture]} "
                             f"(not supported)")
        llama_kwargs.setdefault("verbose", False)
        # no thread count given: as many as the cores other processes leave free, per decode
        # (engine/threads.py); a count given is kept as given
        self.governor: ThreadGovernor | None = None
        if llama_kwargs.get("n_threads") is None and llama_kwargs.get("n_threads_batch") is None:
            n = physical_cores()
            llama_kwargs["n_threads"] = llama_kwargs["n_threads_batch"] = n
            self.governor = ThreadGovernor(n, n)
        if "n_ctx" in llama_kwargs and llama_kwargs["n_ctx"] is None:
            # None: the model's own training context, capped where the KV cache gets large
            llama_kwargs["n_ctx"] = min(4096, self.info.n_ctx_train or 4096)
        from llama_cpp import _logger
        _logger.set_verbose(bool(llama_kwargs["verbose"]))
        # rpc="HOST:PORT,...": those servers' devices join the offload targets (docs/rpc.md)
        if rpc:
            rpc_connect(rpc)
        else:
            rpc_connect_from_env()
        try:
            # info.path: a split model's first part, which llama.cpp wants whichever part was named
            super().__init__(model_path=self.info.path, **llama_kwargs)
        except ValueError as e:
            raise SteerError(f"{model_path}: llama.cpp could not load the model ({e})") from None
        rpc_bound_waits()  # connections the load opened to RPC servers get their timeout too
        if not llama_cpp.llama_get_memory(self._ctx.ctx):
            # encoders (nomic-bert-moe) and diffusion models: no KV cache, which tracing and
            # generation here need
            arch = self.info.architecture
            super().close()
            raise SteerError(f"{model_path}: llama.cpp runs {arch} without KV memory (an encoder or embedding "
                             f"model); steer-gguf's generation and tracing need it (not supported)")
        self._fit_arrays_to_context()
        self.engine = engine
        self.recorder = recorder
        self.force = force
        self.profile: Profile | None = None
        self.lock = ModelLock()
        self._observer = _native.Observer(self.info.n_layer)
        self._recorder = Recorder(self._ctx_ptr, self._observer, self.info.n_layer, recorder, weights=True,
                                  **recorder_kw(self.info.architecture))
        # topk=K: K experts per token in every MoE layer, on top of the profile if any
        self.set_profile(with_topk(profile, topk, self.info))

    def _fit_arrays_to_context(self) -> None:
        # llama.cpp rounds the context up (to 256 tokens here); llama-cpp-python checks prompts
        # against that real size but sized its token buffer for the size asked for, so a
        # prompt in between fails with a numpy broadcast error deep inside eval
        n = self.n_ctx()
        if self.input_ids.shape[0] < n:
            ids = np.zeros(n, dtype=self.input_ids.dtype)
            ids[: self.input_ids.shape[0]] = self.input_ids
            self.input_ids = ids
        if self._logits_all and self.scores.shape[0] < n:
            scores = np.zeros((n, self.scores.shape[1]), dtype=self.scores.dtype)
            scores[: self.scores.shape[0]] = self.scores
            self.scores = scores

    def close(self) -> None:
        if getattr(self, "_stack", None) is None:
            return  # __init__ failed before llama.cpp was involved
        if getattr(self, "_tctx", None) is not None:
            self._tctx.close()
            self._tctx = None
        if getattr(self, "_recorder", None) is not None and getattr(self._ctx, "ctx", None):
            self._recorder.close()
        super().close()

    def __del__(self) -> None:
        self.close()

    # ---- thread safety -------------------------------------------------------------------
    # one lock around generation and profile switches: a streamed answer holds it for the
    # generator's whole life, so no other thread can switch the profile mid-answer
    def create_completion(self, *args, **kwargs):
        if not kwargs.get("stream", False):
            with self.lock:
                return super().create_completion(*args, **kwargs)
        return self._locked(lambda: super(SteeredLlama, self).create_completion(*args, **kwargs))

    def create_chat_completion(self, *args, **kwargs):
        if not kwargs.get("stream", False):
            with self.lock:
                return super().create_chat_completion(*args, **kwargs)
        return self._locked(lambda: super(SteeredLlama, self).create_chat_completion(*args, **kwargs))

    def _locked(self, make):
        return self.lock.hold_while(make)

    def eval(self, tokens) -> None:
        self.govern(self._ctx.ctx)
        super().eval(tokens)

    def govern(self, ctx) -> None:
        """Before a decode on any context of this model: the thread counts for now."""
        if self.governor is not None:
            self.governor.apply(ctx)

    def _init_sampler(self, *args, **kwargs):
        # llama.cpp hands back NULL for a grammar it cannot parse, and llama-cpp-python puts
        # that NULL into the sampler chain: check first, so a bad grammar is an error, not a crash
        grammar = kwargs.get("grammar")
        if grammar is not None:
            self.check_grammar(grammar._grammar, grammar._root)
        return super()._init_sampler(*args, **kwargs)

    def check_grammar(self, grammar: str, root: str = "root") -> None:
        """Raise SteerError unless llama.cpp can sample with this GBNF grammar."""
        check_grammar(self._model.vocab, grammar, root)

    # ---- steering ------------------------------------------------------------------------
    @property
    def _ctx_ptr(self) -> int:
        return ctypes.cast(self._ctx.ctx, ctypes.c_void_p).value

    def set_profile(self, profile: Profile | str | os.PathLike | None, force: bool | None = None) -> None:
        """Switch steering; None (or an empty profile) restores upstream routing. Takes
        effect on the next decode; cached prompt state is dropped so no token keeps routing
        computed under the previous profile."""
        p = as_profile(profile)
        if p is not None:
            p.check(self.info, force=self.force if force is None else force)
            if p.is_empty:
                p = None
        with self.lock:
            self._apply(p)
            self.profile = p
            self.reset()

    def _apply(self, p: Profile | None) -> None:
        self._recorder.set_hooking(install_steering(self._ctx_ptr, self._observer, self.engine, self.info, p))

    @contextlib.contextmanager
    def steering(self, profile: Profile | str | os.PathLike | None) -> Iterator["SteeredLlama"]:
        """Temporarily steer with `profile`, restoring the previous one afterwards."""
        with self.lock:
            old = self.profile
            self.set_profile(profile)
            try:
                yield self
            finally:
                self.set_profile(old, force=True)

    # ---- chat template -------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, bool]:
        """Render messages with the model's own chat template: (text, template_added_bos)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise SteerError(f"{self.model_path}: the model has no chat template (tokenizer.chat_template)")
        eos = self._model.token_get_text(self._model.token_eos()) if self._model.token_eos() >= 0 else ""
        bos = self._model.token_get_text(self._model.token_bos()) if self._model.token_bos() >= 0 else ""
        fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                  add_generation_prompt=add_generation_prompt)
        try:
            r = fmt(messages=messages)
        except Exception as e:
            raise SteerError(f"chat template failed on these messages: {e}".splitlines()[0]) from None
        return r.prompt, bool(getattr(r, "added_special", False))

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        text, added = self.render_chat(messages, add_generation_prompt)
        return self.tokenize(text.encode("utf-8"), add_bos=not added, special=True)
