"""The web page's routing view on a large model's answer: 48 MoE layers x 128 experts (top-8) x
2,000 tokens, in the system's headless Chromium (tests/webtools.py's helpers).

    python benchmarks/web_routing.py [--tokens 2000] [--layers 48] [--experts 128] [--k 8] [--json OUT]

The demo model serves the page; the trace is synthetic (random distinct experts and weights per
token and layer, a profile forcing 8 experts in every layer), handed to the view as an answer's
steer_trace would be. Measured in the page with performance.now():
  show      steer_trace -> typed arrays -> the one-pixel-per-cell image -> the first draw, per colouring
  draw      one redraw of the visible part (what a scroll or a zoom step costs), over a sweep of
            120 scroll positions across all 2,000 tokens, one per animation frame, at zooms 1, 4, 10, 24
  frame     the interval between those animation frames (16.7 ms at 60 Hz when nothing is late)
  hover     listing one token's experts and weights in all 48 layers
and how many elements the page holds before and after (a canvas view adds none per cell).
The frame budget is 16.7 ms (60 Hz): draw and hover must fit in it; show runs once per answer.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from webtools import (STYLE_EXPERTS, WebServer, find_chromium, launch, open_page,  # noqa: E402
                      style_profile, synthetic_trace)

BUDGET_MS = 1000 / 60


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "median": round(statistics.median(xs), 3), "p95": round(pct(xs, 0.95), 3),
            "max": round(max(xs), 3)}


SWEEP = """async (steps) => {
  const s = document.getElementById('routing-scroll'), st = steerUI.routing.stats;
  const max = s.scrollWidth - s.clientWidth, first = st.draws, stamps = [];
  for (let i = 0; i <= steps; i++) {
    s.scrollLeft = max * i / steps;
    await new Promise(r => requestAnimationFrame(t => { stamps.push(t); r(); }));
  }
  await new Promise(r => requestAnimationFrame(() => r()));
  return {draw: st.drawMs.slice(-(st.draws - first)), frames: stamps.slice(1).map((t, i) => t - stamps[i])};
}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "web-routing-cpu.json"))
    args = ap.parse_args()
    chromium = find_chromium()
    if chromium is None:
        sys.exit("web_routing: no Chromium installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as d:
        for style in STYLE_EXPERTS:
            style_profile(style, pathlib.Path(d))
        server = WebServer(pathlib.Path(d))
        try:
            with sync_playwright() as p:
                browser = launch(p, chromium)
                page = open_page(browser, server.page_url)
                page.click("#tabs button[data-view=routing]")
                before = page.evaluate("document.querySelectorAll('*').length")
                page.evaluate(f"window.bigTrace = {synthetic_trace(args.tokens, args.layers, args.experts, args.k)}")
                # a profile forcing the first k experts in every layer, as the view colours it
                page.evaluate(f"""window.bigRules = {{name: 'big', experts: bigTrace.layers.flatMap(l =>
                    Array.from({{length: {args.k}}}, (_, e) => ({{layer: l, expert: e, action: 'activate'}})))}}""")
                show = {}
                for mode in ("forced", "expert", "diff"):
                    page.select_option("#routing-mode", mode)
                    show[mode] = page.evaluate("""() => { const t0 = performance.now();
                        steerUI.routing.showTrace(bigTrace, bigRules, {weights: bigTrace.weights});
                        if (steerUI.routing.mode() === 'diff') steerUI.routing.setRetrace(
                            {pieces: bigTrace.tokens.map(String), weights: bigTrace.weights, experts: bigTrace.experts},
                            {experts: bigTrace.experts.map(r => r.map(l => l.map(e => (e + 1) % 128)))});
                        return performance.now() - t0; }""")
                after = page.evaluate("document.querySelectorAll('*').length")
                sweeps = {}
                for zoom in (1, 4, 10, 24):
                    page.evaluate(f"steerUI.routing.setZoom({zoom})")
                    sweeps[zoom] = page.evaluate(SWEEP, 120)
                hover = page.evaluate("""() => { const out = [];
                    for (let t = 0; t < 2000; t += 40) { const t0 = performance.now(); steerUI.routing.inspect(t, 3);
                      out.push(performance.now() - t0); } return out; }""")
                version = browser.version
                browser.close()
        finally:
            server.stop()
    draw = [x for s in sweeps.values() for x in s["draw"]]
    frames = [x for s in sweeps.values() for x in s["frames"]]
    result = {
        "what": f"routing view, {args.layers} layers x {args.experts} experts (top-{args.k}) x {args.tokens} tokens",
        "browser": f"Chromium {version} headless (software rendering)",
        "machine": {"cpus": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2)},
        "date": time.strftime("%Y-%m-%d"),
        "budget_ms": round(BUDGET_MS, 2),
        "show_ms": {m: round(v, 1) for m, v in show.items()},
        "draw_ms": summary(draw),
        "draw_ms_by_zoom": {str(z): summary(s["draw"]) for z, s in sweeps.items()},
        "frame_interval_ms": summary(frames),
        "hover_ms": summary(hover),
        "elements_added_by_the_grid": after - before,
        "draw_within_budget": max(draw) <= BUDGET_MS,
        "hover_within_budget": max(hover) <= BUDGET_MS,
    }
    text = json.dumps(result, indent=2)
    print(text)
    pathlib.Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
