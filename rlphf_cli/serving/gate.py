"""What every /v1 request passes before the routes (an ASGI middleware, so it also holds for
streamed responses): the API key, the body size, the requests in flight per key; then its status
is counted for /metrics and, with --log-requests, one access-log line is written.

The key is checked before the body is read, so a client without one learns nothing about the
API. The body is read here up to --max-body-bytes (a longer one is a 413 at once) and handed on.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

from rlphf_cli.serving.auth import KeyChecker
from rlphf_cli.serving.metrics import ServeMetrics
from rlphf_cli.serving.protocol import ErrorBody

access_log = logging.getLogger("rlphf.serve.access")
LIMITED = "/v1/chat/completions"  # the route whose requests in flight are counted per key


class Gate:
    def __init__(self, app, *, keys: KeyChecker, max_body_bytes: int, max_requests_per_key: int,
                 metrics: ServeMetrics, log_requests: bool = False):
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.max_requests_per_key = max_requests_per_key
        self.metrics = metrics
        self.log_requests = log_requests
        self.in_flight: Counter[int | None] = Counter()  # key number -> requests in flight (at most one entry per key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["arrived"] = started
        status = {"code": 0}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._pass(scope, receive, counted_send, state)
        finally:
            code = status["code"] or 499  # no response started: the client went away first
            self.metrics.requests.labels(status=str(code)).inc()
            if self.log_requests:
                access_log.info(_line(scope, code, state, time.perf_counter() - started))

    async def _pass(self, scope, receive, send, state):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = None
        if self.keys.required:
            key = self.keys.identify(headers.get("authorization"))
            if key is None:
                given = "authorization" in headers
                message = ("Incorrect API key provided (send it as 'Authorization: Bearer KEY')." if given else
                           "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
                return await _reply(send, 401, message, code="invalid_api_key",
                                    headers={"www-authenticate": "Bearer"})
        state["key"] = key
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(send)
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await self._too_large(send)
            body.append(chunk)
            more = message.get("more_body", False)
        limited = scope["path"] == LIMITED and self.max_requests_per_key
        if limited and self.in_flight[key] >= self.max_requests_per_key:
            who = f"API key {key}" if key else "this server (no API key)"
            return await _reply(send, 429, f"{who} has {self.in_flight[key]} requests in flight, the most "
                                f"allowed (--max-requests-per-key {self.max_requests_per_key}); retry later",
                                code="rate_limit_exceeded", headers={"retry-after": "1"})
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # after the body: waits for the client to disconnect

        if limited:
            self.in_flight[key] += 1
        try:
            await self.app(scope, replay, send)
        finally:
            if limited:
                self.in_flight[key] -= 1
                if not self.in_flight[key]:
                    del self.in_flight[key]

    async def _too_large(self, send):
        return await _reply(send, 413, f"request body: larger than {self.max_body_bytes} bytes (--max-body-bytes)",
                            code="request_too_large")


async def _reply(send, status: int, message: str, code: str, headers: dict | None = None) -> None:
    body = json.dumps(ErrorBody.of(message, "invalid_request_error", None, code).model_dump()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _line(scope, status: int, state: dict, seconds: float) -> str:
    """One access-log line: who (the key's number, never the key), what, how it went; the prompt
    only when --log-prompts put it in the request's state."""
    client = scope.get("client") or ("-", 0)
    key = f"key#{state['key']}" if state.get("key") else "-"
    fields = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in state.get("log", {}).items())
    return (f'{client[0]} {key} "{scope["method"]} {scope["path"]}" {status} {seconds:.3f}s'
            + (f" {fields}" if fields else ""))
