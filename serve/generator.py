"""The generator deployment: the backbone and the joint sampler on one device, requests batched at the
denoising-step level.

Continuous batching: every request becomes a job in the replica's queue. Jobs with the same step-shaping
settings (mode, k, temperature, top_p, policy, block length, EOS handling) form a lane: their sequences are
rows of one batch, each right-aligned after left padding, so rows of any prompt and gen length share every
full backbone pass and every sampler pass. One loop per replica runs one full pass at a time (round-robin
over lanes); between passes, waiting jobs join their lane and finished rows leave it, so a request never
waits for another request's whole generation. The step is `sampler.generate`'s algorithm (same building
blocks from `sampler.decode`) on a batch that changes between passes. The model runs in a worker thread,
so the replica keeps accepting requests, answering stats and streaming while it decodes. A request with an
explicit `seed` gets a lane of its own, so the same request and seed give the same text.

Streaming: after each full pass, each streaming row's longest finished prefix (positions decoded
contiguously from the start, cut at EOS or a stop string) is decoded and its growth is sent as a delta.

Everything that depends on the served model (context length, limits, whether a sampler is loaded,
tokenization, chat template) is checked here; a bad request gets an error event, never an exception, so a
bad request can never take a replica down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sampler.backbone import backbone_dir, parse_dtype
from sampler.decode import (
    NOT_GENERATED,
    candidates,
    cut_at_stop,
    encode_chat,
    encode_text,
    pack_rows,
    unmask_step,
    with_bos,
)
from sampler.kvcache import BlockKVCache
from sampler.settings import DecodeSettings, Mode
from serve.api import ApiError, validation_error
from serve.metrics import GeneratorMetrics

log = logging.getLogger("jointgen.serve")

class ServeDefaults(DecodeSettings):
    """What a request that leaves a field out gets: the decoding settings plus max_tokens."""

    mode: Mode = "joint"  # falls back to exact when no sampler is loaded
    k: int = Field(4, ge=1)
    stop_at_eos: bool = True
    max_tokens: int = Field(64, ge=1)


class ServeLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(256, ge=1)
    max_k: int = Field(8, ge=1)
    max_n: int = Field(8, ge=1)
    max_prompt_tokens: int = Field(1024, ge=1)


SAMPLER_CHOICES = ("auto", "none", "untrained")


@dataclass
class Row:
    sent: str = ""  # text already streamed
    finished: bool = False
    decoded: int = 0  # tokens decoded (EOS-filled positions are not decoded)
    passes: int = 0  # full passes in which this row decoded a token


@dataclass(eq=False)  # identity: a job is one request
class Job:
    id: str
    prompts: list[list[int]]  # one token-id row per choice
    settings: DecodeSettings
    gen_length: int
    seed: int | None
    stop: list[str]
    stream: bool
    key: tuple
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    rows: list[Row] = field(default_factory=list)
    suffix: list[int] = field(default_factory=list)  # infilling: token ids after every row's span
    # filled while decoding
    admitted: float = 0.0
    tokens: list[list[int] | None] = field(default_factory=list)  # per row, once finished
    full_passes: int = 0
    sampler_passes: int = 0
    max_batch_requests: int = 0
    max_batch_rows: int = 0
    shared_passes: int = 0  # full passes this request shared with at least one other request
    prompt_tokens: int = 0  # usage: each prompt (and suffix) once, whatever n
    first_delta: float = 0.0  # when the first streamed text left (time to first token)

    def emit(self, event: dict[str, Any]) -> None:
        """Thread-safe: the model thread hands events to the replica's event loop."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """Plain-Python core of the generator deployment (no Ray here; `Generator` below wraps it)."""

    def __init__(self, backbone: str | None = None, sampler: str | None = "auto", *,
                 model_name: str | None = None, device: str = "auto", dtype: str | None = None,
                 defaults: dict[str, Any] | ServeDefaults | None = None,
                 limits: dict[str, int] | ServeLimits | None = None,
                 max_batch_size: int = 16, batch_wait_s: float = 0.01, torch_threads: int | None = None,
                 max_step_failures: int = 3):
        from sampler import JointSampler, load_backbone
        from sampler.joint import find_sampler

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tdtype = parse_dtype(dtype)
        path = backbone_dir(backbone)
        self.backbone = load_backbone(path, device=device, dtype=tdtype)
        self.sampler, self.sampler_status = None, "none"
        choice = "auto" if sampler is None else str(sampler)
        if choice == "auto":
            self.sampler = find_sampler(path, self.backbone)
            if self.sampler is not None:
                self.sampler_status = "loaded"
            else:
                log.warning("no trained sampler found next to %s: serving an UNTRAINED sampler "
                            "(joint == marginal until one is trained)", path)
                choice = "untrained"
        if choice == "untrained":
            self.sampler = JointSampler.for_backbone(self.backbone, seed=0).to(self.backbone.dtype).eval()
            self.sampler_status = "untrained"
        elif choice not in ("auto", "none"):
            self.sampler = JointSampler.load(choice, self.backbone)  # refuses another backbone's sampler
            self.sampler_status = "loaded"
        self.model_name = model_name or self.backbone.name
        self.defaults = ServeDefaults.model_validate(defaults or {})
        self.limits = ServeLimits.model_validate(limits or {})
        if self.defaults.k > self.limits.max_k or self.defaults.max_tokens > self.limits.max_tokens:
            raise ValueError(f"defaults k={self.defaults.k} / max_tokens={self.defaults.max_tokens} are over "
                             f"the limits max_k={self.limits.max_k} / max_tokens={self.limits.max_tokens}")
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = float(batch_wait_s)
        self.created = int(time.time())
        self._waiting: deque[Job] = deque()
        self._lanes: dict[tuple, Lane] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._stats = {"full_passes": 0, "requests": 0, "rows": 0, "max_batch_requests": 0, "errors": 0}
        self._hist: Counter[int] = Counter()  # requests per full pass -> number of full passes
        self._recent: deque[int] = deque(maxlen=64)
        self.max_step_failures = int(max_step_failures)
        self._failures = 0  # consecutive failed decoding steps (check_health)
        self.metrics = GeneratorMetrics()

    # ---- introspection -----------------------------------------------------------------------------

    def replica_id(self) -> str:
        try:
            from ray import serve

            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica
            return f"local-{os.getpid()}"

    def info(self) -> dict[str, Any]:
        b = self.backbone
        return {"model": self.model_name, "created": self.created, "sampler": self.sampler_status,
                "backbone_identity": b.identity, "max_seq_len": b.args.max_seq_len,
                "defaults": self.effective_defaults().model_dump(), "limits": self.limits.model_dump(),
                "max_batch_size": self.max_batch_size, "device": str(b.device)}

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        lanes = list(self._lanes.values())
        return {**self._stats, "batch_requests_hist": {str(k): v for k, v in sorted(self._hist.items())},
                "recent_batch_requests": list(self._recent),
                "waiting": len(self._waiting) + sum(len(lane.pending) for lane in lanes),
                "running": sum(len(lane.jobs()) for lane in lanes), "lanes": len(lanes),
                "pid": os.getpid(), "replica": self.replica_id()}

    def check_health(self) -> None:
        """Serve's health check (every `health_check_period_s`): raising marks the replica unhealthy and
        Serve replaces it. Unhealthy: the decoding loop has died, or its last `max_step_failures` steps
        all failed (a broken device, say)."""
        task = self._loop_task
        if task is not None and task.done():
            why = "was cancelled" if task.cancelled() else f"raised {task.exception()!r}"
            raise RuntimeError(f"the decoding loop died: it {why}")
        if self._failures >= self.max_step_failures:
            raise RuntimeError(f"the last {self._failures} decoding steps failed")

    def effective_defaults(self) -> ServeDefaults:
        if self.defaults.mode == "joint" and self.sampler is None:
            # the configured default needs a sampler; an explicit request for joint gets a 400
            return self.defaults.model_copy(update={"mode": "exact", "k": 1, "threshold": None})
        return self.defaults

    # ---- request -> job ------------------------------------------------------------------------------

    def encode(self, request: dict[str, Any]) -> tuple[list[list[int]], str]:
        """Token ids of each prompt (one path with the library: `sampler.decode.encode_text/_chat`), and
        the name of the field they came from. A completion's `prompt` is one text or a list of prompts,
        each text or token ids; ids are checked against the vocabulary and get BOS first like text. An
        empty prompt is [BOS]: unconditional generation."""
        if self.backbone.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; text requests are not possible",
                           code="no_tokenizer")
        if request["kind"] == "chat":
            try:
                return [encode_chat(self.backbone, request["messages"])], "messages"
            except ValueError as e:
                code = "no_chat_template" if "no chat template" in str(e) else "invalid_value"
                raise ApiError(400, f"messages: {e}", param="messages", code=code) from None
        b = self.backbone
        prompts = []
        for p in [request["prompt"]] if isinstance(request["prompt"], str) else request["prompt"]:
            if isinstance(p, str):
                ids = encode_text(b, p)
            else:
                for t in p:
                    if not 0 <= t < b.args.vocab_size or t == b.mask_id:
                        what = "the mask token" if t == b.mask_id else \
                            f"outside the vocabulary (0 to {b.args.vocab_size - 1})"
                        raise ApiError(400, f"prompt: token id {t} is {what}", param="prompt",
                                       code="invalid_value")
                ids = with_bos(b, p)
            if not ids:
                raise ApiError(400, "prompt: an empty prompt starts from BOS and this model has no BOS token",
                               param="prompt", code="invalid_value")
            prompts.append(ids)
        return prompts, "prompt"

    def encode_suffix(self, request: dict[str, Any]) -> list[int]:
        """Token ids of a completion's `suffix` (infilling), without BOS: it continues the sequence after
        the span. [] when there is none."""
        if not request.get("suffix"):
            return []
        if self.backbone.tokenizer is None:
            raise ApiError(400, "suffix: this model has no tokenizer; a text suffix is not possible",
                           param="suffix", code="no_tokenizer")
        return encode_text(self.backbone, request["suffix"], bos=False)

    def prepare(self, request: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Job:
        """Validate a request against the served model and the limits; raise ApiError naming the field."""
        d = {k: v for k, v in request["decoding"].items() if v is not None}
        eff, lim = self.effective_defaults(), self.limits
        merged = {**eff.model_dump(), **d}
        if d.get("mode") == "exact" and "threshold" not in d:
            merged["threshold"] = None  # a default threshold does not apply to exact decoding
        try:
            settings = DecodeSettings.from_mapping(merged)
        except ValidationError as e:
            raise validation_error(e) from None
        if settings.mode == "joint" and self.sampler is None:
            raise ApiError(400, "mode: 'joint' needs a joint sampler and this server has none loaded "
                                "(use mode 'exact' or 'marginal')", param="mode", code="no_sampler")
        max_tokens, n = int(merged["max_tokens"]), int(d.get("n", 1))
        for name, value, limit in (("k", settings.k, lim.max_k), ("max_tokens", max_tokens, lim.max_tokens),
                                   ("n", n, lim.max_n)):
            if value > limit:
                raise ApiError(400, f"{name}: {value} is over this server's limit (maximum {limit})",
                               param=name, code="invalid_value")
        prompts, field_name = self.encode(request)
        if len(prompts) * n > self.max_batch_size:
            raise ApiError(400, f"{field_name}: {len(prompts)} prompt(s) x n={n} is over the batch size "
                                f"of {self.max_batch_size}", param=field_name, code="invalid_value")
        longest = max(len(p) for p in prompts)
        ctx = self.backbone.args.max_seq_len
        if longest > lim.max_prompt_tokens:
            raise ApiError(400, f"{field_name}: {longest} tokens is over this server's prompt limit of "
                                f"{lim.max_prompt_tokens}", param=field_name, code="context_length_exceeded")
        if longest + max_tokens > ctx:
            raise ApiError(400, f"{field_name}: {longest} prompt tokens + max_tokens {max_tokens} exceed the "
                                f"model's context of {ctx}", param=field_name, code="context_length_exceeded")
        suffix = self.encode_suffix(request)
        if longest + max_tokens + len(suffix) > ctx:
            raise ApiError(400, f"suffix: {longest} prompt tokens + max_tokens {max_tokens} + {len(suffix)} "
                                f"suffix tokens exceed the model's context of {ctx}", param="suffix",
                           code="context_length_exceeded")
        seed = d.get("seed")
        # rows of any gen length share full passes; the settings must match, and a seeded request is alone
        key = (settings, ("seed", int(seed), uuid.uuid4().hex) if seed is not None else ("shared",))
        rows = [p for p in prompts for _ in range(n)]
        return Job(id=uuid.uuid4().hex[:12], prompts=rows, settings=settings, gen_length=max_tokens,
                   seed=None if seed is None else int(seed), stop=d.get("stop") or [],
                   stream=bool(request.get("stream")), key=key, loop=loop, rows=[Row() for _ in rows],
                   suffix=suffix, prompt_tokens=sum(len(p) + len(suffix) for p in prompts))

    # ---- the request method (a streaming method: the ingress calls it with stream=True) -----------------

    async def submit(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yields {"event": "accepted"} once the request is valid, {"event": "delta", "index", "text"} while
        decoding (when streaming), then one {"event": "done", ...}; or a single {"event": "error", ...}."""
        loop = asyncio.get_running_loop()
        try:
            job = self.prepare(request, loop)
        except ApiError as e:
            yield {"event": "error", "status": e.status, "message": e.message, "param": e.param,
                   "code": e.code, "type": e.type}
            return
        yield {"event": "accepted", "id": job.id, "rows": len(job.prompts)}
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = loop.create_task(self._batch_loop())
        self._waiting.append(job)
        self._wake.set()
        try:
            while True:
                event = await job.events.get()
                yield event
                if event["event"] in ("done", "error"):
                    return
        finally:
            job.cancelled = True  # client gone: a waiting job is dropped; a running one finishes its batch

    async def _batch_loop(self) -> None:
        """Continuous batching: one full pass at a time, round-robin over lanes (a lane = the requests with
        one set of step-shaping settings). Waiting requests join their lane at the next pass boundary;
        finished rows leave it."""
        turn = 0
        while True:
            while self._waiting:
                job = self._waiting.popleft()
                if not job.cancelled:
                    lane = self._lanes.get(job.key)
                    if lane is None:
                        lane = self._lanes[job.key] = Lane(self, job.settings, job.seed)
                    lane.pending.append(job)
            for key in [k for k, lane in self._lanes.items() if lane.idle()]:
                del self._lanes[key]
            if not self._lanes:
                self._wake.clear()
                await self._wake.wait()
                # just woken from idle: give concurrent arrivals a moment to share the first pass
                if self.batch_wait_s > 0:
                    await asyncio.sleep(self.batch_wait_s)
                continue
            lanes = list(self._lanes.values())
            lane = lanes[turn % len(lanes)]
            turn += 1
            try:
                await asyncio.to_thread(self._step, lane)
                self._failures = 0
            except Exception as e:  # never let one step kill the replica: its requests get a clean error
                self._stats["errors"] += 1
                self._failures += 1
                log.exception("decoding step failed")
                status = 400 if isinstance(e, ValueError) else 500
                self.metrics.step_failures.inc(tags={"status": str(status)})
                for job in lane.jobs() + list(lane.pending):
                    job.emit({"event": "error", "status": status, "message": f"generation failed: {e}",
                              "param": None, "code": "generation_failed",
                              "type": "invalid_request_error" if status == 400 else "server_error"})
                self._lanes = {k: v for k, v in self._lanes.items() if v is not lane}
            held = list(self._lanes.values())
            self.metrics.waiting.set(len(self._waiting) + sum(len(h.pending) for h in held))
            self.metrics.running.set(sum(h.n_rows() for h in held))

    def _step(self, lane: Lane) -> None:
        """In the model thread: admit, one full pass (+ its sampler passes), stream, retire."""
        lane.drop_cancelled()
        while lane.pending and lane.n_rows() + len(lane.pending[0].prompts) <= self.max_batch_size:
            job = lane.pending.popleft()
            if not job.cancelled:
                job.admitted = time.perf_counter()
                self.metrics.queue_s.observe(job.admitted - job.enqueued)
                job.tokens = [None] * len(job.prompts)
                lane.admit(job)
        if not lane.n_rows():
            return
        jobs = lane.jobs()
        sampler_passes = lane.step()
        n_jobs, n_rows = len(jobs), lane.n_rows()
        mode = {"mode": lane.settings.mode}
        self.metrics.full_passes.inc(tags=mode)
        if sampler_passes:
            self.metrics.sampler_passes.inc(sampler_passes, tags=mode)
        self.metrics.batch_rows.observe(n_rows, tags=mode)
        self._stats["full_passes"] += 1
        self._stats["max_batch_requests"] = max(self._stats["max_batch_requests"], n_jobs)
        self._hist[n_jobs] += 1
        self._recent.append(n_jobs)
        for job in jobs:
            job.full_passes += 1
            job.sampler_passes += sampler_passes
            job.max_batch_requests = max(job.max_batch_requests, n_jobs)
            job.max_batch_rows = max(job.max_batch_rows, n_rows)
            job.shared_passes += n_jobs > 1
        eos = self.backbone.eos_id if lane.settings.stop_at_eos else None
        for job, r, ids, done in lane.rows_after_step():
            if done:
                job.tokens[r] = ids
            elif job.stream and not job.cancelled and not job.rows[r].finished:
                self._stream_row(job, r, ids, eos)
        for job in jobs:
            if all(t is not None for t in job.tokens):
                self._finish(job, lane.settings)

    def _finish(self, job: Job, settings: DecodeSettings) -> None:
        done_at = time.perf_counter()
        eos = self.backbone.eos_id if settings.stop_at_eos else None
        choices, completion_tokens = [], 0
        for r, tokens in enumerate(job.tokens):
            n_tok = tokens.index(eos) if eos is not None and eos in tokens else len(tokens)
            text = self.backbone.tokenizer.decode(tokens[:n_tok], skip_special_tokens=True)
            text, hit_stop = cut_at_stop(text, job.stop)
            finish = "stop" if hit_stop or n_tok < len(tokens) else "length"
            if hit_stop:  # the tokens the answer's text needs, not those decoded past the stop string
                n_tok = tokens_covering(self.backbone.tokenizer, tokens[:n_tok], len(text))
            completion_tokens += n_tok
            if job.stream:
                row = job.rows[r]
                if not row.finished and text.startswith(row.sent) and len(text) > len(row.sent):
                    self._delta(job, r, text[len(row.sent):])
                row.sent, row.finished = text, True
            choices.append({"index": r, "text": text, "finish_reason": finish})
        self._stats["requests"] += 1
        self._stats["rows"] += len(job.prompts)
        prompt_tokens = job.prompt_tokens
        if prompt_tokens:
            self.metrics.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.metrics.completion_tokens.inc(completion_tokens)
        self.metrics.decode_s.observe(done_at - job.admitted, tags={"mode": settings.mode})
        rates = [row.decoded / row.passes for row in job.rows if row.passes]
        info = {"mode": settings.mode, "k": settings.k, "threshold": settings.threshold,
                "kv_cache": settings.kv_cache, "order": settings.order, "fill": settings.fill,
                "full_passes": job.full_passes,
                "tokens_per_pass": round(sum(rates) / max(len(rates), 1), 4),
                "sampler_passes": job.sampler_passes, "batch_requests": job.max_batch_requests,
                "batch_rows": job.max_batch_rows, "shared_passes": job.shared_passes,
                "queue_s": round(job.admitted - job.enqueued, 4),
                "decode_s": round(done_at - job.admitted, 4),
                "replica": self.replica_id(), "replica_pid": os.getpid()}
        job.emit({"event": "done", "choices": choices, "info": info,
                  "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}})

    def _delta(self, job: Job, r: int, text: str) -> None:
        if not job.first_delta:
            job.first_delta = time.perf_counter()
            self.metrics.first_token_s.observe(job.first_delta - job.enqueued)
        job.emit({"event": "delta", "index": r, "text": text})

    def _stream_row(self, job: Job, r: int, ids: list[int], eos: int | None) -> None:
        """Send the growth of row r's longest finished prefix (contiguous from the start, cut at EOS)."""
        mask = self.backbone.mask_id
        n = ids.index(mask) if mask in ids else len(ids)
        prefix, ended = ids[:n], False
        if eos is not None and eos in prefix:
            prefix, ended = prefix[: prefix.index(eos)], True
        text = self.backbone.tokenizer.decode(prefix, skip_special_tokens=True)
        text, hit_stop = cut_at_stop(text, job.stop)
        if not (hit_stop or ended):
            text = text.rstrip("\ufffd")  # a multi-byte character still half decoded
            hold = max((len(s) for s in job.stop), default=1) - 1
            if hold:  # a stop string may be starting at the end: keep it back until it resolves
                text = text[: max(len(text) - hold, len(job.rows[r].sent))]
        row = job.rows[r]
        if text.startswith(row.sent) and len(text) > len(row.sent):
            self._delta(job, r, text[len(row.sent):])
            row.sent = text
        row.finished = hit_stop or ended




class Lane:
    """Rows decoding with one set of settings, each right-aligned in a shared [rows, columns] batch:
    left padding, prompt, generated span, suffix (`sampler.decode.pack_rows`). Rows join and leave
    between full passes; a step is one full pass and its sampler passes, the same algorithm as
    `sampler.generate` (one `unmask_step`) with the batch changing between passes (docs/method.md, "The
    decoding loop")."""

    def __init__(self, engine: Engine, settings: DecodeSettings, seed: int | None = None):
        self.engine = engine
        self.b = engine.backbone
        self.settings = settings
        dev = self.b.device
        self.rng = torch.Generator(device=dev).manual_seed(secrets.randbits(31) if seed is None else seed)
        self.pending: deque[Job] = deque()
        self.owners: list[tuple[Job, int, int]] = []  # per batch row: job, row index in the job, gen length
        self.x = torch.empty(0, 0, dtype=torch.long, device=dev)
        self.attn = torch.empty(0, 0, dtype=torch.bool, device=dev)
        self.block_id = torch.empty(0, 0, dtype=torch.long, device=dev)
        self.ctx = None
        self.cache: BlockKVCache | None = None  # settings.kv_cache: rebuilt whenever rows join or leave

    def n_rows(self) -> int:
        return len(self.owners)

    def jobs(self) -> list[Job]:
        return list(dict.fromkeys(job for job, _, _ in self.owners))

    def idle(self) -> bool:
        return not self.owners and not self.pending

    def _pad_left(self, width: int) -> None:
        if width <= 0:
            return
        B, dev = self.x.shape[0], self.b.device
        pad = self.b.pad_id if self.b.pad_id is not None else self.b.mask_id
        self.x = torch.cat([torch.full((B, width), pad, dtype=torch.long, device=dev), self.x], 1)
        self.attn = torch.cat([torch.zeros(B, width, dtype=torch.bool, device=dev), self.attn], 1)
        self.block_id = torch.cat([torch.full((B, width), NOT_GENERATED, dtype=torch.long, device=dev),
                                   self.block_id], 1)

    def admit(self, job: Job) -> None:
        G, S = job.gen_length, len(job.suffix)
        self._pad_left(max(len(p) for p in job.prompts) + G + S - self.x.shape[1])
        x, attn, blocks = pack_rows(self.b, job.prompts, G, self.x.shape[1],
                                    suffixes=[job.suffix] * len(job.prompts),
                                    block_length=self.settings.block_length)
        self.owners += [(job, r, G) for r in range(len(job.prompts))]
        self.x = torch.cat([self.x, x])
        self.attn = torch.cat([self.attn, attn])
        self.block_id = torch.cat([self.block_id, blocks])
        self.ctx = self.cache = None

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.owners):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.b.device)
        self.x, self.attn, self.block_id = self.x[idx], self.attn[idx], self.block_id[idx]
        self.owners = [self.owners[i] for i in keep]
        # drop the columns that are padding in every remaining row
        first = int(self.attn.any(0).nonzero()[0]) if keep else self.x.shape[1]
        self.x, self.attn, self.block_id = self.x[:, first:], self.attn[:, first:], self.block_id[:, first:]
        self.ctx = self.cache = None

    def drop_cancelled(self) -> None:
        """A request whose client went away stops using the device at once."""
        self._keep([i for i, (job, _, _) in enumerate(self.owners) if not job.cancelled])

    def step(self) -> int:
        """One full pass and its sampler passes for every row; returns the number of sampler passes.
        Each row's decoded tokens and passes are added to its job's `Row` (tokens per full pass)."""
        b, s, x = self.b, self.settings, self.x
        attn_mask = None if bool(self.attn.all()) else self.attn
        if self.ctx is None:
            self.ctx = b.context(x, attn_mask)
        gen_cols = self.block_id < NOT_GENERATED
        masked = (x == b.mask_id) & gen_cols
        cand, valid, _ = candidates(masked, self.block_id)
        if cand.shape[1] == 0:
            return 0
        if s.kv_cache != "none":  # refreshed at the first pass of a new batch and at every block change
            if self.cache is None:
                self.cache = BlockKVCache.for_decoding(b, s, x.shape[0], x.shape[1], self.engine.sampler)
            self.cache.plan(masked, self.block_id)
        picks, sampler_passes = unmask_step(
            b, x, cand, valid, ctx=self.ctx, attn_mask=attn_mask, settings=s, sampler=self.engine.sampler,
            rng=self.rng, eos_region=gen_cols if s.stop_at_eos else None, cache=self.cache)
        decoded = torch.stack([go for go, _ in picks]).sum(0).tolist() if picks else []
        for (job, r, _), n in zip(self.owners, decoded, strict=True):
            job.rows[r].decoded += n
            job.rows[r].passes += n > 0
        return sampler_passes

    def rows_after_step(self) -> list[tuple[Job, int, list[int], bool]]:
        """(job, row, span ids, finished) for every row; finished rows leave the lane."""
        streaming = any(job.stream for job, _, _ in self.owners)
        left = ((self.x == self.b.mask_id) & (self.block_id < NOT_GENERATED)).any(1).tolist()
        host = self.x.cpu() if streaming or not all(left) else None
        out, keep = [], []
        L = self.x.shape[1]
        for i, (job, r, G) in enumerate(self.owners):
            end = L - len(job.suffix)  # right-aligned: the span ends where the suffix starts
            if left[i]:
                keep.append(i)
                if job.stream:
                    out.append((job, r, host[i, end - G:end].tolist(), False))
            else:
                out.append((job, r, host[i, end - G:end].tolist(), True))
        self._keep(keep)
        return out


def tokens_covering(tokenizer: Any, tokens: list[int], n_chars: int) -> int:
    """The fewest leading `tokens` whose text has at least `n_chars` characters: what a completion cut at
    a stop string used (a binary search; the decoded text grows with the tokens)."""
    lo, hi = 0, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(tokens[:mid], skip_special_tokens=True)) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo
