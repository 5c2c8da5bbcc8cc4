"""Generation of many answers, each under its own profile: the one function that every
evaluation, tuning and audit run generates through.

Jobs are grouped by profile. parallel=1 decodes them one after another through
llama-cpp-python's own completion path. parallel=N > 1 decodes up to N conversations of a
group together on a second context (one KV sequence each, continuous batching: a finished
conversation leaves and the next one joins), each with its own sampler chain seeded by its
job. Per-sequence profile slots in the native table would let different profiles share a
batch too; until then a profile switch separates the groups."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .errors import SteerError
from .profile import Profile

# llama-cpp-python's create_completion defaults, so both paths sample alike
TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05


@dataclass
class GenJob:
    messages: list[dict]
    profile: Profile | None
    seed: int
    temperature: float
    max_tokens: int


def generate_batch(llm, jobs: list[GenJob], on_done: Callable[[int], None] | None = None,
                   parallel: int = 1) -> list[str]:
    """The reply text of every job, in order. on_done(n) after each n finished jobs."""
    if parallel < 1:
        raise SteerError(f"parallel must be >= 1, got {parallel}")
    out: list[str | None] = [None] * len(jobs)
    order: dict[int, list[int]] = {}
    profiles: dict[int, Profile | None] = {}
    for i, j in enumerate(jobs):
        order.setdefault(id(j.profile), []).append(i)
        profiles[id(j.profile)] = j.profile
    with llm.lock:
        gen = _Parallel(llm, parallel, jobs) if parallel > 1 and len(jobs) > 1 else None
        try:
            for key, idx in order.items():
                with llm.steering(profiles[key]):
                    if gen is not None:
                        gen.run(idx, out, on_done)
                        continue
                    for i in idx:
                        j = jobs[i]
                        try:
                            r = llm.create_chat_completion(messages=j.messages, max_tokens=j.max_tokens,
                                                           temperature=j.temperature, seed=j.seed)
                        except ValueError as e:  # llama-cpp-python: the prompt does not fit the context
                            raise SteerError(f"{str(e).splitlines()[0]}: raise --ctx or shorten the prompts") from None
                        out[i] = (r["choices"][0]["message"]["content"] or "").strip()
                        if on_done is not None:
                            on_done(1)
        finally:
            if gen is not None:
                gen.close()
    return out  # type: ignore[return-value]


@dataclass
class _Slot:
    job: int
    sampler: object
    feed: list[int]
    pos: int = 0
    generated: list[int] = field(default_factory=list)


class _Parallel:
    """Continuous batching of up to n_seq conversations on a context of its own, steered like
    llm (the profile in force is installed on it before each group)."""

    def __init__(self, llm, n_seq: int, jobs: list[GenJob]):
        import llama_cpp

        from . import steered

        self.llm, self.jobs = llm, jobs
        self.prompts = [llm.chat_tokens(j.messages, add_generation_prompt=True) for j in jobs]
        per_seq = max(len(p) + j.max_tokens for p, j in zip(self.prompts, jobs))
        if per_seq > llm.n_ctx():
            raise SteerError(f"a prompt and its answer need {per_seq} tokens, more than the context "
                             f"({llm.n_ctx()}); raise --ctx or lower --max-tokens")
        self.n_seq = max(1, min(n_seq, len(jobs), llama_cpp.llama_max_parallel_sequences()))
        self.n_ctx = per_seq * self.n_seq
        self.ctx, self.ptr = steered.secondary_context(llm, self.n_ctx, self.n_seq, "generation")
        self.batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        self.obs = steered._native.Observer(llm.info.n_layer)
        self.hooking = False
        self.vocab = llm._model.vocab

    def _install(self) -> None:
        from . import steered

        hook = steered.install_steering(self.ptr, self.obs, self.llm.engine, self.llm.info, self.llm.profile)
        if hook != self.hooking:
            (self.obs.attach if hook else self.obs.detach)(self.ptr)
            self.hooking = hook

    def _sampler(self, job: GenJob):
        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if job.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        for s in (llama_cpp.llama_sampler_init_top_k(TOP_K), llama_cpp.llama_sampler_init_top_p(TOP_P, 1),
                  llama_cpp.llama_sampler_init_min_p(MIN_P, 1), llama_cpp.llama_sampler_init_temp(job.temperature),
                  llama_cpp.llama_sampler_init_dist(job.seed & 0xFFFFFFFF)):
            llama_cpp.llama_sampler_chain_add(chain, s)
        return chain

    def run(self, idx: list[int], out: list, on_done) -> None:
        import llama_cpp

        self._install()
        mem = llama_cpp.llama_get_memory(self.ctx.ctx)
        llama_cpp.llama_memory_clear(mem, True)
        pending = deque(idx)
        slots: dict[int, _Slot] = {}
        free = list(range(self.n_seq - 1, -1, -1))
        b = self.batch
        try:
            while pending or slots:
                while pending and free:
                    i = pending.popleft()
                    slots[free.pop()] = _Slot(i, self._sampler(self.jobs[i]), list(self.prompts[i]))
                n, last = 0, {}
                for sid, s in slots.items():
                    for t in s.feed:
                        b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = t, s.pos, 1, False
                        b.seq_id[n][0] = sid
                        s.pos += 1
                        n += 1
                    b.logits[n - 1] = True
                    last[sid] = n - 1
                b.n_tokens = n
                rc = llama_cpp.llama_decode(self.ctx.ctx, b)
                if rc != 0:
                    raise SteerError(f"llama_decode failed while generating (code {rc})")
                for sid in list(slots):
                    s = slots[sid]
                    tok = llama_cpp.llama_sampler_sample(s.sampler, self.ctx.ctx, last[sid])
                    done = llama_cpp.llama_vocab_is_eog(self.vocab, tok)
                    if not done:
                        s.generated.append(tok)
                        s.feed = [tok]
                    if done or len(s.generated) >= self.jobs[s.job].max_tokens:
                        text = self.llm.detokenize(s.generated).decode("utf-8", errors="ignore")
                        out[s.job] = text.strip()
                        llama_cpp.llama_memory_seq_rm(mem, sid, -1, -1)
                        llama_cpp.llama_sampler_free(s.sampler)
                        del slots[sid]
                        free.append(sid)
                        if on_done is not None:
                            on_done(1)
        finally:
            for s in slots.values():
                llama_cpp.llama_sampler_free(s.sampler)

    def close(self) -> None:
        import llama_cpp

        if self.hooking:
            self.obs.detach(self.ptr)
        llama_cpp.llama_batch_free(self.batch)
        self.ctx.close()
