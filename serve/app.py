"""The Ray Serve application: an OpenAI-style FastAPI ingress in front of the generator deployment.

    jointgen serve [--backbone DIR] [--sampler auto|none|untrained|DIR] [--port 8000]   # this machine
    serve run serve/config.yaml            # or: serve deploy serve/config.cluster.yaml (on a cluster)
    serve run serve.app:build_app backbone=DIR sampler=DIR

Routes: POST /v1/completions, POST /v1/chat/completions (both with stream=true), GET /v1/models,
GET /v1/models/{id}, GET /health, GET /v1/stats (the generator's batching counters, from one replica).
Prometheus metrics (serve/metrics.py) go out through Ray's metrics agent, not through these routes.
"""


import argparse
import asyncio
import hashlib
import hmac
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from sampler.backbone import backbone_dir
from serve.api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    field_path,
    validation_error,
)
from serve.generator import SAMPLER_CHOICES, Engine, ServeDefaults, ServeLimits
from serve.metrics import ingress_metrics

CONFIG = Path(__file__).with_name("config.yaml")
# the generator replica (or its node) went away: worth retrying on another / the replacement replica
REPLICA_FAILURES = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)

app = FastAPI(title="jointgen", description="Masked diffusion LM with a joint sampler, OpenAI-style API")


def _endpoint(scope: dict[str, Any]) -> str:
    """The metrics' endpoint tag: the matched route's path template (bounded, unlike raw paths)."""
    return getattr(scope.get("route"), "path", "unmatched")


