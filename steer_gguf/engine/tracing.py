"""Recording routing: which experts each token went to, in every MoE layer. Prefill of
one sequence (trace), of many sequences per batch (trace_many, on a second context), and
during ordinary decoding (recording).

Two recorders read the same routing. "graph" (the default): the patched graph keeps every MoE
layer's top-k as graph outputs, copied to host memory after each micro-batch (steer.h, API
version 3): no graph split, one synchronization per decode. "callback": the scheduler's eval
callback copies each layer's top-k as the graph reaches it, a split and a synchronization
per layer; kept as the test oracle of the first."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np

from ..errors import SteerError
from ..model import ROUTES_TWICE
from ..trace import RoutingTrace, stack_layers
from .contexts import _native, check_status, install_steering, llama_cpp, secondary_context
from .rows import undouble

RECORDERS = ("graph", "callback")
# architectures whose graph picks the last layer's rows its own way (recurrent state, per-layer
# inputs, hyper-connections, a reshape of the outputs), where llama.cpp aborts on the generic
# routed-rows edit (llama_steer_route_tokens): their traced tokens are made outputs instead, as
# before steer.h API 3, and cost their logits (tests/test_arch_matrix.py checks both groups)
OUTPUT_ROWS_ONLY = frozenset({"bailingmoe3", "cohere2moe", "deepseek4", "gemma4", "glm5-next", "hy_v3", "hy_v4",
                              "nemotron_h", "nemotron_h_moe", "qwen35moe", "qwen3next"})

# one layer's rows: experts int32 [n, k], weights float32 [n, k] or None, and each row's index
# in the batch of its decode (None from the callback recorder, which cannot tell)
LayerRows = tuple[np.ndarray, "np.ndarray | None", "np.ndarray | None"]


class Recorder:
    """The routing recorder of one llama.cpp context, and the eval-callback attachment that
    the callback recorder and the hook engine share there."""

    def __init__(self, ptr: int, observer, n_layer: int, kind: str, weights: bool, twice: bool = False,
                 routed_rows: bool = True):
        if kind not in RECORDERS:
            raise SteerError(f"recorder must be one of {', '.join(RECORDERS)}, got {kind!r}")
        if twice and kind != "graph":
            # its rows carry no batch index, so the two routings of a layer cannot be told apart
            raise SteerError("the eval-callback recorder cannot record a model that routes twice per layer "
                             "(grovemoe); use the graph recorder")
        self.ptr, self.obs, self.n_layer, self.kind, self.weights = ptr, observer, n_layer, kind, weights
        self.twice = twice
        # whether tokens can be routed in every layer without being outputs (no logits)
        self.routes_rows = kind == "graph" and routed_rows
        self.recording = False
        self.hooking = False
        self._attached = False

    def set_hooking(self, hooking: bool) -> None:
        self.hooking = hooking
        self._sync()

    def _sync(self) -> None:
        # an attached callback splits every layer's compute: attached only while needed
        want = self.hooking or (self.recording and self.kind == "callback")
        if want != self._attached:
            (self.obs.attach if want else self.obs.detach)(self.ptr)
            self._attached = want

    def on(self) -> None:
        """Record every decode from now on (earlier rows are dropped)."""
        self._switch(True)

    def off(self) -> None:
        """Stop recording: the graph is upstream's again (rows not taken are dropped)."""
        self._switch(False)

    def _switch(self, on: bool) -> None:
        if self.kind == "graph":
            flags = _native.ROUTE["experts"] | (_native.ROUTE["weights"] if self.weights else 0)
            check_status(*_native.route_record(self.ptr, flags if on else 0), "routing recorder")
            check_status(*_native.route_tokens(self.ptr, None), "routing recorder")
        else:
            self.obs.record_weights = self.weights
            self.obs.record = on
        self.clear()
        self.recording = on
        self._sync()

    def route_rows(self, mask: np.ndarray) -> bool:
        """Route the tokens of mask (by batch index) in every layer in the next decodes,
        outputs or not; True if the graph recorder does (they need no logits then), False
        if the caller must make them outputs (the callback recorder sees outputs only, and
        OUTPUT_ROWS_ONLY's graphs take no routed rows)."""
        if not self.routes_rows:
            return False
        check_status(*_native.route_tokens(self.ptr, mask.astype(np.int8)), "routing recorder")
        return True

    def clear(self) -> None:
        """Drop the rows recorded so far."""
        if self.kind == "graph":
            _native.route_clear(self.ptr)
        else:
            self.obs.clear_records()

    def take(self) -> dict[int, LayerRows]:
        """Every row recorded since on() or the last take(), by layer (layers that computed
        no row are absent)."""
        if self.kind == "graph":
            try:
                rec = _native.route_take(self.ptr, self.n_layer, self.weights)
            except ValueError as e:
                raise SteerError(str(e)) from None
            return {il: undouble(*r, il) for il, r in rec.items()} if self.twice else rec
        err = self.obs.error  # read first: take() clears it
        rec = self.obs.take()
        if err:
            raise SteerError(f"routing recorder: {err}")
        return {il: (e, w if self.weights else None, None) for il, (e, w) in rec.items()}

    def close(self) -> None:
        if self._attached:
            self.obs.detach(self.ptr)
            self._attached = False


