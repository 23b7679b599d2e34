"""The decoding settings: one type, validated in one place.

Every caller that chooses a decoding (`generate()`, the serving engine and its lanes, the teacher,
generate and evaluate jobs, the HTTP API) builds a `DecodeSettings`; a bad value fails here with an
error that names the field. Shapes that vary per row (prompt, gen_length) and the random seed are not
settings: they are arguments of the call.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Mode = Literal["exact", "marginal", "joint"]
Policy = Literal["entropy", "confidence", "margin", "random"]
KVCache = Literal["none", "prefix", "dual"]
Order = Literal["rescore", "planned"]
Fill = Literal["k", "sure"]
MODES: tuple[str, ...] = get_args(Mode)
POLICIES: tuple[str, ...] = get_args(Policy)
KV_CACHES: tuple[str, ...] = get_args(KVCache)


class DecodeSettings(BaseModel):
    """How tokens are chosen at each full pass (docs/method.md, "The decoding loop").

    mode: exact (one token per full pass), marginal (several from one pass's distributions) or joint
        (the sampler updates the distributions after each token).
    k: the most tokens per full pass (exact: always 1).
    threshold: None = fixed k. Otherwise confidence-threshold decoding (Fast-dLLM's rule): every
        candidate of the current block whose top probability is >= threshold is taken from the full
        pass, and at least the best one; in joint mode the sampler then decides uncertain positions one
        after another up to k tokens in all (docs/method.md, "Threshold and hybrid decoding").
    order: in joint mode, how the positions after the first (with a threshold: after the sure ones) are
        chosen. rescore: by the sampler's updated distributions at every candidate (a read-out over all
        of them per sampler step); planned: by the full pass's scores, fixed for the step, so a sampler
        step reads out one position.
    fill: in joint mode with a threshold, what the sampler takes after each of its passes. k: its best
        candidate whatever its confidence (and any it made sure), until the row has k tokens (the hybrid);
        sure: only the candidates whose top probability under the sampler is >= threshold, and a row
        with none stops until the next full pass (docs/method.md, "Threshold and hybrid decoding").
    kv_cache: none, or a block-wise approximate cache of keys and values (prefix: positions before the
        current block are reused; dual: those after it too), refreshed at every new block.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = "exact"
    k: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    policy: Policy = "entropy"
    block_length: int | None = Field(None, ge=1)
    stop_at_eos: bool = False
    threshold: float | None = Field(None, ge=0.0)
    kv_cache: KVCache = "none"
    order: Order = "rescore"
    fill: Fill = "k"

    @field_validator("threshold")
    @classmethod
    def _threshold_needs_parallel_mode(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("mode") == "exact":
            raise ValueError("exact mode decodes one token per full pass; use mode 'marginal' "
                             "(Fast-dLLM's rule) or 'joint' with a threshold")
        return v

    @model_validator(mode="after")
    def _exact_is_one_token(self) -> DecodeSettings:
        if self.mode == "exact" and self.k != 1:
            object.__setattr__(self, "k", 1)  # k means nothing in exact mode
        return self

    @field_validator("fill")
    @classmethod
    def _fill_sure_needs_a_joint_threshold(cls, v: str, info: ValidationInfo) -> str:
        d = info.data
        if v == "sure" and not (d.get("mode") == "joint" and d.get("threshold") is not None
                                and d.get("order") == "rescore"):
            raise ValueError("'sure' is a rule for the sampler's passes: it needs mode 'joint', a threshold "
                             "and order 'rescore'")
        return v

    def replace(self, **changes: Any) -> DecodeSettings:
        """A copy with some fields changed, validated again."""
        return DecodeSettings(**{**self.model_dump(), **changes})

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> DecodeSettings:
        """The settings among a larger mapping (a job config, a request): other keys are left out."""
        return cls(**{f: values[f] for f in cls.model_fields if f in values})
