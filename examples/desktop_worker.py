"""A desktop app's model worker: SteeredLlama in a background thread, jobs in, callbacks out.

The UI thread never touches llama.cpp: it puts jobs on a queue and gets text back through
callbacks, so the window stays responsive while the model generates. Each job names its own
profile; the worker applies it and generates under `llm.lock`, so a profile switch can never
land in the middle of an answer.

    python examples/desktop_worker.py model.gguf [--profile safe.json] [--prompt TEXT ...]

In a real GUI, make `on_token`/`on_done` hand the text to the UI thread (Qt: emit a signal;
Tkinter: root.after(0, ...); GTK: GLib.idle_add), since widgets are not thread-safe.
"""
from __future__ import annotations

import argparse
import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from steer_gguf import Profile, SteerError, SteeredLlama


@dataclass
class Job:
    messages: list[dict]
    profile: Optional[Profile]  # None: upstream routing
    on_token: Callable[[str], None]
    on_done: Callable[[str, Optional[Exception]], None]
    max_tokens: int = 128
    cancel: threading.Event = field(default_factory=threading.Event)  # set: stop the answer early


class ModelWorker(threading.Thread):
    """Owns generation for one SteeredLlama; jobs run one at a time, in order."""

    def __init__(self, llm: SteeredLlama):
        super().__init__(name="model-worker", daemon=True)
        self.llm = llm
        self.jobs: queue.Queue[Optional[Job]] = queue.Queue()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def shutdown(self) -> None:
        self.jobs.put(None)
        self.join()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            parts: list[str] = []
            try:
                # one lock for the switch and the whole stream: another thread sharing
                # this model (say, a "compare" button) waits instead of re-steering it
                with self.llm.steering(job.profile):
                    for chunk in self.llm.create_chat_completion(messages=job.messages, max_tokens=job.max_tokens,
                                                                 temperature=0.0, stream=True):
                        if job.cancel.is_set():
                            break
                        piece = chunk["choices"][0]["delta"].get("content") or ""
                        if piece:
                            parts.append(piece)
                            job.on_token(piece)
                job.on_done("".join(parts), None)
            except Exception as e:  # report to the UI; the worker lives on for the next job
                job.on_done("".join(parts), e)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a MoE GGUF model")
    ap.add_argument("--profile", help="steering profile (JSON) for the steered answers")
    ap.add_argument("--prompt", action="append", help="a user message (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        threads = {} if args.threads is None else {"n_threads": args.threads, "n_threads_batch": args.threads}
        llm = SteeredLlama(args.model, n_ctx=2048, **threads)
        profile = Profile.load(args.profile) if args.profile else None
        if profile is not None:
            profile.check(llm.info)  # fail here, in the UI thread, not inside a job
    except SteerError as e:
        print(f"desktop_worker: error: {e}", file=sys.stderr)
        return 2

    worker = ModelWorker(llm)
    worker.start()
    prompts = args.prompt or ["Write one sentence about the sea."]
    finished = threading.Semaphore(0)
    print_lock = threading.Lock()  # stands in for "post to the UI thread"

    def job_for(prompt: str, p: Optional[Profile], label: str) -> Job:
        started = []

        def header() -> None:
            if not started:
                started.append(True)
                print(f"--- {label}: {prompt}")

        def on_token(piece: str) -> None:
            with print_lock:
                header()
                print(piece, end="", flush=True)

        def on_done(text: str, err: Optional[Exception]) -> None:
            with print_lock:
                header()
                print(f"\n[{label}] " + (f"failed: {err}" if err else f"{len(text)} characters") + "\n", flush=True)
            finished.release()

        return Job([{"role": "user", "content": prompt}], p, on_token, on_done, args.max_tokens)

    # everything queued at once, as a UI would on clicks: the worker takes the jobs in
    # order and switches profiles between them with no model reload
    jobs = [worker.submit(job_for(prompt, p, label)) for prompt in prompts
            for p, label in ((None, "unsteered"), (profile, f"steered by {profile.name}" if profile else "unsteered"))]
    for _ in jobs:
        finished.acquire()  # a UI would go on handling events here instead
    worker.shutdown()
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
