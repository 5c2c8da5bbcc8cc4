"""The one timing harness of the benchmarks that feed a README figure.

A single run of a few repetitions cannot tell a 1% cost from noise on a shared 2-core machine
(three runs of the old overhead benchmark gave 0.939, 0.985 and 1.059 for the same ratio). So:

- configurations are interleaved: every round runs each configuration once, in an order shuffled
  (seeded) anew each round, so drift and a neighbour's bursts hit all of them alike;
- warm-up rounds are run and discarded (weights paged in, graphs built);
- a figure is a ratio of two configurations' rates measured in the same round (paired), reported
  as the median of those paired ratios with a seeded bootstrap 95% interval;
- rounds are added until every watched figure's interval is no wider than a target width (at
  least `min_rounds`, at most `max_rounds` or a time cap);
- the CPU that other processes used during the run is read from /proc/stat, our own process's
  time (from /proc/self/stat) taken out, and recorded beside each figure with quiet / busy;
- each figure with a target ends in a verdict: "meets", "misses" or "cannot tell at this noise".

Everything statistical here is a pure function of its inputs so tests/test_bench_harness.py can
check it without a model or a fast machine.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

MEETS, MISSES, CANNOT_TELL = "meets", "misses", "cannot tell at this noise"
# other processes' average CPU use, in cores, under which a run counts as quiet: the kernel's
# own threads and the shell that started us stay below it on this machine
QUIET_CORES = 0.10

Measure = Callable[[], Mapping[str, float]]  # one run of a configuration: {metric: rate}


@dataclass(frozen=True)
class Target:
    """The band a figure must lie in: `low <= ratio` and/or `ratio <= high` (None: unbounded)."""

    low: float | None = None
    high: float | None = None

    def verdict(self, lo: float, hi: float) -> str:
        """meets: the whole interval is in the band; misses: none of it is; else cannot tell."""
        inside = (self.low is None or lo >= self.low) and (self.high is None or hi <= self.high)
        if inside:
            return MEETS
        outside = (self.low is not None and hi < self.low) or (self.high is not None and lo > self.high)
        return MISSES if outside else CANNOT_TELL

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in [{self.low:g}, {self.high:g}]"
        return f">= {self.low:g}" if self.low is not None else f"<= {self.high:g}"


@dataclass(frozen=True)
class Figure:
    """A reported ratio: rate of `num` over rate of `den` for one metric (e.g. "prefill")."""

    name: str
    metric: str
    num: str
    den: str
    target: Target | None = None
    watch: bool = True  # whether its interval width decides when the run may stop


def round_order(names: Sequence[str], rng: np.random.Generator) -> list[str]:
    """One round: every configuration once, in a fresh random order."""
    return [names[i] for i in rng.permutation(len(names))]


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> np.ndarray:
    """Ratios of measurements taken in the same round: slow drift of the machine cancels."""
    if len(num) != len(den):
        raise ValueError(f"unpaired: {len(num)} against {len(den)} measurements")
    return np.asarray(num, dtype=float) / np.asarray(den, dtype=float)


def median_ci(xs: Sequence[float], level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Median and its percentile-bootstrap interval; seeded, so the same data give the same interval."""
    x = np.asarray(xs, dtype=float)
    if x.size == 0:
        raise ValueError("no measurements")
    rng = np.random.default_rng(seed)
    boots = np.median(x[rng.integers(0, x.size, (n_boot, x.size))], axis=1)
    a = (1 - level) / 2
    return float(np.median(x)), float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))


# ---- the machine's load --------------------------------------------------------------------

