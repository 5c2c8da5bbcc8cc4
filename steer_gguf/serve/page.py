"""The web page served at `/` (static files in web/, written by hand, nothing fetched from the
network) and the calls only it makes: the model's shape, a profile's rules, a profile checked
against the model, a detection table read or made here (`detect` on a built-in or uploaded pair
dataset), and the routing of an answer traced again under a profile (for the weights and the
difference from unsteered, which steer_trace lacks).

Every call but the static files needs the API key, as /v1 does."""
from __future__ import annotations

import asyncio
import math
import os
import pathlib
import re
import tempfile
from typing import Any, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, StrictInt, StrictStr

from ..errors import SteerError
from ..profile import Profile
from .app import APIError, ServerState, _parse, _parse_json, _text_message
from .registry import NONE, describe

WEB_DIR = pathlib.Path(__file__).resolve().parent / "web"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
# the page runs nothing it did not come with: no CDN, no fonts or scripts from elsewhere
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
_HEADERS = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
MAX_RETRACE = 16384  # tokens one retrace may hold (prompt and answer); a context is at most that anyway
# pairs one detection may read: it holds the model (no answers meanwhile) for its whole prefill
MAX_DETECT_PAIRS = 1000
_SAFE_NAME = r"[\w\- ][\w.\- ]{0,99}"


class TraceRequest(BaseModel):
    """An answer to trace again: its prompt (messages or text, as it was asked) and the tokens
    it produced (steer_trace.tokens), under a profile."""
    messages: Optional[list[dict[str, Any]]] = None
    prompt: Optional[StrictStr] = None
    tokens: list[StrictInt]
    steer_profile: Optional[Union[StrictStr, dict[str, Any]]] = None
    steer_topk: Optional[StrictInt] = None


class DetectionUpload(BaseModel):
    name: StrictStr = "table.csv"
    csv: StrictStr


class DetectRequest(BaseModel):
    """`detect --pairs DATASET --max-pairs N` on the served model: a built-in dataset by name, or
    an uploaded pair dataset (JSONL text; its name only names it in messages)."""
    dataset: Optional[StrictStr] = None
    jsonl: Optional[StrictStr] = None
    name: StrictStr = "pairs.jsonl"
    max_pairs: Optional[StrictInt] = None


class DetectionToProfile(DetectionUpload):
    """`profile make TABLE --activate N --deactivate M [--reverse]` on an uploaded table."""
    activate: StrictInt = 0
    deactivate: StrictInt = 0
    reverse: bool = False


