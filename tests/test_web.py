"""The web page at `/` in a real browser: the distribution's Chromium, driven by Playwright.

STEER_GGUF_WEB_SCREENSHOTS=DIR also writes a screenshot of each view there (docs/img/ holds
the committed ones; scripts/web_screenshots.sh remakes them)."""
from __future__ import annotations

import json
import pathlib
import re

import pytest

from webtools import (KEY, PROMPT, STYLE_EXPERTS, WebServer, ask, bad_profile, find_chromium, launch, open_page,
                      shot, style_profile, synthetic_trace, wait_answers)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from clitools import ENV, NEUTRAL_CWD, cli  # noqa: E402
from steer_gguf.front.demo import DEMO_MODEL, classify  # noqa: E402

CHROMIUM = find_chromium()

import steer_gguf  # noqa: E402

# the installed copy: what the wheel carries
WEB_DIR = pathlib.Path(steer_gguf.__file__).resolve().parent / "serve" / "web"
MSGS = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("profiles")
    for style in STYLE_EXPERTS:
        style_profile(style, d)
    bad_profile(d)
    s = WebServer(d)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    # the only tests skipped without these: the ones in a browser
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (apt-get install chromium): the page's browser tests need one")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install '.[test]')")
    with sync_api.sync_playwright() as p:
        b = launch(p, CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    pg = open_page(browser, server.page_url)
    yield pg
    pg.context.close()


def api(server, path: str, body=None, key: str | None = KEY) -> "httpx.Response":
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = server.page_url + path
    if body is None:
        return httpx.get(url, headers=headers, timeout=120)
    return httpx.post(url, json=body, headers=headers, timeout=120)


# ---- without a browser -------------------------------------------------------------------------
def test_the_page_is_served_from_the_package_and_names_no_host(server):
    assert {"index.html", "main.js", "api.js", "chat.js", "routing.js", "board.js", "detection.js", "grid.js",
            "style.css"} <= {f.name for f in WEB_DIR.iterdir()}
    r = httpx.get(server.page_url)
    assert r.status_code == 200 and "<title>steer-gguf</title>" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for f in WEB_DIR.iterdir():
        text = f.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9-]+(\.[a-z0-9-]+)+", text), f"{f.name} names a host"
        for dep in re.findall(r'from "\./([\w.]+)"', text):  # every module a module imports is served
            assert (WEB_DIR / dep).is_file(), f"{f.name} imports {dep}"
    js = httpx.get(server.page_url + "web/main.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    for bad in ("web/page.py", "web/..%2Fapp.py", "web/%2E%2E%2Fpage.py", "web/nope.js"):
        assert httpx.get(server.page_url + bad).status_code == 404, bad
    # the page's own calls need the key, as /v1 does
    for path, body in (("v1/steer/model", None), ("v1/steer/profiles/digits", None), ("v1/steer/profile/check", {}),
                       ("v1/steer/trace", {}), ("v1/steer/detection", {})):
        r = api(server, path, body, key=None)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    # an uploaded table's name only ever names it in messages
    for name in ("..", "../../etc/passwd", "a/b.csv", "x" * 300):
        r = api(server, "v1/steer/detection", {"name": name, "csv": "layer,expert\n"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "invalid_table" and "/" not in err["message"].split(":")[0], err


def _ranked(csv_text: str) -> list[tuple[int, int, float]]:
    rows = [l.split(",") for l in csv_text.splitlines() if l and not l.startswith("#")]
    col = {name: i for i, name in enumerate(rows[0])}
    return [(int(r[col["layer"]]), int(r[col["expert"]]), float(r[col["risk_diff"]])) for r in rows[1:]]


def test_detect_on_the_server_is_the_clis_detect(server, tmp_path):
    """`detect` run by the page's call on a built-in dataset gives the table the CLI writes for the
    same pairs (the same experts at the top, the same scores), unsteered whatever the server's
    default profile; an uploaded dataset works the same, named as uploaded."""
    csv = tmp_path / "numbers.csv"
    r = cli("detect", DEMO_MODEL, "--pairs", "builtin:demo-numbers", "--max-pairs", "24", "-o", csv, "-t", "1")
    assert r.returncode == 0, r.stderr
    got = api(server, "v1/steer/datasets").json()
    assert "builtin:demo-numbers" in got["datasets"] and got["max_pairs"] >= 24
    res = api(server, "v1/steer/detect", {"dataset": "builtin:demo-numbers", "max_pairs": 24})
    assert res.status_code == 200, res.text
    t = res.json()
    assert t["name"] == "detect-demo-numbers.csv" and t["method"] == "risk_diff" and t["verdict"]
    assert t["meta"]["dataset"] == "builtin:demo-numbers" and t["meta"]["pairs"] == 24
    want, here = _ranked(csv.read_text()), _ranked(t["csv"])
    assert {x[:2] for x in here[:16]} == {x[:2] for x in want[:16]}
    assert max(abs(a[2] - b[2]) for a, b in zip(sorted(here), sorted(want))) < 0.02
    # the table made here goes to the board as an uploaded one does
    prof = api(server, "v1/steer/detection/profile", {"name": t["name"], "csv": t["csv"], "activate": 8}).json()
    assert sorted((x["layer"], x["expert"]) for x in prof["profile"]["experts"]) == sorted(
        (l, e) for l in range(4) for e in STYLE_EXPERTS["digits"])
    # an uploaded pair dataset: its own name, never the server's temporary path
    lines = (pathlib.Path(steer_gguf.__file__).parent / "data" / "pairs" / "demo-numbers.jsonl").read_text().splitlines()
    up = api(server, "v1/steer/detect", {"name": "mine.jsonl", "jsonl": "\n".join(lines[:30]) + "\n", "max_pairs": 24})
    assert up.status_code == 200, up.text
    assert up.json()["name"] == "detect-mine.csv" and up.json()["meta"]["dataset"] == "mine.jsonl"


@pytest.mark.parametrize("body, code, needle", [
    ({}, "invalid_value", "give dataset (builtin:NAME) or jsonl"),
    ({"dataset": "builtin:demo-numbers", "jsonl": "{}"}, "invalid_value", "give dataset (builtin:NAME) or jsonl"),
    ({"dataset": "/etc/passwd"}, "invalid_dataset", "is not builtin:NAME"),
    ({"dataset": "builtin:no-such-set"}, "invalid_dataset", "no-such-set"),
    ({"dataset": "builtin:demo-numbers", "max_pairs": 0}, "invalid_value", "max_pairs: must lie in 1.."),
    ({"name": "../../x.jsonl", "jsonl": "{not json\n"}, "invalid_dataset", "x.jsonl:1"),  # a name, never a path
    ({"name": "a b?*.jsonl", "jsonl": "{not json\n"}, "invalid_dataset", "pairs.jsonl:1"),
    ({"name": "mine.jsonl", "jsonl": "\n"}, "invalid_dataset", "mine.jsonl"),
])
def test_detect_on_the_server_refuses_bad_input_in_one_line(server, body, code, needle):
    r = api(server, "v1/steer/detect", body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == code, err
    assert needle in err["message"] and "\n" not in err["message"], err
    assert "/tmp" not in err["message"] and "../" not in err["message"], err
    assert api(server, "v1/steer/detect", {"dataset": "builtin:demo-numbers"}, key=None).status_code == 401


def test_whole_profiles_follow_the_servers_force_and_their_caches_stay_bounded(server, tmp_path):
    """A profile sent whole is checked as the profiles directory's are: one made on another model
    of the same shape is refused, unless the server runs with --force. However many distinct ones
    arrive with a steer_topk, the server keeps a bounded number of them and of their K copies."""
    from types import SimpleNamespace

    from steer_gguf import model_info
    from steer_gguf.serve.app import MAX_INLINE_PROFILES, ServerState

    digits = json.loads(style_profile("digits", tmp_path).read_text())
    other = dict(digits, model=dict(digits["model"], fingerprint="0" * 32))
    req = {"messages": MSGS, "max_tokens": 8, "temperature": 0, "seed": 0, "steer_profile": other}
    r = api(server, "v1/chat/completions", req)
    assert r.status_code == 400 and "fingerprint" in r.json()["error"]["message"], r.text
    assert api(server, "v1/steer/profile/check", other).status_code == 400
    forced = WebServer(tmp_path, "--force")
    try:
        r = api(forced, "v1/chat/completions", req)
        assert r.status_code == 200, r.text
        assert classify("numbers", r.json()["choices"][0]["message"]["content"]) == "digits"
        assert api(forced, "v1/steer/profile/check", other).status_code == 200
    finally:
        forced.stop()
    state = ServerState(llm=SimpleNamespace(info=model_info(DEMO_MODEL), force=False), profiles=None, worker=None,
                        model_id="demo")
    for i in range(3 * MAX_INLINE_PROFILES):
        name, p = state.profile_of(dict(digits, name=f"p{i}"), 3 + i % 2)
        assert p.topk == 3 + i % 2 and name.startswith("inline:")
    assert len(state.inline) == MAX_INLINE_PROFILES
    assert len(state.with_k) <= MAX_INLINE_PROFILES and {n for n, _ in state.with_k} <= {
        f"inline:{k}" for k in state.inline}


def test_a_whole_profile_as_steer_profile_and_the_retrace_rows_match_steer_trace(server, tmp_path):
    digits = json.loads(style_profile("digits", tmp_path).read_text())
    req = {"messages": MSGS, "steer_trace": True, "max_tokens": 16, "temperature": 0, "seed": 0}
    inline = api(server, "v1/chat/completions", {**req, "steer_profile": digits}).json()
    named = api(server, "v1/chat/completions", {**req, "steer_profile": "digits"}).json()
    assert inline["steer_profile"].startswith("inline:") and named["steer_profile"] == "digits"
    assert inline["choices"][0]["message"]["content"] == named["choices"][0]["message"]["content"]
    assert classify("numbers", inline["choices"][0]["message"]["content"]) == "digits"
    # traced again (one prefill of prompt + answer) under the profile the answer ran under: the rows
    # of steer_trace, with weights and the tokens' text
    # (a prompt whose answer's rows differ from their neighbours': rows off by one agree in 15% of cells)
    story = [{"role": "user", "content": "Tell me a story about a cat."}]
    plain = api(server, "v1/chat/completions", {**req, "messages": story, "steer_profile": "none"}).json()
    tr = plain["steer_trace"]
    again = api(server, "v1/steer/trace", {"messages": story, "tokens": tr["tokens"], "steer_profile": "none"}).json()
    assert again["layers"] == tr["layers"] and again["tokens"] == tr["tokens"]
    cells = [(t, j) for t in range(len(tr["tokens"])) for j in range(len(tr["layers"]))]
    same = sum(sorted(again["experts"][t][j]) == sorted(tr["experts"][t][j]) for t, j in cells)
    assert same >= 0.95 * len(cells), f"{same}/{len(cells)} cells agree"
    assert all(abs(sum(again["weights"][t][j]) - 1) < 1e-3 for t, j in cells)  # qwen3moe renormalizes top-k
    assert plain["choices"][0]["message"]["content"] in "".join(again["pieces"])
    # a profile the model cannot take, sent whole: a 400 naming the field
    alien = dict(digits, experts=[{"layer": 0, "expert": 99, "action": "activate"}])
    for path in ("v1/chat/completions", "v1/steer/trace"):
        r = api(server, path, {**req, "tokens": tr["tokens"], "steer_profile": alien})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "invalid_profile" and "experts[0].expert" in err["message"], err
    r = api(server, "v1/steer/profile/check", dict(digits, strength=1))
    assert r.status_code == 400 and "strength" in r.json()["error"]["message"]
    assert api(server, "v1/steer/profile/check", digits).json()["profile"]["experts"] == digits["experts"]


def test_ui_serves_and_opens_the_page(tmp_path):
    import subprocess
    import sys
    import time

    seen = tmp_path / "url"
    opener = tmp_path / "browser.sh"
    opener.write_text(f'#!/bin/sh\necho "$1" > "{seen}"\n')
    opener.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-m", "steer_gguf", "ui", str(DEMO_MODEL), "--port", "0", "-t", "1"],
                            cwd=NEUTRAL_CWD, env=dict(ENV, BROWSER=f"{opener} %s"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (seen.is_file() and seen.read_text().strip()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert seen.is_file(), proc.stderr.read() if proc.poll() is not None else "no browser opened"
        url = seen.read_text().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url), url
        r = httpx.get(url, timeout=60)
        assert r.status_code == 200 and "<title>steer-gguf</title>" in r.text
    finally:
        proc.terminate()
        proc.wait(30)


# ---- in the browser ----------------------------------------------------------------------------
def messages(page) -> list[str]:
    return page.evaluate("steerUI.messages.filter(m => m.kind === 'error').map(m => m.text)")


def test_page_loads_offline_and_its_calls_need_the_key(browser, server):
    # under the page's own content security policy (no eval: this test waits on selectors only)
    page = open_page(browser, server.page_url, key=None, bypass_csp=False)
    console = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.reload()  # from the start, with the console listened to
    try:
        # without the key the page says so, in the page
        page.wait_for_selector("#messages .msg")
        assert any("API key" in m for m in messages(page)), messages(page)
        assert page.evaluate("steerUI.ready") is False
        page.fill("#api-key", "wrong-key")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#messages .msg:nth-child(2)")
        assert page.evaluate("steerUI.ready") is False
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("body[data-ready='1']")
        assert "qwen3moe" in page.text_content("#model-line")
        options = page.eval_on_selector_all("#profile-a option", "os => os.map(o => o.value)")
        assert {"none", "digits", "words", "bad"} <= set(options)
        # the browser reports 401s as console errors; nothing else may be there (a CSP violation would)
        assert all("401" in c for c in console), "\n".join(console)
    finally:
        page.context.close()


def test_a_prompt_streams_tokens(page):
    [a] = ask(page, PROMPT, "none", max_tokens=24)
    assert a["error"] is None and a["text"]
    # the answer came as a stream of chunks, each shown as it arrived
    assert a["chunks"] >= 2, a
    shown = page.text_content(f".answer[data-answer-id='{a['id']}'] .text")
    assert shown == a["text"]
    assert a["trace"] and len(a["trace"]["experts"]) >= a["chunks"]


def test_the_profile_picker_flips_digits_and_words(page):
    [d] = ask(page, PROMPT, "digits")
    [w] = ask(page, PROMPT, "words")
    assert classify("numbers", d["text"]) == "digits", d["text"]
    assert classify("numbers", w["text"]) == "words", w["text"]


def test_compare_shows_two_answers_side_by_side(page):
    a, b = ask(page, PROMPT, "digits", compare_with="words")
    assert (a["side"], b["side"]) == ("a", "b") and a["seed"] == b["seed"]
    assert classify("numbers", a["text"]) == "digits" and classify("numbers", b["text"]) == "words", (a, b)
    assert page.text_content("#col-a .answer:last-child .text") == a["text"]
    assert page.text_content("#col-b .answer:last-child .text") == b["text"]
    shot(page, "chat-compare")


def test_routing_view_marks_the_forced_expert_in_every_steered_token(page):
    [a] = ask(page, PROMPT, "digits")
    page.click(f".answer[data-answer-id='{a['id']}'] button")
    page.wait_for_selector("#view-routing.active")
    page.select_option("#routing-mode", "forced")
    page.wait_for_function("steerUI.routing.data && steerUI.routing.data.mode === 'forced'")
    marks = page.evaluate("Array.from(steerUI.routing.data.marks)")
    n_tok, n_layer = len(a["trace"]["experts"]), len(a["trace"]["layers"])
    assert len(marks) == n_tok * n_layer and n_tok > 0
    assert set(marks) == {1}, marks  # every token, every layer: a forced-on expert among the chosen
    # the marks agree with the trace itself: a digit expert is among each row's experts
    assert all(set(layer) & set(STYLE_EXPERTS["digits"]) for row in a["trace"]["experts"] for layer in row)
    # and the canvas shows it: the cell's pixel has the "forced" green
    xy = page.evaluate("steerUI.routing.cellCenter(0, 0)")
    rgb = page.evaluate(f"Array.from(document.getElementById('routing-canvas').getContext('2d')"
                        f".getImageData({xy['x']}, {xy['y']}, 1, 1).data).slice(0, 3)")
    assert rgb == [46, 157, 79], rgb
    # the retrace arrives: hovering a token lists its experts with weights, the forced ones named
    page.wait_for_function("steerUI.routing.data.weights && steerUI.routing.data.unsteered")
    box = page.locator("#routing-canvas").bounding_box()
    page.mouse.move(box["x"] + xy["x"], box["y"] + xy["y"])
    text = page.text_content("#routing-inspector")
    assert text.startswith("token 0:") and "forced" in text and re.search(r"\d 0\.\d{3}", text), text
    shot(page, "routing")
    # difference from unsteered: every cell measured, in [0, 1]
    page.select_option("#routing-mode", "diff")
    values = page.evaluate("Array.from(steerUI.routing.data.values)")
    assert len(values) == n_tok * n_layer and all(0 <= v <= 1 for v in values), values
    page.mouse.move(box["x"] + xy["x"], box["y"] + xy["y"])
    shot(page, "routing-diff")
    # the grid is a canvas: the view holds a fixed handful of elements, not one per cell
    assert page.evaluate("document.querySelectorAll('#view-routing *').length") < 60


def test_routing_view_of_a_large_model_stays_a_few_elements(page):
    """48 MoE layers x 128 experts (top-8) x 2,000 tokens: drawn, scrolled and zoomed with one
    canvas; its timings are measured by benchmarks/web_routing.py, not asserted here."""
    page.click("#tabs button[data-view=routing]")
    before = page.evaluate("document.querySelectorAll('*').length")
    page.evaluate(f"(tr => steerUI.routing.showTrace(tr, null, {{weights: tr.weights}}))({synthetic_trace(2000, 48, 128, 8)})")
    page.select_option("#routing-mode", "expert")
    page.fill("#routing-expert", "5")
    page.dispatch_event("#routing-expert", "change")
    d = page.evaluate("({T: steerUI.routing.data.T, L: steerUI.routing.data.L, w: document.getElementById('routing-canvas').width,"
                      " sw: document.getElementById('routing-scroll').scrollWidth, draws: steerUI.routing.stats.draws})")
    assert (d["T"], d["L"]) == (2000, 48)
    assert d["sw"] >= 2000 * 10 and d["w"] <= 1280  # scrolls over every token, draws only what shows
    draws = d["draws"]
    page.evaluate("document.getElementById('routing-scroll').scrollLeft = 15000")
    page.wait_for_function(f"steerUI.routing.stats.draws > {draws}")
    # expert 5's cells: lit exactly where the trace chose it
    ok = page.evaluate("""(() => { const d = steerUI.routing.data; let bad = 0;
        for (let t = 0; t < d.T; t += 97) for (let j = 0; j < d.L; j++) {
          const has = steerUI.routing.cell(t, j).experts.includes(5);
          if (has !== (d.values[t * d.L + j] > 0)) bad++; }
        return bad === 0; })()""")
    assert ok
    assert page.evaluate("document.querySelectorAll('*').length") - before < 10
    page.evaluate("steerUI.routing.setZoom(4); steerUI.routing.inspect(1000, 20)")
    shot(page, "routing-large")


def test_board_profile_downloads_validates_and_loads_back(page, tmp_path):
    [base] = ask(page, PROMPT, "none")
    page.click("#tabs button[data-view=board]")
    page.check("input[name=board-tool][value=activate]")
    page.check("#board-all-layers")
    box = page.locator("#board-canvas").bounding_box()
    for e in STYLE_EXPERTS["words"]:  # a click per expert sets it in every layer
        xy = page.evaluate(f"steerUI.board.cellCenter(0, {e})")
        page.mouse.click(box["x"] + xy["x"], box["y"] + xy["y"])
    n_layers = len(base["trace"]["layers"])
    assert page.evaluate("steerUI.board.counts().on") == 2 * n_layers
    page.fill("#board-name", "words-board")
    shot(page, "board")
    page.uncheck("#board-compare")
    before = page.evaluate("steerUI.answers.length")
    page.click("#board-run")
    [steered] = wait_answers(page, before, 1)
    assert steered["error"] is None and classify("numbers", steered["text"]) == "words", steered["text"]
    # downloaded, it is a profile `profile validate` accepts for this model
    page.click("#tabs button[data-view=board]")
    with page.expect_download() as dl:
        page.click("#board-download")
    path = tmp_path / "words-board.json"
    dl.value.save_as(path)
    r = cli("profile", "validate", path, "--model", DEMO_MODEL)
    assert r.returncode == 0, r.stderr
    saved = json.loads(path.read_text())
    assert sorted((x["layer"], x["expert"]) for x in saved["experts"]) == sorted(
        (l, e) for l in base["trace"]["layers"] for e in STYLE_EXPERTS["words"])
    # cleared, then loaded back from the file: the same board, the same answer
    page.click("#board-clear")
    assert page.evaluate("steerUI.board.counts().on") == 0
    page.set_input_files("#board-file", str(path))
    page.wait_for_function(f"steerUI.board.counts().on === {2 * n_layers}")
    before = page.evaluate("steerUI.answers.length")
    page.click("#board-run")
    [again] = wait_answers(page, before, 1)
    assert again["text"] == steered["text"]
    assert not messages(page), messages(page)


def test_bad_profiles_and_tables_show_errors_in_the_page(page, tmp_path):
    # a profile made for another model, loaded into the board
    bad = bad_profile(tmp_path, "alien")
    page.click("#tabs button[data-view=board]")
    page.set_input_files("#board-file", str(bad))
    page.wait_for_function("steerUI.messages.some(m => m.kind === 'error')")
    assert any("alien.json" in m and "n_expert" in m for m in messages(page)), messages(page)
    assert page.is_visible("#messages .msg")
    # a profile the server excluded at startup, picked in the chat: the answer box and the messages say why
    [a] = ask(page, PROMPT, "bad")
    assert a["error"] and "not usable on this model" in a["error"], a
    assert page.is_visible(f".answer[data-answer-id='{a['id']}'] .error")
    # a board the model cannot take (3 experts forced on in a top-2 layer) run as a request
    page.click("#tabs button[data-view=board]")
    page.click("#board-clear")
    page.uncheck("#board-all-layers")
    box = page.locator("#board-canvas").bounding_box()
    for e in range(3):
        xy = page.evaluate(f"steerUI.board.cellCenter(0, {e})")
        page.mouse.click(box["x"] + xy["x"], box["y"] + xy["y"])
    [b] = ask(page, PROMPT, "__board__")
    assert b["error"] and "steer_profile" in b["error"], b
    # a file that is not a detection table
    junk = tmp_path / "junk.csv"
    junk.write_text("a,b\n1,2\n")
    page.click("#tabs button[data-view=detection]")
    n = len(messages(page))
    page.set_input_files("#detect-file", str(junk))
    page.wait_for_function(f"steerUI.messages.filter(m => m.kind === 'error').length > {n}")
    assert "junk.csv" in messages(page)[-1] and "missing column" in messages(page)[-1]
    shot(page, "error")


def test_detection_runs_on_the_server_from_the_page_and_its_top_flips_the_answer(page):
    page.click("#tabs button[data-view=detection]")
    page.wait_for_function("document.querySelectorAll('#detect-dataset option').length > 0")
    page.select_option("#detect-dataset", "builtin:demo-numbers")
    page.fill("#detect-max-pairs", "24")
    page.click("#detect-run")
    page.wait_for_function("!steerUI.detection.running && steerUI.detection.table !== null")
    assert page.text_content("#detect-verdict .verdict").startswith("verdict: strong signal")
    assert "builtin:demo-numbers, 24 pairs" in page.text_content("#detect-verdict")
    assert not page.is_disabled("#detect-download")
    page.fill("#detect-n-on", "8")
    page.click("#detect-to-board")
    page.wait_for_selector("#view-board.active")
    [a] = ask(page, PROMPT, "__board__")
    assert classify("numbers", a["text"]) == "digits", a["text"]
    # a bad uploaded dataset: the error is in the page, naming its line
    page.click("#tabs button[data-view=detection]")
    n = len(messages(page))
    page.set_input_files("#detect-pairs", files=[{"name": "broken.jsonl", "mimeType": "application/json",
                                                  "buffer": b"{not json\n"}])
    page.wait_for_function(f"steerUI.messages.filter(m => m.kind === 'error').length > {n}")
    assert "broken.jsonl:1" in messages(page)[-1], messages(page)[-1]


def test_detection_view_shows_the_table_and_sends_its_top_to_the_board(page, tmp_path):
    csv = tmp_path / "numbers.csv"
    r = cli("detect", DEMO_MODEL, "--pairs", "builtin:demo-numbers", "--max-pairs", "24", "-o", csv, "-t", "1")
    assert r.returncode == 0, r.stderr
    page.click("#tabs button[data-view=detection]")
    page.set_input_files("#detect-file", str(csv))
    page.wait_for_selector("#detect-verdict .verdict")
    assert page.text_content("#detect-verdict .verdict").startswith("verdict: ")
    assert "verdict: none" not in page.text_content("#detect-verdict .verdict")
    assert page.locator("#detect-top tr").count() == 21  # a header and the top 20
    assert re.search(r"\[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", page.text_content("#detect-top"))
    shot(page, "detection")
    page.fill("#detect-n-on", "8")
    page.click("#detect-to-board")
    page.wait_for_selector("#view-board.active")
    rules = page.evaluate("steerUI.board.toProfile().experts")
    # profile make's rule on the same table: the digit experts, two per layer
    assert sorted((x["layer"], x["expert"]) for x in rules) == sorted(
        (l, e) for l in range(4) for e in STYLE_EXPERTS["digits"]), rules
    [a] = ask(page, PROMPT, "__board__")
    assert classify("numbers", a["text"]) == "digits", a["text"]
