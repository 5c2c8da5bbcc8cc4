"""`steer-gguf serve`: the real server in a subprocess, driven by the openai client."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from clitools import ENV, NEUTRAL_CWD, assert_one_line_error, cli  # noqa: E402
from steer_gguf import ExpertRule, Profile, SteeredLlama, model_info  # noqa: E402

X = 2  # the fixture routes digits to this expert and keeps every other token off it
KEY = "sk-test-key"
MODEL_ARGS = ["-t", "1", "--ctx", "1024"]
PROMPTS = ["Hello there", "the cat sat on", "tell me a story", "where is the sea",
           "it is a fine day", "open the door", "what is this", "we went home"]


class Server:
    """`steer-gguf serve ... --port 0` in a subprocess; the port comes from its first line."""

    def __init__(self, *args: str, ctx: int = 1024):
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "steer_gguf", "serve", *map(str, args),
                                      "--port", "0", "-t", "1", "--ctx", str(ctx)], stdout=subprocess.PIPE, stderr=self.err,
                                     text=True, cwd=NEUTRAL_CWD, env=ENV)
        line = ""
        deadline = time.monotonic() + 60
        while "serving" not in line and time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline()
        if "serving" not in line:
            self.stop()
            raise AssertionError(f"server did not start: {line!r} {self.stderr()}")
        self.url = line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1

    def client(self, key: str | None = KEY, timeout: float = 60) -> "openai.OpenAI":
        # no retries: a 503 must reach the test, not be retried away
        return openai.OpenAI(base_url=self.url, api_key=key or "none", max_retries=0, timeout=timeout)

    def post(self, path: str, body, key: str | None = KEY, **kw) -> "httpx.Response":
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers=headers, timeout=60, **kw)

    def health(self) -> dict:
        return self.get("/health", key=None).json()

    def open_request(self, path: str, body: dict, key: str | None = KEY, declared_length: int | None = None,
                     send_body: bool = True) -> socket.socket:
        """A request sent on a raw socket that the test closes when it chooses: the way a client
        leaves, with no client library's timeout or retry in between."""
        host, port = self.url.split("//")[1].split("/")[0].rsplit(":", 1)
        data = json.dumps(body).encode()
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST /v1{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
                     f"Content-Length: {declared_length or len(data)}\r\n\r\n".encode()
                     + (data if send_body else b""))
        return sock

    def get(self, path: str, key: str | None = KEY) -> "httpx.Response":
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.url.removesuffix("/v1") + path, headers=headers, timeout=60)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def model(make):
    return make("qwen3moe", n_layer=4, route_digits_to=X)


@pytest.fixture(scope="module")
def profiles_dir(model, make, tmp_path_factory):
    d = tmp_path_factory.mktemp("profiles")
    info = model_info(model)
    force = Profile.empty(info, name="force-x")
    force.experts = [ExpertRule(il, X, "activate") for il in info.moe_layers]
    force.provenance = {"dataset": "builtin:digits-words", "description": "always the digit expert"}
    force.save(d / "force.json")
    other = model_info(make("olmoe", n_layer=4))
    alien = Profile.empty(other, name="alien")
    alien.experts = [ExpertRule(0, 1, "deactivate")]
    alien.save(d / "alien.json")
    (d / "broken.json").write_text("{not json")
    return d


@pytest.fixture(scope="module")
def server(model, profiles_dir):
    s = Server(model, "--profiles-dir", profiles_dir, "--api-key", KEY, "--max-queue", "64")
    yield s
    s.stop()


def chat(client, prompt: str, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                          temperature=0, **kw)


