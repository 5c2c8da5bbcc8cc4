"""Batched generation: many conversations decoded together on one llama.cpp context, each
with its own profile (a slot of the context, slots.py), steering phase, sampler chain, stop
conditions, streaming and routing trace. Continuous batching: a finished conversation
leaves at once and the next one takes its sequence.

Every evaluation, tuning and audit run generates through generate_batch; the server's
parallel scheduler drives a BatchEngine directly."""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..errors import SteerError
from ..profile import Profile
from ..trace import stack_layers
from .slots import ContextSlots, check_phase, steered_in

# llama-cpp-python's create_completion defaults, so both paths sample alike
TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05
PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size


@dataclass
class SamplerSpec:
    temperature: float = 0.8
    top_k: int = TOP_K
    top_p: float = TOP_P
    min_p: float = MIN_P
    seed: int = 0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF, root rule "root"


@dataclass
class Request:
    prompt: list[int]
    profile: Profile | None = None
    phase: str = "all"
    max_tokens: int = 128
    sampling: SamplerSpec = field(default_factory=SamplerSpec)
    stop: list[str] = field(default_factory=list)
    trace: bool = False                               # record the routing behind every sampled token
    on_text: Callable[[str], None] | None = None      # streaming: each new piece of text
    cancelled: Callable[[], bool] | None = None       # polled before every decode


@dataclass
class Result:
    text: str
    tokens: list[int]          # every sampled token, the end-of-generation one included
    finish_reason: str         # "stop" | "length" | "cancelled"
    prompt_tokens: int
    # int32 [len(tokens), n_moe_layers, k]: row i, the experts of the forward pass that produced
    # sampled token i (its input: the prompt's last token for row 0); None unless trace=True
    experts: np.ndarray | None = None


@dataclass
class _Seq:
    key: object
    req: Request
    sampler: object
    slot: int | None
    feed: list[int]
    pos: int = 0
    tokens: list[int] = field(default_factory=list)
    sent: int = 0              # characters of text already streamed
    rows: list[np.ndarray] = field(default_factory=list)
    in_prompt: bool = True


