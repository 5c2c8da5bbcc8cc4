"""An OpenAI-compatible HTTP server for one SteeredLlama, with a steering profile per request.

The HTTP side only validates, queues (bounded) and relays what the worker produces: the
profiles come from the registry (registry.py), the queue, worker and generation from
scheduler.py.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Optional, Union

from ..engine.steered import SteeredLlama
from ..errors import SteerError
from ..fileio import check_json_value
from ..profile import Profile, with_topk
from .registry import NONE, ProfileUnavailable, Profiles, describe
from .scheduler import Job, QueueFull, ShuttingDown, Worker

# llama_cpp only after .steered, which points it at our patched library
import llama_cpp  # isort: skip
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest  # isort: skip
from pydantic import BaseModel, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes (serve --max-body): far above any chat request, far below what ties the server up
# request bodies nest a few levels; JSON schemas of tools a few more
MAX_BODY_DEPTH = 128
MAX_INLINE_PROFILES = 16  # whole profiles sent in requests, kept for reuse


# ---- errors ----------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _worker_error(e: Exception) -> APIError:
    """What the worker reported (scheduler.py knows no HTTP), as the client sees it."""
    if isinstance(e, ShuttingDown):
        return APIError(503, "server is shutting down", "server_error", "shutting_down")
    # llama-cpp-python reports bad arguments (prompt longer than the context, logprobs
    # without logits_all...) as ValueError: the client's fault, not the server's
    if isinstance(e, (ValueError, SteerError)):
        return APIError(400, str(e).splitlines()[0] if str(e) else type(e).__name__, "invalid_request_error",
                        "invalid_request")
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error", "generation_failed")


# ---- requests --------------------------------------------------------------------------------
class _SteerFields(BaseModel):
    # strict: "yes" or 1 must not quietly mean true, nor 3 a profile name; an object is a
    # whole profile (the web page's expert board), checked against the model like a file
    steer_profile: Optional[Union[StrictStr, dict[str, Any]]] = None
    steer_trace: StrictBool = False
    steer_phase: Literal["all", "generation", "prompt"] = "all"
    steer_topk: Optional[StrictInt] = None  # experts per token in every MoE layer (issue 32)


class ChatRequest(CreateChatCompletionRequest, _SteerFields):
    pass


class CompletionRequest(CreateCompletionRequest, _SteerFields):
    pass


_NOT_LLAMA_ARGS = {"n", "best_of", "logit_bias_type", "user", "min_tokens", "steer_profile", "steer_trace",
                   "steer_phase", "steer_topk"}


def llama_kwargs(llm: SteeredLlama, body: ChatRequest | CompletionRequest, model_id: str) -> dict:
    """The request as create_chat_completion/create_completion arguments (what llama-cpp-python's
    own server does with the same request types)."""
    if (body.n or 1) != 1 or (getattr(body, "best_of", 1) or 1) != 1:
        raise APIError(400, "n and best_of must be 1: one completion per request", code="unsupported")
    kw = body.model_dump(exclude=_NOT_LLAMA_ARGS)
    kw["model"] = model_id
    if isinstance(body, CompletionRequest):
        if isinstance(body.prompt, list):
            if len(body.prompt) > 1:
                raise APIError(400, "prompt: one prompt per request", code="unsupported")
            kw["prompt"] = body.prompt[0] if body.prompt else ""
        if not kw["prompt"]:
            raise APIError(400, "prompt: empty", code="invalid_value", param="prompt")
    else:
        kw["messages"] = [_text_message(m, i) for i, m in enumerate(kw["messages"])]
    if body.logit_bias is not None and body.logit_bias_type == "tokens":
        kw["logit_bias"] = {str(t): v for text, v in body.logit_bias.items()
                            for t in llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)}
    if kw.get("logit_bias"):
        kw["logit_bias"] = _token_bias(kw["logit_bias"], llm.n_vocab())
    if body.grammar is not None:
        try:
            llm.check_grammar(body.grammar)
        except SteerError as e:
            raise APIError(400, str(e), code="invalid_grammar", param="grammar") from None
        kw["grammar"] = llama_cpp.LlamaGrammar.from_string(body.grammar, verbose=False)
    if body.min_tokens > 0:
        kw["logits_processor"] = llama_cpp.LogitsProcessorList(
            [llama_cpp.MinTokensLogitsProcessor(body.min_tokens, llm.token_eos())])
    return kw


def _text_message(m: dict, i: int) -> dict:
    """A message whose content is a string, as chat templates need: OpenAI clients may send
    null (an assistant turn that only called tools) or a list of text parts."""
    content = m.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                               code="unsupported", param="messages")
            texts.append(part["text"])
        content = "".join(texts)
    return {**m, "content": content}


def _token_bias(bias: dict, n_vocab: int) -> dict:
    """logit_bias with every key a token id of this vocabulary (llama-cpp-python indexes the
    logits with it, and an id out of range fails inside the sampler callback, unseen)."""
    out = {}
    for key, value in bias.items():
        try:
            t = int(key)
        except (TypeError, ValueError):
            t = -1
        if not 0 <= t < n_vocab:
            raise APIError(400, f"logit_bias: {str(key)[:20]!r} is not a token id (0..{n_vocab - 1})",
                           code="invalid_value", param="logit_bias")
        out[str(t)] = value
    return out


# ---- the app ---------------------------------------------------------------------------------
@dataclass
class ServerState:
    llm: SteeredLlama
    profiles: Profiles
    worker: Worker
    model_id: str
    api_key: Optional[str] = None
    max_body: int = DEFAULT_MAX_BODY
    started: int = field(default_factory=lambda: int(time.time()))
    topk: Optional[int] = None  # serve --topk: requests that give no steer_topk
    # (profile name, K) -> the profile with that K, made once: the batch engine keeps a slot
    # per profile object, so a new object per request would reload a slot every time
    with_k: dict = field(default_factory=dict)
    # profiles sent whole in requests (canonical JSON digest -> Profile): a board re-run with
    # the same rules reuses one object, so the batch engine keeps its slot
    inline: "collections.OrderedDict[str, Optional[Profile]]" = field(default_factory=collections.OrderedDict)

    def profile_of(self, spec: "str | dict | None", k: Optional[int]) -> tuple[str, Optional[Profile]]:
        """A request's steer_profile (a registered name, or a whole profile) and steer_topk
        as (the name it answers under, the profile to run), or a 400."""
        if isinstance(spec, dict):
            name, profile = self._inline(spec)
        else:
            try:
                name, profile = self.profiles.get(spec)
            except ProfileUnavailable as e:
                raise APIError(400, f"steer_profile {e.name!r} {e.why}", "invalid_request_error", e.code,
                               "steer_profile") from None
        try:
            return name, self.profile_with_k(name, profile, k if k is not None else self.topk)
        except SteerError as e:
            raise APIError(400, f"steer_topk: {str(e).split(': ', 1)[-1]}", "invalid_request_error", "invalid_topk",
                           "steer_topk") from None

    def _inline(self, data: dict) -> tuple[str, Optional[Profile]]:
        key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
        name = f"inline:{key}"
        if key not in self.inline:
            try:
                p = Profile.from_dict(data, source="steer_profile")
                # serve --force accepts them as it accepts the profiles directory's
                p.check(self.llm.info, force=self.llm.force, source="steer_profile")
            except SteerError as e:
                raise APIError(400, str(e), "invalid_request_error", "invalid_profile", "steer_profile") from None
            self.inline[key] = None if p.is_empty else p
            while len(self.inline) > MAX_INLINE_PROFILES:
                gone, _ = self.inline.popitem(last=False)
                # and its copies with other K, so that neither table grows with the requests
                for k in [k for k in self.with_k if k[0] == f"inline:{gone}"]:
                    del self.with_k[k]
        self.inline.move_to_end(key)
        return name, self.inline[key]

    def profile_with_k(self, name: str, profile: Profile | None, k: Optional[int]) -> Profile | None:
        if k is None:
            return profile
        key = (name, k)
        if key not in self.with_k:
            p = with_topk(profile, k, self.llm.info)
            p.check(self.llm.info, force=True)  # the model was checked with its profile already
            self.with_k[key] = p
        return self.with_k[key]


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.worker.start()
        yield
        await asyncio.to_thread(state.worker.stop)

    # no /docs, /redoc or /openapi.json: they would be served without the API key
    app = FastAPI(title="steer-gguf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        return APIError(499, "client closed the request", "invalid_request_error", "client_closed").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), "invalid_request_error", None).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        # a bug of ours, not the client's: still an OpenAI-style body, and the server lives on
        return APIError(500, f"internal error: {type(e).__name__}", "server_error", "internal_error").response()

    async def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send Authorization: Bearer KEY",
                           "invalid_request_error", "invalid_api_key")

    auth = [Depends(authorized)]

    @app.get("/health")
    async def health():
        w = state.worker
        return {"status": "ok", "model": state.model_id, "busy": w.busy, "running": w.running,
                "queued": w.jobs.qsize(), "max_queue": w.jobs.maxsize, "served": w.served,
                "cancelled": w.cancelled}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.started,
                                            "owned_by": "steer-gguf"}]}

    @app.get("/v1/steer/profiles", dependencies=auth)
    async def profiles():
        ps = state.profiles
        return {"object": "list", "default": ps.default,
                "data": [describe(n, p) for n, p in ps.usable.items() if n != NONE],
                "excluded": [{"name": n, "error": err} for n, err in ps.excluded.items()]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request):
        return await _generate(state, request, await _parse(request, ChatRequest, state.max_body), chat=True)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        return await _generate(state, request, await _parse(request, CompletionRequest, state.max_body), chat=False)

    from . import page  # the web page and the calls only it makes; it imports this module

    page.add_routes(app, state, auth)
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes:
    before reading when Content-Length says so, else as the chunks arrive."""
    too_big = APIError(413, f"request body larger than {limit} bytes (the server's --max-body)",
                       code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def _parse_json(request: Request, max_body: int) -> Any:
    # parsed by hand, whatever the Content-Type: `curl -d` sends JSON as a form
    raw = await _read_body(request, max_body)
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
    except ValueError as e:
        raise APIError(400, f"malformed JSON body: {str(e).splitlines()[0]}", code="invalid_json") from None
    try:
        check_json_value(data, "request body", max_depth=MAX_BODY_DEPTH)
    except SteerError as e:
        raise APIError(400, str(e), code="invalid_json") from None
    return data


async def _parse(request: Request, model: type[BaseModel], max_body: int) -> Any:
    data = await _parse_json(request, max_body)
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        # OpenAI allows null content (an assistant turn that only called tools); the
        # request types here want a string
        data["messages"] = [{**m, "content": ""} if isinstance(m, dict) and "content" in m and m["content"] is None
                            else m for m in data["messages"]]
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = _telling_error(e.errors())
        loc = ".".join(str(x) for x in first["loc"]) or "body"
        raise APIError(400, f"{loc}: {first['msg']}", code="invalid_value",
                       param=str(first["loc"][0]) if first["loc"] else None) from None


def _telling_error(errors: list[dict]) -> dict:
    """The error to report. A message is a union of one type per role, and pydantic lists
    every member's complaint, first those of the roles the message does not have; the one
    that matters is the complaint of the member whose role matched."""
    failed = [e["loc"][:-1] for e in errors if e["loc"] and e["loc"][-1] == "role"]
    rest = [e for e in errors if not any(tuple(e["loc"][:len(f)]) == tuple(f) for f in failed)]
    return (rest or errors)[0]


async def _next_event(job: Job, request: Request) -> tuple[str, Any]:
    """The worker's next event; cancels the job if the client disconnects while waiting
    (starlette does not cancel a handler whose client left)."""
    if not job.events.empty():
        # a turn of the event loop all the same: a queue full of chunks must not starve
        # the loop of the socket events that say the client is gone
        await asyncio.sleep(0)
        return job.events.get_nowait()
    get = asyncio.ensure_future(job.events.get())
    try:
        while not (await asyncio.wait({get}, timeout=0.5))[0]:
            if await request.is_disconnected():
                raise ClientGone()
        return get.result()
    except BaseException:
        get.cancel()
        job.cancelled = True
        raise


class ClientGone(Exception):
    pass


async def _generate(state: ServerState, request: Request, body: ChatRequest | CompletionRequest, chat: bool):
    name, profile = state.profile_of(body.steer_profile, body.steer_topk)
    job = Job(chat=chat, stream=body.stream, kwargs=llama_kwargs(state.llm, body, state.model_id),
              profile_name=name, profile=profile, trace=body.steer_trace,
              loop=asyncio.get_running_loop(), events=asyncio.Queue(), phase=body.steer_phase)
    try:
        state.worker.submit(job)
    except QueueFull:
        raise APIError(503, f"server busy: {state.worker.jobs.maxsize} requests already waiting; retry later",
                       "server_error", "queue_full") from None
    kind, payload = await _next_event(job, request)
    if kind == "error":
        job.cancelled = True
        return _worker_error(payload).response()
    if kind == "end":  # nothing generated
        return APIError(500, "generation produced no output", "server_error", None).response()
    if not job.stream:
        return JSONResponse(payload)
    return StreamingResponse(_sse(job, request, payload), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _sse(job: Job, request: Request, first: dict) -> AsyncIterator[str]:
    try:
        yield f"data: {json.dumps(first)}\n\n"
        while True:
            kind, payload = await _next_event(job, request)
            if kind == "end":
                break
            if kind == "error":  # after a 200 status: OpenAI clients raise on an error event
                yield f"data: {json.dumps(_worker_error(payload).body())}\n\n"
                break
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"
    except ClientGone:
        return  # nobody left to tell
    finally:
        job.cancelled = True  # no-op when finished; stops the worker if the client left


# ---- running it ------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """Listen before loading the model: a taken port fails in a second, not after the load."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SteerError(f"--host {host!r}: cannot resolve ({e.strerror})") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise SteerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(state: ServerState, sock: socket.socket, access_log: bool = False, open_browser: bool = False) -> None:
    import uvicorn

    config = uvicorn.Config(create_app(state), log_level="info" if access_log else "warning",
                            access_log=access_log, timeout_graceful_shutdown=5)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"steer-gguf: serving {state.model_id} at http://{shown}:{port}/v1 "
          f"(default profile: {state.profiles.default}; profiles: {', '.join(state.profiles.usable)})",
          flush=True)
    print(f"steer-gguf: web page at http://{shown}:{port}/", flush=True)
    server = uvicorn.Server(config)
    if open_browser:
        threading.Thread(target=_open_when_started, args=(server, f"http://{shown}:{port}/"), daemon=True).start()
    server.run(sockets=[sock])


def _open_when_started(server, url: str) -> None:
    """The browser opens once the page can be served: opened earlier it would wait on a
    socket nobody accepts yet. The API key is never put in the URL (other users of the
    machine see a browser's command line): the page asks for it."""
    import webbrowser

    while not server.started and not server.should_exit:
        time.sleep(0.1)
    if server.started and not webbrowser.open(url):
        print(f"steer-gguf: no browser to open here; open {url} yourself", flush=True)

