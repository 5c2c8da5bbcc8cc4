"""The server's request queue: a bounded queue of jobs, one worker thread, one executor.

The worker only takes jobs off the queue, skips those whose client already left, and hands
each to the executor, which streams what the job produces through `job.emit` and ends it
with `job.finish`. `SerialExecutor` sees each job through before it returns; `BatchExecutor` decodes several
jobs together and returns as soon as it can take another one, finishing each job when its
decoding ends.

Nothing here knows HTTP: errors travel as exceptions and the server maps them to statuses.
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Protocol

from ..errors import SteerError
from ..profile import Profile

if TYPE_CHECKING:  # the worker's logic needs no model: importing it loads no native library
    from ..engine.steered import SteeredLlama


@dataclass
class Job:
    chat: bool                      # create_chat_completion, else create_completion
    stream: bool
    kwargs: dict                    # the llama-cpp-python call's arguments
    profile_name: str
    profile: Optional[Profile]      # None: unsteered
    trace: bool                     # add steer_trace to the last chunk or the result
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue           # (kind, payload): "chunk"s or a "result", or an "error"; then "end"
    cancelled: bool = False         # the client went away: stop generating
    on_finish: Optional[Callable[[], None]] = None  # the worker's count of running jobs
    finished: bool = False          # "end" was emitted
    phase: str = "all"              # steer the prompt and the answer, or only one (slots.PHASES)

    def emit(self, kind: str, payload: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def finish(self, error: Optional[Exception] = None) -> None:
        """The job's last events: its error if it failed, then "end". A second call does nothing:
        the worker finishes a job whose executor raised, finished or not."""
        if self.finished:
            return
        self.finished = True
        if error is not None:
            self.emit("error", error)
        if self.on_finish is not None:
            self.on_finish()  # before "end": a client that saw the end sees the worker idle
        self.emit("end", None)


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    """The model is closing: the job was not run."""


class Cancelled(Exception):
    pass


class Executor(Protocol):
    stopping: bool  # set once the server shuts down: every job from then on ends in ShuttingDown

    def execute(self, job: Job) -> None:
        """Take `job`: emit its "chunk"s or its "result", and `job.finish()` it (with the error if
        it failed). Return when ready for the next job; raising finishes the job with that error."""


class Worker:
    """Feeds queued jobs to `executor`. `max_queue` bounds the jobs waiting behind the running ones."""

    def __init__(self, executor: Executor, max_queue: int):
        self.executor = executor
        self.jobs: queue.Queue[Optional[Job]] = queue.Queue(maxsize=max_queue)
        self.running = 0  # jobs handed to the executor and not finished
        self.served = 0
        self.cancelled = 0  # jobs whose client left before their end (running or still queued)
        self._count = threading.Lock()  # a batched executor finishes jobs from its own threads
        self._thread = threading.Thread(target=self._run, name="steer-gguf-worker", daemon=True)

    @property
    def busy(self) -> bool:
        return self.running > 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.executor.stopping = True  # jobs still queued are answered 503, not run
        with contextlib.suppress(queue.Full):
            self.jobs.put_nowait(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled:  # its client left while it waited
                with self._count:
                    self.cancelled += 1
                continue
            with self._count:
                self.running += 1
            job.on_finish = lambda job=job: self._finished(job)
            try:
                self.executor.execute(job)
            except Exception as e:  # never let one request stop the worker
                job.finish(e)

    def _finished(self, job: Job) -> None:
        with self._count:
            self.running -= 1
            self.served += 1
            # read before "end" is emitted, so a job that ran to its end is never counted here
            self.cancelled += job.cancelled


class SerialExecutor:
    """One job at a time on one model, holding `llm.lock` from the profile switch to the last
    streamed chunk, so a request can never run under another request's profile."""

    def __init__(self, llm: SteeredLlama):
        self.llm = llm
        self.stopping = False

    def execute(self, job: Job) -> None:
        try:
            self._generate(job)
        except Exception as e:
            job.finish(e)
        else:
            job.finish()

    def _generate(self, job: Job) -> None:
        llm = self.llm
        with llm.lock:
            if self.stopping:  # checked under the lock: whoever closes the model holds it
                raise ShuttingDown()
            if job.phase != "all":
                raise SteerError(f"steer_phase {job.phase!r} needs per-sequence steering (serve --engine graph)")
            if llm.profile is not job.profile:
                # only on a change: set_profile drops the prompt cache, which is only
                # valid for the profile it was computed under
                llm.set_profile(job.profile)
            call = llm.create_chat_completion if job.chat else llm.create_completion
            with contextlib.ExitStack() as stack:
                sampled = stack.enter_context(_sampling_hook(llm, job))
                if job.trace:
                    # a fully cached prompt is sampled without a decode, which would leave
                    # the first token's routing unrecorded: start from a clean state
                    llm.reset()
                    log = stack.enter_context(llm.recording())
                last = None
                try:
                    out = call(**job.kwargs)
                    if not job.stream:
                        last = out
                    else:
                        for chunk in out:
                            if last is not None:
                                job.emit("chunk", last)
                            last = chunk  # held back: the trace goes into the final chunk
                except Cancelled:
                    return
            if last is None:
                return
            last["steer_profile"] = job.profile_name
            if job.trace:
                last["steer_trace"] = routing_trace(log, sampled)
            job.emit("chunk" if job.stream else "result", last)

    def shut_down(self) -> None:
        """Refuse every job from now on, let a running one finish, then close the model."""
        self.stopping = True
        with self.llm.lock:
            self.llm.close()


