"""PNG pictures of evaluations, sweeps, audits, detection tables and profiles (matplotlib,
an optional dependency: `pip install 'steer-gguf[plot]'`)."""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from ..errors import SteerError
from ..fileio import atomic_write


def require() -> None:
    """Fail before any work when a plot was asked for and matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SteerError("--plot needs matplotlib: pip install 'steer-gguf[plot]'") from None


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> None:
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


_KIND_COLOURS = {"unsteered": "#777777", "profile": "#1f77b4", "control": "#ff7f0e"}


def eval_plot(report, path: str) -> None:
    """Target-label rate with its Wilson interval per condition (primary group), KL beside it."""
    plt = pyplot()
    conds = report.conditions
    g = report.primary
    names = [c.name for c in conds]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * len(conds)), sharey=True,
                                  gridspec_kw={"width_ratios": [3, 1]})
    y = np.arange(len(conds))
    for i, c in enumerate(conds):
        s = c.groups[g]
        colour = _KIND_COLOURS.get(c.kind, "#333333")
        if s.target_rate is None:  # unsteered has no target: its rates are the dashed lines
            continue
        lo, hi = s.target_ci
        ax.barh(i, 100 * s.target_rate, color=colour, alpha=0.8)
        ax.errorbar(100 * s.target_rate, i, xerr=[[100 * (s.target_rate - lo)], [100 * (hi - s.target_rate)]],
                    color="black", capsize=3)
        ax.text(101, i, f"{c.target} {100 * s.target_rate:.0f}%  ({s.effect:+.0f}, p={s.p:.1g})", va="center",
                fontsize=8)
    base = conds[0].groups[g]
    for lab, style in zip(report.labels, ("--", ":")):
        ax.axvline(100 * base.counts.get(lab, 0) / max(1, base.n), color="#777777", ls=style, lw=1,
                   label=f"unsteered: {lab}")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 140)
    ax.set_xlabel(f"% answers with the condition's target label ({g}, 95% Wilson interval)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8)
    ax.set_title(f"{report.behavior}: {report.n_items} prompts x {report.sampling.samples} samples")
    ax2.barh(y, [c.kl or 0.0 for c in conds], color=[_KIND_COLOURS.get(c.kind, "#333333") for c in conds])
    ax2.set_xlabel("KL(unsteered || steered), nats/token")
    save(fig, path)


def sweep_plot(points: list[dict[str, Any]], path: str, title: str, max_kl: float | None = None) -> None:
    """tune's sweep: effect (with significance) and KL against profile size, per schedule arm."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    arms = sorted({p["arm"] for p in points})
    for arm in arms:
        pts = sorted((p for p in points if p["arm"] == arm), key=lambda p: p["size"])
        xs = [p["size"] for p in pts]
        ax.plot(xs, [p["effect"] for p in pts], marker="o", label=arm)
        for p in pts:
            if p["significant"]:
                ax.plot(p["size"], p["effect"], marker="o", ms=11, mfc="none", color="black")
            if p.get("chosen"):
                ax.plot(p["size"], p["effect"], marker="*", ms=18, color="red")
        ax2.plot(xs, [p["kl"] for p in pts], marker="o", label=arm)
    if max_kl is not None:
        ax2.axhline(max_kl, color="red", ls="--", lw=1, label="KL budget")
    ax.axhline(0, color="#777777", lw=1)
    ax.set_ylabel("shift toward target (points)")
    ax.set_title(title + "  (ringed: significant; star: chosen)")
    ax.legend(fontsize=8)
    ax2.set_ylabel("KL (nats/token)")
    ax2.set_xlabel("experts in the profile")
    ax2.set_xscale("log", base=2)
    ax2.legend(fontsize=8)
    save(fig, path)


