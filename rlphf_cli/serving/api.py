"""The HTTP API: OpenAI's chat completions (JSON and server-sent events), models, health, playground.

Requests and responses follow OpenAI's JSON, so the official clients work unmodified; the soup is
the `model` field, or `preferences` (extra_body) with model "soup", or the `user`'s profile with
model "soup". Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
400 for bad input, 404 for an unknown model, 500 only for the server's own failures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlphf_cli.errors import InputError
from rlphf_cli.prompting import messages_with_preferences, render_messages, text_ids
from rlphf_cli.serving.backend import Backend, BackendError, Delta, Finish, Job, Sampling
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
    SoupInfo,
    Usage,
    sse,
)

log = logging.getLogger("rlphf.serve")


class RequestError(InputError):
    """Bad request input, with the OpenAI `param` (the field at fault) and `code`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


# --------------------------------------------------------------------------------------------
# Errors


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody.of(message, type_, param, code).model_dump(), status_code=status)


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

    @app.exception_handler(UnknownModel)
    async def unknown(request: Request, exc: UnknownModel):
        return _error(404, str(exc), param=exc.param, code="model_not_found")

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError):
        return _error(exc.status, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, exc: InputError):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("request failed")
        return _error(500, f"the server failed: {type(exc).__name__}: {exc}", type_="server_error")


# --------------------------------------------------------------------------------------------
# From a request to a job


class Service:
    """Turns requests into jobs for the backend; owns the soup vocabulary and the prompt rule."""

    def __init__(self, backend: Backend, policies: PolicySet, *, prompt_format: str, default_max_tokens: int,
                 max_batch: int, profiles: dict[str, Soup] | None = None):
        self.backend = backend
        self.policies = policies
        self.prompt_format = prompt_format
        self.default_max_tokens = default_max_tokens
        self.max_batch = max_batch
        self.profiles = profiles or {}

    def soup(self, req: ChatRequest) -> Soup:
        prompts = req.preference_prompts
        if req.preferences is not None:
            if req.model != SOUP:
                raise RequestError(f"'preferences' gives the soup, so 'model' must be '{SOUP}' (got '{req.model}')",
                                   param="model")
            if not req.preferences:
                raise RequestError("preferences: empty; give weights, e.g. {\"concise\": 0.7, \"friendly\": 0.3}",
                                   param="preferences")
            try:
                return self.policies.resolve(req.preferences, where="preferences", prompts=prompts)
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
            return self.policies.resolve(req.model, prompts=prompts)
        except UnknownModel:
            raise
        except InputError as exc:
            raise RequestError(str(exc), param="model") from None

    def job(self, req: ChatRequest) -> Job:
        if req.presence_penalty or req.frequency_penalty:
            raise RequestError("presence_penalty and frequency_penalty are not supported (use 0)",
                               param="presence_penalty" if req.presence_penalty else "frequency_penalty")
        if req.logprobs:
            raise RequestError("logprobs are not supported", param="logprobs")
        if req.n > self.max_batch:
            raise RequestError(f"n: at most {self.max_batch} choices (the server's --max-batch)", param="n")
        if not any(m.role == "user" for m in req.messages):
            raise RequestError("messages: no message with role 'user'", param="messages")
        soup = self.soup(req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        messages = messages_with_preferences(messages, soup.preferences)
        tokenizer = self.backend.tokenizer
        try:
            prompt_ids = text_ids(tokenizer, render_messages(tokenizer, messages, self.prompt_format),
                                  self.prompt_format)
        except Exception as exc:  # e.g. a chat template that refuses a role order
            raise RequestError(f"messages: cannot be rendered with the model's chat template: {exc}",
                               param="messages") from None
        context = self.backend.context_length
        asked = req.max_completion_tokens or req.max_tokens
        if len(prompt_ids) >= context or (asked and len(prompt_ids) + asked > context):
            wanted = f" and {asked} for the answer (max_tokens)" if asked else ""
            raise RequestError(f"the model's context is {context} tokens; the messages take {len(prompt_ids)}"
                               f"{wanted}", param="messages", code="context_length_exceeded")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        sampling = Sampling(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            max_tokens=asked or min(self.default_max_tokens, context - len(prompt_ids)),
            min_tokens=req.min_tokens, stop=stop, seed=req.seed, n=req.n,
        )
        return Job(f"chatcmpl-{uuid.uuid4().hex[:24]}", prompt_ids, soup, sampling)


# --------------------------------------------------------------------------------------------
# The app


class _SSEResponse(StreamingResponse):
    """A stream whose producer is closed as soon as sending fails (the client went away), so the
    job's batch slots are freed now rather than when the generator is garbage-collected."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()


def create_app(service: Service, playground_config: dict) -> FastAPI:
    backend = service.backend

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
    page = resources.files("rlphf_cli.serving").joinpath("static/playground.html").read_text(encoding="utf-8")
    page = page.replace('"__RLPHF_CONFIG__"', json.dumps(playground_config).replace("</", "<\\/"))

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend.name, "model": backend.model_name,
                "policies": list(service.policies.policies), **backend.status()}

    @app.get("/v1/models")
    async def models() -> ModelList:
        created = int(time.time())
        return ModelList(data=[ModelCard(id=name, created=created) for name in service.policies.model_ids()])

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        job = service.job(req)
        backend.counters.requests += 1
        head = {"id": job.id, "created": int(time.time()), "model": req.model}
        info = SoupInfo(soup=job.soup.key, preferences=[p.id for p in job.soup.preferences])
        prompt_tokens = len(job.prompt_ids)
        if not req.stream:
            finished: dict[int, Finish] = {}
            async with contextlib.aclosing(backend.stream(job)) as events:
                async for event in events:
                    if isinstance(event, Finish):
                        finished[event.index] = event
            completion = sum(f.completion_tokens for f in finished.values())
            return ChatCompletion(**head, choices=[
                Choice(index=i, message=AssistantMessage(content=finished[i].text), finish_reason=finished[i].reason)
                for i in sorted(finished)], usage=Usage.of(prompt_tokens, completion), rlphf=info)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[ChunkChoice], **more) -> str:
            return ChatCompletionChunk(**head, choices=choices, **more).sse(usage_field=include_usage)

        async def events():
            completion = 0
            try:
                yield chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                             for i in range(job.sampling.n)], rlphf=info)
                async with contextlib.aclosing(backend.stream(job)) as stream:
                    async for event in stream:
                        if isinstance(event, Delta):
                            yield chunk([ChunkChoice(index=event.index, delta=DeltaMessage(content=event.text))])
                        else:
                            completion += event.completion_tokens
                            yield chunk([ChunkChoice(index=event.index, delta=DeltaMessage(),
                                                     finish_reason=event.reason)])
                if include_usage:
                    yield chunk([], usage=Usage.of(prompt_tokens, completion))
            except BackendError as exc:
                yield sse(ErrorBody.of(str(exc), "server_error").model_dump())
            yield "data: [DONE]\n\n"

        return _SSEResponse(events(), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
