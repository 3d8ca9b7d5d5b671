"""An OpenAI-compatible `/v1/chat/completions` server on 127.0.0.1 for tests and benchmarks.

Answers are scripted (default: the shorter output wins, equal lengths are a TIE, read from the
judge template's "## Output (a)" / "## Output (b)" sections) and faults are injected per request:
`faults` maps a marker to a list of faults consumed in order by the requests whose first user
message contains the marker. A fault is one of:
  "429" or ("429", retry_after_s)   rate limited, with a Retry-After header (default 1 s)
  "500", "401", ... (any status)     that HTTP status
  ("slow", seconds)                 answer after `seconds` (past the client's time-out)
  "garbage"                         an answer that names no output
  "drop"                            close the connection without an answer
`latency` delays every answer (the benchmark uses a fixed 100 ms).

Usage:
    with FakeOpenAIServer(faults={"q3": ["429", "500"]}) as server:
        server.base_url  # http://127.0.0.1:<port>/v1
        server.requests  # HTTP requests received
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GARBAGE = "Both outputs have their merits; it really depends on what you value."
_SECTIONS = re.compile(r"## Output \(a\)\n(.*?)\n\n## Output \(b\)\n(.*?)\n\n## Answer", re.S)


def shorter_wins(messages: list[dict]) -> str:
    """The default script: fewer words wins; equal is a TIE."""
    match = _SECTIONS.search(messages[0]["content"])
    if match is None:
        return GARBAGE
    a, b = (len(part.split()) for part in match.groups())
    return "TIE" if a == b else ("Output (a)" if a < b else "Output (b)")


class FakeOpenAIServer:
    def __init__(self, answer: Callable[[list[dict]], str] | None = None, latency: float = 0.0,
                 faults: dict[str, list] | None = None):
        self.answer = answer or shorter_wins
        self.latency = latency
        self.faults = {marker: list(items) for marker, items in (faults or {}).items()}
        self.requests = 0
        self.answered = 0
        self.answered_messages: list[str] = []  # sha256 of every answered request's messages, in order
        self.faults_served: list[str] = []
        self.log: list[dict] = []  # time, marker fault, authorization header
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeOpenAIServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # the default 5 drops connections under concurrency

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.answered = 0
            self.answered_messages.clear()
            self.log.clear()

    # ---------------------------------------------------------------------------------------
    def _next_fault(self, prompt: str):
        with self._lock:
            self.requests += 1
            for marker, items in self.faults.items():
                if marker in prompt and items:
                    fault = items.pop(0)
                    self.faults_served.append(fault if isinstance(fault, str) else fault[0])
                    return fault
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real endpoint
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server_owner: FakeOpenAIServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (time-out)

    def do_POST(self) -> None:
        owner = self.server_owner
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": "not found"}})
            return
        messages = body.get("messages", [])
        prompt = messages[0]["content"] if messages else ""
        fault = owner._next_fault(prompt)
        with owner._lock:
            owner.log.append({"time": time.monotonic(), "fault": fault,
                              "authorization": self.headers.get("Authorization", "")})
        kind, param = (fault, None) if isinstance(fault, str) or fault is None else fault
        if kind == "429":
            self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                       {"Retry-After": str(param if param is not None else 1)})
            return
        if isinstance(kind, str) and kind.isdigit():
            self._send(int(kind), {"error": {"message": f"status {kind}"}})
            return
        if kind == "drop":
            self.close_connection = True
            return
        time.sleep(owner.latency + (param if kind == "slow" else 0.0))
        text = GARBAGE if kind == "garbage" else owner.answer(messages)
        with owner._lock:
            owner.answered += 1
            owner.answered_messages.append(hashlib.sha256(json.dumps(messages).encode()).hexdigest())
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        self._send(200, {
            "id": f"chatcmpl-{owner.requests}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                      "total_tokens": prompt_tokens + len(text.split())},
        })