def audit_plot(curve: list[dict[str, Any]], path: str, title: str) -> None:
    """The attack curve: refusal rate as the top-N experts are deactivated, with controls."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ns = [p["n"] for p in curve]
    rate = [100 * p["rate"] for p in curve]
    lo = [100 * p["ci"][0] for p in curve]
    hi = [100 * p["ci"][1] for p in curve]
    ax.plot(ns, rate, marker="o", color="#d62728", label="top-N experts deactivated")
    ax.fill_between(ns, lo, hi, color="#d62728", alpha=0.15)
    ctrl = [(p["n"], 100 * p["control_rate"]) for p in curve if p.get("control_rate") is not None]
    if ctrl:
        ax.plot([c[0] for c in ctrl], [c[1] for c in ctrl], marker="s", color="#777777", ls="--",
                label="random controls (mean)")
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_ylim(-2, 102)
    ax.set_xlabel("experts deactivated (N)")
    ax.set_ylabel("% refusals on held-out harmful prompts")
    ax.set_title(title)
    ax.legend()
    save(fig, path)


def detection_heatmap(table, path: str, picked: list[tuple[int, int]] | None = None, title: str = "") -> None:
    """The table's ranking statistic (risk difference, or a causal table's effect) per layer x
    expert, diverging colours; `picked` experts outlined."""
    plt = pyplot()
    layers = table.layers
    grid = np.zeros((len(layers), table.n_expert))
    row = {l: i for i, l in enumerate(layers)}
    grid[[row[int(l)] for l in table.layer], table.expert] = table.score
    lim = max(1e-6, float(np.abs(grid).max()))
    fig, ax = plt.subplots(figsize=(min(18, 2.5 + table.n_expert * 0.18), 1.6 + len(layers) * 0.3))
    im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    for layer, expert in picked or []:
        if layer in row:
            ax.add_patch(plt.Rectangle((expert - 0.5, row[layer] - 0.5), 1, 1, fill=False, ec="black", lw=1.5))
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title or "red: toward behavior 1, blue: toward behavior 2; outlined: picked")
    fig.colorbar(im, ax=ax, label="risk difference" if table.effect is None else "causal effect")
    save(fig, path)


def profile_plot(profile, n_layer: int, n_expert: int, path: str) -> None:
    """Which experts a profile forces on (+1) or off (-1), and its biases, per layer."""
    plt = pyplot()
    grid = np.zeros((n_layer, n_expert))
    for r in profile.experts:
        grid[r.layer, r.expert] = 1.0 if r.action == "activate" else -1.0
    for b in profile.bias:
        grid[b.layer, b.expert] += float(np.clip(b.value, -1, 1)) * 0.5
    used = sorted({r.layer for r in profile.experts} | {b.layer for b in profile.bias}) or list(range(n_layer))
    lo, hi = min(used), max(used)
    fig, ax = plt.subplots(figsize=(min(18, 2.5 + n_expert * 0.18), 1.6 + (hi - lo + 1) * 0.3))
    im = ax.imshow(grid[lo:hi + 1], aspect="auto", cmap="PiYG", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_yticks(range(hi - lo + 1), [str(l) for l in range(lo, hi + 1)])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"profile {profile.name}: green forced on, pink forced off (half tones: bias)")
    fig.colorbar(im, ax=ax)
    save(fig, path)


def detection_plot(table_path: str, path: str, pick: int, info) -> None:
    """The written table as a heatmap, with the experts `profile make --activate pick` takes
    outlined."""
    from ..detect.risk import DetectionTable

    t = DetectionTable.from_csv(table_path)
    picked = []
    if pick:
        n_pos = min(pick, int((t.score > 0).sum()), info.n_expert_used * len(info.moe_layers))
        if n_pos:
            try:
                picked = [(r.layer, r.expert) for r in t.make_profile(info, activate=n_pos).experts]
            except SteerError:  # fewer pickable experts under the k-per-layer cap: outline none
                picked = []
    what = "risk difference" if t.effect is None else "causal effect"
    detection_heatmap(t, path, picked, f"{os.path.basename(table_path)}: {what} (red: behavior 1, "
                      f"blue: behavior 2); outlined: the top {len(picked)} to activate")


def usage_plot(stats: dict, path: str) -> None:
    """`steer-gguf stats --plot`: each MoE layer's share of routing per expert."""
    plt = pyplot()
    share = np.array([l["share"] for l in stats["layers"]])
    fig, ax = plt.subplots(figsize=(min(16, 2 + share.shape[1] * 0.15), 1.5 + share.shape[0] * 0.25))
    im = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(stats["layers"])), [str(l["layer"]) for l in stats["layers"]])
    ax.set_title(f"expert usage share: {stats['model']}")
    fig.colorbar(im, ax=ax)
    save(fig, path)


