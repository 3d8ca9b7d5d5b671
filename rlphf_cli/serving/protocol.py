"""OpenAI's chat-completions protocol as rlphf serves it: the request (strict: a wrong type or an
unknown field is an error that names it), the responses, the stream's chunks and the error body.
Routes build these models and only do transport; `Usage` and `ErrorBody` are shared by both
backends' answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rlphf_cli.errors import InputError

# --------------------------------------------------------------------------------------------
# The request


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None  # how many and how long: the server's limits
    user: str | None = None
    # OpenAI parameters accepted at their neutral values only
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | None = None
    # rlphf's own (extra_body): the soup as weights, and whether its preference prompts are appended
    preferences: dict[str, float] | None = None
    preference_prompts: bool = True
    # How the soup's policies are composed: merged ("params") or mixed at decoding time ("logits")
    compose: Literal["params", "logits"] = "params"
    min_tokens: int | None = Field(default=None, ge=0)  # as vLLM's OpenAI server; None: the recipe's


# --------------------------------------------------------------------------------------------
# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class SoupInfo(BaseModel):
    """rlphf's own field of a response: the soup that answered and the preferences it was prompted with."""

    soup: str
    preferences: list[str]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[Choice]
    usage: Usage
    rlphf: SoupInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
    rlphf: SoupInfo | None = None

    def sse(self, usage_field: bool = False) -> str:
        """The chunk as a server-sent event. An empty delta is {} (a choice's last chunk); `usage` is
        there, null but in the last chunk, when the request asked for it (stream_options.include_usage)."""
        body = self.model_dump(exclude={"rlphf"} if self.rlphf is None else set())
        for choice in body["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not usage_field:
            body.pop("usage")
        return sse(body)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlphf"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail

    @classmethod
    def of(cls, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> ErrorBody:
        return cls(error=ErrorDetail(message=message, type=type_, param=param, code=code))


def sse(obj) -> str:
    import json

    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class RequestError(InputError):
    """Bad request input, with the OpenAI `param` (the field at fault), `code` and HTTP headers."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.param, self.code, self.status, self.headers = param, code, status, headers
