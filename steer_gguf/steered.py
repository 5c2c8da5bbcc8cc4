"""SteeredLlama: a llama_cpp.Llama whose MoE routing follows a steering profile."""
from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator, Sequence

import numpy as np

from . import runtime
from .errors import SteerError
from .grammar import check_grammar
from .locking import ModelLock
from .model import ModelInfo, model_info
from .profile import Profile, as_profile
from .trace import RoutingTrace

llama_cpp, _native = runtime.load()

ENGINES = ("graph", "hook")
_STATUS_NAMES = {code: name for name, code in _native.STATUS.items()}


class SteeredLlama(llama_cpp.Llama):
    """A `llama_cpp.Llama` with expert steering.

    engine="graph" steers inside llama.cpp's MoE gating (the patched graph: no extra cost
    on unsteered layers, works with every backend); engine="hook" rewrites the router
    logits from the scheduler's eval callback instead (slower; the test oracle).

    Safe to share between threads: generation, tracing and profile switches take one lock.
    """

    def __init__(self, model_path: str | os.PathLike, profile: Profile | str | os.PathLike | None = None, *,
                 engine: str = "graph", force: bool = False, **llama_kwargs):
        if engine not in ENGINES:
            raise SteerError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.info: ModelInfo = model_info(model_path)
        llama_kwargs.setdefault("verbose", False)
        if "n_ctx" in llama_kwargs and llama_kwargs["n_ctx"] is None:
            # None: the model's own training context, capped where the KV cache gets large
            llama_kwargs["n_ctx"] = min(4096, self.info.n_ctx_train or 4096)
        from llama_cpp import _logger
        _logger.set_verbose(bool(llama_kwargs["verbose"]))
        try:
            super().__init__(model_path=os.fspath(model_path), **llama_kwargs)
        except ValueError as e:
            raise SteerError(f"{model_path}: llama.cpp could not load the model ({e})") from None
        self._fit_arrays_to_context()
        self.engine = engine
        self.force = force
        self.profile: Profile | None = None
        self.lock = ModelLock()
        self._observer = _native.Observer(self.info.n_layer)
        self._hooking = False
        self._attached = False
        self.set_profile(profile)

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
        if getattr(self, "_attached", False) and getattr(self._ctx, "ctx", None):
            self._observer.detach(self._ctx_ptr)
            self._attached = False
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
        self._hooking = install_steering(self._ctx_ptr, self._observer, self.engine, self.info, p)
        self._sync_observer()

    def _sync_observer(self) -> None:
        want = self._hooking or self._observer.record
        if want != self._attached:
            if want:
                self._observer.attach(self._ctx_ptr)
            else:
                self._observer.detach(self._ctx_ptr)
            self._attached = want

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

    # ---- routing trace -------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self) -> Iterator["RoutingLog"]:
        """Record the routing of every decode inside the block (generation included).
        Holds the lock for the whole block."""
        log = RoutingLog(list(self.info.moe_layers))
        with self.lock:
            self._observer.clear_records()
            self._observer.record = True
            self._sync_observer()
            try:
                yield log
            finally:
                rec = self._observer.take()
                self._observer.record = False
                self._sync_observer()
                log.per_layer = {il: rec[il][0] for il in rec}

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

    def trace(self, tokens: Sequence[int] | None = None, text: str | None = None,
              messages: list[dict] | None = None, add_generation_prompt: bool = False) -> RoutingTrace:
        """Prefill one sequence and record the experts every token was routed to in every
        MoE layer (under the current profile)."""
        given = [x is not None for x in (tokens, text, messages)]
        if sum(given) != 1:
            raise SteerError("trace takes exactly one of tokens=, text=, messages=")
        if text is not None:
            toks = self.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        elif messages is not None:
            toks = self.chat_tokens(messages, add_generation_prompt)
        else:
            toks = [int(t) for t in tokens]
        if not toks:
            raise SteerError("nothing to trace: no tokens")
        if len(toks) > self.n_ctx():
            raise SteerError(f"{len(toks)} tokens do not fit the context ({self.n_ctx()}); raise --ctx")
        n_vocab = self.n_vocab()
        if min(toks) < 0 or max(toks) >= n_vocab:
            raise SteerError(f"token id out of range (vocabulary has {n_vocab} tokens)")
        with self.lock:
            self.reset()
            self._ctx.kv_cache_seq_rm(-1, 0, -1)
            self._observer.clear_records()
            self._observer.record = True
            self._sync_observer()
            try:
                for i in range(0, len(toks), self.n_batch):
                    chunk = toks[i:i + self.n_batch]
                    # every traced token is an output, so the last layer computes all rows
                    self._batch.set_batch(batch=chunk, n_past=i, logits_all=True)
                    self._ctx.decode(self._batch)
                rec = self._observer.take()
                err = self._observer.error
            finally:
                self._observer.record = False
                self._sync_observer()
                self.reset()
        return self._make_trace(toks, rec, err)

    def trace_many(self, seqs: Sequence[Sequence[int]], rows: Sequence[Sequence[int]] | None = None,
                   batch_tokens: int = 2048, record: bool = True, logits: bool = False) -> list[np.ndarray]:
        """Prefill many sequences, several per llama.cpp batch, and return for each the
        experts of the requested token rows: int32 [len(rows[i]), n_moe_layers, k].
        logits=True returns instead the next-token logits at those rows, float32
        [len(rows[i]), n_vocab] (teacher forcing: row r is the prediction of token r+1).

        Only the requested rows are marked as outputs: the last layer computes nothing
        else, and the logits of the rest are never needed."""
        rows = [list(range(len(s))) for s in seqs] if rows is None else [list(r) for r in rows]
        if len(rows) != len(seqs):
            raise SteerError("trace_many: one row list per sequence")
        out: list[np.ndarray | None] = [None] * len(seqs)
        # batch_tokens is how many tokens to pack per decode; a longer sequence gets a batch
        # of its own size rather than an error
        longest = max((len(s) for s in seqs), default=0)
        with self.lock:
            tc = self._trace_context(max(batch_tokens, longest))
            i = 0
            while i < len(seqs):
                group, n = [], 0
                while i < len(seqs) and len(group) < tc.n_seq and (not group or n + len(seqs[i]) <= tc.n_tok):
                    group.append(i)
                    n += len(seqs[i])
                    i += 1
                for j, ex in zip(group, tc.run([seqs[j] for j in group], [rows[j] for j in group], record,
                                               logits)):
                    out[j] = ex
        return out  # type: ignore[return-value]

    def _trace_context(self, batch_tokens: int) -> "_TraceContext":
        tc = getattr(self, "_tctx", None)
        if tc is None or tc.n_tok < batch_tokens:
            if tc is not None:
                tc.close()
            tc = _TraceContext(self, batch_tokens)
            self._tctx = tc
        tc.sync_profile()
        return tc

    def _make_trace(self, toks: list[int], rec: dict, err: str) -> RoutingTrace:
        layers = self.info.moe_layers
        if err:
            raise SteerError(f"routing recorder: {err}")
        missing = [il for il in layers if il not in rec or rec[il][0].shape[0] != len(toks)]
        if missing:
            got = {il: rec[il][0].shape[0] for il in rec}
            raise SteerError(f"routing recorder saw an incomplete trace in layers {missing} "
                             f"({len(toks)} tokens expected, got {got})")
        experts = np.stack([rec[il][0] for il in layers], axis=1).astype(np.int32)
        weights = np.stack([rec[il][1] for il in layers], axis=1).astype(np.float32)
        pieces = [self.detokenize([t]).decode("utf-8", errors="replace") for t in toks]
        return RoutingTrace(np.asarray(toks, dtype=np.int32), list(layers), experts, weights, pieces)