def parse_proc_stat(text: str) -> dict[str, int]:
    """The aggregate `cpu` line of /proc/stat: busy, idle and steal jiffies.
    guest time is already counted in user, so it is not added again."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]] + [0] * 10
            user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
            return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}
    raise ValueError("no aggregate cpu line in /proc/stat")


def parse_self_stat(text: str) -> int:
    """Our own CPU jiffies from /proc/self/stat: utime + stime of all our threads, plus the
    children we waited for (cutime + cstime). The command name may hold spaces and ')', so
    the fields are counted from its last ')'."""
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is the state (field 3 of proc(5)); utime..cstime are fields 14..17
    return sum(int(f) for f in fields[11:15])


@dataclass
class LoadSample:
    wall: float
    busy: int
    steal: int
    own: int


@dataclass
class LoadMeter:
    """Reads the kernel's CPU counters; `between` gives what others used between two samples."""

    stat_path: str = "/proc/stat"
    self_path: str = "/proc/self/stat"
    hz: int = field(default_factory=lambda: os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)

    def sample(self) -> LoadSample | None:
        try:
            with open(self.stat_path) as f:
                s = parse_proc_stat(f.read())
            with open(self.self_path) as f:
                own = parse_self_stat(f.read())
        except (OSError, ValueError):
            return None  # no /proc (macOS): the load is then reported as unknown
        return LoadSample(time.monotonic(), s["busy"], s["steal"], own)

    def between(self, a: LoadSample | None, b: LoadSample | None) -> dict:
        return load_between(a, b, self.hz)


def load_between(a: LoadSample | None, b: LoadSample | None, hz: int) -> dict:
    """Average cores other processes kept busy (and the hypervisor stole) between two samples."""
    if a is None or b is None or b.wall <= a.wall:
        return {"other_cores": None, "steal_cores": None, "own_cores": None, "seconds": None, "quiet": None}
    secs = b.wall - a.wall
    own = (b.own - a.own) / hz / secs
    # the two counters tick separately, so a little of our time can show in one and not yet in
    # the other: never report negative load
    other = max(0.0, (b.busy - a.busy) / hz / secs - own)
    steal = (b.steal - a.steal) / hz / secs
    return {"other_cores": round(other, 4), "steal_cores": round(steal, 4), "own_cores": round(own, 4),
            "seconds": round(secs, 2), "quiet": other <= QUIET_CORES}


# ---- the run --------------------------------------------------------------------------------

def figure_result(fig: Figure, num: Sequence[float], den: Sequence[float], seed: int) -> dict:
    r = paired_ratios(num, den)
    med, lo, hi = median_ci(r, seed=seed)
    out = {"metric": fig.metric, "num": fig.num, "den": fig.den, "ratio": med, "ci95": [lo, hi],
           "width": hi - lo, "n": int(r.size), "paired": [float(x) for x in r]}
    if fig.target is not None:
        out["target"] = str(fig.target)
        out["verdict"] = fig.target.verdict(lo, hi)
    return out


