"""The HTTP API: OpenAI's chat completions (JSON and server-sent events), models, health, metrics,
playground.

Requests and responses follow OpenAI's JSON, so the official clients work unmodified; the soup is
the `model` field, or `preferences` (extra_body) with model "soup", or the `user`'s profile with
model "soup". Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
400 for bad input (each limit named), 401 for a missing or wrong key, 404 for an unknown model,
413 for a body too large, 429 when the queue is full (with Retry-After), 503 when the backend
cannot decode any more, 500 only for the server's own failures. A stream that fails after it began
ends with an error event, then [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlphf_cli.errors import InputError
from rlphf_cli.prompting import messages_with_preferences, render_messages, text_ids
from rlphf_cli.serving.auth import KeyChecker
from rlphf_cli.serving.backend import Backend, BackendError, BackendUnavailable, Delta, Finish, Job, Sampling
from rlphf_cli.serving.gate import Gate
from rlphf_cli.serving.learn import CompareRequest, FeedbackRequest, ProfileLearning
from rlphf_cli.serving.policies import SOUP, PolicySet, Soup, UnknownModel
from rlphf_cli.serving.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ErrorBody,
    ModelCard,
    ModelList,
    RequestError,
    SoupInfo,
    Usage,
    sse,
)
from rlphf_cli.specs import Sampling as RecipeSampling
from rlphf_cli.specs import ServeLimits

log = logging.getLogger("rlphf.serve")

# A bowl of soup, in the page's accent colour.
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
           '<path d="M4 14h24a12 12 0 0 1-24 0z" fill="#3a5ccc"/>'
           '<path d="M11 4c-2 3 2 4 0 7M16 3c-2 3 2 4 0 7M21 4c-2 3 2 4 0 7" stroke="#3a5ccc" stroke-width="2" '
           'fill="none" stroke-linecap="round"/></svg>')


# --------------------------------------------------------------------------------------------
# Errors


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody.of(message, type_, param, code).model_dump(), status_code=status, headers=headers)


def _error_of(exc: Exception) -> tuple[int, ErrorBody]:
    """The HTTP status and OpenAI error body of an exception raised while serving a request."""
    if isinstance(exc, UnknownModel):
        return 404, ErrorBody.of(str(exc), param=exc.param, code="model_not_found")
    if isinstance(exc, RequestError):
        return exc.status, ErrorBody.of(str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, InputError):
        return 400, ErrorBody.of(str(exc))
    if isinstance(exc, BackendError):
        return exc.status, ErrorBody.of(str(exc), "server_error", code=exc.code)
    return 500, ErrorBody.of(f"the server failed: {type(exc).__name__}: {exc}", "server_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if err.get("type") == "model_attributes_type" or not loc:
        return f"request body: {err.get('msg')}", None
    # Drop pydantic's union-branch names ('str', 'list[...]') from the path: users know field names.
    path = ".".join(p for p in loc if not p.startswith(("str", "list[", "dict[", "function-")))
    message = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        message = "unknown field (not an OpenAI chat-completions parameter rlphf supports)"
    return f"{path}: {message}", path


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(exc.status_code, message, param=None, code=code)

    async def answer(request: Request, exc: Exception):
        status, body = _error_of(exc)
        if status >= 500:
            log.error("request failed: %s", body.error.message, exc_info=status == 500)
        return JSONResponse(body.model_dump(), status_code=status, headers=getattr(exc, "headers", None))

    # InputError (RequestError, UnknownModel, ...) and BackendError are answered here; anything else
    # reaches Starlette's last-resort handler too, which answers and logs the traceback.
    for kind in (InputError, BackendError, Exception):
        app.add_exception_handler(kind, answer)


# --------------------------------------------------------------------------------------------
# From a request to a job


class Service:
    """Turns requests into jobs for the backend; owns the soup vocabulary, the prompt rule, the
    recipe's sampling settings and the limits of one request."""

    def __init__(self, backend: Backend, policies: PolicySet, *, prompt_format: str, sampling: RecipeSampling,
                 limits: ServeLimits, max_batch: int, profiles: dict[str, Soup] | None = None):
        self.backend = backend
        self.policies = policies
        self.prompt_format = prompt_format
        self.sampling = sampling
        self.limits = limits
        self.max_batch = max_batch
        self.profiles = profiles or {}

    def soup(self, req: ChatRequest) -> Soup:
        prompts = req.preference_prompts
        most = self.limits.max_soup_members
        if req.preferences is not None:
            if req.model != SOUP:
                raise RequestError(f"'preferences' gives the soup, so 'model' must be '{SOUP}' (got '{req.model}')",
                                   param="model")
            if not req.preferences:
                raise RequestError("preferences: empty; give weights, e.g. {\"concise\": 0.7, \"friendly\": 0.3}",
                                   param="preferences")
            try:
                return self.policies.resolve(req.preferences, where="preferences", prompts=prompts, max_members=most)
            except UnknownModel:
                raise
            except InputError as exc:
                raise RequestError(str(exc), param="preferences") from None
        if req.model == SOUP:
            if req.user is None or req.user not in self.profiles:
                users = ", ".join(sorted(self.profiles)) or "none: start the server with --profiles FILE"
                who = f"user '{req.user}' has no profile" if req.user else "no 'user' given"
                raise RequestError(f"model '{SOUP}' needs 'preferences' (extra_body) or a user with a profile; "
                                   f"{who} (profiles: {users})", param="user" if req.user else "model")
            soup = self.profiles[req.user]
            return soup if prompts else Soup(soup.members, soup.merged, ())
        try:
            return self.policies.resolve(req.model, prompts=prompts, max_members=most)
        except UnknownModel:
            raise
        except InputError as exc:
            raise RequestError(str(exc), param="model") from None

    def check(self, req: ChatRequest) -> tuple[str, ...]:
        """The request's own limits, before any work; returns its stop sequences."""
        limits = self.limits
        if req.presence_penalty or req.frequency_penalty:
            raise RequestError("presence_penalty and frequency_penalty are not supported (use 0)",
                               param="presence_penalty" if req.presence_penalty else "frequency_penalty")
        if req.logprobs:
            raise RequestError("logprobs are not supported", param="logprobs")
        most_n = min(limits.max_n, self.max_batch)
        if req.n > most_n:
            raise RequestError(f"n: {req.n} choices; this server gives at most {most_n} (--max-n, --max-batch)",
                               param="n")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > limits.max_stop:
            raise RequestError(f"stop: {len(stop)} stop sequences; at most {limits.max_stop} (--max-stop)", param="stop")
        longest = max(map(len, stop), default=0)
        if longest > limits.max_stop_chars:
            raise RequestError(f"stop: a stop sequence of {longest} characters; at most {limits.max_stop_chars} "
                               "(--max-stop-chars)", param="stop")
        asked = req.max_completion_tokens or req.max_tokens
        if asked and asked > limits.max_tokens_limit:
            field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise RequestError(f"{field}: {asked}; this server allows at most {limits.max_tokens_limit} "
                               "(--max-tokens-limit)", param=field)
        if not any(m.role == "user" for m in req.messages):
            raise RequestError("messages: no message with role 'user'", param="messages")
        return stop

    def job(self, req: ChatRequest) -> Job:
        """The request as a job: checked, its soup resolved, its prompt rendered and tokenized (this
        runs on a worker thread, not on the event loop)."""
        stop = self.check(req)
        soup = self.soup(req)
        if req.compose == "logits":
            if not self.backend.mixes_logits:
                raise RequestError(f"compose: the {self.backend.name} backend does not mix at decoding time; "
                                   "serve with --backend transformers", param="compose")
            try:
                soup = soup.as_mix()
            except InputError as exc:
                raise RequestError(str(exc), param="compose") from None
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        messages = messages_with_preferences(messages, soup.preferences)
        tokenizer = self.backend.tokenizer
        try:
            text = render_messages(tokenizer, messages, self.prompt_format)
            prompt_ids = text_ids(tokenizer, text, self.prompt_format)
        except Exception as exc:  # e.g. a chat template that refuses a role order
            raise RequestError(f"messages: cannot be rendered with the model's chat template: {exc}",
                               param="messages") from None
        context, budget = self.backend.context_length, self.limits.max_prompt_tokens
        if budget is not None and len(prompt_ids) > budget:
            raise RequestError(f"messages: {len(prompt_ids)} prompt tokens; this server takes at most {budget} "
                               "(--max-prompt-tokens)", param="messages", code="context_length_exceeded")
        asked = req.max_completion_tokens or req.max_tokens
        if len(prompt_ids) >= context or (asked and len(prompt_ids) + asked > context):
            wanted = f" and {asked} for the answer (max_tokens)" if asked else ""
            raise RequestError(f"the model's context is {context} tokens; the messages take {len(prompt_ids)}"
                               f"{wanted}", param="messages", code="context_length_exceeded")
        recipe = self.sampling
        max_tokens = asked or min(recipe.max_new_tokens, self.limits.max_tokens_limit, context - len(prompt_ids))
        sampling = Sampling(
            temperature=recipe.temperature if req.temperature is None else req.temperature,
            top_p=recipe.top_p if req.top_p is None else req.top_p,
            top_k=recipe.top_k, repetition_penalty=recipe.repetition_penalty,
            no_repeat_ngram_size=recipe.no_repeat_ngram_size, max_tokens=max_tokens,
            min_tokens=min(max_tokens, recipe.min_new_tokens if req.min_tokens is None else req.min_tokens),
            stop=stop, seed=req.seed, n=req.n,
        )
        return Job(f"chatcmpl-{uuid.uuid4().hex[:24]}", prompt_ids, soup, sampling, prompt_text=text)


