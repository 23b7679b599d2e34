"""Request and response bodies of the OpenAI-style API, plus the error shape.

Requests follow OpenAI's completions / chat completions schema so the official client works unchanged.
Extension fields choose the decoding: `mode` (exact / marginal / joint), `k` (the most tokens per full
pass), `threshold` (confidence-threshold decoding), `kv_cache` (none / prefix / dual), `policy`,
`block_length`, `stop_at_eos`. Fields left out take the server's configured defaults; `k` is ignored (1)
in exact mode. The decoding fields' types come from `sampler.settings`, and their values are validated
there (one place), by the generator, with the server's limits and what depends on the served model
(context length, max `k`, whether a sampler is loaded); a bad value is a 400 that names the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sampler.settings import KVCache, Mode, Policy


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def field_path(loc: tuple | list) -> str | None:
    """`messages.0.content` from a pydantic error location, without union-member tags like `str` or
    `list[str]` that pydantic appends when a field accepts several types."""
    parts = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or p.startswith("function-")):
            break
        parts.append(str(p))
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "json-or-python"}


def validation_error(exc: ValidationError) -> ApiError:
    """The first pydantic error as a 400 that names the offending field (e.g. `messages.0.content`)."""
    err = exc.errors()[0]
    param = field_path(err["loc"])
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "field required"
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


class _Request(BaseModel):
    # unknown fields are ignored (clients send e.g. `user`, `frequency_penalty` defaults)
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, le=2.0)  # OpenAI's protocol bound; the rest: DecodeSettings
    top_p: float | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    logprobs: Any = None
    user: str | None = None
    # extensions
    mode: Mode | None = None
    k: int | None = None
    threshold: float | None = None
    kv_cache: KVCache | None = None
    policy: Policy | None = None
    block_length: int | None = None
    stop_at_eos: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: Any) -> Any:
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        return None

    def decoding(self) -> dict[str, Any]:
        """The decoding settings the generator reads (None = server default)."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "n": self.n, "seed": self.seed, "stop": self.stop, "mode": self.mode, "k": self.k,
                "threshold": self.threshold, "kv_cache": self.kv_cache, "policy": self.policy,
                "block_length": self.block_length, "stop_at_eos": self.stop_at_eos}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("prompt must not be empty")
        if any(not s.strip() for s in items):
            raise ValueError("prompt must not be empty")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text().strip() for m in v):
            raise ValueError("messages must contain some text")
        return v

    def decoding(self) -> dict[str, Any]:
        d = super().decoding()
        if d["max_tokens"] is None:
            d["max_tokens"] = self.max_completion_tokens
        return d


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()


# --- responses ----------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DecodingInfo(BaseModel):
    """Extension object `jointgen` on every response: how the answer was decoded and batched."""
    mode: str
    k: int
    threshold: float | None = None
    kv_cache: str = "none"
    full_passes: int
    tokens_per_pass: float  # mean over rows of tokens decoded per full pass that decoded for the row
    sampler_passes: int
    batch_requests: int  # requests that shared this answer's full passes
    batch_rows: int  # sequences in that batch (a request with n=3 adds 3 rows)
    queue_s: float
    decode_s: float
    replica: str
    replica_pid: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    jointgen: DecodingInfo


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    jointgen: DecodingInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jointgen"
    sampler: str  # "loaded" (from a directory), "untrained" or "none"
    backbone_identity: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