def add_routes(app: FastAPI, state: ServerState, auth: list) -> None:
    files = {p.name: p for p in WEB_DIR.iterdir() if p.is_file() and p.suffix in _TYPES}

    def static(name: str) -> FileResponse:
        # only the files the package ships, by exact name: no path ever reaches the disk
        if name not in files:
            raise APIError(404, f"no such file: {name[:80]}", code="not_found")
        return FileResponse(files[name], media_type=_TYPES[files[name].suffix], headers=_HEADERS)

    @app.get("/", include_in_schema=False)
    async def index():
        return static("index.html")

    @app.get("/web/{name}", include_in_schema=False)
    async def web_file(name: str):
        return static(name)

    @app.get("/v1/steer/model", dependencies=auth)
    async def model():
        i = state.llm.info
        return {"id": state.model_id, "architecture": i.architecture, "n_layer": i.n_layer,
                "moe_layers": list(i.moe_layers), "fixed_layers": list(i.fixed_layers), "n_expert": i.n_expert,
                "n_expert_used": i.n_expert_used, "fingerprint": i.fingerprint, "n_ctx": state.llm.n_ctx(),
                "default_profile": state.profiles.default, "topk": state.topk}

    @app.get("/v1/steer/profiles/{name}", dependencies=auth)
    async def profile(name: str):
        try:
            _, p = state.profiles.get(name)
        except SteerError as e:
            raise APIError(404, str(e), code="unknown_profile", param="name") from None
        body = describe(name, p)
        body["profile"] = (p if p is not None else Profile.empty(state.llm.info, NONE)).to_dict()
        return body

    @app.post("/v1/steer/profile/check", dependencies=auth)
    async def check(request: Request):
        """A profile as `profile validate --model` sees it: its canonical form, or the error."""
        data = await _parse_json(request, state.max_body)
        try:
            p = Profile.from_dict(data, source="profile")
            p.check(state.llm.info, force=state.llm.force, source="profile")
        except SteerError as e:
            raise APIError(400, str(e), code="invalid_profile") from None
        return {"profile": p.to_dict(), "summary": p.summary()}

    @app.post("/v1/steer/trace", dependencies=auth)
    async def retrace(request: Request):
        body = await _parse(request, TraceRequest, state.max_body)
        name, p = state.profile_of(body.steer_profile, body.steer_topk)
        prompt = _prompt_tokens(state, body)
        if not body.tokens:
            raise APIError(400, "tokens: empty (the answer's steer_trace.tokens)", code="invalid_value",
                           param="tokens")
        if len(prompt) + len(body.tokens) > MAX_RETRACE:
            raise APIError(400, f"tokens: prompt and answer hold more than {MAX_RETRACE} tokens",
                           code="invalid_value", param="tokens")
        try:
            out = await asyncio.to_thread(_trace_rows, state, prompt, body.tokens, p)
        except SteerError as e:
            raise APIError(400, str(e).splitlines()[0], code="invalid_request") from None
        out["steer_profile"] = name
        return out

    @app.post("/v1/steer/detection", dependencies=auth)
    async def detection(request: Request):
        body = await _parse(request, DetectionUpload, state.max_body)
        shown, table = _load_table(body.name, body.csv)
        return JSONResponse(_describe_table(state, shown, table))

    @app.get("/v1/steer/datasets", dependencies=auth)
    async def datasets():
        from ..detect.datasets import BUILTIN_PREFIX, builtin_names

        return {"datasets": [BUILTIN_PREFIX + n for n in builtin_names()], "max_pairs": MAX_DETECT_PAIRS}

    @app.post("/v1/steer/detect", dependencies=auth)
    async def detect_here(request: Request):
        body = await _parse(request, DetectRequest, state.max_body)
        if (body.dataset is None) == (body.jsonl is None):
            raise APIError(400, "give dataset (builtin:NAME) or jsonl (a pair dataset's text)", code="invalid_value")
        if body.max_pairs is not None and not 1 <= body.max_pairs <= MAX_DETECT_PAIRS:
            raise APIError(400, f"max_pairs: must lie in 1..{MAX_DETECT_PAIRS}, got {body.max_pairs}",
                           code="invalid_value", param="max_pairs")
        return JSONResponse(await asyncio.to_thread(_detect, state, body))

    @app.post("/v1/steer/detection/profile", dependencies=auth)
    async def detection_profile(request: Request):
        body = await _parse(request, DetectionToProfile, state.max_body)
        shown, table = _load_table(body.name, body.csv)
        try:
            p = table.make_profile(state.llm.info, activate=body.activate, deactivate=body.deactivate,
                                   reverse=body.reverse, name=os.path.splitext(shown)[0],
                                   provenance={"method": table.method, "table": shown,
                                               "dataset": table.meta.get("dataset")})
            p.check(state.llm.info, source=shown)
        except SteerError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        return {"profile": p.to_dict(), "summary": p.summary()}


def _prompt_tokens(state: ServerState, body: TraceRequest) -> list[int]:
    """The prompt as the completion saw it (completions.to_request)."""
    llm = state.llm
    if (body.messages is None) == (body.prompt is None):
        raise APIError(400, "give messages or prompt: the request the answer came from", code="invalid_value")
    try:
        if body.messages is not None:
            return llm.chat_tokens([_text_message(m, i) for i, m in enumerate(body.messages)],
                                   add_generation_prompt=True)
        return llm.tokenize(body.prompt.encode("utf-8"), add_bos=True, special=True)
    except (SteerError, ValueError, TypeError, KeyError) as e:
        raise APIError(400, f"messages: {e}", code="invalid_value", param="messages") from None


def _trace_rows(state: ServerState, prompt: list[int], tokens: list[int], profile: Optional[Profile]) -> dict:
    """Row i: the experts and weights of the forward pass that produced tokens[i] (its input
    the token before it), as steer_trace's rows. The last token is never an input."""
    llm = state.llm
    n_vocab = llm.n_vocab()
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise SteerError(f"tokens: {bad} is not a token id (0..{n_vocab - 1})")
    with llm.lock:
        if getattr(state.worker.executor, "stopping", False):
            raise APIError(503, "server is shutting down", "server_error", "shutting_down")
        with llm.steering(profile):
            t = llm.trace(tokens=prompt + tokens[:-1])
        pieces = [llm.detokenize([x]).decode("utf-8", errors="replace") for x in tokens]
    n = len(tokens)
    return {"layers": list(t.layers), "tokens": list(tokens), "pieces": pieces,
            "experts": t.experts[-n:].tolist(), "weights": [[[round(float(w), 4) for w in row] for row in tok]
                                                           for tok in t.weights[-n:]]}


