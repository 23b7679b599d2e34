"""Teacher job: exact (one token per full pass) trajectories decoded by a pool of Ray actors, written as
Parquet shards (`sampler.schema`) plus a manifest (docs/method.md, docs/system.md).

    jointgen teacher --config configs/teacher.yaml --backbone PATH --out runs/teacher --num-trajectories 1024

Interface (stable):
- `run_teacher(config, *, on_event=None) -> dict`. `config` is a `TeacherConfig` or a mapping of its keys
  (ray_jobs/config.py; missing keys take the defaults). Returns a summary: trajectories, tokens,
  full_passes, wall_s, per_actor (chunks, trajectories, busy_s, traj_per_s, tok_per_s), out, manifest,
  chunks_total / chunks_skipped / chunks_done, bad_shards (names redone), actor_failures.
  `on_event(dict)` (optional, for monitoring and tests) gets {"event": "actors", "pids": [...]},
  {"event": "submitted", "chunk", "actor", "pid"}, {"event": "done", "chunk", ...} and
  {"event": "actor_failed", "chunk", "actor", "error"}.
- `main(argv) -> int` for `jointgen teacher`; `format_summary(summary)`, `shard_name(chunk)`,
  `batch_seed(seed, chunk, batch)`.

How work is cut: trajectory i (0-based; its `traj_id`) belongs to chunk i // chunk_size; chunk c is one
shard, `shard-{c:05d}.parquet`. Within a chunk, trajectories are decoded in batches of `batch_size`, each
with the seed `batch_seed(seed, c, b)`, stored in every trajectory's `seed` column: the same config gives
the same shards whatever the number of actors, and a batch replays with
`generate(backbone, its prompts, mode="exact", seed=that seed, ...)`.
With a prompt file, trajectory i uses prompt i % n_prompts.

Nothing lost, nothing twice: actors return trajectories; the driver alone writes each shard atomically
(`write_trajectories`: temp file + rename) and then the manifest (JSON, atomic), listing every shard with
its row count and sha256. A rerun skips the chunks whose shard matches the manifest, adopts a shard
written but not yet listed (the driver died in between) after reading it in full, and reports any other
shard (missing, checksum differs, foreign backbone or settings, unreadable) by name: `on_bad_shard: redo`
decodes it again, `refuse` raises ShardError. An actor that dies (killed, out of memory) is restarted by
Ray (`max_restarts`) and its chunk resubmitted (up to `chunk_retries` times per chunk). Shards are written
by the driver, so `out` needs to be visible only to the driver, not to the actors' nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.common import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    backbone_identity,
    backbone_path,
    load_prompts,
    parse_dtype,
    ray_session,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from ray_jobs.config import TeacherConfig, add_config_args, run_cli, validate
from sampler.backbone import hub_source
from sampler.schema import ShardError, read_trajectories, write_trajectories
from sampler.settings import POLICIES

# Keys that change what is decoded: a manifest written with other values is another dataset.
GENERATION_KEYS = ("prompt_field", "chat", "gen_length", "temperature", "top_p", "policy", "block_length",
                   "batch_size", "chunk_size", "seed")
Chunk = tuple[int, int, int]  # (chunk, first traj_id, rows)


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:05d}.parquet"


def batch_seed(seed: int, chunk: int, batch: int) -> int:
    """Seed of one batched decode, a function of (seed, chunk, batch) only."""
    return int(np.random.SeedSequence([int(seed), int(chunk), int(batch)]).generate_state(1)[0])


def manifest_settings(cfg: TeacherConfig, prompts_sha: str | None) -> dict[str, Any]:
    """What a manifest and every shard record of the decoding; a rerun must match it to resume."""
    settings = {k: getattr(cfg, k) for k in GENERATION_KEYS}
    if cfg.kv_cache != "none":  # only when set: manifests written before the key existed still match
        settings["kv_cache"] = cfg.kv_cache
    return settings | {"prompts_sha256": prompts_sha, "unconditional": cfg.prompts is None}


# ---------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------


class TeacherWorker:
    """Holds the frozen backbone; decodes whole chunks exactly. Wrapped by `ray.remote` at run time."""

    def __init__(self, cfg: TeacherConfig, path: str, device: str, threads: int | None):
        import torch

        from sampler import load_backbone

        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.backbone = load_backbone(path, device=device, dtype=parse_dtype(cfg.dtype))

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "name": self.backbone.name, "identity": self.backbone.identity,
                "device": str(self.backbone.device)}

    def run_chunk(self, chunk: int, first: int, texts: list[str] | None, prompt_ids: list[str]) -> dict:
        from sampler import encode_prompts, from_result, generate

        t0 = time.perf_counter()
        cfg, bb, rows, size = self.cfg, self.backbone, len(prompt_ids), self.cfg.batch_size
        prompts = encode_prompts(bb, n=rows) if texts is None else encode_prompts(bb, texts, chat=cfg.chat)
        trajs, passes = [], 0
        for b, start in enumerate(range(0, rows, size)):
            seed = batch_seed(cfg.seed, chunk, b)
            res = generate(bb, prompts[start:start + size], cfg.decode, gen_length=cfg.gen_length, seed=seed)
            trajs += from_result(res, start_id=first + start, seed=seed,
                                 prompt_ids_str=prompt_ids[start:start + size])
            passes += res.full_passes
        return {"chunk": chunk, "trajs": trajs, "full_passes": passes, "pid": os.getpid(),
                "busy_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# The output directory: shards and their manifest
# ---------------------------------------------------------------------------------------------


def _entry(path: Path, chunk: int, trajs: list, full_passes: int) -> dict[str, Any]:
    return {"file": path.name, "chunk": chunk, "rows": len(trajs), "first_traj_id": trajs[0].traj_id,
            "tokens": sum(len(t.tokens) for t in trajs), "full_passes": full_passes,
            "sha256": sha256_file(path)}


@dataclass
class ShardStore:
    """The shards of one teacher run and their manifest; `done` holds the manifest entry of every
    complete chunk."""

    out: Path
    settings: dict[str, Any]
    backbone: dict[str, Any]  # name, identity, path
    chunks: list[Chunk]
    num_trajectories: int
    done: dict[int, dict] = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST_NAME

    def meta(self, chunk: int) -> dict[str, Any]:
        """The metadata a shard of this run holds (besides its counters)."""
        return {"backbone_identity": self.backbone["identity"], **self.settings, "chunk": chunk}

    def scan(self) -> list[str]:
        """Take the complete shards already on disk into `done`; returns the problems of the others. A
        manifest from other settings is an error: that directory holds another dataset."""
        entries: dict[int, dict] = {}
        if self.manifest.exists():
            old = read_manifest(self.out)
            keys = set(self.settings) | set(old["settings"])
            diff = sorted(k for k in keys if old["settings"].get(k) != self.settings.get(k))
            if old["backbone"]["identity"] != self.backbone["identity"]:
                diff.append(f"backbone ({old['backbone']['name']} {old['backbone']['identity']})")
            if diff:
                raise ValueError(f"{self.out}: holds teacher data from different settings (differs in: "
                                 f"{', '.join(diff)}); use another --out or delete it")
            entries = {e["chunk"]: e for e in old["shards"]}
        for stale in self.out.glob(".shard-*.tmp"):  # an interrupted write; its chunk is redone
            stale.unlink()
        bad = []
        for c, _first, rows in self.chunks:
            path = self.out / shard_name(c)
            if c not in entries and not path.exists():
                continue
            problem, entry = self._check(path, entries.get(c), rows, c)
            if problem is None:
                self.done[c] = entry
            else:
                bad.append(problem)
        return bad

    def _check(self, path: Path, entry: dict | None, rows: int, chunk: int) -> tuple[str | None, dict | None]:
        """(problem, entry): problem None means the shard is complete (entry: its manifest entry)."""
        if entry is not None:
            if not path.is_file():
                return f"{path}: listed in the manifest but missing", None
            if entry.get("rows") != rows:
                return f"{path}: holds {entry.get('rows')} rows, this run needs {rows}", None
            if sha256_file(path) != entry.get("sha256"):
                return f"{path}: checksum differs from the manifest (corrupt or replaced shard)", None
            return None, entry
        # on disk but not listed: written just before a crash, or foreign; read it in full before trusting it
        try:
            trajs, meta = read_trajectories(path, backbone_identity=self.backbone["identity"])
        except ShardError as e:
            return str(e), None
        diff = sorted(k for k, v in self.meta(chunk).items() if meta.get(k) != v)
        if diff:
            return f"{path}: written with other settings ({', '.join(diff)})", None
        if len(trajs) != rows:
            return f"{path}: holds {len(trajs)} rows, this run needs {rows}", None
        return None, _entry(path, meta["chunk"], trajs, meta.get("full_passes", 0))

    def write_manifest(self) -> None:
        done = self.done
        write_json_atomic(self.manifest, {
            "format": MANIFEST_FORMAT, "version": 1, "settings": self.settings, "backbone": self.backbone,
            "num_trajectories": self.num_trajectories, "num_chunks": len(self.chunks),
            "complete": len(done) == len(self.chunks), "shards": [done[c] for c in sorted(done)],
            "trajectories": sum(e["rows"] for e in done.values()),
            "tokens": sum(e["tokens"] for e in done.values()),
        })

    def store(self, chunk: Chunk, result: dict[str, Any]) -> dict[str, Any]:
        """Write a decoded chunk's shard, then list it in the manifest; returns its entry."""
        c, first, rows = chunk
        path = write_trajectories(self.out / shard_name(c), result["trajs"], {
            **self.meta(c), "backbone_name": self.backbone["name"], "full_passes": result["full_passes"],
            "first_traj_id": first, "rows": rows})
        self.done[c] = _entry(path, c, result["trajs"], result["full_passes"])
        self.write_manifest()
        return self.done[c]


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def start_actors(cfg: TeacherConfig, bpath: Path, identity: str, n_chunks: int) -> tuple[list, list[int]]:
    """The decoding actors, each with the backbone loaded (and checked to be the driver's), and their
    process ids."""
    import ray

    res = ray.cluster_resources()
    n_gpu, n_cpu = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1 if n_gpu else 0)
    n_actors = min(cfg.actors or (max(1, int(n_gpu // gpus)) if gpus else max(1, n_cpu)), n_chunks)
    threads = cfg.torch_threads or (None if gpus else max(1, n_cpu // n_actors))
    worker = ray.remote(TeacherWorker).options(
        num_cpus=cfg.cpus_per_actor, num_gpus=gpus, max_restarts=cfg.max_restarts,
        max_task_retries=0)  # the driver resubmits, so it knows which chunk failed
    actors = [worker.remote(cfg, str(bpath), "cuda" if gpus else "cpu", threads) for _ in range(n_actors)]
    infos = ray.get([a.info.remote() for a in actors])
    for info in infos:
        if info["identity"] != identity:
            raise ShardError(f"{bpath}: an actor loaded backbone {info['identity']}, the driver sees "
                             f"{identity} (different files on different nodes?)")
    return actors, [info["pid"] for info in infos]


def chunk_inputs(chunk: Chunk, texts: list[str] | None, prompt_ids: list[str] | None) -> tuple:
    """The arguments of `TeacherWorker.run_chunk` for one chunk: trajectory i uses prompt i % n_prompts."""
    c, first, rows = chunk
    span = range(first, first + rows)
    return (c, first, None if texts is None else [texts[i % len(texts)] for i in span],
            [prompt_ids[i % len(prompt_ids)] if prompt_ids else "" for i in span])


def decode_chunks(cfg: TeacherConfig, actors: list, pids: list[int], todo: deque[Chunk], inputs: Callable,
                  done: Callable[[int, Chunk, dict], None], emit: Callable[[dict], None]) -> int:
    """Hand chunks to idle actors until none is left (`inputs(chunk)`: run_chunk's arguments);
    `done(actor, chunk, result)` gets each result. A chunk whose actor died is resubmitted first (up to
    chunk_retries times). Returns the number of actor failures."""
    import ray
    from ray.exceptions import OutOfMemoryError, RayActorError

    attempts: dict[int, int] = {}
    deaths = [0] * len(actors)
    idle = deque(range(len(actors)))
    inflight: dict[Any, tuple[int, Chunk]] = {}
    failures = 0
    while todo or inflight:
        while idle and todo:
            a, chunk = idle.popleft(), todo.popleft()
            inflight[actors[a].run_chunk.remote(*inputs(chunk))] = (a, chunk)
            emit({"event": "submitted", "chunk": chunk[0], "actor": a, "pid": pids[a]})
        ready, _ = ray.wait(list(inflight), num_returns=1)
        a, chunk = inflight.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except (RayActorError, OutOfMemoryError) as e:
            c = chunk[0]
            failures, deaths[a], attempts[c] = failures + 1, deaths[a] + 1, attempts.get(c, 0) + 1
            emit({"event": "actor_failed", "chunk": c, "actor": a, "error": type(e).__name__})
            print(f"teacher: actor {a} died on chunk {c} ({type(e).__name__}); resubmitting "
                  f"(try {attempts[c]} of {cfg.chunk_retries})", file=sys.stderr)
            if attempts[c] > cfg.chunk_retries:
                raise RuntimeError(f"teacher: chunk {c} failed {attempts[c]} times; last error: {e}") from e
            todo.appendleft(chunk)
            if deaths[a] <= cfg.max_restarts:  # Ray restarts it; calls queue until it is back
                idle.append(a)
            elif not idle and not inflight:
                raise RuntimeError("teacher: every actor died more than max_restarts times") from e
            continue
        done(a, chunk, result)
        pids[a] = result["pid"]  # a restarted actor has a new one
        emit({"event": "done", "chunk": chunk[0], "actor": a, "pid": result["pid"], "rows": chunk[2]})
        idle.append(a)
    return failures


def decode_all(cfg: TeacherConfig, store: ShardStore, todo: deque[Chunk], texts: list[str] | None,
               prompt_ids: list[str] | None, emit: Callable[[dict], None]) -> tuple[dict, int, float]:
    """Decode the chunks of `todo` on Ray actors into `store`: (per-actor counters, failures, decode s)."""
    import ray
    from tqdm import tqdm

    actors, pids = start_actors(cfg, backbone_path(cfg.backbone), store.backbone["identity"], len(todo))
    emit({"event": "actors", "pids": pids})
    per_actor = {i: {"chunks": 0, "trajectories": 0, "tokens": 0, "busy_s": 0.0} for i in range(len(actors))}
    bar = tqdm(total=store.num_trajectories, initial=sum(e["rows"] for e in store.done.values()), unit="traj",
               desc="teacher", disable=not cfg.progress, dynamic_ncols=True)

    def done(a: int, chunk: Chunk, result: dict) -> None:
        entry = store.store(chunk, result)
        st = per_actor[a]
        st["chunks"], st["trajectories"] = st["chunks"] + 1, st["trajectories"] + chunk[2]
        st["tokens"], st["busy_s"] = st["tokens"] + entry["tokens"], st["busy_s"] + result["busy_s"]
        bar.update(chunk[2])

    try:
        t0 = time.perf_counter()
        failures = decode_chunks(cfg, actors, pids, todo,
                                 lambda chunk: chunk_inputs(chunk, texts, prompt_ids), done, emit)
        bar.close()
        return per_actor, failures, time.perf_counter() - t0
    finally:
        for a in actors:
            ray.kill(a)


def run_teacher(config: TeacherConfig | dict[str, Any] | None = None, *,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Decode the configured trajectories into `<out>/shard-*.parquet` + `<out>/manifest.json`."""
    cfg = validate(TeacherConfig, config)
    t_start = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bpath = backbone_path(cfg.backbone)
    name, identity = backbone_identity(bpath)
    texts = prompt_ids = prompts_sha = None
    if cfg.prompts is not None:
        texts, prompt_ids = load_prompts(cfg.prompts, cfg.prompt_field)
        prompts_sha = sha256_file(cfg.prompts)
    n_traj = cfg.num_trajectories or (len(texts) if texts is not None else 1024)
    backbone = {"name": name, "identity": identity, "path": None if cfg.backbone is None else str(bpath),
                **hub_source(bpath)}  # a hub checkpoint: its repo id and commit
    chunks = [(c, first, min(cfg.chunk_size, n_traj - first))
              for c, first in enumerate(range(0, n_traj, cfg.chunk_size))]
    store = ShardStore(out, manifest_settings(cfg, prompts_sha), backbone, chunks, n_traj)
    bad = store.scan()
    if bad and cfg.on_bad_shard == "refuse":
        raise ShardError("bad shard(s), refusing to continue (on_bad_shard=refuse):\n  " + "\n  ".join(bad))
    for problem in bad:
        print(f"teacher: {problem}; decoding it again", file=sys.stderr)
    skipped = len(store.done)
    todo = deque(chunk for chunk in store.chunks if chunk[0] not in store.done)
    store.write_manifest()
    per_actor, failures, decode_s = {}, 0, 0.0
    if todo:
        with ray_session(cfg.ray_address, cfg.ray_num_cpus):
            per_actor, failures, decode_s = decode_all(cfg, store, todo, texts, prompt_ids,
                                                       on_event or (lambda ev: None))
    return summarize(store, per_actor, skipped=skipped, bad=bad, failures=failures,
                     wall=time.perf_counter() - t_start, decode_s=decode_s)


def summarize(store: ShardStore, per_actor: dict[int, dict], *, skipped: int, bad: list[str], failures: int,
              wall: float, decode_s: float) -> dict[str, Any]:
    done = store.done.values()
    for st in per_actor.values():
        st["traj_per_s"] = st["trajectories"] / st["busy_s"] if st["busy_s"] else 0.0
        st["tok_per_s"] = st["tokens"] / st["busy_s"] if st["busy_s"] else 0.0
    this_run = sum(st["trajectories"] for st in per_actor.values())
    return {
        "trajectories": sum(e["rows"] for e in done), "tokens": sum(e["tokens"] for e in done),
        "full_passes": sum(e.get("full_passes", 0) for e in done),
        "chunks_total": len(store.chunks), "chunks_skipped": skipped,
        "chunks_done": len(store.chunks) - skipped, "trajectories_this_run": this_run,
        "bad_shards": bad, "actor_failures": failures, "wall_s": wall, "decode_s": decode_s,
        "startup_s": wall - decode_s if decode_s else 0.0,
        # trajectories decoded in this run per second of decoding (Ray and model start-up excluded)
        "traj_per_s": this_run / decode_s if decode_s else 0.0,
        "per_actor": [per_actor[i] for i in sorted(per_actor)],
        "out": str(store.out), "manifest": str(store.manifest), "backbone": store.backbone,
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"teacher: {s['trajectories']} trajectories ({s['tokens']} tokens, {s['full_passes']} batched "
             f"full passes) in {s['out']}",
             f"  chunks: {s['chunks_total']} total, {s['chunks_skipped']} already done, {s['chunks_done']} "
             f"decoded now; {len(s['bad_shards'])} bad shard(s) redone; "
             f"{s['actor_failures']} actor failure(s)",
             f"  wall {s['wall_s']:.1f} s ({s['startup_s']:.1f} s start-up), {s['traj_per_s']:.2f} traj/s "
             "while decoding"]
    for i, st in enumerate(s["per_actor"]):
        lines.append(f"  actor {i}: {st['chunks']} chunks, {st['trajectories']} traj, "
                     f"{st['traj_per_s']:.2f} traj/s, {st['tok_per_s']:.1f} tok/s while busy")
    lines.append(f"  manifest: {s['manifest']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jointgen teacher", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--backbone", help="backbone checkpoint dir or hub id owner/name[@revision] "
                   "(default: the embedded backbone)")
    p.add_argument("--prompts", help=".jsonl / .parquet prompt file (default: unconditional)")
    p.add_argument("--chat", action="store_true", default=None, help="apply the chat template to prompts")
    p.add_argument("--out", help="output directory for shards + manifest")
    p.add_argument("--num-trajectories", type=int)
    p.add_argument("--gen-length", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--policy", choices=POLICIES)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--actors", type=int, help="number of decoding actors (default: one per GPU / CPU core)")
    p.add_argument("--address", dest="ray_address",
                   help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(TeacherConfig, args, run_teacher,
                   lambda s: print(json.dumps(s, indent=1) if args.json else format_summary(s)))


if __name__ == "__main__":
    sys.exit(main())
