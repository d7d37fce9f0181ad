"""A simulated Anthropic Messages API on 127.0.0.1: enough of POST /v1/messages for the real SDK.

``FakeAPI.actions`` is a queue of what to answer next; each entry is
    ("text", str)                       a 200 message whose content is that text
    ("error", status, headers, body)    an error response (body: the JSON error object)
    ("raw", status, content_type, text) that body as it is (a gateway's HTML page, JSON of the wrong shape)
    callable(body: dict, n: int)        returns one of the above
and ``default`` answers when the queue is empty. Every request (its JSON body and headers) is kept in
``requests``; ``max_in_flight`` counts the most requests served at once.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


def message(text: str, body: dict[str, Any], n: int, usage: dict[str, int] | None = None,
            stop_reason: str = "end_turn") -> dict[str, Any]:
    return {"id": f"msg_fake_{n:04d}", "type": "message", "role": "assistant", "model": body.get("model"),
            "content": [{"type": "text", "text": text}], "stop_reason": stop_reason, "stop_sequence": None,
            "usage": usage or {"input_tokens": 120, "output_tokens": 900, "cache_creation_input_tokens": 4000,
                               "cache_read_input_tokens": 0}}


def error_body(kind: str, text: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": text}}


class FakeAPI:
    def __init__(self) -> None:
        self.actions: list[Any] = []
        self.default: Callable[[dict[str, Any], int], Any] | None = None
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.delay = 0.0
        self.usage: dict[str, int] | None = None
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with api._lock:
                    api.requests.append(body)
                    api.headers.append({k.lower(): v for k, v in self.headers.items()})
                    n = len(api.requests)
                    action = api.actions.pop(0) if api.actions else api.default
                    api._in_flight += 1
                    api.max_in_flight = max(api.max_in_flight, api._in_flight)
                try:
                    if api.delay:
                        time.sleep(api.delay)
                    if callable(action):
                        action = action(body, n)
                    if action is None:
                        action = ("error", 500, {}, error_body("api_error", "the fake API has no answer queued"))
                    if self.path.split("?")[0] != "/v1/messages":
                        action = ("error", 404, {}, error_body("not_found_error", f"no route {self.path}"))
                    if action[0] == "raw":
                        _, status, ctype, raw = action
                        self._send(status, {"request-id": f"req_fake_{n}"}, raw, ctype)
                    elif action[0] == "text":
                        usage = action[2] if len(action) > 2 else api.usage
                        stop = action[3] if len(action) > 3 else "end_turn"
                        self._send(200, {"request-id": f"req_fake_{n}"}, message(action[1], body, n, usage, stop))
                    else:
                        _, status, headers, payload = action
                        self._send(status, {"request-id": f"req_fake_{n}", **headers}, payload)
                finally:
                    with api._lock:
                        api._in_flight -= 1

            def _send(self, status: int, headers: dict[str, str], payload: Any,
                      content_type: str = "application/json") -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):   # the client gave up (its timeout): fine
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def user_text(self, i: int) -> str:
        """The user message of request ``i``."""
        content = self.requests[i]["messages"][-1]["content"]
        return content if isinstance(content, str) else "".join(b.get("text", "") for b in content)