def recorder_kw(arch: str) -> dict:
    """What a Recorder must know of the architecture it records."""
    return {"twice": arch in ROUTES_TWICE, "routed_rows": arch not in OUTPUT_ROWS_ONLY}


def by_token(rec: dict[int, LayerRows], layers: Sequence[int], n_tokens: int,
             outputs: Sequence[int]) -> list[np.ndarray]:
    """The rows of one decode of n_tokens tokens, per layer in `layers`, as int32
    [n_tokens, k] indexed by batch position: -1 where the layer computed no row for the token
    (the last layer computes output tokens only). `outputs`: the batch positions marked as
    outputs, in batch order, to place the callback recorder's rows by their count."""
    out = []
    for il in layers:
        if il not in rec:
            raise SteerError(f"routing recorder saw nothing in MoE layer {il}")
        e, _, idx = rec[il]
        full = np.full((n_tokens, e.shape[1]), -1, dtype=np.int32)
        if idx is not None:
            full[idx] = e
        elif e.shape[0] == n_tokens:
            full[:] = e
        elif e.shape[0] == len(outputs):
            full[np.asarray(outputs, dtype=np.int64)] = e
        else:
            raise SteerError(f"routing recorder: layer {il} has {e.shape[0]} rows, expected "
                             f"{n_tokens} or {len(outputs)}")
        out.append(full)
    return out


class Tracing:
    """SteeredLlama's tracing methods (a mixin: they use its lock, observer and context)."""

    @contextlib.contextmanager
    def recording(self) -> Iterator["RoutingLog"]:
        """Record the routing of every decode inside the block (generation included).
        Holds the lock for the whole block."""
        log = RoutingLog(list(self.info.moe_layers))
        with self.lock:
            self._recorder.on()
            try:
                yield log
            finally:
                try:
                    rec = self._recorder.take()
                finally:
                    self._recorder.off()
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
            self._recorder.on()
            try:
                for i in range(0, len(toks), self.n_batch):
                    chunk = toks[i:i + self.n_batch]
                    # the last layer must compute every traced token: routed rows (no logits)
                    # with the graph recorder; outputs, logits and all, with the callback one
                    routed = self._recorder.route_rows(np.ones(len(chunk), dtype=bool))
                    self._batch.set_batch(batch=chunk, n_past=i, logits_all=not routed)
                    self.govern(self._ctx.ctx)
                    self._ctx.decode(self._batch)
                rec = self._recorder.take()
            finally:
                self._recorder.off()
                self.reset()
        return self._make_trace(toks, rec)

    def trace_many(self, seqs: Sequence[Sequence[int]], rows: Sequence[Sequence[int]] | None = None,
                   batch_tokens: int = 2048, record: bool = True, logits: bool = False) -> list[np.ndarray]:
        """Prefill many sequences, several per llama.cpp batch, and return for each the
        experts of the requested token rows: int32 [len(rows[i]), n_moe_layers, k].
        logits=True returns instead the next-token logits at those rows, float32
        [len(rows[i]), n_vocab] (teacher forcing: row r is the prediction of token r+1).

        Only the requested rows reach the last layer, which computes nothing else; with the
        graph recorder they are routed rows without logits (steer.h llama_steer_route_tokens),
        so no output head runs at all."""
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
        # a context holds at least as many tokens as sequences (up to 64): llama.cpp aborts on fewer
        batch_tokens = max(batch_tokens, 64)
        tc = getattr(self, "_tctx", None)
        if tc is None or tc.n_tok < batch_tokens:
            if tc is not None:
                tc.close()
            tc = _TraceContext(self, batch_tokens)
            self._tctx = tc
        tc.sync_profile()
        return tc

    def _make_trace(self, toks: list[int], rec: dict[int, LayerRows]) -> RoutingTrace:
        layers = self.info.moe_layers
        missing = [il for il in layers if il not in rec or rec[il][0].shape[0] != len(toks)]
        if missing:
            got = {il: rec[il][0].shape[0] for il in rec}
            raise SteerError(f"routing recorder saw an incomplete trace in layers {missing} "
                             f"({len(toks)} tokens expected, got {got})")
        experts = stack_layers([rec[il][0] for il in layers], 1, -1).astype(np.int32)
        weights = stack_layers([rec[il][1] for il in layers], 1, 0.0).astype(np.float32)
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
        return stack_layers(rows, 1, -1)


