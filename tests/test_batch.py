"""The batched generation engine: conversations decoded together, each under its own
profile and steering phase, with streaming, stop strings, cancellation and routing traces."""
from __future__ import annotations

import numpy as np
import pytest

from steer_gguf import ExpertRule, ModelRef, Profile, SteeredLlama
from steer_gguf.engine.batch import BatchEngine, Request, Result, SamplerSpec
from steer_gguf.errors import SteerError

from fixtures.backend import TEST_NGL

from steer_gguf.front.demo import DEMO_MODEL as DEMO  # noqa: E402
QUESTIONS = ["How many apples are in the basket?", "How many cats live here?", "How many days in a week?",
             "How many wheels does a car have?", "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def llm(make):
    # the model the other batch tests and test_steering use: on llvmpipe every new weight type
    # and shape compiles its own kernels (the F32 demo model cost 7 minutes on a cold cache)
    m = SteeredLlama(make("qwen3moe", n_layer=4), n_ctx=512, n_threads=1, n_threads_batch=1, n_gpu_layers=TEST_NGL)
    yield m
    m.close()


def _prompt(llm, q):
    return llm.chat_tokens([{"role": "user", "content": q}], add_generation_prompt=True)


def _run(llm, reqs: list[Request], n_seq: int = 4) -> list[Result | Exception]:
    out: list = [None] * len(reqs)
    pending = list(enumerate(reqs))

    def next_request(idle):
        return pending.pop(0) if pending else None

    def done(i, r):
        out[i] = r

    eng = BatchEngine(llm, n_seq, 256)
    try:
        eng.run(next_request, done)
    finally:
        eng.close()
    return out


@pytest.fixture(scope="module")
def forced(llm):
    """A profile forcing, in every MoE layer, an expert the unsteered answers rarely use."""
    r = _run(llm, [Request(_prompt(llm, q), max_tokens=12, sampling=SamplerSpec(temperature=0), trace=True)
                   for q in QUESTIONS])
    ex = np.concatenate([x.experts for x in r])  # [rows, layers, k]
    info = llm.info
    rules = []
    for j, il in enumerate(info.moe_layers):
        counts = np.bincount(ex[:, j, :].ravel(), minlength=info.n_expert)
        rules.append(ExpertRule(il, int(np.argmin(counts)), "activate"))
    p = Profile(ModelRef.of(info), rules, [], name="forced")
    return p, [x.expert for x in rules], r


def _has(experts: np.ndarray, forced_experts: list[int]) -> np.ndarray:
    """[rows]: whether every layer of a row chose that layer's forced expert."""
    return np.all([(experts[:, j, :] == e).any(-1) for j, e in enumerate(forced_experts)], axis=0)


def test_a_steered_request_is_isolated_from_its_unsteered_neighbours(llm, forced):
    """One batch, four conversations: the one under a profile that forces an expert in every
    layer has it in 100% of its traced rows; its unsteered neighbours route exactly as when
    they ran without it."""
    p, fe, alone = forced
    reqs = [Request(_prompt(llm, q), profile=p if i == 1 else None, max_tokens=12,
                    sampling=SamplerSpec(temperature=0), trace=True) for i, q in enumerate(QUESTIONS[:4])]
    got = _run(llm, reqs)
    assert _has(got[1].experts, fe).all()
    for i in (0, 2, 3):
        assert got[i].tokens == alone[i].tokens
        np.testing.assert_array_equal(np.sort(got[i].experts, -1), np.sort(alone[i].experts, -1))
        assert _has(got[i].experts, fe).mean() < 0.5


@pytest.mark.parametrize("phase,steered_rows", [("all", "every"), ("prompt", "first"), ("generation", "rest")])
def test_steering_phase_switches_between_the_prompt_and_the_first_generated_token(make, phase, steered_rows):
    """Trace row 0 is the prompt's last token, rows 1.. the generated tokens fed back. On a
    random synthetic model (the demo would answer in the forced experts' style, and so route
    to them, after a steered prompt alone)."""
    m = SteeredLlama(make("qwen3moe", n_layer=4), n_ctx=256, n_threads=1, n_gpu_layers=TEST_NGL)
    try:
        prompt = m.tokenize(b"The quick brown fox jumps over the lazy dog", add_bos=True, special=True)
        greedy = SamplerSpec(temperature=0)
        plain = _run(m, [Request(prompt, max_tokens=12, sampling=greedy, trace=True)])[0].experts
        rules = [ExpertRule(il, int(np.argmin(np.bincount(plain[:, j, :].ravel(), minlength=m.info.n_expert))),
                            "activate") for j, il in enumerate(m.info.moe_layers)]
        p = Profile(ModelRef.of(m.info), rules, [], name="forced")
        r = _run(m, [Request(prompt, profile=p, phase=phase, max_tokens=12, sampling=greedy, trace=True)])[0]
    finally:
        m.close()
    has = _has(r.experts, [x.expert for x in rules])
    assert len(has) >= 3 and _has(plain, [x.expert for x in rules]).mean() < 0.5
    if steered_rows == "every":
        assert has.all()
    elif steered_rows == "first":
        assert has[0] and has[1:].mean() < 0.5
    else:
        assert not has[0] and has[1:].all()


def test_a_batch_sharing_one_profile_runs_it_context_wide_on_selection_bias_models(make):
    """DeepSeek-V3-style gating (sigmoid + selection bias): while every sequence of a batch takes
    the same profile, the engine puts it in force as the context-wide table, slots emptied
    (the graph that keeps GPUs' fused gating); a neighbour on another profile, or unsteered,
    or in its unsteered phase, brings the slots back. Tokens and routing must equal the
    slots-only engine's, through every switch."""
    m = SteeredLlama(make("deepseek-v3", n_layer=4), n_ctx=512, n_threads=1, n_gpu_layers=TEST_NGL)
    try:
        assert m.info.has_selection_bias
        texts = [b"The quick brown fox", b"jumps over the lazy dog", b"0123456789 again", b"and again and"]
        prompts = [m.tokenize(t, add_bos=True, special=True) for t in texts]
        greedy = SamplerSpec(temperature=0)
        plain = _run(m, [Request(prompts[0], max_tokens=8, sampling=greedy, trace=True)])[0].experts
        rules = [ExpertRule(il, int(np.argmin(np.bincount(plain[:, j, :].ravel(), minlength=m.info.n_expert))),
                            "activate") for j, il in enumerate(m.info.moe_layers)]
        p = Profile(ModelRef.of(m.info), rules, [], name="forced")
        fe = [x.expert for x in rules]

        def run(shared_wide: bool):
            seen: list[int | None] = []
            eng = BatchEngine(m, 2, 256)
            eng.slots.shared_wide = shared_wide
            watch = lambda _text: seen.append(eng.slots.wide)  # noqa: E731
            # two sequences at a time: A+B share p, then C (unsteered) joins, then D (p, steered
            # only while generating) and A's successor; staggered lengths force every switch
            reqs = [Request(prompts[0], profile=p, max_tokens=4, sampling=greedy, trace=True, on_text=watch),
                    Request(prompts[1], profile=p, max_tokens=12, sampling=greedy, trace=True, on_text=watch),
                    Request(prompts[2], max_tokens=4, sampling=greedy, trace=True, on_text=watch),
                    Request(prompts[3], profile=p, phase="generation", max_tokens=6, sampling=greedy,
                            trace=True, on_text=watch)]
            out: list = [None] * len(reqs)
            pending = list(enumerate(reqs))
            try:
                eng.run(lambda idle: pending.pop(0) if pending else None, out.__setitem__)
                final = (eng.slots.wide, {s: h.loaded for s, h in eng.slots.held.items()})
            finally:
                eng.close()
            return out, seen, final

        wide, seen_wide, _ = run(True)
        slots_only, seen_slots, _ = run(False)
    finally:
        m.close()
    assert all(isinstance(r, Result) for r in wide + slots_only), wide + slots_only
    for a, b in zip(wide, slots_only):
        assert a.tokens == b.tokens
        np.testing.assert_array_equal(a.experts, b.experts)
    assert _has(wide[0].experts, fe).all() and _has(wide[1].experts, fe).all()
    assert _has(wide[2].experts, fe).mean() < 0.5
    assert not _has(wide[3].experts[:1], fe).any() and _has(wide[3].experts[1:], fe).all()
    # both modes were in force during the run, and only where allowed
    assert any(w is not None for w in seen_wide) and any(w is None for w in seen_wide)
    assert all(w is None for w in seen_slots)


def test_a_context_wide_profile_leaves_with_its_evicted_slot(make):
    """One slot, conversations one after another under two profiles on a selection-bias model:
    the second profile takes the first's slot, and must replace it as the context-wide table."""
    m = SteeredLlama(make("deepseek-v3", n_layer=4), n_ctx=256, n_threads=1, n_gpu_layers=TEST_NGL)
    try:
        prompt = m.tokenize(b"The quick brown fox", add_bos=True, special=True)
        greedy = SamplerSpec(temperature=0)
        layers = m.info.moe_layers
        profiles = [Profile(ModelRef.of(m.info), [ExpertRule(il, e, "activate") for il in layers], [], name=f"e{e}")
                    for e in (0, 1)]
        eng = BatchEngine(m, 1, 128)
        eng.slots.n_slots = 1
        out: list = [None, None]
        pending = [(i, Request(prompt, profile=p, max_tokens=4, sampling=greedy, trace=True))
                   for i, p in enumerate(profiles)]
        try:
            eng.run(lambda idle: pending.pop(0) if pending else None, out.__setitem__)
        finally:
            eng.close()
    finally:
        m.close()
    for e, r in enumerate(out):
        assert isinstance(r, Result)
        assert _has(r.experts, [e] * len(layers)).all(), f"profile e{e} not in force"


def test_streaming_stop_strings_and_cancellation(llm):
    base = _run(llm, [Request(_prompt(llm, QUESTIONS[0]), max_tokens=16, sampling=SamplerSpec(temperature=0))])[0]
    assert len(base.text) > 4 and base.finish_reason in ("stop", "length")
    pieces: list[str] = []
    stop = base.text[2:4]
    seen = 0

    def cancel_after_3():
        nonlocal seen
        seen += 1
        return seen > 3

    r = _run(llm, [
        Request(_prompt(llm, QUESTIONS[0]), max_tokens=16, sampling=SamplerSpec(temperature=0), on_text=pieces.append),
        Request(_prompt(llm, QUESTIONS[0]), max_tokens=16, sampling=SamplerSpec(temperature=0), stop=[stop]),
        Request(_prompt(llm, QUESTIONS[0]), max_tokens=16, sampling=SamplerSpec(temperature=0),
                cancelled=cancel_after_3),
    ])
    assert "".join(pieces) == r[0].text == base.text
    assert r[1].text == base.text[: base.text.find(stop)] and r[1].finish_reason == "stop"
    assert r[2].finish_reason == "cancelled" and len(r[2].tokens) == 3


def test_a_request_that_cannot_start_fails_alone(llm):
    too_long = Request(_prompt(llm, "apples " * 300), max_tokens=8)
    bad_grammar = Request(_prompt(llm, QUESTIONS[1]), max_tokens=8, sampling=SamplerSpec(grammar="root ::= ("))
    bad_phase = Request(_prompt(llm, QUESTIONS[1]), max_tokens=8, phase="later")
    good = Request(_prompt(llm, QUESTIONS[2]), max_tokens=8, sampling=SamplerSpec(temperature=0))
    r = _run(llm, [too_long, bad_grammar, good, bad_phase])
    assert isinstance(r[0], SteerError) and "raise --ctx" in str(r[0])
    assert isinstance(r[1], SteerError) and "grammar" in str(r[1])
    assert isinstance(r[3], SteerError) and "steer_phase" in str(r[3])
    assert isinstance(r[2], Result) and r[2].tokens


def test_more_conversations_than_sequences_all_finish_with_mixed_profiles(llm, forced):
    p, fe, alone = forced
    reqs = [Request(_prompt(llm, q), profile=p if i % 2 else None, max_tokens=12,
                    sampling=SamplerSpec(temperature=0), trace=True) for i, q in enumerate(QUESTIONS * 2)]
    got = _run(llm, reqs, n_seq=3)
    for i, r in enumerate(got):
        assert isinstance(r, Result)
        if i % 2:
            assert _has(r.experts, fe).all()
        else:
            assert r.tokens == alone[i % len(QUESTIONS)].tokens


def test_the_hook_engine_cannot_steer_per_sequence():
    m = SteeredLlama(DEMO, n_ctx=256, n_threads=1, engine="hook")
    try:
        with pytest.raises(SteerError, match="graph engine"):
            BatchEngine(m, 2, 128)
    finally:
        m.close()
