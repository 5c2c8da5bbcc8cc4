"""CPU threads that hold up on a busy machine.

ggml's threads meet at a spinning barrier after every op of the graph. When another process
takes one of their cores, the others spin until the descheduled one comes back: on this
project's 2-core benchmark machine, with one busy process beside it, a decode on 2 threads ran
at 19 tok/s where 1 thread ran 270 (benchmarks/contention.py). A laptop is never idle, so
when the user sets no thread count, every decode uses as many threads as the cores that other
processes leave free, re-measured a few times a second from /proc/stat, and at most the
machine's physical cores (llama.cpp's own default). A thread count the user gives is kept
as given, as llama.cpp keeps it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Callable

# a core counts as free when other processes use less than 1 - SLACK of it: background noise
# (a browser tab, a daemon waking up) does not cost a thread, a busy process does
SLACK = 0.3
INTERVAL_S = 0.25  # how often the load is measured


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once), as
    llama.cpp's cpu_get_num_physical_cores; half the logical CPUs where neither the topology
    nor sysctl tells (llama-cpp-python's default)."""
    if sys.platform == "darwin":  # llama.cpp counts the performance cores there
        for key in ("hw.perflevel0.physicalcpu", "hw.physicalcpu"):
            try:
                n = int(subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout)
            except (OSError, ValueError, subprocess.SubprocessError):
                continue
            if n > 0:
                return n
    cpus = usable_cpus()
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology"
        try:
            with open(f"{base}/core_id") as f1, open(f"{base}/physical_package_id") as f2:
                cores.add((f2.read().strip(), f1.read().strip()))
        except OSError:
            return max(len(cpus) // 2, 1)
    return max(len(cores), 1)


def usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def choose(max_threads: int, n_cpu: int, other_busy: float) -> int:
    """Threads for the next decode: the cores others leave free, 1..max_threads."""
    return max(1, min(max_threads, int(n_cpu - other_busy + SLACK)))


class CpuLoad:
    """How many cores processes other than this one kept busy since the last call, from the
    kernel's CPU counters and this process's own CPU time (None where /proc/stat is absent)."""

    def __init__(self, stat_path: str = "/proc/stat", clock: Callable[[], float] = time.monotonic,
                 own_cpu: Callable[[], float] | None = None):
        self.stat_path, self.clock = stat_path, clock
        self.own_cpu = own_cpu or (lambda: sum(os.times()[:2]))  # this process's user + system seconds
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        try:
            with open(self.stat_path) as f:
                cols = f.readline().split()
        except OSError:
            return None
        if not cols or cols[0] != "cpu" or len(cols) < 8:
            return None
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
        v = [int(x) for x in cols[1:9]] + [0] * (9 - len(cols[1:9]))
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / self.tick
        return self.clock(), busy, self.own_cpu()

    def other_busy(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        wall = now[0] - last[0]
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / wall)


class ThreadGovernor:
    """The thread counts for each decode while other processes come and go. Shared by every
    context of a model (decode threads and prompt threads alike); safe from any thread."""

    def __init__(self, max_threads: int, max_batch_threads: int, load: CpuLoad | None = None,
                 interval: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 n_cpu: int | None = None):
        self.max_threads, self.max_batch_threads = max_threads, max_batch_threads
        self.load = load if load is not None else CpuLoad()
        self.interval, self.clock = interval, clock
        self.n_cpu = n_cpu or len(usable_cpus())
        self.threads, self.batch_threads = max_threads, max_batch_threads
        self._next = clock() + interval
        self._lock = threading.Lock()
        self._set = None  # llama_set_n_threads, bound on first use

    def current(self) -> tuple[int, int]:
        """(decode threads, prompt threads) for a decode starting now."""
        with self._lock:
            now = self.clock()
            if now >= self._next:
                self._next = now + self.interval
                other = self.load.other_busy()
                if other is not None:
                    self.threads = choose(self.max_threads, self.n_cpu, other)
                    self.batch_threads = choose(self.max_batch_threads, self.n_cpu, other)
            return self.threads, self.batch_threads

    def apply(self, ctx) -> None:
        """Set the counts on a llama.cpp context before it decodes (two ints in its
        parameters: cheap enough for every decode)."""
        if self._set is None:
            from .runtime import load

            self._set = load()[0].llama_set_n_threads
        self._set(ctx, *self.current())