class RoutingLog:
    """Routing recorded during ordinary decoding. Layers may hold different numbers of rows:
    llama.cpp computes the last layer only for tokens whose logits are requested (in a
    prompt, just the last one), so use tail(n) for the n most recent tokens."""

    def __init__(self, layers: list[int]):
        self.layers = layers
        self.per_layer: dict[int, np.ndarray] = {}

    def tail(self, n: int) -> np.ndarray:
        """int32 [n, len(layers), k]: the experts of the n most recently decoded tokens."""
        rows = []
        for il in self.layers:
            a = self.per_layer.get(il)
            if a is None or a.shape[0] < n:
                raise SteerError(f"routing log has {0 if a is None else a.shape[0]} rows in layer {il}, asked for {n}")
            rows.append(a[a.shape[0] - n:])
        return np.stack(rows, axis=1)


class _TraceContext:
    """A second llama.cpp context on the same weights, made for batched prefill of many
    sequences (one KV stream, several sequence ids) with the routing recorder attached."""

    def __init__(self, llm: SteeredLlama, n_tok: int):
        self.llm = llm
        self.n_tok = n_tok
        self.n_seq = max(1, min(64, llama_cpp.llama_max_parallel_sequences()))
        self.ctx, self.ptr = secondary_context(llm, n_tok, self.n_seq, "tracing")
        self.batch = llama_cpp.llama_batch_init(n_tok, 0, 1)
        self.obs = _native.Observer(llm.info.n_layer)
        self.obs.record = True
        self.obs.record_weights = False  # detection counts experts only
        self.obs.attach(self.ptr)
        self.hooking = False
        self.profile_applied: object = False

    def sync_profile(self) -> None:
        p = self.llm.profile
        if p is self.profile_applied:
            return
        self.hooking = install_steering(self.ptr, self.obs, self.llm.engine, self.llm.info, p)
        self.profile_applied = p

    def run(self, seqs: list[Sequence[int]], rows: list[list[int]], record: bool = True,
            logits: bool = False) -> list[np.ndarray]:
        """Decode the sequences as one batch. record=False is plain prefill of the same batch
        (recorder off, one output per sequence): the baseline detection is measured against.
        logits=True: recorder off, the requested rows' logits are returned."""
        record = record and not logits
        if not record and not logits:
            rows = [[len(t) - 1] for t in seqs]
        b = self.batch
        n = 0
        out_index = []  # per sequence: positions of its requested rows among the batch outputs
        n_out = 0
        for sid, (toks, want) in enumerate(zip(seqs, rows)):
            want_set = set(want)
            mine = {}
            for pos, t in enumerate(toks):
                b.token[n] = int(t)
                b.pos[n] = pos
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = sid
                is_out = pos in want_set
                b.logits[n] = is_out
                if is_out:
                    mine[pos] = n_out
                    n_out += 1
                n += 1
            out_index.append([(n - len(toks) + r, mine[r]) for r in want])
        b.n_tokens = n
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx.ctx), True)
        self.obs.clear_records()
        # the plain-prefill baseline drops the recorder, but a hook engine still steers from it
        detach = not record and not self.hooking
        self.obs.record = record
        if detach:
            self.obs.detach(self.ptr)
        try:
            rc = llama_cpp.llama_decode(self.ctx.ctx, b)
        finally:
            self.obs.record = True
            if detach:
                self.obs.attach(self.ptr)
        if rc != 0:
            raise SteerError(f"llama_decode failed while tracing (code {rc})")
        if logits:
            n_vocab = self.llm.n_vocab()
            out = []
            for idx in out_index:
                m = np.empty((len(idx), n_vocab), dtype=np.float32)
                for r, (i_batch, _) in enumerate(idx):
                    m[r] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx.ctx, i_batch), (n_vocab,))
                out.append(m)
            return out
        if not record:
            return []
        rec = self.obs.take()
        if self.obs.error:
            raise SteerError(f"routing recorder: {self.obs.error}")
        layers = self.llm.info.moe_layers
        per_layer = []
        for il in layers:
            if il not in rec:
                raise SteerError(f"routing recorder saw nothing in MoE layer {il}")
            e = rec[il][0]
            # a layer computes every token, except the last which computes outputs only
            if e.shape[0] == n:
                per_layer.append(("all", e))
            elif e.shape[0] == n_out:
                per_layer.append(("out", e))
            else:
                raise SteerError(f"routing recorder: layer {il} has {e.shape[0]} rows, expected {n} or {n_out}")
        result = []
        for idx in out_index:
            tok_rows = np.asarray([a for a, _ in idx], dtype=np.int64)
            out_rows = np.asarray([o for _, o in idx], dtype=np.int64)
            result.append(np.stack([e[tok_rows] if kind == "all" else e[out_rows] for kind, e in per_layer], axis=1))
        return result

    def close(self) -> None:
        if self.ctx is not None and self.ctx.ctx:
            self.obs.detach(self.ptr)
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None


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
        rc, msg = _native.set_table(ptr, actions, bias, float(p.eps))
        if rc != _native.STATUS["OK"]:  # llama_steer_set leaves the previous table in place
            raise SteerError(f"profile {p.name!r}: rejected by llama.cpp ({_STATUS_NAMES.get(rc, rc)}): {msg}")
        observer.clear_hook()
        return False
    if bias is None:
        bias = np.zeros(actions.shape, dtype=np.float32)
    observer.set_hook(actions, bias, float(p.eps), info.logit_stage, info.select_stage, info.n_expert_groups > 1)
    _native.clear_table(ptr)
    return True
