"""The server's queue and worker (scheduler.py) on their own: no model, no HTTP.

The worker only feeds jobs to an executor, so a fake executor shows the queue's rules, and a
fake model shows what SerialExecutor does with a job."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest

from steer_gguf.serve.scheduler import Job, QueueFull, SerialExecutor, ShuttingDown, Worker


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def job(loop, stream=False, profile=None, trace=False, **kwargs) -> Job:
    return Job(chat=False, stream=stream, kwargs={"prompt": "hi", "max_tokens": 3, "stream": stream, **kwargs},
               profile_name="p" if profile else "none", profile=profile, trace=trace, loop=loop,
               events=asyncio.Queue())


def events(j: Job) -> list[tuple]:
    """What the job emitted so far (run from the loop's thread, after the executor returned)."""
    j.loop.run_until_complete(asyncio.sleep(0))
    out = []
    while not j.events.empty():
        out.append(j.events.get_nowait())
    return out


def until_end(j: Job) -> list[tuple]:
    """Everything a worker thread emits for the job, up to its "end"."""
    out = []
    while not out or out[-1][0] != "end":
        out.append(j.loop.run_until_complete(asyncio.wait_for(j.events.get(), 10)))
    return out


# ---- the worker, with a fake executor ---------------------------------------------------------
class Recorder:
    def __init__(self, fail_on: str | None = None):
        self.stopping = False
        self.ran: list[Job] = []
        self.fail_on = fail_on

    def execute(self, j: Job) -> None:
        self.ran.append(j)
        if j.kwargs["prompt"] == self.fail_on:
            raise ValueError("bad prompt")  # the worker finishes the job with it
        j.emit("result", {"prompt": j.kwargs["prompt"]})
        j.finish()


def test_worker_feeds_the_executor_and_survives_its_errors(loop):
    ex = Recorder(fail_on="bad")
    w = Worker(ex, max_queue=4)
    jobs = [job(loop, prompt=p) for p in ("a", "bad", "b")]
    skipped = job(loop, prompt="gone")
    skipped.cancelled = True  # its client left while it waited
    for j in (jobs[0], skipped, *jobs[1:]):
        w.submit(j)
    w.start()
    assert until_end(jobs[0]) == [("result", {"prompt": "a"}), ("end", None)]
    (kind, err), end = until_end(jobs[1])
    assert kind == "error" and isinstance(err, ValueError) and end == ("end", None)
    assert until_end(jobs[2])[0] == ("result", {"prompt": "b"})
    assert [j.kwargs["prompt"] for j in ex.ran] == ["a", "bad", "b"]
    assert w.served == 3 and not w.busy
    w.stop()
    assert ex.stopping


class Admitter:
    """How a batched executor uses the seam: execute() only admits the job; it finishes later."""

    def __init__(self):
        self.stopping = False
        self.admitted: list[Job] = []
        self.two = threading.Event()

    def execute(self, j: Job) -> None:
        self.admitted.append(j)
        if len(self.admitted) == 2:
            self.two.set()


def test_an_executor_may_hold_several_jobs(loop):
    ex = Admitter()
    w = Worker(ex, max_queue=4)
    a, b = job(loop, prompt="a"), job(loop, prompt="b")
    w.submit(a)
    w.submit(b)
    w.start()
    assert ex.two.wait(10)
    assert w.busy and w.running == 2 and w.served == 0  # both running at once, neither over
    b.emit("result", {"prompt": "b"})
    b.finish()
    assert until_end(b) == [("result", {"prompt": "b"}), ("end", None)]
    assert w.busy and w.served == 1
    a.finish(RuntimeError("decode failed"))
    a.finish()  # a second finish changes nothing
    assert [k for k, _ in until_end(a)] == ["error", "end"] and events(a) == []
    assert not w.busy and w.served == 2
    w.stop()


def test_the_queue_is_bounded(loop):
    w = Worker(Recorder(), max_queue=2)  # not started: nothing leaves the queue
    w.submit(job(loop))
    w.submit(job(loop))
    with pytest.raises(QueueFull):
        w.submit(job(loop))


# ---- SerialExecutor, with a fake model ----------------------------------------------------------
class FakeLlama:
    """What SerialExecutor uses of a SteeredLlama: a completion samples through `sample`."""

    def __init__(self):
        self.lock = threading.RLock()
        self.profile = None
        self.switches = 0
        self.closed = False
        self.resets = 0

    def set_profile(self, p) -> None:
        self.profile = p
        self.switches += 1

    def sample(self) -> int:
        return 7

    def reset(self) -> None:
        self.resets += 1

    @contextlib.contextmanager
    def recording(self):
        class Log:
            layers = [1, 2]

            def tail(self, n):
                return np.zeros((n, 2, 1), dtype=np.int32)

        yield Log()

    def create_completion(self, prompt, max_tokens, stream=False):
        if not stream:
            return {"text": "".join(str(self.sample()) for _ in range(max_tokens))}
        return ({"text": str(self.sample())} for _ in range(max_tokens))

    def close(self) -> None:
        self.closed = True


def test_serial_executor_result_and_stream(loop):
    ex = SerialExecutor(FakeLlama())
    j = job(loop)
    ex.execute(j)
    assert events(j) == [("result", {"text": "777", "steer_profile": "none"}), ("end", None)]
    j = job(loop, stream=True, trace=True)
    ex.execute(j)
    got = events(j)
    assert [k for k, _ in got] == ["chunk"] * 3 + ["end"]
    got = got[:-1]
    assert "steer_profile" in got[-1][1] and "steer_trace" not in got[0][1]  # only the last chunk carries them
    assert got[-1][1]["steer_trace"] == {"layers": [1, 2], "tokens": [7, 7, 7], "experts": [[[0], [0]]] * 3}
    assert ex.llm.resets == 1  # traced from a clean state


def test_serial_executor_switches_profiles_only_on_change(loop):
    ex = SerialExecutor(FakeLlama())
    prof = object()
    for p in (None, prof, prof, None):
        ex.execute(job(loop, profile=p))
    assert ex.llm.switches == 2


def test_serial_executor_stops_a_cancelled_job(loop):
    ex = SerialExecutor(FakeLlama())
    j = job(loop, stream=True, max_tokens=100)
    j.cancelled = True  # the client left: the next sampled token stops it
    ex.execute(j)
    assert events(j) == [("end", None)]  # nothing generated, nothing to report
    assert "sample" not in vars(ex.llm)  # the hook is gone


def test_serial_executor_shut_down(loop):
    ex = SerialExecutor(FakeLlama())
    ex.shut_down()
    assert ex.llm.closed
    j = job(loop)
    ex.execute(j)  # one that was still queued: answered, not run
    (kind, err), end = events(j)
    assert kind == "error" and isinstance(err, ShuttingDown) and end == ("end", None)