class Queue:
    """Requests accepted and not decoding yet: at most --max-queue; beyond, a 429 with Retry-After."""

    def __init__(self, limit: int):
        self.limit = limit
        self._waiting: set[str] = set()  # job ids
        self._lock = threading.Lock()  # the backend's thread reports when a job starts

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def enter(self, job: Job) -> None:
        with self._lock:
            if len(self._waiting) >= self.limit:
                raise RequestError(f"the server is busy: {len(self._waiting)} requests wait for a batch slot, the "
                                   f"most it queues (--max-queue {self.limit}); retry in a moment", status=429,
                                   code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self._waiting.add(job.id)
        job.on_leave = lambda: self._leave(job.id)

    def _leave(self, job_id: str) -> None:
        with self._lock:
            self._waiting.discard(job_id)


# --------------------------------------------------------------------------------------------
# The app


class _SSEResponse(StreamingResponse):
    """A stream whose producer is closed as soon as sending fails (the client went away), so the
    job's batch slots are freed now rather than when the generator is garbage-collected;
    `on_close` runs whatever happened, even when the stream never began."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()


class _Tracker:
    """One request's figures: time to first token, tokens, latency (for /metrics and the access log)."""

    def __init__(self, request: Request, job: Job, metrics, log_prompt: str | None):
        self.metrics, self.job = metrics, job
        self.arrived = getattr(request.state, "arrived", None) or time.perf_counter()
        self.first: float | None = None
        self.completion = 0
        self.log = {"id": job.id, "model": job.soup.key, "prompt_tokens": len(job.prompt_ids)}
        if log_prompt is not None:
            self.log["prompt"] = log_prompt
        request.state.log = self.log
        metrics.prompt_tokens.inc(len(job.prompt_ids))

    def saw(self, event) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.arrived)
            self.log["ttft"] = round(self.first - self.arrived, 4)
        if isinstance(event, Finish):
            self.completion += event.completion_tokens
            self.metrics.generation_tokens.inc(event.completion_tokens)

    def finished(self) -> None:
        self.metrics.latency.observe(time.perf_counter() - self.arrived)
        self.log["completion_tokens"] = self.completion


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the request's body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work):
    """The result of `work` (a coroutine), or None when the client went away first (`work` is
    then cancelled, which frees its batch slots)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def create_app(service: Service, playground_config: dict, *, keys: KeyChecker | None = None,
               log_requests: bool = False, log_prompts: bool = False, learning=None) -> FastAPI:
    backend, limits = service.backend, service.limits
    keys = keys or KeyChecker(())
    queue = Queue(limits.max_queue)
    metrics = backend.metrics
    metrics.watch(waiting=lambda: queue.waiting, running=backend.running_rows)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        try:
            yield
        finally:
            backend.stop()

    # No /docs: FastAPI's page loads its scripts from a CDN, and the server must work offline.
    app = FastAPI(title="rlphf serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(Gate, keys=keys, max_body_bytes=limits.max_body_bytes,
                       max_requests_per_key=limits.max_requests_per_key, metrics=metrics, log_requests=log_requests)
    page = resources.files("rlphf_cli.serving").joinpath("static/playground.html").read_text(encoding="utf-8")
    config = {**playground_config, "auth": keys.required}
    page = page.replace('"__RLPHF_CONFIG__"', json.dumps(config).replace("</", "<\\/"))

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page)

    # The playground's tab icon (a browser asks for /favicon.ico whatever the page links): a small
    # SVG, so no binary file ships for it.
    @app.get("/favicon.ico")
    async def favicon():
        return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/health")
    async def health():
        body = {"status": "ok", "backend": backend.name, "model": backend.model_name,
                "policies": list(service.policies.policies), "queued": queue.waiting, **backend.status()}
        if backend.dead:
            return JSONResponse({**body, "status": "unavailable", "reason": backend.dead}, status_code=503)
        return body

    @app.get("/metrics")
    async def prometheus():
        content, media_type = metrics.text()
        return Response(content, media_type=media_type)

    @app.get("/v1/models")
    async def models() -> ModelList:
        created = int(time.time())
        return ModelList(data=[ModelCard(id=name, created=created) for name in service.policies.model_ids()])

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        if backend.dead:
            raise BackendUnavailable(f"the server cannot decode: {backend.dead}")
        job = await run_in_threadpool(service.job, req)
        queue.enter(job)
        backend.counters.requests += 1
        prompt = next((m.text() for m in reversed(req.messages) if m.role == "user"), "") if log_prompts else None
        track = _Tracker(request, job, metrics, prompt)
        head = {"id": job.id, "created": int(time.time()), "model": req.model}
        info = SoupInfo(soup=job.soup.key, preferences=[p.id for p in job.soup.preferences])
        prompt_tokens = len(job.prompt_ids)
        if not req.stream:
            async def collect() -> dict[int, Finish]:
                finished: dict[int, Finish] = {}
                async with contextlib.aclosing(backend.stream(job)) as events:
                    async for event in events:
                        track.saw(event)
                        if isinstance(event, Finish):
                            finished[event.index] = event
                return finished

            try:
                finished = await _unless_gone(request, collect())
            finally:
                job.left_queue()
            if finished is None:
                return Response(status_code=499)  # nobody is listening (nginx's 'client closed request')
            track.finished()
            completion = sum(f.completion_tokens for f in finished.values())
            return ChatCompletion(**head, choices=[
                Choice(index=i, message=AssistantMessage(content=finished[i].text), finish_reason=finished[i].reason)
                for i in sorted(finished)], usage=Usage.of(prompt_tokens, completion), rlphf=info)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[ChunkChoice], **more) -> str:
            return ChatCompletionChunk(**head, choices=choices, **more).sse(usage_field=include_usage)

        async def events():
            try:
                yield chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                             for i in range(job.sampling.n)], rlphf=info)
                async with contextlib.aclosing(backend.stream(job)) as stream:
                    async for event in stream:
                        track.saw(event)
                        if isinstance(event, Delta):
                            yield chunk([ChunkChoice(index=event.index, delta=DeltaMessage(content=event.text))])
                        else:
                            yield chunk([ChunkChoice(index=event.index, delta=DeltaMessage(),
                                                     finish_reason=event.reason)])
                track.finished()
                if include_usage:
                    yield chunk([], usage=Usage.of(prompt_tokens, track.completion))
            except Exception as exc:  # the stream began (status 200 is sent): an error event, then [DONE]
                status, body = _error_of(exc)
                if status >= 500:
                    log.error("stream %s failed: %s", job.id, body.error.message, exc_info=status == 500)
                track.log["error"] = status
                yield sse(body.model_dump())
            yield "data: [DONE]\n\n"

        return _SSEResponse(events(), job.left_queue, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    learning = learning or ProfileLearning(service, None, [], None)

    @app.post("/v1/profiles/{user}/compare")
    async def compare(user: str, body: CompareRequest):
        if backend.dead:
            raise BackendUnavailable(f"the server cannot decode: {backend.dead}")
        return await run_in_threadpool(learning.compare, user, body, asyncio.get_running_loop())

    @app.post("/v1/profiles/{user}/feedback")
    async def feedback(user: str, body: FeedbackRequest):
        return await run_in_threadpool(learning.feedback, user, body)

    @app.get("/v1/profiles/{user}")
    async def profile(user: str):
        return await run_in_threadpool(learning.get, user)

    return app
