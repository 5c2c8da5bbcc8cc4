"""Thread counts that follow the machine's load (engine/threads.py): what the governor
decides from the CPU counters, and that every decode path of a model applies it. The load is
simulated, so nothing here depends on how busy or fast the machine is."""
from __future__ import annotations

import pytest

from steer_gguf import BatchEngine, Request, SteeredLlama
from steer_gguf.engine.threads import CpuLoad, ThreadGovernor, choose, physical_cores


def test_choose_leaves_busy_cores_to_their_owners():
    assert choose(4, 4, 0.0) == 4
    assert choose(4, 4, 0.2) == 4     # background noise costs no thread
    assert choose(4, 4, 1.0) == 3     # one busy process: one core less
    assert choose(2, 2, 0.67) == 1    # its fair share while we spun on both cores
    assert choose(2, 2, 9.0) == 1     # never fewer than one
    assert choose(2, 8, 0.0) == 2     # never more than asked


class _Stat:
    """A /proc/stat whose busy and idle jiffies the test advances."""

    def __init__(self, path):
        self.path, self.busy, self.idle = path, 0, 0
        self.write()

    def write(self):
        self.path.write_text(f"cpu  {self.busy} 0 0 {self.idle} 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")


def test_cpu_load_counts_other_processes_only(tmp_path):
    import os

    tick = os.sysconf("SC_CLK_TCK")
    t, own = [0.0], [0.0]
    stat = _Stat(tmp_path / "stat")
    load = CpuLoad(str(stat.path), clock=lambda: t[0], own_cpu=lambda: own[0])
    # one second: 1.5 cores busy in all, 0.5 of them ours -> others kept 1.0 busy
    t[0], own[0] = 1.0, 0.5
    stat.busy, stat.idle = int(1.5 * tick), int(0.5 * tick)
    stat.write()
    assert load.other_busy() == pytest.approx(1.0, abs=0.02)
    t[0], own[0] = 2.0, 2.5  # then only we were busy
    stat.busy += 2 * tick
    stat.write()
    assert load.other_busy() == pytest.approx(0.0, abs=0.02)
    assert CpuLoad(str(tmp_path / "absent")).other_busy() is None  # not Linux: no opinion


class _FixedLoad:
    def __init__(self, busy):
        self.busy = busy

    def other_busy(self):
        return self.busy


def test_the_governor_follows_the_load_at_its_pace():
    now = [0.0]
    g = ThreadGovernor(4, 4, load=_FixedLoad(2.0), interval=1.0, clock=lambda: now[0], n_cpu=4)
    assert g.current() == (4, 4)          # until the first measurement: as configured
    now[0] = 1.0
    assert g.current() == (2, 2)
    g.load.busy = 0.0
    now[0] = 1.5
    assert g.current() == (2, 2)          # not measured again before the interval
    now[0] = 2.0
    assert g.current() == (4, 4)
    g.load = _FixedLoad(None)             # an unreadable measurement keeps the last choice
    now[0] = 3.0
    assert g.current() == (4, 4)


def _busy_machine(llm):
    llm.governor.load = _FixedLoad(1.0e6)
    llm.governor.interval = llm.governor._next = 0.0  # measured before every decode


def test_every_decode_path_uses_the_governed_count(make):
    import llama_cpp

    path = make("qwen3moe", n_layer=4)
    n = physical_cores()
    llm = SteeredLlama(path, n_ctx=256)
    try:
        assert llm.governor is not None and llm.context_params.n_threads == n
        _busy_machine(llm)
        toks = llm.tokenize(b"The 42 ducks", add_bos=True)
        llm.eval(toks)                                           # generation's decodes
        assert llama_cpp.llama_n_threads(llm._ctx.ctx) == 1
        assert llama_cpp.llama_n_threads_batch(llm._ctx.ctx) == 1
        tr = llm.trace_many([toks, toks[:3]])                    # the tracing context
        assert len(tr) == 2
        assert llama_cpp.llama_n_threads(llm._tctx.ctx.ctx) == 1
        eng = BatchEngine(llm, n_seq=2, n_ctx_seq=64)           # batched generation
        queue, done = [("a", Request(prompt=toks, max_tokens=2))], {}
        eng.run(lambda idle: queue.pop() if queue else None, done.__setitem__)
        assert list(done) == ["a"] and not isinstance(done["a"], Exception)
        assert llama_cpp.llama_n_threads(eng.ctx.ctx) == 1
    finally:
        llm.close()


def test_a_thread_count_given_is_kept(make):
    import llama_cpp

    llm = SteeredLlama(make("qwen3moe", n_layer=4), n_ctx=256, n_threads=2, n_threads_batch=2)
    try:
        assert llm.governor is None
        llm.eval(llm.tokenize(b"x", add_bos=True))
        assert llama_cpp.llama_n_threads(llm._ctx.ctx) == 2
    finally:
        llm.close()
