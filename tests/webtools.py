"""Driving the web page (steer_gguf/serve/web/) in the system's Chromium through Playwright:
shared by tests/test_web.py and the scripts that take its screenshots and time its routing view."""
from __future__ import annotations

import json
import os
import pathlib
import shutil

from steer_gguf import model_info
from steer_gguf.front.demo import DEMO_MODEL
from test_server import Server

KEY = "sk-web-test"
# the demo model's designated experts (data/MODEL_CARD.md): the same ids in every layer
STYLE_EXPERTS = {"digits": (0, 1), "words": (2, 3)}
PROMPT = "Add seven and eight."
TIMEOUT_MS = 120_000  # generous: a busy machine must not fail a test


def find_chromium() -> str | None:
    """The distribution's Chromium (never a browser Playwright downloads)."""
    given = os.environ.get("STEER_GGUF_CHROMIUM")
    if given:
        return given if os.path.isfile(given) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def style_profile(style: str, out: pathlib.Path) -> pathlib.Path:
    """The demo's profile toward `style`: its designated experts activated in every layer
    (what `steer-gguf demo` makes from detection, written directly here)."""
    info = model_info(str(DEMO_MODEL))
    experts = [{"layer": l, "expert": e, "action": "activate"} for l in info.moe_layers for e in STYLE_EXPERTS[style]]
    p = {"format": "steer-gguf.profile/1", "name": style,
         "model": {"architecture": info.architecture, "n_layer": info.n_layer, "n_expert": info.n_expert,
                   "n_expert_used": info.n_expert_used, "fingerprint": info.fingerprint},
         "eps": 0.01, "experts": experts, "bias": [], "provenance": {"description": f"the demo's {style} experts"}}
    path = out / f"{style}.json"
    path.write_text(json.dumps(p, indent=1))
    return path


def bad_profile(out: pathlib.Path, name: str = "bad") -> pathlib.Path:
    """A profile made for another shape of model (99 experts): excluded by the server."""
    path = out / f"{name}.json"
    path.write_text(json.dumps({"format": "steer-gguf.profile/1", "name": name,
                                "model": {"n_expert_used": 2, "n_expert": 99, "n_layer": 4},
                                "experts": [{"layer": 0, "expert": 50, "action": "activate"}]}))
    return path


class WebServer(Server):
    """`steer-gguf serve MODEL --profiles-dir DIR --api-key KEY` (tests/test_server.py's Server)."""

    def __init__(self, profiles_dir: pathlib.Path, *extra: str, model: str = str(DEMO_MODEL)):
        super().__init__(model, "--profiles-dir", profiles_dir, "--api-key", KEY, *extra)
        self.page_url = self.url.removesuffix("v1")  # the page is at the root


def launch(playwright, chromium: str):
    return playwright.chromium.launch(executable_path=chromium, headless=True,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])


def open_page(browser, url: str, key: str | None = KEY, width: int = 1280, height: int = 860, bypass_csp: bool = True):
    """A fresh page at `url`, connected (the key typed into the page's key field) unless key is None.
    bypass_csp: the page's policy forbids eval, which Playwright's waiting on a JS condition uses."""
    ctx = browser.new_context(accept_downloads=True, viewport={"width": width, "height": height}, bypass_csp=bypass_csp)
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    if key is not None:
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("body[data-ready='1']")
    return page


def ask(page, prompt: str, profile: str, compare_with: str | None = None, max_tokens: int = 48) -> list[dict]:
    """Send `prompt` from the chat form; returns the new answers (one per column) once done."""
    page.click("#tabs button[data-view=chat]")
    before = page.evaluate("steerUI.answers.length")
    page.select_option("#profile-a", profile)
    if page.is_checked("#compare") != (compare_with is not None):
        page.click("#compare")
    if compare_with is not None:
        page.select_option("#profile-b", compare_with)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", prompt)
    page.click("#send")
    return wait_answers(page, before, 1 if compare_with is None else 2)


def wait_answers(page, before: int, n: int) -> list[dict]:
    page.wait_for_function(f"steerUI.answers.length >= {before + n} && "
                           f"steerUI.answers.slice({before}).every(a => a.done || a.error)")
    return page.evaluate(f"steerUI.answers.slice({before}).map(a => ({{id: a.id, side: a.side, text: a.text, "
                         f"error: a.error, chunks: a.chunks, trace: a.trace, label: a.label, seed: a.settings.seed}}))")


def shot(page, name: str) -> None:
    """A screenshot for docs/img when STEER_GGUF_WEB_SCREENSHOTS names a directory."""
    out = os.environ.get("STEER_GGUF_WEB_SCREENSHOTS")
    if out:
        os.makedirs(out, exist_ok=True)
        page.screenshot(path=os.path.join(out, f"{name}.png"))


def synthetic_trace(n_tokens: int, n_layers: int, n_expert: int, k: int, seed: int = 1) -> str:
    """JS that builds a steer_trace of the given size in the page (a large model's answer that
    the demo model cannot produce): k distinct experts per token and layer, and weights."""
    return f"""(() => {{
      let s = {seed};
      const rnd = () => (s = (s * 1103515245 + 12345) % 2147483648) / 2147483648;
      const layers = Array.from({{length: {n_layers}}}, (_, j) => j);
      const experts = [], weights = [];
      for (let t = 0; t < {n_tokens}; t++) {{
        const er = [], wr = [];
        for (let j = 0; j < {n_layers}; j++) {{
          const set = new Set();
          while (set.size < {k}) set.add(Math.floor(rnd() * {n_expert}));
          er.push([...set]);
          wr.push([...set].map(() => rnd() / {k}));
        }}
        experts.push(er); weights.push(wr);
      }}
      return {{layers, tokens: experts.map((_, t) => t), experts, weights}};
    }})()"""
