"""Progress bars on stderr for the long commands, fed by their on_progress callbacks."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

import click


class Progress:
    """A bar fed with finished work units (eval, tune, audit)."""

    def __init__(self, total: int, label: str):
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


@contextlib.contextmanager
def prefill_bar(n_conversations: int) -> Iterator[Callable[[int, int, int], None]]:
    """detect's bar: conversations prefilled, and the target tokens per second so far."""
    t0 = time.perf_counter()
    tokens = [0]
    with click.progressbar(length=n_conversations, label="prefilling", file=sys.stderr,
                           item_show_func=lambda _: f"{tokens[0] / max(1e-9, time.perf_counter() - t0):,.0f} target tok/s"
                           ) as bar:
        def progress(done, total, n_target):
            tokens[0] += n_target
            bar.update(done - bar.pos, current_item=done)

        yield progress


@contextlib.contextmanager
def phase_bar(label: str) -> Iterator[Callable[[int, int, str], None]]:
    """A bar that starts over with each phase of a run (causal detection: the candidates, then
    each greedy step), showing what it is doing."""
    with click.progressbar(length=1, label=label, file=sys.stderr, item_show_func=lambda s: s or "") as bar:
        def progress(done, total, what):
            if bar.length != total:  # a new phase
                bar.length, bar.pos = total, 0
            bar.update(done - bar.pos, current_item=what)

        yield progress