def compare_plot(comparisons: list, path: str) -> None:
    """`detect compare --plot`: each pair of tables as a scatter of risk differences (one point
    per expert; filled where significant in both, hollow otherwise), the diagonal of perfect
    agreement, and the top-N overlap beside it. Several comparisons: one panel each."""
    plt = pyplot()
    n = len(comparisons)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(4.2 * cols, 6.2 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.1] * rows})
    for j in range(n, rows * cols):  # empty cells of the last row
        axes[2 * (j // cols)][j % cols].set_visible(False)
        axes[2 * (j // cols) + 1][j % cols].set_visible(False)
    for j, c in enumerate(comparisons):
        row, col = 2 * (j // cols), j % cols
        ax = axes[row][col]
        lim = max(0.05, float(np.abs(np.r_[c.a, c.b]).max()) * 1.08)
        ax.plot([-lim, lim], [-lim, lim], color="#999999", lw=0.8, zorder=0)
        both = c.sig_a & c.sig_b if c.sig_a is not None and c.sig_b is not None else np.zeros(c.a.size, bool)
        ax.scatter(c.a[~both], c.b[~both], s=14, facecolors="none", edgecolors="#1f77b4", lw=0.8,
                   label="not significant in both")
        ax.scatter(c.a[both], c.b[both], s=14, color="#d62728", label="significant in both")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel(f"risk_diff, {c.names[0]}")
        ax.set_ylabel(f"risk_diff, {c.names[1]}")
        ax.set_title(f"Spearman {c.spearman:+.3f}", fontsize=10)
        if j == 0:
            ax.legend(fontsize=7, loc="upper left")
        bx = axes[row + 1][col]
        sizes = list(c.overlap)
        bx.bar(range(len(sizes)), [c.overlap[s] / s for s in sizes], color="#2ca02c")
        bx.set_xticks(range(len(sizes)), [f"top-{s}" for s in sizes], fontsize=8)
        bx.set_ylim(0, 1.05)
        bx.set_ylabel("overlap share")
    save(fig, path)


def prune_plot(report, kept: dict[int, list[int]], path: str) -> None:
    """`prune --plot`: which experts each MoE layer keeps, and KL against size per criterion
    (random: the mean of its seeds, each seed a dot)."""
    plt = pyplot()
    layers = sorted(kept)
    grid = np.zeros((len(layers), report.n_expert))
    for j, il in enumerate(layers):
        grid[j, kept[il]] = 1
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 1.5 + len(layers) * 0.25 + 2))
    ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(layers)), [str(il) for il in layers])
    ax.set_title("kept (black) and dropped experts")
    mib = lambda p: p.size_bytes / 2**20  # noqa: E731
    for crit in sorted({p.criterion for p in report.points} - {"random"}):
        pts = sorted((p for p in report.points if p.criterion == crit), key=mib)
        ax2.plot([mib(p) for p in pts], [p.kl for p in pts], marker="o", label=crit)
    rnd = [p for p in report.points if p.criterion == "random"]
    ax2.scatter([mib(p) for p in rnd], [p.kl for p in rnd], s=10, color="#999999", label="random seeds")
    keeps = sorted({p.keep for p in rnd})
    ax2.plot([next(mib(p) for p in rnd if p.keep == k) for k in keeps], [report.random_mean(k)[0] for k in keeps],
             marker="s", color="#555555", label="random (mean)")
    ax2.set_xlabel("tensor MiB after the prune")
    ax2.set_ylabel("KL to the source (nats/token, held-out text)")
    ax2.set_title(f"size against cost (source {report.size_before / 2**20:.1f} MiB)")
    ax2.legend(fontsize=8)
    save(fig, path)
