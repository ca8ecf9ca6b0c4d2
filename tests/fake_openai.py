"""A scripted OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` server for tests (stdlib only,
127.0.0.1, a free port). A chat request gets its reply in ``choices[0].message.content``.

``FakeOpenAI(mode)`` answers every request by ``mode``; ``script`` (a list of modes) is used up first, one
mode per request. Modes:

- ``ok``: a plausible caption that mentions the prompt's concept (and the request's seed, so captions differ);
  a background-list prompt gets a short list of places
- ``empty``: a well-formed reply whose text is empty (a reply the stage's cleaning rejects)
- ``500``, ``503``, ``400``, ``401``, ``403``, ``404``: that HTTP status (401 echoes the bearer token in its body,
  as some servers do, so tests can check that the client never repeats it)
- ``invalid json``: HTML instead of JSON; ``no choices``: JSON without ``choices``; ``binary``: non-UTF-8 bytes
- ``slow``: no reply for ``slow_s`` seconds (longer than the client's timeout), then a healthy one

``requests`` lists ``(path, body, authorization header)`` of every request received.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PLACES = ["on a wooden table", "in a shop window", "on a park bench", "next to a window", "on a white background"]


def healthy_text(prompt: str, seed: int) -> str:
    last = prompt.rstrip().rsplit("\n", 1)[-1]
    if last.startswith("List ") or last == "-":
        return " a sunny beach\n- a busy city street\n- a wooden kitchen table\n- a park bench"
    concept = last.split(" =>")[0].split(",")[0].strip()
    return f" a {concept} {PLACES[seed % len(PLACES)]} in photo {seed}\nan ignored second line"


class FakeOpenAI:
    def __init__(self, mode: str = "ok", script: list[str] | tuple = (), slow_s: float = 2.0):
        self.mode, self.script, self.slow_s = mode, list(script), slow_s
        self.requests: list[tuple[str, dict, str | None]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization")
                with outer._lock:
                    outer.requests.append((self.path, body, auth))
                    mode = outer.script.pop(0) if outer.script else outer.mode
                try:
                    outer._answer(self, mode, body, auth)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def count(self) -> int:
        return len(self.requests)

    def _answer(self, handler: BaseHTTPRequestHandler, mode: str, body: dict, auth: str | None) -> None:
        if mode.isdigit():
            payload = json.dumps({"error": {"message": f"status {mode}; you sent {auth}"}}).encode()
            return self._send(handler, int(mode), payload)
        if mode == "slow":
            if self._closing.wait(self.slow_s):
                return
            mode = "ok"
        payload = {
            "invalid json": b"<html><body>502 Bad Gateway</body></html>",
            "no choices": b'{"object": "error", "message": "model is loading"}',
            "binary": b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00binary",
            "empty": json.dumps({"choices": [{"text": ""}]}).encode(),
        }.get(mode)
        if payload is None:
            if mode != "ok":
                raise ValueError(f"unknown mode {mode!r}")
            if "messages" in body:
                content = body["messages"][-1]["content"]
                asked = content.split("caption for: ", 1)[1].split("\n")[0] if "caption for: " in content else content
                reply = {"message": {"role": "assistant", "content": healthy_text(asked, int(body["seed"])).strip()}}
            else:
                reply = {"text": healthy_text(body["prompt"], int(body["seed"]))}
            payload = json.dumps({"choices": [reply]}).encode()
        self._send(handler, 200, payload)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def close(self) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeOpenAI":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