def run_interleaved(configs: Mapping[str, Measure], figures: Sequence[Figure], *, min_rounds: int = 20,
                    max_rounds: int = 200, target_width: float = 0.02, warmup_rounds: int = 1, seed: int = 0,
                    max_seconds: float | None = None, meter: LoadMeter | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
    """Runs rounds of every configuration until each watched figure's 95% interval is at most
    `target_width` wide (in ratio units: 0.02 is 2% of a ratio near 1), or a cap is reached
    (`max_seconds` even before `min_rounds`).
    Returns the rates of every round, the figures with intervals and verdicts, and the load."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    meter = meter or LoadMeter()
    names = list(configs)
    rng = np.random.default_rng(seed)
    for _ in range(warmup_rounds):
        for name in round_order(names, rng):
            configs[name]()
    rates: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    orders, round_load = [], []
    start = meter.sample()
    t0 = time.monotonic()
    stop = "max_rounds"
    for rnd in range(max_rounds):
        before = meter.sample()
        order = round_order(names, rng)
        for name in order:
            for metric, rate in configs[name]().items():
                rates[name].setdefault(metric, []).append(float(rate))
        orders.append(order)
        round_load.append(meter.between(before, meter.sample()).get("other_cores"))
        # the time cap holds even before min_rounds: on a machine busy enough to slow a round
        # tenfold, a run must still end; its figures then say how few rounds they rest on
        if max_seconds is not None and time.monotonic() - t0 > max_seconds:
            stop = "max_seconds"
            break
        if rnd + 1 < min_rounds:
            continue
        widths = {f.name: figure_result(f, rates[f.num][f.metric], rates[f.den][f.metric], seed)["width"]
                  for f in figures if f.watch}
        log(f"round {rnd + 1}: widest watched interval {max(widths.values(), default=0):.4f}")
        if all(w <= target_width for w in widths.values()):
            stop = "width"
            break
    load = meter.between(start, meter.sample())
    load["per_round_other_cores"] = round_load
    out_figs = {}
    for f in figures:
        res = figure_result(f, rates[f.num][f.metric], rates[f.den][f.metric], seed)
        res["load"] = {k: load[k] for k in ("other_cores", "steal_cores", "quiet")}
        out_figs[f.name] = res
    return {"settings": {"min_rounds": min_rounds, "max_rounds": max_rounds, "target_width": target_width,
                         "warmup_rounds": warmup_rounds, "seed": seed, "max_seconds": max_seconds,
                         "quiet_below_cores": QUIET_CORES},
            "rounds": len(orders), "stopped_by": stop, "orders": orders, "load": load, "rates": rates,
            "figures": out_figs}


def format_figure(name: str, r: dict) -> str:
    """One line per figure: the ratio, its interval and width, the verdict and the load."""
    lo, hi = r["ci95"]
    other = r["load"]["other_cores"]
    load = "load unknown" if other is None else \
        f"others used {other:.2f} cores ({'quiet' if r['load']['quiet'] else 'busy'})"
    verdict = f"; target {r['target']}: {r['verdict']}" if "target" in r else ""
    return f"{name}: {r['ratio']:.4f} [{lo:.4f}, {hi:.4f}] width {r['width']:.4f}, n={r['n']}{verdict}; {load}"


def finish(result: Mapping, figures: Mapping[str, dict], json_path: str | None) -> None:
    """A benchmark's last step: its results to `json_path` (if given), and one line per figure."""
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    for name, r in figures.items():
        print(format_figure(name, r))


def add_arguments(ap) -> None:
    """The harness's options, the same in every benchmark that uses it."""
    ap.add_argument("--min-rounds", type=int, default=20, help="at least this many interleaved rounds [20]")
    ap.add_argument("--max-rounds", type=int, default=200, help="at most this many rounds [200]")
    ap.add_argument("--target-width", type=float, default=0.02,
                    help="stop once every watched 95%% interval is this narrow, in ratio units [0.02]")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop adding rounds after this long")
    ap.add_argument("--warmup-rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="seeds the round orders and the bootstrap")


def run_from_args(args, configs: Mapping[str, Measure], figures: Sequence[Figure]) -> dict:
    return run_interleaved(configs, figures, min_rounds=args.min_rounds, max_rounds=args.max_rounds,
                           target_width=args.target_width, warmup_rounds=args.warmup_rounds, seed=args.seed,
                           max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)


def agreement(runs: Sequence[Mapping], figure: str, max_width: float) -> dict:
    """Whether repeated runs agree on a figure: their intervals share a point, each is narrow enough."""
    cis = [r["figures"][figure]["ci95"] for r in runs]
    widths = [hi - lo for lo, hi in cis]
    return {"figure": figure, "ci95": cis, "widths": widths,
            "overlap": max(lo for lo, _ in cis) <= min(hi for _, hi in cis),
            "narrow": all(w <= max_width for w in widths),
            "quiet": [r["figures"][figure]["load"]["quiet"] for r in runs],
            "other_cores": [r["figures"][figure]["load"]["other_cores"] for r in runs]}


if __name__ == "__main__":
    # python benchmarks/harness.py FIGURE MAX_WIDTH RESULT.json...: do repeated runs agree?
    import json

    print(json.dumps(agreement([json.load(open(p)) for p in sys.argv[3:]], sys.argv[1], float(sys.argv[2])), indent=1))
