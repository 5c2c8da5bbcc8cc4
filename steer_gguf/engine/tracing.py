"""Recording routing: which experts each token went to, in every MoE layer. Prefill of
one sequence (trace), of many sequences per batch (trace_many, on a second context), and
during ordinary decoding (recording)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np

from ..errors import SteerError
from ..model import ROUTES_TWICE
from ..trace import RoutingTrace
from .contexts import _native, install_steering, llama_cpp, secondary_context
from .rows import concat, undouble


class Tracing:
    """SteeredLlama's tracing methods (a mixin: they use its lock, observer and context)."""

    @contextlib.contextmanager
    def recording(self) -> Iterator["RoutingLog"]:
        """Record the routing of every decode inside the block (generation included).
        Holds the lock for the whole block."""
        log = RoutingLog(list(self.info.moe_layers))
        with self.lock:
            self._observer.clear_records()
            self._observer.record = True
            self._sync_observer()
            twice = self.info.architecture in ROUTES_TWICE
            parts: list[dict] = []
            if twice:  # each decode's rows are undoubled as it ends, while its batch is known
                decode = self._ctx.decode

                def undoubling_decode(batch):
                    rc = decode(batch)
                    b = batch.batch
                    parts.append(undouble(self._observer.take(), [bool(b.logits[i]) for i in range(b.n_tokens)],
                                          self.context_params.n_ubatch))
                    return rc

                self._ctx.decode = undoubling_decode
            try:
                yield log
            finally:
                if twice:
                    del self._ctx.decode
                rec = concat(parts + [self._observer.take()])
                self._observer.record = False
                self._sync_observer()
                log.per_layer = {il: rec[il][0] for il in rec}

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
                twice = self.info.architecture in ROUTES_TWICE
                parts = []
                for i in range(0, len(toks), self.n_batch):
                    chunk = toks[i:i + self.n_batch]
                    # every traced token is an output, so the last layer computes all rows
                    self._batch.set_batch(batch=chunk, n_past=i, logits_all=True)
                    self.govern(self._ctx.ctx)
                    self._ctx.decode(self._batch)
                    if twice:
                        parts.append(undouble(self._observer.take(), [True] * len(chunk),
                                              self.context_params.n_ubatch))
                rec = concat(parts + [self._observer.take()])
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

    def __init__(self, llm: "Tracing", n_tok: int):
        self.llm = llm
        self.n_tok = n_tok
        self.n_seq = max(1, min(64, llama_cpp.llama_max_parallel_sequences()))
        self.ctx, self.ptr = secondary_context(llm, n_tok, self.n_seq, "tracing")
        self.n_ubatch = llama_cpp.llama_n_ubatch(self.ctx.ctx)
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
            self.llm.govern(self.ctx.ctx)
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
        if self.llm.info.architecture in ROUTES_TWICE:
            rec = undouble(rec, [bool(b.logits[i]) for i in range(n)], self.n_ubatch)
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
