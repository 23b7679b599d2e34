"""The generator deployment: the backbone and the joint sampler on one device, requests batched at the
denoising-step level.

Batching: every request becomes a job in the replica's queue. One loop per replica takes the oldest job
plus every waiting job with compatible decoding settings (same gen length, mode, k, temperature, top_p,
policy, block length, EOS handling) and runs them as the rows of ONE `sampler.generate` call, so they share
every full backbone pass and every sampler pass. Jobs that arrive while a batch runs wait and form the
next batch together (admission is per batch, not per step: `generate` runs a batch to the end). The model
runs in a worker thread, so the replica keeps accepting requests, answering stats and streaming while it
decodes. A request with an explicit `seed` runs as its own batch, so the same request and seed give the
same text.

Streaming: `on_step` after each full pass gives the generated region; each row's longest finished prefix
(positions decoded contiguously from the start, cut at EOS or a stop string) is decoded and its growth is
sent as a delta event.

Everything that depends on the served model (context length, limits, whether a sampler is loaded,
tokenization, chat template) is checked here; a bad request gets an error event, never an exception, so a
bad request can never take a replica down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from serve.api import ApiError

log = logging.getLogger("jointgen.serve")

DEFAULTS: dict[str, Any] = {"mode": "joint", "k": 4, "max_tokens": 64, "temperature": 1.0, "top_p": 1.0,
                            "policy": "entropy", "block_length": None, "stop_at_eos": True}
LIMITS: dict[str, int] = {"max_tokens": 256, "max_k": 8, "max_n": 8, "max_prompt_tokens": 1024}
SAMPLER_CHOICES = ("auto", "none", "untrained")


def resolve_backbone_path(backbone: str | None) -> Path:
    from sampler import DEFAULT_BACKBONE

    path = Path(backbone) if backbone not in (None, "", "embedded") else DEFAULT_BACKBONE
    if not (path / "config.json").is_file():
        hint = (" (the embedded backbone has not been built yet: pass --backbone DIR)"
                if path == DEFAULT_BACKBONE else "")
        raise FileNotFoundError(f"backbone checkpoint {path} not found: no config.json{hint}")
    return path


def sampler_candidates(backbone_dir: Path) -> list[Path]:
    """Where `sampler: auto` looks for a trained sampler next to the backbone."""
    return [backbone_dir / "sampler", backbone_dir.parent / "sampler"]


@dataclass
class Row:
    sent: str = ""  # text already streamed
    finished: bool = False


@dataclass
class Job:
    id: str
    prompts: list[list[int]]  # one token-id row per choice
    settings: dict[str, Any]  # generate() keyword arguments (gen_length, mode, k, ...)
    stop: list[str]
    stream: bool
    key: tuple
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    rows: list[Row] = field(default_factory=list)

    def emit(self, event: dict[str, Any]) -> None:
        """Thread-safe: the model thread hands events to the replica's event loop."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """Plain-Python core of the generator deployment (no Ray here; `Generator` below wraps it)."""

    def __init__(self, backbone: str | None = None, sampler: str | None = "auto", *,
                 model_name: str | None = None, device: str = "auto", dtype: str | None = None,
                 defaults: dict[str, Any] | None = None, limits: dict[str, int] | None = None,
                 max_batch_size: int = 16, batch_wait_s: float = 0.01, torch_threads: int | None = None):
        from sampler import JointSampler, load_backbone

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tdtype = {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}[dtype]
        path = resolve_backbone_path(backbone)
        self.backbone = load_backbone(path, device=device, dtype=tdtype)
        self.sampler, self.sampler_status = None, "none"
        choice = "auto" if sampler is None else str(sampler)
        if choice == "auto":
            for cand in sampler_candidates(path):
                if (cand / "sampler.json").is_file():
                    try:
                        self.sampler = JointSampler.load(cand, self.backbone)
                        self.sampler_status = "loaded"
                        break
                    except ValueError as e:  # trained for another backbone: say so, keep looking
                        log.warning("ignoring sampler %s: %s", cand, e)
            if self.sampler is None:
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
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.limits = {**LIMITS, **(limits or {})}
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = float(batch_wait_s)
        self.created = int(time.time())
        self._waiting: deque[Job] = deque()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._running = 0
        self._lock = threading.Lock()  # one generate() at a time on the device
        self._stats = {"batches": 0, "requests": 0, "rows": 0, "max_batch_requests": 0, "full_passes": 0,
                       "errors": 0}
        self._hist: Counter[int] = Counter()
        self._recent: deque[int] = deque(maxlen=64)

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
                "defaults": self.effective_defaults(), "limits": dict(self.limits),
                "max_batch_size": self.max_batch_size, "device": str(b.device)}

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        return {**self._stats, "batch_requests_hist": {str(k): v for k, v in sorted(self._hist.items())},
                "recent_batch_requests": list(self._recent), "waiting": len(self._waiting),
                "running": self._running, "pid": os.getpid(), "replica": self.replica_id()}

    def effective_defaults(self) -> dict[str, Any]:
        d = dict(self.defaults)
        if d["mode"] == "joint" and self.sampler is None:
            d["mode"] = "exact"  # the configured default needs a sampler; an explicit request gets a 400
        return d

    # ---- request -> job ------------------------------------------------------------------------------

    def encode(self, request: dict[str, Any]) -> tuple[list[list[int]], str]:
        """Token ids of each prompt (BOS first), and the name of the field they came from."""
        tok, b = self.backbone.tokenizer, self.backbone
        if tok is None:
            raise ApiError(400, "this model has no tokenizer; text requests are not possible",
                           code="no_tokenizer")
        if request["kind"] == "chat":
            if not getattr(tok, "chat_template", None):
                raise ApiError(400, "messages: this model has no chat template; use /v1/completions",
                               param="messages", code="no_chat_template")
            text = tok.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=False)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
            if b.bos_id is not None and (not ids or ids[0] != b.bos_id):
                ids = [b.bos_id] + ids
            return [ids], "messages"
        prompts = request["prompt"]
        out = []
        for text in [prompts] if isinstance(prompts, str) else prompts:
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
            if b.bos_id is not None and (not ids or ids[0] != b.bos_id):
                ids = [b.bos_id] + ids
            out.append(ids)
        return out, "prompt"

    def prepare(self, request: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Job:
        """Validate a request against the served model and the limits; raise ApiError naming the field."""
        d = {k: v for k, v in request["decoding"].items() if v is not None}
        eff = self.effective_defaults()
        lim = self.limits
        mode = d.get("mode", eff["mode"])
        if mode == "joint" and self.sampler is None:
            raise ApiError(400, "mode: 'joint' needs a joint sampler and this server has none loaded "
                                "(use mode 'exact' or 'marginal')", param="mode", code="no_sampler")
        k = int(d.get("k", eff["k"] if mode != "exact" else 1))
        if k > lim["max_k"]:
            raise ApiError(400, f"k: {k} tokens per full pass is over this server's maximum of "
                                f"{lim['max_k']}",
                           param="k", code="invalid_value")
        if mode == "exact":
            k = 1
        max_tokens = int(d.get("max_tokens", eff["max_tokens"]))
        if max_tokens > lim["max_tokens"]:
            raise ApiError(400, f"max_tokens: {max_tokens} is over this server's limit of "
                                f"{lim['max_tokens']}",
                           param="max_tokens", code="invalid_value")
        n = int(d.get("n", 1))
        if n > lim["max_n"]:
            raise ApiError(400, f"n: {n} is over this server's limit of {lim['max_n']}", param="n",
                           code="invalid_value")
        prompts, field_name = self.encode(request)
        if len(prompts) * n > self.max_batch_size:
            raise ApiError(400, f"{field_name}: {len(prompts)} prompt(s) x n={n} is over the batch size "
                                f"of {self.max_batch_size}", param=field_name, code="invalid_value")
        longest = max(len(p) for p in prompts)
        ctx = self.backbone.args.max_seq_len
        if longest > lim["max_prompt_tokens"]:
            raise ApiError(400, f"{field_name}: {longest} tokens is over this server's prompt limit of "
                                f"{lim['max_prompt_tokens']}", param=field_name,
                           code="context_length_exceeded")
        if longest + max_tokens > ctx:
            raise ApiError(400, f"{field_name}: {longest} prompt tokens + max_tokens {max_tokens} exceed the "
                                f"model's context of {ctx}", param=field_name, code="context_length_exceeded")
        settings = {"gen_length": max_tokens, "mode": mode, "k": k,
                    "temperature": float(d.get("temperature", eff["temperature"])),
                    "top_p": float(d.get("top_p", eff["top_p"])), "policy": d.get("policy", eff["policy"]),
                    "block_length": d.get("block_length", eff["block_length"]),
                    "stop_at_eos": bool(d.get("stop_at_eos", eff["stop_at_eos"]))}
        seed = d.get("seed")
        key = tuple(settings[f] for f in sorted(settings)) + (("seed", seed, uuid.uuid4().hex)
                                                               if seed is not None else ("shared",))
        if seed is not None:
            settings["seed"] = int(seed)
        rows = [p for p in prompts for _ in range(n)]
        return Job(id=uuid.uuid4().hex[:12], prompts=rows, settings=settings, stop=d.get("stop") or [],
                   stream=bool(request.get("stream")), key=key, loop=loop, rows=[Row() for _ in rows])

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
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                # just woken from idle: give concurrent arrivals a moment to join this batch
                if self.batch_wait_s > 0:
                    await asyncio.sleep(self.batch_wait_s)
                continue
            jobs = self._take_batch()
            if not jobs:
                continue
            self._running = len(jobs)
            try:
                await asyncio.to_thread(self._run_batch, jobs)
            finally:
                self._running = 0

    def _take_batch(self) -> list[Job]:
        """The oldest live job and every waiting job compatible with it, up to max_batch_size rows."""
        while self._waiting and self._waiting[0].cancelled:
            self._waiting.popleft()
        if not self._waiting:
            return []
        key = self._waiting[0].key
        batch, rest, rows = [], deque(), 0
        for job in self._waiting:
            if job.cancelled:
                continue
            if job.key == key and rows + len(job.prompts) <= self.max_batch_size:
                batch.append(job)
                rows += len(job.prompts)
            else:
                rest.append(job)
        self._waiting = rest
        return batch

    def _run_batch(self, jobs: list[Job]) -> None:
        from sampler import generate

        started = time.perf_counter()
        settings = dict(jobs[0].settings)
        settings.setdefault("seed", secrets.randbits(31))
        prompts = [p for job in jobs for p in job.prompts]
        where = [(job, r) for job in jobs for r in range(len(job.prompts))]
        eos = self.backbone.eos_id if settings["stop_at_eos"] else None
        streaming = any(job.stream for job in jobs)

        def on_step(gen: torch.Tensor) -> None:
            ids = gen.tolist()
            for i, (job, r) in enumerate(where):
                if job.stream and not job.cancelled and not job.rows[r].finished:
                    self._stream_row(job, r, ids[i], eos)

        try:
            with self._lock:
                res = generate(self.backbone, prompts, sampler=self.sampler,
                               on_step=on_step if streaming else None, **settings)
        except Exception as e:  # never let one batch kill the replica; its requests get a clean error
            self._stats["errors"] += 1
            log.exception("batch of %d request(s) failed", len(jobs))
            status = 400 if isinstance(e, ValueError) else 500
            for job in jobs:
                job.emit({"event": "error", "status": status, "message": f"generation failed: {e}",
                          "param": None, "code": "generation_failed",
                          "type": "invalid_request_error" if status == 400 else "server_error"})
            return
        decode_s = time.perf_counter() - started
        self._stats["batches"] += 1
        self._stats["requests"] += len(jobs)
        self._stats["rows"] += len(prompts)
        self._stats["full_passes"] += res.full_passes
        self._stats["max_batch_requests"] = max(self._stats["max_batch_requests"], len(jobs))
        self._hist[len(jobs)] += 1
        self._recent.append(len(jobs))
        info = {"mode": settings["mode"], "k": settings["k"], "full_passes": res.full_passes,
                "sampler_passes": res.sampler_passes, "batch_requests": len(jobs), "batch_rows": len(prompts),
                "decode_s": round(decode_s, 4), "replica": self.replica_id(), "replica_pid": os.getpid()}
        i = 0
        for job in jobs:
            choices, completion_tokens = [], 0
            for r in range(len(job.prompts)):
                tokens = res.tokens[i]
                i += 1
                n_tok = tokens.index(eos) if eos is not None and eos in tokens else len(tokens)
                text = self.backbone.tokenizer.decode(tokens[:n_tok], skip_special_tokens=True)
                text, hit_stop = cut_at_stop(text, job.stop)
                finish = "stop" if hit_stop or n_tok < len(tokens) else "length"
                completion_tokens += n_tok
                if job.stream:
                    row = job.rows[r]
                    if not row.finished and text.startswith(row.sent) and len(text) > len(row.sent):
                        job.emit({"event": "delta", "index": r, "text": text[len(row.sent):]})
                    row.sent, row.finished = text, True
                choices.append({"index": r, "text": text, "finish_reason": finish})
            prompt_tokens = sum(len(p) for p in job.prompts)
            job.emit({"event": "done", "choices": choices,
                      "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                "total_tokens": prompt_tokens + completion_tokens},
                      "info": {**info, "queue_s": round(started - job.enqueued, 4)}})

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
            job.emit({"event": "delta", "index": r, "text": text[len(row.sent):]})
            row.sent = text
        row.finished = hit_stop or ended


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)
