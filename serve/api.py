"""Request and response bodies of the OpenAI-style API, plus the error shape.

Requests follow OpenAI's completions / chat completions schema so the official client works unchanged.
Extension fields choose the decoding: `mode` (exact / marginal / joint), `k` (the most tokens per full
pass), `threshold` (confidence-threshold decoding), `kv_cache` (none / prefix / dual), `order` (joint:
rescore / planned), `fill` (joint with a threshold: k / sure), `policy`,
`block_length`, `stop_at_eos`. Fields left out take the server's configured defaults; `k` is ignored (1)
in exact mode. The decoding fields' types come from `sampler.settings`, and their values are validated
there (one place), by the generator, with the server's limits and what depends on the served model
(context length, max `k`, whether a sampler is loaded); a bad value is a 400 that names the field.

Completions take OpenAI's `suffix`: infilling. The sequence is prompt, a masked span of `max_tokens`,
suffix; the span is decoded by the same modes, the answer's text is the span only (cut at EOS and at stop
strings; the suffix stays as given), streamed the same way.

Strict: a field the server cannot honour is a 400 that names it (as vLLM does), never silently dropped.
Fields with no effect on the answer pass (`user`, `metadata`, `store`, `service_tier`,
`prompt_cache_key`, `safety_identifier`); OpenAI's sampling fields this server does not implement
(`echo`, `best_of`, penalties, `logit_bias`, `logprobs`, `top_k`, `min_p`, `response_format`, tools) pass
only with the value that turns them off, which some clients always send (`best_of` equal to `n`); any
other field is refused. A completion's `prompt` is text, token ids, or a list of either (several
prompts); an empty prompt ("" or []) generates unconditionally, from BOS.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from sampler.settings import Fill, KVCache, Mode, Order, Policy


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
    msg, code = err["msg"], "invalid_value"
    if err["type"] == "missing":
        msg = "field required"
    elif err["type"] == "extra_forbidden":
        msg, code = "not supported by this server", "unsupported_parameter"
    elif err["type"] == "unsupported":  # _Request._not_implemented
        code = "unsupported_parameter"
    elif err["type"] == "value_error":
        msg = str(err["ctx"]["error"])
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param, code=code)


# OpenAI fields this server cannot honour -> the values that turn them off (accepted: some clients always
# send them); `best_of` is off when equal to n
OFF_VALUES: dict[str, tuple] = {
    "echo": (False,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
    "logprobs": (False,), "top_logprobs": (0,), "top_k": (-1, 0), "min_p": (0,),
    "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
}


def _off(value: Any, offs: tuple) -> bool:
    return any(value == o and isinstance(value, bool) == isinstance(o, bool) for o in offs)  # 0 is not False


class _Request(BaseModel):
    # unknown fields are refused by name: an answer must never silently ignore what was asked
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, le=2.0)  # OpenAI's protocol bound; the rest: DecodeSettings
    top_p: float | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    # no effect on the answer
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # not implemented: accepted only when off (OFF_VALUES)
    echo: Any = None
    best_of: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    top_k: Any = None
    min_p: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    # extensions
    mode: Mode | None = None
    k: int | None = None
    threshold: float | None = None
    kv_cache: KVCache | None = None
    order: Order | None = None
    fill: Fill | None = None
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

    @field_validator(*OFF_VALUES, "best_of")
    @classmethod
    def _not_implemented(cls, v: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        offs = (info.data.get("n", 1),) if name == "best_of" else OFF_VALUES[name]
        if v is None or _off(v, offs):
            return None
        shown = "equal to n" if name == "best_of" else " or ".join(json.dumps(o) for o in offs)
        raise PydanticCustomError("unsupported", "not supported by this server (accepted only as {offs})",
                                  {"offs": shown})

    def decoding(self) -> dict[str, Any]:
        """The decoding settings the generator reads (None = server default)."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "n": self.n, "seed": self.seed, "stop": self.stop, "mode": self.mode, "k": self.k,
                "threshold": self.threshold, "kv_cache": self.kv_cache, "order": self.order,
                "fill": self.fill, "policy": self.policy, "block_length": self.block_length,
                "stop_at_eos": self.stop_at_eos}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


TokenIds = list[StrictInt]  # checked against the vocabulary by the generator


class CompletionRequest(_Request):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    suffix: str | None = None  # infilling: the text after the span (the same for every prompt)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids. "" and [] are one empty prompt (generation from BOS)."""
        p = self.prompt
        if isinstance(p, str) or not p or isinstance(p[0], int):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    order: str = "rescore"
    fill: str = "k"
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
    max_model_len: int  # the backbone's context: prompt + max_tokens (+ suffix) must fit
    sampler: str  # "loaded" (from a directory), "untrained" or "none"
    backbone_identity: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