class BatchExecutor:
    """Up to n_parallel jobs decoded together (batch.BatchEngine, on a context of its own),
    each under its own profile and steering phase. execute() returns as soon as a sequence is
    free for the next job. A job that needs what only llama-cpp-python's own completion path
    serves (logprobs, tools, response_format, ...) runs through a SerialExecutor on the
    model's main context instead, beside the batch."""

    def __init__(self, llm: SteeredLlama, n_parallel: int, n_ctx_seq: int):
        from ..engine.batch import BatchEngine

        self.llm = llm
        self.n_ctx_seq = n_ctx_seq
        self.stopping = False
        self.serial = SerialExecutor(llm)
        self.engine = BatchEngine(llm, n_parallel, n_ctx_seq)
        self._free = threading.Semaphore(self.engine.n_seq)
        self._inbox: queue.Queue = queue.Queue()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="steer-gguf-batch", daemon=True)
        self._thread.start()

    def execute(self, job: Job) -> None:
        from .completions import serial_only

        if self.stopping:
            raise ShuttingDown()
        needs = serial_only(job.kwargs)
        if needs:
            if job.phase != "all":
                raise SteerError(f"steer_phase {job.phase!r} cannot be combined with {', '.join(needs)}")
            self.serial.execute(job)
            return
        self._free.acquire()  # wait for a free sequence: the queue behind stays bounded
        try:
            if self.stopping:
                raise ShuttingDown()
            self._inbox.put(self._prepare(job))
        except BaseException:
            self._free.release()
            raise

    def _prepare(self, job: Job):
        from .completions import Responder, to_request

        resp = Responder(job.chat, str(job.kwargs.get("model") or ""))
        on_text = None
        if job.stream:
            if job.chat:
                job.emit("chunk", resp.chunk(role=True))
            on_text = lambda piece: job.emit("chunk", resp.chunk(piece))  # noqa: E731
        req = to_request(self.llm, job.kwargs, self.n_ctx_seq, job.profile, job.phase, job.trace, on_text,
                         lambda: job.cancelled)
        return job, resp, req

    def _loop(self) -> None:
        def next_request(idle: bool):
            while True:
                if idle and self._closing:
                    return None
                try:
                    item = self._inbox.get() if idle else self._inbox.get_nowait()
                except queue.Empty:
                    return None
                if item is None:
                    self._closing = True
                    continue
                job, resp, req = item
                if self.stopping:
                    self._free.release()
                    job.finish(ShuttingDown())
                    continue
                return (job, resp), req

        self.engine.run(next_request, self._done)

    def _done(self, key, r) -> None:
        job, resp = key
        self._free.release()
        if isinstance(r, Exception):
            job.finish(r)
            return
        if r.finish_reason == "cancelled":
            job.finish()
            return
        last = resp.chunk(finish="length" if r.finish_reason == "length" else "stop") if job.stream else resp.result(r)
        last["steer_profile"] = job.profile_name
        if job.trace:
            last["steer_trace"] = {"layers": list(self.llm.info.moe_layers), "tokens": list(r.tokens),
                                   "experts": r.experts.tolist()}
        job.emit("chunk" if job.stream else "result", last)
        job.finish()

    def shut_down(self, timeout: float = 60.0) -> None:
        """Refuse new jobs, let the running ones finish, then close the model."""
        self.stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            return  # still decoding on the weights: closing them now would pull them from under it
        self.engine.close()
        self.serial.shut_down()


@contextlib.contextmanager
def _sampling_hook(llm: SteeredLlama, job: Job) -> Iterator[list[int]]:
    """Sees every token llama-cpp-python samples (the end-of-generation token included):
    their count says how many recorded forward passes belong to the completion, and a
    request whose client left stops at the next token, even while llama-cpp-python holds
    text back (stop-sequence and UTF-8 lookahead). Installed on the instance, and only
    while the lock is held."""
    tokens: list[int] = []
    sample = type(llm).sample.__get__(llm)

    def hooked_sample(*args, **kwargs):
        if job.cancelled:
            raise Cancelled()
        t = sample(*args, **kwargs)
        tokens.append(int(t))
        return t

    llm.sample = hooked_sample  # type: ignore[method-assign]
    try:
        yield tokens
    finally:
        del llm.sample


def routing_trace(log, sampled: list[int]) -> dict:
    """Row i: the experts chosen in each MoE layer by the forward pass that produced sampled
    token i (its input is the token before it: the prompt's last token for row 0). The last
    sampled token is never fed back through the model, so this is the only way every
    generated token gets a row."""
    n = len(sampled)
    experts = log.tail(n).tolist() if n else []
    return {"layers": list(log.layers), "tokens": list(sampled), "experts": experts}