class BatchEngine:
    """Up to n_seq conversations at once on a context of their own (llm's weights, threads,
    offload), each conversation given up to n_ctx_seq tokens of KV cache."""

    def __init__(self, llm, n_seq: int, n_ctx_seq: int):
        import llama_cpp

        from . import contexts

        if llm.engine != "graph":
            raise SteerError("per-sequence steering needs the graph engine (engine='graph')")
        self.llm = llm
        self.n_seq = max(1, min(n_seq, llama_cpp.llama_max_parallel_sequences()))
        self.n_ctx_seq = n_ctx_seq
        self.n_ctx = n_ctx_seq * self.n_seq
        self.ctx, self.ptr = contexts.secondary_context(llm, self.n_ctx, self.n_seq, "generation")
        self.batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        self.slots = ContextSlots(self.ptr, llm.info, force=llm.force)
        from .tracing import Recorder, recorder_kw

        self.rec = Recorder(self.ptr, contexts._native.Observer(llm.info.n_layer), llm.info.n_layer, llm.recorder,
                            weights=False, **recorder_kw(llm.info.architecture))
        self.vocab = llm._model.vocab
        self.mem = llama_cpp.llama_get_memory(self.ctx.ctx)

    # ---- one conversation ----------------------------------------------------------------
    def _sampler(self, s: SamplerSpec):
        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda smpl: llama_cpp.llama_sampler_chain_add(chain, smpl)  # noqa: E731
        try:
            if s.logit_bias:
                n = len(s.logit_bias)
                arr = (llama_cpp.llama_logit_bias * n)(*[llama_cpp.llama_logit_bias(int(t), float(b))
                                                          for t, b in s.logit_bias.items()])
                add(llama_cpp.llama_sampler_init_logit_bias(self.llm.n_vocab(), n, arr))
            add(llama_cpp.llama_sampler_init_penalties(self.llm.n_vocab(), PENALTY_LAST_N, s.repeat_penalty,
                                                       s.frequency_penalty, s.presence_penalty))
            if s.grammar is not None:
                self.llm.check_grammar(s.grammar)
                g = llama_cpp.llama_sampler_init_grammar(self.vocab, s.grammar.encode(), b"root")
                if not g:
                    raise SteerError("llama.cpp could not parse the grammar")
                add(g)
            if s.temperature <= 0:
                add(llama_cpp.llama_sampler_init_greedy())
                return chain
            for smpl in (llama_cpp.llama_sampler_init_top_k(s.top_k), llama_cpp.llama_sampler_init_top_p(s.top_p, 1),
                         llama_cpp.llama_sampler_init_min_p(s.min_p, 1), llama_cpp.llama_sampler_init_temp(s.temperature),
                         llama_cpp.llama_sampler_init_dist(s.seed & 0xFFFFFFFF)):
                add(smpl)
        except BaseException:
            llama_cpp.llama_sampler_free(chain)
            raise
        return chain

    def _start(self, sid: int, key: object, req: Request) -> _Seq:
        check_phase(req.phase)
        if not req.prompt:
            raise SteerError("empty prompt")
        need = len(req.prompt) + req.max_tokens
        if need > self.n_ctx_seq:
            raise SteerError(f"a prompt and its answer need {need} tokens, more than the context "
                             f"({self.n_ctx_seq}); raise --ctx or lower max_tokens")
        slot = self.slots.acquire(req.profile)
        try:
            sampler = self._sampler(req.sampling)
        except BaseException:
            self.slots.release(slot)
            raise
        return _Seq(key, req, sampler, slot, list(req.prompt))

    def _finish(self, sid: int, s: _Seq, reason: str, text: str) -> Result:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self.mem, sid, -1, -1)
        llama_cpp.llama_sampler_free(s.sampler)
        self.slots.release(s.slot)
        self.slots.bind(sid, None)
        if s.req.on_text is not None and len(text) > s.sent:
            s.req.on_text(text[s.sent:])
        experts = stack_layers(s.rows, 0, -1).astype(np.int32) if s.req.trace and s.rows else None
        if s.req.trace and experts is None:
            k = max(self.llm.info.n_expert_used, 1)
            experts = np.zeros((0, len(self.llm.info.moe_layers), k), dtype=np.int32)
        return Result(text, s.tokens, reason, len(s.req.prompt), experts)

    def _text(self, s: _Seq, final: bool = False) -> tuple[str, bool, int]:
        """(text so far, whether a stop string ended it, characters safe to stream)."""
        raw = self.llm.detokenize([t for t in s.tokens if not self._eog(t)])
        # bytes that are not UTF-8 are dropped (as llama-cpp-python does); a character cut
        # between tokens waits for its rest, unless the answer ends there
        text = codecs.getincrementaldecoder("utf-8")(errors="ignore").decode(raw, final=final)
        cut = [text.find(st) for st in s.req.stop if st and st in text]
        if cut:
            return text[:min(cut)], True, min(cut)
        hold = 0  # a tail that may be the start of a stop string is held back
        for st in s.req.stop:
            for n in range(min(len(st) - 1, len(text)), 0, -1):
                if text.endswith(st[:n]):
                    hold = max(hold, n)
                    break
        return text, False, len(text) - hold

    def _eog(self, tok: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, tok))

    # ---- the loop ------------------------------------------------------------------------
    def run(self, next_request: Callable[[bool], tuple[object, Request] | None],
            on_done: Callable[[object, Result | Exception], None]) -> None:
        """Decode until next_request returns None while no conversation is running.
        next_request(idle) gives (key, request) to start, or None; idle=True says nothing is
        running, so it may block. A request that cannot start (bad profile, grammar, length)
        or fails is answered on_done(key, exception); the others go on."""
        import llama_cpp

        llama_cpp.llama_memory_clear(self.mem, True)
        active: dict[int, _Seq] = {}
        free = list(range(self.n_seq - 1, -1, -1))
        try:
            while True:
                exhausted = False
                while free:
                    got = next_request(not active)
                    if got is None:
                        exhausted = True
                        break
                    key, req = got
                    sid = free.pop()
                    try:
                        active[sid] = self._start(sid, key, req)
                    except Exception as e:
                        free.append(sid)
                        on_done(key, e)
                if not active:
                    if exhausted:
                        return
                    continue
                try:
                    self._step(active, free, on_done)
                except Exception as e:  # the whole batch failed: answer its conversations, go on
                    for sid, s in list(active.items()):
                        del active[sid]
                        llama_cpp.llama_sampler_free(s.sampler)
                        self.slots.release(s.slot)
                        free.append(sid)
                        on_done(s.key, e)
                    llama_cpp.llama_memory_clear(self.mem, True)
        finally:
            for sid, s in active.items():
                llama_cpp.llama_sampler_free(s.sampler)
                self.slots.release(s.slot)
            active.clear()

    def _step(self, active: dict[int, _Seq], free: list[int], on_done) -> None:
        import llama_cpp

        for sid in [sid for sid, s in active.items() if s.req.cancelled is not None and s.req.cancelled()]:
            s = active.pop(sid)
            text = self._text(s, final=True)[0]
            on_done(s.key, self._finish(sid, s, "cancelled", text))
            free.append(sid)
        if not active:
            return
        self.slots.route({sid: s.slot if steered_in(s.req.phase, s.in_prompt) else None
                          for sid, s in active.items()})
        b = self.batch
        n, last = 0, {}
        for sid, s in active.items():
            for t in s.feed:
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = t, s.pos, 1, False
                b.seq_id[n][0] = sid
                s.pos += 1
                n += 1
            b.logits[n - 1] = True
            last[sid] = n - 1
        b.n_tokens = n
        self._record(any(s.req.trace for s in active.values()))
        self.llm.govern(self.ctx.ctx)
        rc = llama_cpp.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise SteerError(f"llama_decode failed while generating (code {rc})")
        if self.rec.recording:
            self._take_rows(active, last, n)
        for sid in list(active):
            s = active[sid]
            s.in_prompt = False
            tok = int(llama_cpp.llama_sampler_sample(s.sampler, self.ctx.ctx, last[sid]))
            s.tokens.append(tok)
            s.feed = [tok]
            # the text so far is only needed to find stop strings or to stream
            text, stopped, safe = self._text(s) if s.req.stop or s.req.on_text else ("", False, 0)
            reason = None
            if self._eog(tok) or stopped:
                reason = "stop"
            elif len(s.tokens) >= s.req.max_tokens:
                reason = "length"
            if reason is None:
                if s.req.on_text is not None and safe > s.sent:
                    s.req.on_text(text[s.sent:safe])
                    s.sent = safe
                continue
            if not stopped:
                text = self._text(s, final=True)[0]
            del active[sid]
            free.append(sid)
            on_done(s.key, self._finish(sid, s, reason, text))

    # ---- routing traces ------------------------------------------------------------------
    def _record(self, want: bool) -> None:
        # recording changes the graph (or, with the callback recorder, splits every layer's
        # compute): on only while someone asks
        if want != self.rec.recording:
            (self.rec.on if want else self.rec.off)()
        elif want:
            self.rec.clear()

    def _take_rows(self, active: dict[int, _Seq], last: dict[int, int], n: int) -> None:
        from .tracing import by_token

        per_layer = by_token(self.rec.take(), self.llm.info.moe_layers, n, sorted(last.values()))
        for sid, s in active.items():
            if not s.req.trace:
                continue
            row = stack_layers([e[last[sid]] for e in per_layer], 0, -1)
            if (row[:, 0] < 0).any():
                raise SteerError("routing recorder: a sampled token's row was not computed in every MoE layer")
            # a decode mixing requests of different K (topk) records the widest; this row keeps its own
            s.rows.append(row[:, :int((row >= 0).sum(axis=1).max())])

    def close(self) -> None:
        import llama_cpp

        if self.ctx is None:
            return
        self.rec.close()
        llama_cpp.llama_batch_free(self.batch)
        self.ctx.close()
        self.ctx = None


