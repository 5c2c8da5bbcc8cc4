"""Issue 11, the server's side: every bad request gets a 4xx OpenAI-style JSON error, bad
profile files are excluded (never fatal) with reasons that name no server path, and the
server answers /health after each of them."""
from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import KEY, Server, X  # noqa: E402
from steer_gguf import ExpertRule, Profile, model_info  # noqa: E402

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model(make):
    return make("qwen3moe", n_layer=4, route_digits_to=X)


def _force(info, **kw) -> dict:
    p = Profile.empty(info, name="force-x")
    p.experts = [ExpertRule(il, X, "activate") for il in info.moe_layers]
    d = p.to_dict()
    d.update(kw)
    return d


@pytest.fixture(scope="module")
def profiles_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-profiles")
    info = model_info(model)
    good = _force(info)
    (d / "force.json").write_text(json.dumps(good))
    bad = {
        "action-list": json.dumps({**good, "experts": [{"layer": 0, "expert": X, "action": ["x"]}]}),
        "action-object": json.dumps({**good, "experts": [{"layer": 0, "expert": X, "action": {"a": 1}}]}),
        "deep": "[" * 2000 + "]" * 2000,
        "huge-int": json.dumps(good).replace('"layer": 0', '"layer": ' + "9" * 5000, 1),
        "surrogate": json.dumps(good).replace('"force-x"', '"\\ud800"'),
        "huge-eps": json.dumps({**good, "eps": 1e39}),
        "huge-bias": json.dumps({**good, "bias": [{"layer": 0, "expert": 1, "value": -1e39}]}),
        "not-utf8": b"\xff\xfe{",
    }
    for name, text in bad.items():
        (d / f"{name}.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


@pytest.fixture(scope="module")
def server(model, profiles_dir):
    s = Server(model, "--profiles-dir", profiles_dir, "--api-key", KEY, "--max-body", "1")
    yield s
    s.stop()


def _error(r: "httpx.Response", status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code, err
    return err


def test_bad_profile_files_are_excluded_with_reasons_and_no_server_paths(server, profiles_dir):
    r = server.get("/v1/steer/profiles")
    assert r.status_code == 200
    body = r.json()
    assert [p["name"] for p in body["data"]] == ["force"]
    excluded = {e["name"]: e["error"] for e in body["excluded"]}
    assert set(excluded) == {"action-list", "action-object", "deep", "huge-int", "surrogate", "huge-eps",
                             "huge-bias", "not-utf8"}
    assert "action" in excluded["action-list"] and "action" in excluded["action-object"]
    assert "nested" in excluded["deep"] and "surrogate" in excluded["surrogate"]
    assert "eps" in excluded["huge-eps"] and "32-bit" in excluded["huge-eps"]
    assert "bias[0].value" in excluded["huge-bias"]
    assert str(profiles_dir) not in r.text
    err = _error(server.post("/chat/completions", {"messages": MSGS, "steer_profile": "huge-eps"}), 400,
                 "invalid_profile")
    assert str(profiles_dir) not in err["message"] and "huge-eps.json" in err["message"]


def _steered_rows(server, profile: str) -> float:
    r = server.post("/chat/completions", {"messages": MSGS, "max_tokens": 4, "temperature": 0,
                                          "steer_profile": profile, "steer_trace": True})
    assert r.status_code == 200, r.text
    rows = r.json()["steer_trace"]["experts"]
    return sum(all(X in layer for layer in row) for row in rows) / len(rows)


def test_a_refused_profile_never_leaves_the_previous_one_unsteered(server):
    assert _steered_rows(server, "force") == 1.0
    _error(server.post("/chat/completions", {"messages": MSGS, "steer_profile": "huge-eps"}), 400)
    assert _steered_rows(server, "force") == 1.0
    assert _steered_rows(server, "none") < 1.0


NESTED = "[" * 100000 + "]" * 100000
BAD = {
    # shapes and types
    "nested body": ("/chat/completions", NESTED, 400, "invalid_json"),
    "nested value": ("/chat/completions", json.dumps({"messages": MSGS, "user": "x"})[:-1]
                     + ', "stop": ' + "[" * 500 + "]" * 500 + "}", 400, "invalid_json"),
    "NaN": ("/completions", '{"prompt": "hi", "temperature": NaN}', 400, "invalid_json"),
    "Infinity": ("/completions", '{"prompt": "hi", "top_p": -Infinity}', 400, "invalid_json"),
    "lone surrogate": ("/completions", '{"prompt": "\\ud800"}', 400, "invalid_json"),
    "huge int": ("/completions", '{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", 400, "invalid_json"),
    "not an object": ("/chat/completions", "[1, 2]", 400, "invalid_value"),
    "empty body": ("/chat/completions", "", 400, "invalid_json"),
    "role": ("/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    "image part": ("/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "unsupported"),
    "empty prompt": ("/completions", {"prompt": ""}, 400, "invalid_value"),
    "empty prompt list": ("/completions", {"prompt": []}, 400, "invalid_value"),
    "two prompts": ("/completions", {"prompt": ["a", "b"]}, 400, "unsupported"),
    "logit_bias id": ("/completions", {"prompt": "hi", "logit_bias": {"999999": 5}}, 400, "invalid_value"),
    "logit_bias key": ("/completions", {"prompt": "hi", "logit_bias": {"abc": 5}}, 400, "invalid_value"),
    "n": ("/completions", {"prompt": "hi", "n": 2}, 400, "unsupported"),
    "steer_profile type": ("/completions", {"prompt": "hi", "steer_profile": 3}, 400, "invalid_value"),
    "steer_profile unknown": ("/completions", {"prompt": "hi", "steer_profile": "nope"}, 400, "unknown_profile"),
    "too long": ("/completions", {"prompt": "hello " * 1200, "max_tokens": 2}, 400, None),
    # grammars llama.cpp cannot parse: before the fix each one killed the server (SIGSEGV)
    "grammar syntax": ("/chat/completions", {"messages": MSGS, "grammar": "root ::= ("}, 400, "invalid_grammar"),
    "grammar undefined": ("/chat/completions", {"messages": MSGS, "grammar": "root ::= foo"}, 400,
                          "invalid_grammar"),
    "grammar left recursion": ("/completions", {"prompt": "hi", "grammar": 'root ::= root "a"'}, 400,
                               "invalid_grammar"),
    "grammar nested": ("/completions", {"prompt": "hi", "grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000},
                       400, "invalid_grammar"),
    # sizes
    "body over --max-body": ("/completions", json.dumps({"prompt": "x" * (2 << 20)}), 413, "body_too_large"),
}


@pytest.mark.parametrize("path,body,status,code", BAD.values(), ids=BAD.keys())
def test_bad_request_gets_4xx_json_and_the_server_lives(server, path, body, status, code):
    _error(server.post(path, body), status, code)
    h = server.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"


def test_client_shapes_openai_allows_are_served(server):
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]
    for msgs in ([{"role": "user", "content": None}],
                 [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                  {"role": "user", "content": "again"}],
                 [{"role": "user", "content": parts}]):
        r = server.post("/chat/completions", {"messages": msgs, "max_tokens": 2})
        assert r.status_code == 200, r.text
    r = server.post("/completions", {"prompt": "hi", "max_tokens": 3, "grammar": 'root ::= "yes" | "no"'})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("yes", "no")


def test_a_large_body_is_refused_before_it_is_read(server):
    # 64 MB used to tie the single worker up for 35 s: now the header alone decides. The body
    # is never sent, so an answer at all proves the server did not wait to read it.
    sock = server.open_request("/completions", {}, key=KEY, declared_length=64 << 20, send_body=False)
    try:
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"the server closed the connection without an answer: {head!r}"
            head += chunk
    finally:
        sock.close()
    assert head.split(b"\r\n", 1)[0].split()[1] == b"413", head
    assert server.get("/health").status_code == 200


def test_auth_and_no_unauthenticated_schema(server):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert server.get(path, key=None).status_code == 404
    _error(server.post("/completions", {"prompt": "hi"}, key=None), 401, "invalid_api_key")
    _error(server.post("/completions", {"prompt": "hi"}, key="wrong"), 401, "invalid_api_key")
    assert server.get("/health", key=None).status_code == 200
