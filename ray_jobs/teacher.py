"""Teacher job: exact (one token per full pass) trajectories decoded by a pool of Ray actors, written as
Parquet shards (`sampler.schema`) plus a manifest. DESIGN 1.3 and 2.3.

    jointgen teacher --config configs/teacher.yaml --backbone PATH --out runs/teacher --num-trajectories 1024

Interface (stable):
- `run_teacher(config: dict, *, on_event=None) -> dict`. `config` holds any keys of `DEFAULTS` (the same keys
  as configs/teacher.yaml); missing keys take the defaults. Returns a summary: trajectories, tokens,
  full_passes, wall_s, per_actor (chunks, trajectories, busy_s, traj_per_s, tok_per_s), out, manifest,
  chunks_total / chunks_skipped / chunks_done, bad_shards (names redone), actor_failures.
  `on_event(dict)` (optional, for monitoring and tests) gets {"event": "actors", "pids": [...]},
  {"event": "submitted", "chunk", "actor", "pid"}, {"event": "done", "chunk", ...} and
  {"event": "actor_failed", "chunk", "actor", "error"}.
- `main(argv) -> int` for `jointgen teacher`.
- Helpers other jobs use: `backbone_path(path_or_None) -> Path` (None = the embedded backbone),
  `backbone_identity(path) -> (name, identity)` without loading the weights, `format_summary(summary)`,
  `shard_name(chunk)`, `batch_seed(seed, chunk, batch)`, `load_prompts(path, field) -> (texts, ids)`.

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
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.common import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    add_config_args,
    init_ray,
    merge_config,
    read_manifest,
    run_job_cli,
    sha256_file,
    write_json_atomic,
)
from sampler.schema import ShardError, read_trajectories, write_trajectories

DEFAULTS: dict[str, Any] = {
    "backbone": None,  # checkpoint dir; null = the embedded backbone (sampler/assets/backbone)
    "dtype": None,  # null = the checkpoint's dtype (bf16 checkpoints decode in bf16)
    "prompts": None,  # null = unconditional ([BOS]); else a .jsonl or .parquet file of prompts
    "prompt_field": "prompt",  # JSONL key / Parquet column holding the prompt text (optional "id" alongside)
    "chat": False,  # apply the tokenizer's chat template to prompts
    "num_trajectories": None,  # null = 1024 unconditional, one per prompt with a prompt file
    "gen_length": 64,
    "temperature": 1.0,
    "top_p": 1.0,
    "policy": "entropy",
    "block_length": None,
    "batch_size": 32,  # trajectories per batched decode
    "chunk_size": 128,  # trajectories per shard (the unit of work, retry and resume)
    "seed": 0,
    "out": "runs/teacher",
    "actors": None,  # null = one per GPU, or one per CPU core without GPUs
    "cpus_per_actor": 0.5,  # fractional on small machines (a whole core per actor starves the driver)
    "gpus_per_actor": None,  # null = 1 when the cluster has GPUs, else 0
    "torch_threads": None,  # null = CPU cores / actors (at least 1)
    "max_restarts": 3,  # Ray restarts of a dead actor
    "chunk_retries": 3,  # resubmissions of one chunk after its actor died
    "on_bad_shard": "redo",  # redo | refuse
    "ray_address": None,  # null = RAY_ADDRESS or a local cluster
    "ray_num_cpus": None,  # CPUs of a local cluster (null = all)
    "progress": True,
}

# Keys that change what is decoded: a manifest written with other values is another dataset.
GENERATION_KEYS = ("prompt_field", "chat", "gen_length", "temperature", "top_p", "policy", "block_length",
                   "batch_size", "chunk_size", "seed")
POLICIES = ("entropy", "confidence", "margin", "random")


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:05d}.parquet"


def batch_seed(seed: int, chunk: int, batch: int) -> int:
    """Seed of one batched decode, a function of (seed, chunk, batch) only."""
    return int(np.random.SeedSequence([int(seed), int(chunk), int(batch)]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Config and prompts
# ---------------------------------------------------------------------------------------------


def check_config(cfg: dict[str, Any]) -> None:
    def positive_int(key: str) -> None:
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ValueError(f"teacher: {key} must be an integer >= 1, got {cfg[key]!r}")

    for key in ("gen_length", "batch_size", "chunk_size"):
        positive_int(key)
    for key in ("num_trajectories", "actors", "block_length", "torch_threads"):
        if cfg[key] is not None:
            positive_int(key)
    if cfg["policy"] not in POLICIES:
        raise ValueError(f"teacher: policy must be one of {POLICIES}, got {cfg['policy']!r}")
    if not 0.0 < float(cfg["top_p"]) <= 1.0:
        raise ValueError(f"teacher: top_p must be in (0, 1], got {cfg['top_p']!r}")
    if float(cfg["temperature"]) < 0:
        raise ValueError(f"teacher: temperature must be >= 0, got {cfg['temperature']!r}")
    if cfg["on_bad_shard"] not in ("redo", "refuse"):
        raise ValueError(f"teacher: on_bad_shard must be 'redo' or 'refuse', got {cfg['on_bad_shard']!r}")
    if cfg["dtype"] not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"teacher: dtype must be null, float32, bfloat16 or float16, got {cfg['dtype']!r}")


def load_prompts(path: str | Path, field: str) -> tuple[list[str], list[str]]:
    """(texts, ids) from a JSONL file (one object per line with `field`, optional "id") or a Parquet file
    (column `field`, optional column "id")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    texts: list[str] = []
    ids: list[str] = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise ValueError(f"{path}: no column {field!r} (columns: {table.column_names})")
        texts = [str(t) for t in table.column(field).to_pylist()]
        ids = ([str(i) for i in table.column("id").to_pylist()] if "id" in table.column_names
               else [str(i) for i in range(len(texts))])
    elif path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise ValueError(f"{path}:{n}: expected an object with a string {field!r}")
            texts.append(rec[field])
            ids.append(str(rec.get("id", len(ids))))
    else:
        raise ValueError(f"{path}: prompt files must be .jsonl or .parquet")
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return texts, ids