# ---- generate_batch: the evaluation's entry point ------------------------------------------
@dataclass
class GenJob:
    messages: list[dict]
    profile: Profile | None
    seed: int
    temperature: float
    max_tokens: int
    phase: str = "all"


def generate_batch(llm, jobs: list[GenJob], on_done: Callable[[int], None] | None = None,
                   parallel: int = 1) -> list[str]:
    """The reply text of every job, in order. on_done(n) after each n finished jobs.
    parallel=1 decodes one job after another through llama-cpp-python's own completion path
    (phase "all" only); parallel=N > 1 decodes up to N together, profiles mixed in one batch."""
    if parallel < 1:
        raise SteerError(f"parallel must be >= 1, got {parallel}")
    for j in jobs:
        check_phase(j.phase)
    if parallel > 1 and len(jobs) > 1 and llm.engine == "graph" or any(j.phase != "all" for j in jobs):
        return _generate_together(llm, jobs, on_done, parallel)
    return _generate_one_by_one(llm, jobs, on_done)


def _generate_one_by_one(llm, jobs: list[GenJob], on_done) -> list[str]:
    out: list[str] = []
    with llm.lock:
        for j in jobs:
            with llm.steering(j.profile):
                try:
                    r = llm.create_chat_completion(messages=j.messages, max_tokens=j.max_tokens,
                                                   temperature=j.temperature, seed=j.seed)
                except ValueError as e:  # llama-cpp-python: the prompt does not fit the context
                    raise SteerError(f"{str(e).splitlines()[0]}: raise --ctx or shorten the prompts") from None
            out.append((r["choices"][0]["message"]["content"] or "").strip())
            if on_done is not None:
                on_done(1)
    return out


def _generate_together(llm, jobs: list[GenJob], on_done, parallel: int) -> list[str]:
    prompts = [llm.chat_tokens(j.messages, add_generation_prompt=True) for j in jobs]
    per_seq = max(len(p) + j.max_tokens for p, j in zip(prompts, jobs))
    if per_seq > llm.n_ctx():
        raise SteerError(f"a prompt and its answer need {per_seq} tokens, more than the context "
                         f"({llm.n_ctx()}); raise --ctx or lower --max-tokens")
    out: list[str | None] = [None] * len(jobs)
    pending: Iterator[int] = iter(range(len(jobs)))

    def next_request(idle: bool):
        i = next(pending, None) if not failed else None
        if i is None:
            return None
        j = jobs[i]
        return i, Request(prompts[i], j.profile, j.phase, j.max_tokens,
                          SamplerSpec(temperature=j.temperature, seed=j.seed))

    failed: list[Exception] = []

    def done(i, r):
        if isinstance(r, Exception):
            failed.append(r)
            return
        out[i] = r.text.strip()
        if on_done is not None:
            on_done(1)

    with llm.lock:
        eng = BatchEngine(llm, min(parallel, len(jobs)), per_seq)
        try:
            eng.run(next_request, done)
        finally:
            eng.close()
    if failed:
        raise failed[0] if isinstance(failed[0], SteerError) else SteerError(str(failed[0]))
    return out  # type: ignore[return-value]
