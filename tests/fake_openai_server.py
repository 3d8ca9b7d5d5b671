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

A request holding several numbered pairs ("### Pair 1" ...: the judge's batch_size) is answered
pair by pair with the same script, one numbered line each: a verdict depends on its pair, never on
the batch. `garble` (pair instructions containing a marker) leaves those pairs' lines out.

The Batch API endpoints the official client calls are served too: POST /files (multipart upload),
POST /batches, GET /batches/{id}, GET /files/{id}/content. A batch runs its lines through the same
script when it is polled `batch_polls` times (or, with `hold` set, once the event is set).

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


_PAIRS = re.compile(r"### Pair (\d+)\n\n## Instruction\n(.*?)\n\n## Output \(a\)\n(.*?)\n\n## Output \(b\)\n(.*?)\n\n"
                    r"(?=### Pair |## Answers)", re.S)


def shorter(a: str, b: str) -> str:
    words_a, words_b = len(a.split()), len(b.split())
    return "TIE" if words_a == words_b else ("Output (a)" if words_a < words_b else "Output (b)")


def shorter_wins(messages: list[dict]) -> str:
    """The default script: fewer words wins; equal is a TIE."""
    match = _SECTIONS.search(messages[0]["content"])
    if match is None:
        return GARBAGE
    return shorter(*match.groups())


def batched_pairs(prompt: str) -> list[tuple[int, str, str, str]]:
    """(number, instruction, output a, output b) of every pair of a batched prompt."""
    return [(int(n), instruction, a, b) for n, instruction, a, b in _PAIRS.findall(prompt)]


class FakeOpenAIServer:
    def __init__(self, answer: Callable[[list[dict]], str] | None = None, latency: float = 0.0,
                 faults: dict[str, list] | None = None, garble: str | None = None, batch_polls: int = 1,
                 hold: threading.Event | None = None):
        self.answer = answer or shorter_wins
        self.latency = latency
        self.faults = {marker: list(items) for marker, items in (faults or {}).items()}
        self.garble = garble
        self.batch_polls = batch_polls
        self.hold = hold
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.uploads = 0
        self.batches_created = 0
        self.batch_lines = 0  # request lines of batches that were run
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
            self.uploads = 0
            self.batch_lines = 0
            self.batches_created = 0

    def reply(self, messages: list[dict], garbage: bool = False) -> str:
        """The script's answer; a batched prompt is answered pair by pair."""
        if garbage:
            return GARBAGE
        pairs = batched_pairs(messages[0]["content"]) if messages and len(messages) == 1 else []
        if not pairs:
            return self.answer(messages)
        return "\n".join(f"{n}. {shorter(a, b)}" for n, instruction, a, b in pairs
                         if not (self.garble and self.garble in instruction))

    def completion(self, body: dict, text: str, request_id: str) -> dict:
        messages = body.get("messages", [])
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        return {
            "id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                      "total_tokens": prompt_tokens + len(text.split())},
        }

    def run_batch(self, batch: dict) -> None:
        """Answer every line of the batch's input file into its output (and error) file."""
        out, errors = [], []
        for line in self.files[batch["input_file_id"]].decode().splitlines():
            request = json.loads(line)
            messages = request["body"].get("messages", [])
            fault = self._next_fault(messages[0]["content"] if messages else "", count=False)
            with self._lock:
                self.batch_lines += 1
            if isinstance(fault, str) and fault.isdigit():
                errors.append({"id": f"err-{len(errors)}", "custom_id": request["custom_id"],
                               "response": {"status_code": int(fault), "body": {"error": {"message": "failed"}}}})
                continue
            text = self.reply(messages, garbage=fault == "garbage")
            out.append({"id": f"res-{len(out)}", "custom_id": request["custom_id"],
                        "response": {"status_code": 200, "body": self.completion(request["body"], text, f"b-{len(out)}")}})
        for name, rows in (("output_file_id", out), ("error_file_id", errors)):
            if rows:
                file_id = f"file-{len(self.files)}"
                self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[name] = file_id
        batch.update(status="completed", completed_at=int(time.time()),
                     request_counts={"total": len(out) + len(errors), "completed": len(out), "failed": len(errors)})

    # ---------------------------------------------------------------------------------------
    def _next_fault(self, prompt: str, count: bool = True):
        with self._lock:
            self.requests += count  # chat requests; a batch's lines are counted in batch_lines
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

    def do_GET(self) -> None:
        owner = self.server_owner
        path = self.path.split("?")[0].rstrip("/")
        if "/batches/" in path:
            batch = owner.batches.get(path.rsplit("/", 1)[1])
            if batch is None:
                self._send(404, {"error": {"message": "no such batch"}})
                return
            with owner._lock:
                batch["polls"] += 1
                ready = batch["status"] != "completed" and (
                    owner.hold.is_set() if owner.hold is not None else batch["polls"] >= owner.batch_polls)
            if ready:
                owner.run_batch(batch)
            elif batch["status"] == "validating":
                batch["status"] = "in_progress"
            self._send(200, {k: v for k, v in batch.items() if k != "polls"})
            return
        if path.endswith("/content") and "/files/" in path:
            data = owner.files.get(path.split("/files/")[1].removesuffix("/content"))
            if data is None:
                self._send(404, {"error": {"message": "no such file"}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._send(404, {"error": {"message": "not found"}})

    def _upload(self, raw: bytes) -> None:
        from email.parser import BytesParser
        from email.policy import default

        owner = self.server_owner
        message = BytesParser(policy=default).parsebytes(
            f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode() + raw)
        parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        data = parts["file"].get_payload(decode=True)
        with owner._lock:
            file_id = f"file-{len(owner.files)}"
            owner.files[file_id] = data
            owner.uploads += 1
        self._send(200, {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                         "filename": parts["file"].get_filename(), "purpose": parts["purpose"].get_content().strip()})

    def _create_batch(self, body: dict) -> None:
        owner = self.server_owner
        with owner._lock:
            batch_id = f"batch_{len(owner.batches)}"
            owner.batches_created += 1
            owner.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"], "status": "validating", "created_at": int(time.time()),
                "output_file_id": None, "error_file_id": None, "polls": 0,
                "request_counts": {"total": 0, "completed": 0, "failed": 0}}
        self._send(200, {k: v for k, v in owner.batches[batch_id].items() if k != "polls"})

    def do_POST(self) -> None:
        owner = self.server_owner
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/files"):
            self._upload(raw)
            return
        body = json.loads(raw or b"{}")
        if path.endswith("/batches"):
            self._create_batch(body)
            return
        if not path.endswith("/chat/completions"):
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
        text = owner.reply(messages, garbage=kind == "garbage")
        with owner._lock:
            owner.answered += 1
            owner.answered_messages.append(hashlib.sha256(json.dumps(messages).encode()).hexdigest())
        self._send(200, owner.completion(body, text, f"chatcmpl-{owner.requests}"))