def backbone_path(path: str | Path | None) -> Path:
    from sampler.backbone import DEFAULT_BACKBONE

    return Path(path).resolve() if path is not None else DEFAULT_BACKBONE


def backbone_identity(path: Path) -> tuple[str, str]:
    """(name, identity) of a checkpoint without loading it: the values `load_backbone` gives."""
    from sampler.backbone import CheckpointError, fingerprint

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        hint = " (the embedded backbone is not built yet: pass --backbone)" if path.name == "backbone" else ""
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json){hint}")
    name = json.loads(cfg_file.read_text()).get("_name_or_path") or path.name
    return name, fingerprint(path)


# ---------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------


class TeacherWorker:
    """Holds the frozen backbone; decodes whole chunks exactly. Wrapped by `ray.remote` at run time."""

    def __init__(self, path: str, device: str, dtype: str | None, threads: int | None):
        import torch

        from sampler import load_backbone

        if threads:
            torch.set_num_threads(threads)
        self.backbone = load_backbone(path, device=device, dtype=getattr(torch, dtype) if dtype else None)

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "name": self.backbone.name, "identity": self.backbone.identity,
                "device": str(self.backbone.device)}

    def run_chunk(self, spec: dict[str, Any]) -> dict[str, Any]:
        from sampler import encode_prompts, from_result, generate

        t0 = time.perf_counter()
        s = spec["settings"]
        bb = self.backbone
        texts, pids = spec["texts"], spec["prompt_ids"]
        prompts = (encode_prompts(bb, n=spec["rows"]) if texts is None
                   else encode_prompts(bb, texts, chat=s["chat"]))
        trajs, passes = [], 0
        for b, start in enumerate(range(0, spec["rows"], s["batch_size"])):
            seed = batch_seed(s["seed"], spec["chunk"], b)
            res = generate(bb, prompts[start:start + s["batch_size"]], mode="exact", k=1,
                           gen_length=s["gen_length"], temperature=s["temperature"], top_p=s["top_p"],
                           policy=s["policy"], block_length=s["block_length"], stop_at_eos=False, seed=seed)
            trajs += from_result(res, start_id=spec["first"] + start, seed=seed,
                                 prompt_ids_str=pids[start:start + s["batch_size"]])
            passes += res.full_passes
        return {"chunk": spec["chunk"], "trajs": trajs, "full_passes": passes, "pid": os.getpid(),
                "busy_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# Manifest and existing shards
# ---------------------------------------------------------------------------------------------


def _shard_problem(path: Path, entry: dict | None, rows: int, meta_expected: dict[str, Any],
                   identity: str) -> tuple[str | None, dict | None]:
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
        trajs, meta = read_trajectories(path, backbone_identity=identity)
    except ShardError as e:
        return str(e), None
    diff = sorted(k for k, v in meta_expected.items() if meta.get(k) != v)
    if diff:
        return f"{path}: written with other settings ({', '.join(diff)})", None
    if len(trajs) != rows:
        return f"{path}: holds {len(trajs)} rows, this run needs {rows}", None
    return None, _entry(path, meta["chunk"], trajs, meta.get("full_passes", 0))


def _entry(path: Path, chunk: int, trajs: list, full_passes: int) -> dict[str, Any]:
    return {"file": path.name, "chunk": chunk, "rows": len(trajs), "first_traj_id": trajs[0].traj_id,
            "tokens": sum(len(t.tokens) for t in trajs), "full_passes": full_passes,
            "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def run_teacher(config: dict[str, Any] | None = None, *,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Decode the configured trajectories into `<out>/shard-*.parquet` + `<out>/manifest.json`."""
    import ray
    from ray.exceptions import OutOfMemoryError, RayActorError
    from tqdm import tqdm

    cfg = merge_config(DEFAULTS, config, "teacher")
    check_config(cfg)
    emit = on_event or (lambda ev: None)
    t_start = time.perf_counter()
    out = Path(cfg["out"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bpath = backbone_path(cfg["backbone"])
    name, identity = backbone_identity(bpath)

    texts = prompt_ids = None
    prompts_sha = None
    if cfg["prompts"] is not None:
        texts, prompt_ids = load_prompts(cfg["prompts"], cfg["prompt_field"])
        prompts_sha = sha256_file(cfg["prompts"])
    n_traj = cfg["num_trajectories"] or (len(texts) if texts is not None else 1024)
    chunks = [(c, first, min(cfg["chunk_size"], n_traj - first))
              for c, first in enumerate(range(0, n_traj, cfg["chunk_size"]))]

    settings = {k: cfg[k] for k in GENERATION_KEYS} | {"prompts_sha256": prompts_sha,
                                                       "unconditional": texts is None}
    backbone_info = {"name": name, "identity": identity,
                     "path": None if cfg["backbone"] is None else str(bpath)}
    manifest_path = out / MANIFEST_NAME
    entries: dict[int, dict] = {}
    if manifest_path.exists():
        old = read_manifest(out)
        keys = set(settings) | set(old["settings"])
        diff = sorted(k for k in keys if old["settings"].get(k) != settings.get(k))
        if old["backbone"]["identity"] != identity:
            diff.append(f"backbone ({old['backbone']['name']} {old['backbone']['identity']})")
        if diff:
            raise ValueError(f"{out}: holds teacher data from different settings (differs in: "
                             f"{', '.join(diff)}); use another --out or delete it")
        entries = {e["chunk"]: e for e in old["shards"]}
    for stale in out.glob(".shard-*.tmp"):  # an interrupted write; its chunk is redone below
        stale.unlink()

    meta_expected = {"backbone_identity": identity, **settings}
    done: dict[int, dict] = {}
    bad: list[str] = []
    for c, _first, rows in chunks:
        path = out / shard_name(c)
        if c not in entries and not path.exists():
            continue
        problem, entry = _shard_problem(path, entries.get(c), rows, meta_expected | {"chunk": c}, identity)
        if problem is None:
            done[c] = entry
        else:
            bad.append(problem)
    if bad:
        if cfg["on_bad_shard"] == "refuse":
            raise ShardError("bad shard(s), refusing to continue (on_bad_shard=refuse):\n  "
                             + "\n  ".join(bad))
        for problem in bad:
            print(f"teacher: {problem}; decoding it again", file=sys.stderr)
    skipped = len(done)
    todo = deque((c, first, rows) for c, first, rows in chunks if c not in done)

    def write_manifest() -> None:
        write_json_atomic(manifest_path, {
            "format": MANIFEST_FORMAT, "version": 1, "settings": settings, "backbone": backbone_info,
            "num_trajectories": n_traj, "num_chunks": len(chunks), "complete": len(done) == len(chunks),
            "shards": [done[c] for c in sorted(done)],
            "trajectories": sum(e["rows"] for e in done.values()),
            "tokens": sum(e["tokens"] for e in done.values()),
        })

    write_manifest()
    per_actor: dict[int, dict[str, float]] = {}
    failures = 0
    decode_s = 0.0
    started_ray = False
    actors: list = []
    if todo:
        started_ray = init_ray(cfg["ray_address"], cfg["ray_num_cpus"])
    try:
        if todo:
            res_ = ray.cluster_resources()
            n_gpu = int(res_.get("GPU", 0))
            gpus = cfg["gpus_per_actor"] if cfg["gpus_per_actor"] is not None else (1 if n_gpu else 0)
            n_cpu = int(res_.get("CPU", 1))
            n_actors = cfg["actors"] or (max(1, int(n_gpu // gpus)) if gpus else max(1, n_cpu))
            n_actors = min(n_actors, len(todo))
            threads = cfg["torch_threads"] or (None if gpus else max(1, n_cpu // n_actors))
            Worker = ray.remote(TeacherWorker).options(
                num_cpus=cfg["cpus_per_actor"], num_gpus=gpus, max_restarts=cfg["max_restarts"],
                max_task_retries=0)  # the driver resubmits, so it knows which chunk failed
            actors = [Worker.remote(str(bpath), "cuda" if gpus else "cpu", cfg["dtype"], threads)
                      for _ in range(n_actors)]
            infos = ray.get([a.info.remote() for a in actors])
            for info in infos:
                if info["identity"] != identity:
                    raise ShardError(f"{bpath}: an actor loaded backbone {info['identity']}, the driver sees "
                                     f"{identity} (different files on different nodes?)")
            pids = [i["pid"] for i in infos]
            emit({"event": "actors", "pids": pids})
            per_actor = {i: {"chunks": 0, "trajectories": 0, "tokens": 0, "busy_s": 0.0}
                         for i in range(n_actors)}

            attempts: dict[int, int] = {}
            deaths = [0] * n_actors
            idle = deque(range(n_actors))
            inflight: dict[Any, tuple[int, tuple[int, int, int]]] = {}
            t_decode = time.perf_counter()
            bar = tqdm(total=n_traj, initial=sum(e["rows"] for e in done.values()), unit="traj",
                       desc="teacher", disable=not cfg["progress"], dynamic_ncols=True)
            while todo or inflight:
                while idle and todo:
                    a = idle.popleft()
                    c, first, rows = todo.popleft()
                    spec = {"chunk": c, "first": first, "rows": rows, "settings": settings,
                            "texts": None if texts is None else [texts[i % len(texts)] for i in
                                                                 range(first, first + rows)],
                            "prompt_ids": [prompt_ids[i % len(prompt_ids)] if prompt_ids else "" for i in
                                           range(first, first + rows)]}
                    inflight[actors[a].run_chunk.remote(spec)] = (a, (c, first, rows))
                    emit({"event": "submitted", "chunk": c, "actor": a, "pid": pids[a]})
                ready, _ = ray.wait(list(inflight), num_returns=1)
                a, (c, first, rows) = inflight.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except (RayActorError, OutOfMemoryError) as e:
                    failures += 1
                    deaths[a] += 1
                    attempts[c] = attempts.get(c, 0) + 1
                    emit({"event": "actor_failed", "chunk": c, "actor": a, "error": type(e).__name__})
                    print(f"teacher: actor {a} died on chunk {c} ({type(e).__name__}); resubmitting "
                          f"(try {attempts[c]} of {cfg['chunk_retries']})", file=sys.stderr)
                    if attempts[c] > cfg["chunk_retries"]:
                        raise RuntimeError(f"teacher: chunk {c} failed {attempts[c]} times; "
                                           f"last error: {e}") from e
                    todo.appendleft((c, first, rows))
                    if deaths[a] <= cfg["max_restarts"]:  # Ray restarts it; calls queue until it is back
                        idle.append(a)
                    elif not idle and not inflight:
                        raise RuntimeError("teacher: every actor died more than max_restarts times") from e
                    continue
                path = write_trajectories(out / shard_name(c), result["trajs"], {
                    **meta_expected, "chunk": c, "backbone_name": name, "full_passes": result["full_passes"],
                    "first_traj_id": first, "rows": rows})
                done[c] = _entry(path, c, result["trajs"], result["full_passes"])
                write_manifest()
                st = per_actor[a]
                st["chunks"] += 1
                st["trajectories"] += rows
                st["tokens"] += done[c]["tokens"]
                st["busy_s"] += result["busy_s"]
                if result["pid"] != pids[a]:  # restarted actor
                    pids[a] = result["pid"]
                emit({"event": "done", "chunk": c, "actor": a, "pid": result["pid"], "rows": rows})
                bar.update(rows)
                idle.append(a)
            bar.close()
            decode_s = time.perf_counter() - t_decode
    finally:
        for a in actors:
            ray.kill(a)
        if started_ray:
            ray.shutdown()

    wall = time.perf_counter() - t_start
    for st in per_actor.values():
        st["traj_per_s"] = st["trajectories"] / st["busy_s"] if st["busy_s"] else 0.0
        st["tok_per_s"] = st["tokens"] / st["busy_s"] if st["busy_s"] else 0.0
    summary = {
        "trajectories": sum(e["rows"] for e in done.values()),
        "tokens": sum(e["tokens"] for e in done.values()),
        "full_passes": sum(e.get("full_passes", 0) for e in done.values()),
        "chunks_total": len(chunks), "chunks_skipped": skipped, "chunks_done": len(chunks) - skipped,
        "trajectories_this_run": sum(st["trajectories"] for st in per_actor.values()),
        "bad_shards": bad, "actor_failures": failures, "wall_s": wall, "decode_s": decode_s,
        "startup_s": wall - decode_s if decode_s else 0.0,
        # trajectories decoded in this run per second of decoding (Ray and model start-up excluded)
        "traj_per_s": sum(st["trajectories"] for st in per_actor.values()) / decode_s if decode_s else 0.0,
        "per_actor": [per_actor[i] for i in sorted(per_actor)],
        "out": str(out), "manifest": str(manifest_path), "backbone": backbone_info,
    }
    return summary


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
    p.add_argument("--backbone", help="backbone checkpoint dir (default: the embedded backbone)")
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
    code, summary = run_job_cli("teacher", args, DEFAULTS, run_teacher)
    if code == 0:
        print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return code


if __name__ == "__main__":
    sys.exit(main())