def _error_response(request: Request, exc: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    ingress_metrics().error(_endpoint(request.scope), exc.status, exc.code)
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class CountRequests:
    """ASGI middleware: every HTTP answer into `jointgen_requests` by endpoint and status (a stream
    counts when its status line goes out; an unhandled exception counts as 500)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            ingress_metrics().requests.inc(tags={"endpoint": _endpoint(scope), "status": str(status)})


app.add_middleware(CountRequests)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(request, exc, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    msg = f"{request.method} {request.url.path}: {exc.detail}"
    return _error_response(request, ApiError(exc.status_code, msg, code=code))


@app.exception_handler(RequestValidationError)
async def _request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    param = field_path(errs[0]["loc"]) if errs else None
    msg = f"{param}: {errs[0]['msg']}" if errs else "invalid request"
    return _error_response(request, ApiError(400, msg, param=param or None, code="invalid_value"))


@app.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    # a bug, not a bad request: still an OpenAI-shaped body, and the replica stays up
    return _error_response(request, ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))


def _usage(req: Any) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _unavailable(e: BaseException) -> ApiError:
    return ApiError(503, f"the generator replica failed ({type(e).__name__}); retry the request",
                    code="replica_unavailable", type="server_error")


def _sse(obj: dict[str, Any] | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


# NB: serve.ingress pickles the FastAPI app when the class is defined: helpers its routes use must be
# defined above this line.
# graceful_shutdown_timeout_s: a replica taken down by downscaling first lets its streams finish
@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
                  graceful_shutdown_timeout_s=60)
@serve.ingress(app)
class Ingress:
    """HTTP only: authentication, body limits, schema validation, OpenAI response shapes, retries. The
    model, its tokenizer and every model-dependent check live in the generator."""

    def __init__(self, generator: DeploymentHandle, *, api_key_sha256: str | None = None,
                 max_body_bytes: int = 1 << 20, retries: int = 2, retry_wait_s: float = 1.0):
        self.generator = generator
        self.key_hash = api_key_sha256
        self.max_body_bytes = int(max_body_bytes)
        self.retries = int(retries)
        self.retry_wait_s = float(retry_wait_s)
        self._info: dict[str, Any] | None = None

    # ---- helpers ----------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if not self.key_hash:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not token or not hmac.compare_digest(digest, self.key_hash):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object, refused with 413 as soon as it is known to be over the limit: from
        Content-Length before reading anything, else while counting the streamed chunks."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, f"invalid Content-Length header {declared!r}", code="invalid_request")
            if int(declared) > limit:
                raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes",
                               code="request_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    async def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self._with_retries(lambda: self.generator.info.remote())
        return self._info

    async def _with_retries(self, call):
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except REPLICA_FAILURES as e:
                if attempt == self.retries:
                    raise _unavailable(e) from None
                await asyncio.sleep(self.retry_wait_s * (attempt + 1))

    async def _parse(self, request: Request, model_cls: type[BaseModel]) -> tuple[Any, dict[str, Any]]:
        self._auth(request)
        body = await self._read_json(request)
        try:
            req = model_cls.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None
        info = await self.info()
        if req.model is not None and req.model != info["model"]:
            raise ApiError(404, f"model: the model {req.model!r} does not exist; this server serves "
                                f"{info['model']!r}", param="model", code="model_not_found")
        return req, info

    async def _events(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The generator's events for one request. A replica that dies before anything reached the client is
        retried (Serve replaces it); after that the failure becomes an ApiError(503)."""
        for attempt in range(self.retries + 1):
            delivered = False
            try:
                stream = self.generator.options(stream=True).submit.remote(payload)
                async for event in stream:
                    if event["event"] == "error":
                        raise ApiError(event["status"], event["message"], param=event["param"],
                                       code=event["code"], type=event["type"])
                    delivered = delivered or event["event"] == "delta"
                    yield event
                    if event["event"] == "done":
                        return
                raise ApiError(503, "the generator closed the stream without an answer",
                               code="replica_failed")
            except REPLICA_FAILURES as e:
                if delivered or attempt == self.retries:
                    raise _unavailable(e) from None
                await asyncio.sleep(self.retry_wait_s * (attempt + 1))

    async def _answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        async for event in self._events(payload):
            if event["event"] == "done":
                return event
        raise ApiError(503, "no answer from the generator", code="replica_failed")

    async def _stream_response(self, payload: dict[str, Any], *, chat: bool, model: str, n_choices: int,
                               include_usage: bool) -> StreamingResponse:
        """A stream cannot change its HTTP status once started, so wait for the generator to accept the
        request (or refuse it with a 4xx) before the first byte goes out."""
        events = self._events(payload)
        async for event in events:
            if event["event"] == "accepted":
                break
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
                         **extra})

        def choice(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                        "finish_reason": finish}
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

        async def body() -> AsyncIterator[bytes]:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(n_choices)])
            try:
                async for event in events:
                    if event["event"] == "delta":
                        yield chunk([choice(event["index"], event["text"], None)])
                    elif event["event"] == "done":
                        yield chunk([choice(c["index"], None, c["finish_reason"]) for c in event["choices"]],
                                    jointgen=event["info"])
                        if include_usage:
                            yield chunk([], usage=event["usage"])
            except Exception as e:  # headers are gone: the error travels as an SSE event (the client raises)
                err = e if isinstance(e, ApiError) else ApiError(500, f"internal error: {type(e).__name__}: "
                                                                      f"{e}")  # a bug: end the stream cleanly
                ingress_metrics().error("/v1/chat/completions" if chat else "/v1/completions", err.status,
                                        err.code)
                yield _sse(err.body())
            yield _sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes -----------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self.generator.check_health.remote(), timeout=10)
            info = await asyncio.wait_for(self.generator.info.remote(), timeout=10)
        except (TimeoutError, *REPLICA_FAILURES) as e:
            raise ApiError(503, f"generator not ready: {type(e).__name__}", code="not_ready") from None
        except RayTaskError as e:  # check_health raised: Serve replaces that replica
            raise ApiError(503, f"generator unhealthy: {e.cause}", code="unhealthy") from None
        return JSONResponse({"status": "ok", "model": info["model"], "sampler": info["sampler"]})

    async def _card(self) -> ModelCard:
        info = await self.info()
        return ModelCard(id=info["model"], created=info["created"], max_model_len=info["max_seq_len"],
                         sampler=info["sampler"], backbone_identity=info["backbone_identity"])

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._auth(request)
        return JSONResponse(ModelList(data=[await self._card()]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> JSONResponse:
        self._auth(request)
        card = await self._card()
        if model_id != card.id:
            raise ApiError(404, f"model: the model {model_id!r} does not exist; this server serves "
                                f"{card.id!r}", param="model", code="model_not_found")
        return JSONResponse(card.model_dump())

    @app.get("/v1/stats")
    async def stats(self, request: Request) -> JSONResponse:
        self._auth(request)
        return JSONResponse(await self._with_retries(lambda: self.generator.stats.remote()))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req, info = await self._parse(request, CompletionRequest)
        prompts = req.prompts()
        payload = {"kind": "completion", "prompt": prompts, "suffix": req.suffix,
                   "decoding": req.decoding(), "stream": req.stream}
        n_prompts = len(prompts)
        if req.stream:
            return await self._stream_response(payload, chat=False, model=info["model"],
                                               n_choices=n_prompts * req.n, include_usage=_usage(req))
        done = await self._answer(payload)
        return JSONResponse({"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
                             "created": int(time.time()), "model": info["model"],
                             "choices": [{**c, "logprobs": None} for c in done["choices"]],
                             "usage": done["usage"], "jointgen": done["info"]})

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req, info = await self._parse(request, ChatCompletionRequest)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        payload = {"kind": "chat", "messages": messages, "decoding": req.decoding(), "stream": req.stream}
        if req.stream:
            return await self._stream_response(payload, chat=True, model=info["model"], n_choices=req.n,
                                               include_usage=_usage(req))
        done = await self._answer(payload)
        choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                    "logprobs": None, "finish_reason": c["finish_reason"]} for c in done["choices"]]
        return JSONResponse({"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion",
                             "created": int(time.time()), "model": info["model"], "choices": choices,
                             "usage": done["usage"], "jointgen": done["info"]})