def _detect(state: ServerState, body: DetectRequest) -> dict:
    """The risk-difference table of the served model, unsteered, as `detect` makes it; described
    for the page, with its CSV (what `detect -o` writes) to download or send to the board."""
    from ..detect.datasets import BUILTIN_PREFIX, load_pairs
    from ..detect.risk import detect

    llm = state.llm
    with tempfile.TemporaryDirectory() as tmp:
        if body.jsonl is not None:
            shown = _page_name(body.name, "pairs.jsonl")
            spec = os.path.join(tmp, shown)
            with open(spec, "w", encoding="utf-8") as f:
                f.write(body.jsonl)
        elif body.dataset.startswith(BUILTIN_PREFIX):
            shown = spec = body.dataset
        else:  # never a path on the server's disk
            raise APIError(400, f"dataset: {body.dataset[:80]!r} is not builtin:NAME (upload other datasets as jsonl)",
                           code="invalid_dataset", param="dataset")
        try:
            pairs = load_pairs(spec, max_pairs=body.max_pairs or MAX_DETECT_PAIRS)
            pairs.source = shown
            with llm.lock:
                if getattr(state.worker.executor, "stopping", False):
                    raise APIError(503, "server is shutting down", "server_error", "shutting_down")
                with llm.steering(None):
                    table = detect(llm, pairs)
        except SteerError as e:
            raise APIError(400, str(e).replace(spec, shown).splitlines()[0], code="invalid_dataset") from None
        out = os.path.join(tmp, "table.csv")
        table.to_csv(out)
        with open(out, encoding="utf-8") as f:
            csv = f.read()
    stem = re.sub(r"[^\w.-]+", "_", os.path.splitext(shown.removeprefix(BUILTIN_PREFIX))[0]) or "pairs"
    res = _describe_table(state, f"detect-{stem}.csv", table)
    res["csv"] = csv
    return res


def _page_name(name: str, default: str) -> str:
    """An uploaded file's name as the page gave it, if a plain file name (never "..", never a
    path), else `default`: it only ever names the file in messages and in the server's temporary
    folder."""
    base = os.path.basename(name)
    return base if re.fullmatch(_SAFE_NAME, base) else default


def _load_table(name: str, text: str):
    """A detection table (`detect`'s CSV) read as the CLI reads it; errors name the file as
    the page gave it, never where the server put it."""
    from ..detect.risk import DetectionTable

    shown = _page_name(name, "table.csv")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, shown)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        try:
            return shown, DetectionTable.from_csv(path)
        except SteerError as e:
            raise APIError(400, str(e).replace(path, shown), code="invalid_table") from None


def _describe_table(state: ServerState, shown: str, table) -> dict:
    """The table ranked, for the page's heatmap, its top list and its verdict line."""
    # each row's interval is the one its rule would be chosen by: a positive score's activate,
    # a negative one's deactivate (the same columns for a risk-difference table)
    pos = table.score >= 0
    lo, hi, conf = (_floats(np.where(pos, a_on, a_off))
                    for a_on, a_off in zip(table.interval_of("activate"), table.interval_of("deactivate")))
    return {"name": shown, "method": table.method, "verdict": table.verdict, "layers": table.layers,
            "n_expert": table.n_expert,
            "meta": {k: table.meta.get(k) for k in ("architecture", "n_layer", "n_expert", "n_expert_used",
                                                    "dataset", "pairs", "fingerprint")},
            "rows": {"layer": table.layer.tolist(), "expert": table.expert.tolist(),
                     "score": _floats(table.score), "lo": lo, "hi": hi, "conf": conf},
            "warning": _fit_warning(state, table)}


def _floats(a) -> list[Optional[float]]:
    return [None if math.isnan(x) else round(float(x), 6) for x in a.tolist()]


def _fit_warning(state: ServerState, table) -> Optional[str]:
    """Why this table's experts may not be this model's, or None."""
    i = state.llm.info
    if table.n_expert != i.n_expert:
        return f"the table has {table.n_expert} experts per layer, the model {i.n_expert}: made for another model"
    extra = sorted(set(table.layers) - set(i.moe_layers))
    if extra:
        return f"the table's layers {extra[:8]} are not MoE layers of this model: made for another model"
    fp = table.meta.get("fingerprint")
    if fp and i.fingerprint and fp != i.fingerprint:
        return "the table was detected on another model (fingerprint differs): its experts may mean other things here"
    return None