# ---- the OpenAI surface ----------------------------------------------------------------------
def test_chat_streaming_and_not(server, model):
    c = server.client()
    r = chat(c, "Hello there", max_tokens=8)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens >= 8
    assert r.model == os.path.basename(model) and r.steer_profile == "none"
    chunks = list(chat(c, "Hello there", max_tokens=8, stream=True, extra_body={"steer_trace": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # greedy: the same answer either way
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    trace = last.steer_trace  # only in the final chunk
    assert all(getattr(ch, "steer_trace", None) is None for ch in chunks[:-1])
    assert trace["layers"] == model_info(model).moe_layers
    assert len(trace["experts"]) == len(trace["tokens"]) >= 8
    assert all(len(row) == 4 and all(len(e) == 2 for e in row) for row in trace["experts"])


def test_completion_streaming_and_not(server):
    c = server.client()
    r = c.completions.create(model="m", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens > 0
    parts = list(c.completions.create(model="m", prompt="Once upon a time", max_tokens=6, temperature=0,
                                      stream=True))
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text


def test_models_profiles_and_health(server, model):
    c = server.client()
    assert [m.id for m in c.models.list().data] == [os.path.basename(model)]
    r = server.get("/v1/steer/profiles")
    assert r.status_code == 200
    body = r.json()
    assert body["default"] == "none"
    assert body["data"] == [{"name": "force", "profile_name": "force-x", "description": "always the digit expert",
                             "dataset": "builtin:digits-words", "activated": 4, "deactivated": 0, "biased": 0,
                             "layers": [0, 1, 2, 3], "topk": None}]
    excluded = {e["name"]: e["error"] for e in body["excluded"]}
    assert set(excluded) == {"alien", "broken"}
    assert "olmoe" in excluded["alien"] and "not valid JSON" in excluded["broken"]
    h = server.get("/health", key=None)  # open, for probes
    assert h.status_code == 200 and h.json()["status"] == "ok"


def _error(r: "httpx.Response", status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, "hi", max_tokens=2, extra_body={"steer_profile": "nope"})
    assert e.value.status_code == 400 and "nope" in str(e.value) and e.value.code == "unknown_profile"
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, "hi", max_tokens=2, extra_body={"steer_profile": "alien"})
    assert "another model" in str(e.value) or "olmoe" in str(e.value)
    msgs = [{"role": "user", "content": "hi"}]
    _error(server.post("/chat/completions", '{"messages": [{"role": "user",'), 400, "invalid_json")
    _error(server.post("/chat/completions", {"messages": msgs, "max_tokens": "many"}), 400, "invalid_value")
    _error(server.post("/chat/completions", {"messages": msgs, "steer_trace": "yes"}), 400, "invalid_value")
    _error(server.post("/chat/completions", {"messages": msgs, "steer_profile": 3}), 400, "invalid_value")
    _error(server.post("/chat/completions", [1, 2]), 400, "invalid_value")
    _error(server.post("/completions", {"prompt": "hello " * 1200, "max_tokens": 2}), 400)  # > context
    _error(server.post("/nowhere", {}), 404)
    r = chat(c, "hi", max_tokens=3, extra_body={"steer_profile": "force"})
    assert r.steer_profile == "force" and r.usage.completion_tokens >= 3


@pytest.fixture(scope="module")
def no_end(model) -> dict[str, float]:
    """A logit bias that bans the end-of-generation tokens: the random model would otherwise
    end some answers within the client's patience, and the test would time nothing."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    try:
        ends = {vocab.token_eos(), llama_cpp.llama_vocab_eot(llama_cpp.llama_model_get_vocab(vocab.model))}
    finally:
        vocab.close()
    return {str(t): -100.0 for t in ends if t >= 0}


def until(cond, what: str, guard: float = 600.0):
    """Polls `cond` until it holds. `guard` only turns a hang into a failure; nothing here
    expects the machine to reach the state within any given time."""
    deadline = time.monotonic() + guard
    while not (got := cond()):
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.02)
    return got


# The longest answer the long server's context allows: a prompt and its answer need fewer than
# LONG_CTX tokens, the end-of-generation tokens are banned, so a request for it is still running
# long after the test has seen it start, on any machine, and can only end early by being cancelled.
LONG_CTX = 65536


@pytest.fixture(scope="module")
def long_server(model):
    s = Server(model, "--parallel", "2", "--max-queue", "1", ctx=LONG_CTX)
    yield s
    s.stop()


def _long(no_end: dict, stream: bool) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0,
            "max_tokens": LONG_CTX - 64, "logit_bias": no_end, "stream": stream}


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_dropped_by_its_client_stops_generating(long_server, stream, no_end):
    """The client leaves once the request is known to be running (a streaming one after its first
    chunk, the other once /health counts it); the server must stop generating for it: /health
    counts it as cancelled, which a request that ran to its (distant) end never is."""
    s = long_server
    before = s.health()
    assert before["running"] == 0 and before["queued"] == 0
    sock = s.open_request("/chat/completions", _long(no_end, stream), key=None)
    try:
        if stream:
            got = b""
            while b"data:" not in got:
                chunk = sock.recv(65536)
                assert chunk, f"the server closed the stream: {got!r}"
                got += chunk
            assert b" 200 " in got.split(b"\r\n", 1)[0]
        else:
            until(lambda: s.health()["running"] == 1, "the request started")
    finally:
        sock.close()
    after = until(lambda: (h := s.health())["running"] == 0 and h, "the worker let the request go")
    assert after["cancelled"] == before["cancelled"] + 1, (before, after)
    assert after["served"] == before["served"] + 1
    r = chat(s.client(key=None), "hi", max_tokens=3)
    assert r.usage.completion_tokens >= 3


def test_queue_overflow_gets_503(long_server, no_end):
    """Two requests decode (--parallel 2), one waits in the worker for a free sequence, one waits
    in the queue (--max-queue 1): the next is refused with 503 at once. Each long request is sent
    only after /health shows the one before it taken, so the order is the server's, not a race."""
    s = long_server
    before = s.health()
    socks = []
    try:
        for n in range(1, 4):
            socks.append(s.open_request("/chat/completions", _long(no_end, True), key=None))
            until(lambda: s.health()["running"] == n, f"request {n} taken by the worker")
        socks.append(s.open_request("/chat/completions", _long(no_end, True), key=None))
        until(lambda: s.health()["queued"] == 1, "request 4 queued")
        r = s.post("/chat/completions", {"messages": [{"role": "user", "content": "Hello there"}],
                                         "max_tokens": 2}, key=None)
        _error(r, 503, "queue_full")
    finally:
        for sock in socks:
            sock.close()
    after = until(lambda: (h := s.health())["running"] == 0 and h["queued"] == 0 and h, "the worker is idle")
    assert after["cancelled"] == before["cancelled"] + 4, (before, after)
    assert s.post("/completions", {"prompt": "hi", "max_tokens": 2}, key=None).status_code == 200


def test_api_key_is_enforced(server):
    with pytest.raises(openai.AuthenticationError) as e:
        chat(server.client(key="wrong"), "hi", max_tokens=2)
    assert e.value.status_code == 401
    for path in ("/v1/models", "/v1/steer/profiles"):
        _error(server.get(path, key=None), 401, "invalid_api_key")
    _error(server.post("/completions", {"prompt": "hi"}, key=None), 401, "invalid_api_key")


# ---- isolation -------------------------------------------------------------------------------
def _traced(client, prompt: str, profile: str) -> dict:
    r = chat(client, prompt, max_tokens=6, extra_body={"steer_profile": profile, "steer_trace": True})
    assert r.steer_profile == profile
    return r.steer_trace


def test_concurrent_requests_never_share_a_profile(server):
    c = server.client()
    alone = {p: _traced(c, p, "none") for p in PROMPTS}  # one at a time: the reference
    rows = [e for t in alone.values() for row in t["experts"] for e in row]
    assert sum(X in e for e in rows) < len(rows) / 4, "fixture: expert X is not rare unsteered"

    jobs = [(PROMPTS[i % len(PROMPTS)], "force" if i % 2 == 0 else "none") for i in range(32)]
    start = threading.Barrier(len(jobs))

    def run(job):
        start.wait()
        return _traced(c, *job)

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        traces = list(pool.map(run, jobs))
    for (prompt, profile), t in zip(jobs, traces):
        assert len(t["experts"]) == len(t["tokens"]) > 0
        if profile == "force":
            assert all(X in e for row in t["experts"] for e in row), (prompt, t)
        else:  # exactly what the same request gets alone: routing, tokens, and so X's frequency
            assert t == alone[prompt], prompt


def test_trace_is_the_routing_that_produced_each_token(server, model, profiles_dir):
    """Row i of steer_trace = the routing of the forward pass that sampled tokens[i]: the
    same as prefilling the prompt plus tokens[:-1] and reading rows P-1 onwards."""
    llm = SteeredLlama(model, n_ctx=1024, n_threads=1, n_threads_batch=1)
    c = server.client()
    try:
        for name, profile in (("none", None), ("force", Profile.load(profiles_dir / "force.json"))):
            llm.set_profile(profile)
            for prompt in PROMPTS[:4]:
                r = c.completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0,
                                         extra_body={"steer_trace": True, "steer_profile": name})
                t = r.steer_trace
                toks = llm.tokenize(prompt.encode(), add_bos=True, special=True)
                n_prompt = r.usage.prompt_tokens
                assert len(toks) == n_prompt
                # every completion token has a row; one more when the model ended on its own
                extra = 1 if r.choices[0].finish_reason == "stop" else 0
                assert len(t["tokens"]) == r.usage.completion_tokens + extra
                oracle = llm.trace(tokens=toks + t["tokens"][:-1]).experts[n_prompt - 1:]
                assert oracle.tolist() == t["experts"], (name, prompt)
    finally:
        llm.close()


def test_steer_phase_steers_the_prompt_or_the_answer(server):
    """steer_trace row 0 is the pass over the prompt, rows 1.. over the generated tokens."""
    c = server.client()
    got = {phase: chat(c, "Hello there", max_tokens=6,
                       extra_body={"steer_profile": "force", "steer_trace": True, "steer_phase": phase}).steer_trace
           for phase in ("all", "prompt", "generation")}
    forced = {phase: [all(X in e for e in row) for row in t["experts"]] for phase, t in got.items()}
    assert all(forced["all"])
    assert forced["prompt"][0] and not all(forced["prompt"][1:])
    assert not forced["generation"][0] and all(forced["generation"][1:])
    r = server.post("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "steer_phase": "later"})
    assert "steer_phase" in _error(r, 400)["message"]


def test_requests_only_llama_cpp_python_serves_run_beside_the_batch(server):
    """response_format (a JSON grammar made by llama-cpp-python) is served by its own path on
    the main context, steered as asked."""
    r = chat(server.client(), "Hello there", max_tokens=6, response_format={"type": "json_object"},
             extra_body={"steer_profile": "force", "steer_trace": True})
    assert r.choices[0].message.content.lstrip().startswith(("{", "["))
    assert all(X in e for row in r.steer_trace["experts"] for e in row)
    r = server.post("/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                          "response_format": {"type": "json_object"}, "steer_phase": "prompt"})
    assert "steer_phase" in _error(r, 400)["message"]


# ---- load ------------------------------------------------------------------------------------
def test_bounded_load_keeps_memory_flat(server):
    c = server.client()

    def one(i: int) -> int:
        r = chat(c, PROMPTS[i % len(PROMPTS)], max_tokens=4,
                 extra_body={"steer_profile": ("force", "none")[i % 2], "steer_trace": i % 3 == 0})
        return r.usage.completion_tokens

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(200)))  # warm-up: allocator arenas, caches
        before = server.rss_kib()
        t0 = time.perf_counter()
        done = list(pool.map(one, range(200)))
        dt = time.perf_counter() - t0
    after = server.rss_kib()
    print(f"\nserve: 200 requests, 8 at a time: {200 / dt:.1f} requests/s; "
          f"server RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB")
    assert len(done) == 200 and all(n >= 4 for n in done)
    assert after - before < 32 * 1024, f"RSS grew by {(after - before) / 1024:.1f} MiB over 200 requests"


# ---- bad command lines -----------------------------------------------------------------------
def test_bad_serve_arguments(model, profiles_dir, tmp_path):
    assert_one_line_error(cli("serve", model, "--profiles-dir", tmp_path / "missing", *MODEL_ARGS),
                          "--profiles-dir")
    assert_one_line_error(cli("serve", model, "--profiles-dir", profiles_dir, "--profile", "nope", "--port", "0",
                              *MODEL_ARGS), "nope")
    assert_one_line_error(cli("serve", model, "--profiles-dir", profiles_dir, "--profile", "alien", "--port", "0",
                              *MODEL_ARGS), "alien", "olmoe")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert_one_line_error(cli("serve", model, "--port", port, *MODEL_ARGS), "cannot listen", str(port))
