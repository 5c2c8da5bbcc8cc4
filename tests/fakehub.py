"""A Hugging Face Hub stand-in on 127.0.0.1 for the -hf tests: the model info and the file
endpoints huggingface_hub calls, with ETag/X-Repo-Commit headers and Range requests, and
switches to drop a download halfway or fail it. Nothing reaches outside this machine."""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    drop_after: dict[str, int] = field(default_factory=dict)   # file -> bytes sent before the next GET drops
    fail_gets: set[str] = field(default_factory=set)           # files whose GETs answer 500
    fail_after_drop: set[str] = field(default_factory=set)     # files whose GETs answer 500 once one dropped
    url: str = ""

    def commit(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def gets(self, name: str) -> list[str]:
        """The Range header of every GET of `name` so far ('' for none)."""
        return [rng for m, p, rng in self.log if m == "GET" and p.endswith("/" + name)]


def _handler(hub: FakeHub):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet test output
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _route(self, head: bool):
            hub.log.append((self.command, self.path.split("?")[0], self.headers.get("Range", "")))
            m = re.fullmatch(r"/api/models/([^/]+/[^/?]+)(\?.*)?", self.path)
            if m:  # model_info: the repository's files as "siblings"
                files = hub.repos.get(m.group(1))
                if files is None:
                    return self._send(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
                body = json.dumps({"id": m.group(1), "sha": hub.commit(m.group(1)),
                                   "siblings": [{"rfilename": p} for p in sorted(files)]}).encode()
                return self._send(200, body, {"Content-Type": "application/json"}, head)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
            files = hub.repos.get(m.group(1)) if m else None
            if files is None:
                return self._send(404, b"Repository not found", {"X-Error-Code": "RepoNotFound"}, head)
            name = m.group(3)
            commit = hub.commit(m.group(1))
            if name not in files:
                return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit},
                                  head)
            data = files[name]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes"}
            if head:
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                return self.end_headers()
            if name in hub.fail_gets:
                return self._send(500, b"Internal Error", {"X-Repo-Commit": commit})
            start = 0
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if rng:
                start = int(rng.group(1))
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            self.send_response(206 if rng else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = hub.drop_after.pop(name, None)
            if cut is not None:  # promise the whole body, send part of it, hang up
                if name in hub.fail_after_drop:
                    hub.fail_gets.add(name)
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_GET(self):
            self._route(head=False)

        def do_HEAD(self):
            self._route(head=True)

    return H


class running:
    """`with running(hub) as url:` serves `hub` on a free port of 127.0.0.1."""

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        self.server.daemon_threads = True

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self.hub.url

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