Generator = serve.deployment(name="Generator", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64,
                             autoscaling_config={"min_replicas": 1, "max_replicas": 2,
                                                 "target_ongoing_requests": 4},
                             graceful_shutdown_timeout_s=60)(Engine)


# ---- application builder -----------------------------------------------------------------------------


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of an application in a Serve config file)."""
    model_config = ConfigDict(extra="forbid")

    backbone: str | None = Field(None, description="checkpoint dir; None = the embedded backbone")
    sampler: str = Field("auto", description="auto | none | untrained | a sampler directory")
    model_name: str | None = None
    device: str = "auto"
    dtype: str | None = None
    defaults: ServeDefaults = Field(default_factory=ServeDefaults)  # decoding defaults + max_tokens
    limits: ServeLimits = Field(default_factory=ServeLimits)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_s: float = Field(0.01, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    max_step_failures: int = Field(3, ge=1, description="consecutive failed decoding steps that make the "
                                   "generator's health check fail (Serve then replaces the replica)")
    api_key_env: str = "JOINTGEN_API_KEY"
    api_key_file: str | None = None
    require_api_key: bool = False
    max_body_bytes: int = Field(1 << 20, ge=1024)
    retries: int = Field(2, ge=0)
    retry_wait_s: float = Field(1.0, ge=0)


def api_key_hash(args: AppArgs) -> str | None:
    """sha256 of the API key (file first, then the environment variable): replicas only see the hash."""
    key = None
    if args.api_key_file:
        path = Path(args.api_key_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"api_key_file {path} does not exist")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"api_key_file {path} is empty")
    elif os.environ.get(args.api_key_env, "").strip():
        key = os.environ[args.api_key_env].strip()
    if key is None and args.require_api_key:
        raise ValueError(f"require_api_key is set but no key was given: set ${args.api_key_env} "
                         "or api_key_file")
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def build(args: dict[str, Any] | AppArgs, deployment_options: dict[str, dict[str, Any]] | None = None):
    """The application (Ingress -> Generator), with optional per-deployment `.options()` from a config."""
    try:
        a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    except ValidationError as e:
        raise ValueError(f"bad serve application args: {validation_error(e).message}") from None
    checkpoint = backbone_dir(a.backbone)
    if a.sampler not in SAMPLER_CHOICES and not (Path(a.sampler) / "sampler.json").is_file():
        raise FileNotFoundError(f"sampler {a.sampler!r} is none of {SAMPLER_CHOICES} and no sampler "
                                "directory (sampler.json) is there")
    opts = deployment_options or {}
    gen = Generator.options(**opts.get("Generator", {})).bind(
        str(checkpoint), a.sampler, model_name=a.model_name, device=a.device, dtype=a.dtype,
        defaults=a.defaults.model_dump(), limits=a.limits.model_dump(), max_batch_size=a.max_batch_size,
        batch_wait_s=a.batch_wait_s, torch_threads=a.torch_threads, max_step_failures=a.max_step_failures)
    return Ingress.options(**opts.get("Ingress", {})).bind(
        gen, api_key_sha256=api_key_hash(a), max_body_bytes=a.max_body_bytes, retries=a.retries,
        retry_wait_s=a.retry_wait_s)


def build_app(args: dict[str, Any]):
    """Application builder for `serve run serve.app:build_app key=value ...` and config files."""
    return build(args)


def load_config(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(application args, deployment options by name, http_options) from a Serve config file."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the serve config: {e}") from None
    apps = cfg.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{path}: expected exactly one application, found {len(apps)}")
    deployments = {}
    for d in apps[0].get("deployments") or []:
        d = dict(d)
        deployments[d.pop("name")] = d
    return dict(apps[0].get("args") or {}), deployments, dict(cfg.get("http_options") or {})


def _set(args: dict[str, Any], assignment: str) -> None:
    key, eq, value = assignment.partition("=")
    if not eq or not key:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    node = args
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jointgen serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG), help="Serve config file (default: serve/config.yaml)")
    p.add_argument("--backbone", help="backbone checkpoint dir (default: the embedded backbone)")
    p.add_argument("--sampler", help="auto | none | untrained | sampler dir (default: auto)")
    p.add_argument("--model-name", help="model id in the API (default: the backbone's name)")
    p.add_argument("--host", help="bind address (default: 127.0.0.1, or 0.0.0.0 when an API key is set)")
    p.add_argument("--port", type=int, help="HTTP port (default: from the config, 8000)")
    p.add_argument("--api-key-file", help="file holding the bearer key (else $JOINTGEN_API_KEY)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an application arg, e.g. --set defaults.k=2 --set max_batch_size=8")
    p.add_argument("--num-cpus", type=float, help="CPUs of the local Ray cluster if one is started")
    p.add_argument("--metrics-port", type=int,
                   help="Prometheus metrics port of the local Ray cluster if one is started (default: Ray's)")
    ns = p.parse_args(argv)
    try:
        args, deployments, http = load_config(ns.config)
        for flag, key in (("backbone", "backbone"), ("sampler", "sampler"), ("model_name", "model_name"),
                          ("api_key_file", "api_key_file")):
            if getattr(ns, flag) is not None:
                args[key] = getattr(ns, flag)
        for s in ns.set:
            _set(args, s)
        a = AppArgs.model_validate(args)
        keyed = api_key_hash(a) is not None
        application = build(a, deployments)
    except (ValueError, FileNotFoundError) as e:
        print(f"jointgen serve: {e}", file=sys.stderr)
        return 2
    host = ns.host or ("0.0.0.0" if keyed else "127.0.0.1")
    if host not in ("127.0.0.1", "localhost", "::1") and not keyed:
        print(f"jointgen serve: WARNING: binding {host} with no API key: anyone who can reach it can use it",
              file=sys.stderr)
    port = ns.port or int(http.get("port", 8000))

    import ray

    local = {k: v for k, v in (("num_cpus", ns.num_cpus), ("_metrics_export_port", ns.metrics_port)) if v}
    ray.init(**local)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name="jointgen", route_prefix="/")
        node = ray.get_runtime_context().get_node_id()
        metrics = next((n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node), None)
        print(f"jointgen serve: OpenAI-style API at http://{host}:{port}/v1 "
              f"(auth {'on' if keyed else 'off'}); Prometheus metrics of this node at "
              f"http://127.0.0.1:{metrics}/metrics; Ctrl-C stops", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("jointgen serve: shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