class _TraceContext:
    """A second llama.cpp context on the same weights, made for batched prefill of many
    sequences (one KV stream, several sequence ids) with the routing recorder on."""

    def __init__(self, llm: "Tracing", n_tok: int):
        self.llm = llm
        self.n_tok = n_tok
        self.n_seq = max(1, min(64, llama_cpp.llama_max_parallel_sequences()))
        self.ctx, self.ptr = secondary_context(llm, n_tok, self.n_seq, "tracing")
        self.batch = llama_cpp.llama_batch_init(n_tok, 0, 1)
        self.obs = _native.Observer(llm.info.n_layer)
        # detection counts experts only
        self.rec = Recorder(self.ptr, self.obs, llm.info.n_layer, llm.recorder, weights=False,
                            **recorder_kw(llm.info.architecture))
        self.profile_applied: object = False

    def sync_profile(self) -> None:
        p = self.llm.profile
        if p is self.profile_applied:
            return
        self.rec.set_hooking(install_steering(self.ptr, self.obs, self.llm.engine, self.llm.info, p))
        self.profile_applied = p

    def run(self, seqs: list[Sequence[int]], rows: list[list[int]], record: bool = True,
            logits: bool = False) -> list[np.ndarray]:
        """Decode the sequences as one batch. record=False is plain prefill of the same batch
        (recorder off, one output per sequence): the baseline detection is measured against.
        logits=True: recorder off, the requested rows' logits are returned."""
        record = record and not logits
        if not record and not logits:
            rows = [[len(t) - 1] for t in seqs]
        # the plain-prefill baseline and scoring run the upstream graph (a hook engine still
        # steers); switching costs one graph rebuild, so the recorder stays as it was last run
        if record != self.rec.recording:
            (self.rec.on if record else self.rec.off)()
        routed_only = record and self.rec.routes_rows
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
                b.logits[n] = is_out and not routed_only
                if is_out:
                    mine[pos] = n_out
                    n_out += 1
                n += 1
            out_index.append([(n - len(toks) + r, mine[r]) for r in want])
        b.n_tokens = n
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx.ctx), True)
        if routed_only:
            mask = np.zeros(n, dtype=bool)
            mask[[i for idx in out_index for i, _ in idx]] = True
            self.rec.route_rows(mask)
        self.rec.clear()  # nothing of a decode that failed before
        self.llm.govern(self.ctx.ctx)
        rc = llama_cpp.llama_decode(self.ctx.ctx, b)
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
        outputs = [i for i in range(n) if b.logits[i]]  # the callback recorder's rows of the last layer
        per_layer = by_token(self.rec.take(), self.llm.info.moe_layers, n, outputs)
        # a profile with per-layer topk gives layers of different widths: each padded with -1 to
        # the widest, as a Trace holds them (a token's own experts first)
        k = max(e.shape[1] for e in per_layer)
        per_layer = [e if e.shape[1] == k else np.pad(e, ((0, 0), (0, k - e.shape[1])), constant_values=-1)
                     for e in per_layer]
        result = []
        for idx in out_index:
            tok_rows = np.asarray([a for a, _ in idx], dtype=np.int64)
            ex = np.stack([e[tok_rows] for e in per_layer], axis=1)
            if (ex[:, :, 0] < 0).any():
                raise SteerError("routing recorder: a requested row was not computed in every MoE layer")
            result.append(ex)
        return result

    def close(self) -> None:
        if self.ctx is not None and self.ctx.ctx:
            self.rec.close()
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
