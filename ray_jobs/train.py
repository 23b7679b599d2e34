"""Train job: fit the joint sampler on teacher shards with Ray Train (docs/method.md).

    jointgen train --config configs/train.yaml --data runs/teacher --out runs/train --workers 2 --steps 2000

Interface (stable):
- `run_train(config) -> dict`. `config` is a `TrainConfig` or a mapping of its keys (ray_jobs/config.py;
  missing keys take the defaults). Returns: sampler_dir (`<out>/sampler`, loadable by `JointSampler.load`),
  checkpoint (the latest Ray Train checkpoint dir), metrics (the last reported: loss, kl_marginal, lr,
  grad_norm, val/..., step, start_step), depth_metrics ({K: {kl_sampler, kl_marginal, top1_sampler,
  top1_marginal, positions}} of the last validation), start_step, steps, wall_s, metrics_jsonl, out.
- `main(argv) -> int` for `jointgen train`; `format_summary(summary)` prints a summary as the CLI does.

What runs: a `TorchTrainer` with `workers` workers (DDP over gloo on CPU, NCCL on GPUs). Each worker loads
the frozen backbone (inference only, no gradients) and reads the teacher shards listed in the manifest
(checksums and backbone identity checked; a bad shard stops the run naming it). Trajectories are split
by a hash of traj_id into a held-out set (`val_fraction`) and a training set; each worker reads and trains
on its own shards (every `world_size`-th; every `world_size`-th trajectory when there are fewer shards than
workers); rank 0 also reads the held-out trajectories of all shards. A step draws `batch_size / workers`
windows per worker (K from 1..k_max, `k_weighting`), computes `sampler.joint_loss` and updates the sampler
(wrapped in DDP, the only trainable module) with AdamW, linear warm-up then a constant rate, gradient
clipping, bf16 autocast on GPU only.

Checkpoints every `checkpoint_every` steps (and at the end) through `ray.train.report`: the sampler as
safetensors (`JointSampler.save`: the directory loads with `JointSampler.load`), `train_state.pt`
(optimizer + scheduler state + step; our own file, read with weights_only=True). A worker that dies is
restarted by Ray Train from the latest checkpoint (`max_failures`); rerunning the same command (same
`out` and `run_name`) resumes from it too, the step continuing. Validation (`val_every`, rank 0):
`sampler.depth_metrics` per unroll depth, sampler vs the marginal baseline. Metrics go to
`<out>/metrics.jsonl` and, on world rank 0 only, to wandb (`WANDB_MODE=offline` unless `wandb: online`;
`wandb: disabled` turns it off). The final sampler is exported to `<out>/sampler`.
On a multi-node cluster, `data` and `out` should be on storage all nodes share (NFS, /mnt/cluster_storage):
workers read the shards from `data` and rank 0 writes metrics.jsonl into `out`; checkpoints go to
`storage_path` (default `<out>/ray`; an s3:// URI works too), from which the driver exports the sampler.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ray_jobs.common import (
    backbone_identity,
    backbone_path,
    manifest_shards,
    parse_dtype,
    ray_session,
    read_manifest,
    write_json_atomic,
)
from ray_jobs.config import TrainConfig, add_config_args, run_cli, validate
from sampler import Backbone, JointSampler, depth_metrics, joint_loss, load_backbone, sample_windows
from sampler.joint import SAMPLER_CONFIG, SAMPLER_WEIGHTS, read_weights
from sampler.schema import ShardError, read_trajectories
from sampler.trajectory import WindowBatch

TRAIN_STATE = "train_state.pt"


def is_heldout(traj_id: int, fraction: float) -> bool:
    """Stable split by a hash of traj_id: the same trajectories are held out in every run."""
    h = int.from_bytes(hashlib.blake2b(str(int(traj_id)).encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


def data_dirs(data: str | Path | list) -> list[Path]:
    """`data` as a list of teacher directories (one path, a comma-separated string, or a list)."""
    items = data if isinstance(data, list | tuple) else str(data).split(",")
    dirs = [Path(str(d).strip()).resolve() for d in items if str(d).strip()]
    if not dirs:
        raise ValueError("train: data names no teacher directory")
    return dirs


def load_split(data: str | list, identity: str, fraction: float, rank: int,
               world: int) -> tuple[list, list]:
    """(this rank's training trajectories, the held-out trajectories on rank 0, [] elsewhere).

    With at least as many shards as workers, rank r trains on shards r, r + world, ... and reads only
    those (rank 0 reads all, for the held-out set); with fewer shards, every rank reads them all and takes
    every world-th training trajectory."""
    shards = [sh for d in data_dirs(data) for sh in manifest_shards(d)]
    by_shard = len(shards) >= world
    train, val = [], []
    for i, (path, _) in enumerate(shards):
        mine = i % world == rank or not by_shard
        if not mine and rank != 0:
            continue
        trajs, _meta = read_trajectories(path, backbone_identity=identity)
        for t in trajs:
            if is_heldout(t.traj_id, fraction):
                if rank == 0:
                    val.append(t)
            elif mine:
                train.append(t)
    train.sort(key=lambda t: t.traj_id)
    if not by_shard and len(train) >= world:
        train = train[rank::world]
    if not train:
        raise ValueError(f"{data}: no training trajectories for rank {rank} (val_fraction {fraction})")
    return train, val


# the settings that shaped a sampler, recorded in its sampler.json
EXPORTED_TRAIN_KEYS = {"lr", "warmup_steps", "lr_schedule", "min_lr_ratio", "norm_out_lr_scale", "batch_size",
                       "k_max", "k_weighting", "init", "sampler_layers", "loss_depths", "eos_window_keep",
                       "next_targets", "workers", "seed"}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The lr multiplier at `step`: linear warm-up, then constant or a cosine down to min_lr_ratio at
    the last step (the schedule follows cfg.steps, so a resumed run with more steps stretches it)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# The per-worker loop
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInputs:
    """What the driver resolved and every worker needs besides the config."""

    backbone_path: str
    identity: str
    data: str  # teacher directories, comma-separated
    out: str
    bf16: bool


class RunLog:
    """metrics.jsonl and wandb, on world rank 0 only."""

    def __init__(self, cfg: TrainConfig, out: str, rank: int):
        self.active = rank == 0
        self.wandb = None
        if not self.active:
            return
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.fh = open(out_dir / "metrics.jsonl", "a")
        if cfg.wandb != "disabled":
            os.environ["WANDB_MODE"] = cfg.wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            run_id = hashlib.sha256(f"{out}:{cfg.run_name}".encode()).hexdigest()[:12]
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, id=run_id,
                                    resume="allow", dir=str(out_dir), config=cfg.model_dump())

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        self.fh.write(json.dumps(metrics) + "\n")
        self.fh.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                           step=int(metrics["step"]))

    def close(self) -> None:
        if self.active:
            self.fh.close()
            if self.wandb is not None:
                self.wandb.finish()


def flat_depth(depth: dict[int, dict]) -> dict[str, float]:
    """Validation metrics as flat keys (val/kl_sampler/K3 ...) plus means over depths."""
    out: dict[str, float] = {}
    for k, m in depth.items():
        for name, v in m.items():
            out[f"val/{name}/K{k}"] = float(v)
    for name in ("kl_sampler", "kl_marginal", "top1_sampler", "top1_marginal"):
        vals = [m[name] for m in depth.values()]
        if vals:
            out[f"val/{name}"] = float(sum(vals) / len(vals))
    return out


def unflat_depth(metrics: dict[str, Any]) -> dict[int, dict[str, float]]:
    """{K: {kl_sampler, kl_marginal, top1_sampler, top1_marginal, positions}} back from the flat keys."""
    depth: dict[int, dict[str, float]] = {}
    for key, v in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "val" and parts[2].startswith("K"):
            depth.setdefault(int(parts[2][1:]), {})[parts[1]] = v
    return dict(sorted(depth.items()))


class SamplerLoss(torch.nn.Module):
    """The sampler as DDP's module: one forward = the whole K-step unroll, so DDP sees one forward and
    one backward per step. The backbone is held outside the module tree (frozen, never broadcast)."""

    def __init__(self, backbone: Backbone, sampler: JointSampler, depths: str = "last") -> None:
        super().__init__()
        self.sampler = sampler
        self.depths = depths
        object.__setattr__(self, "backbone", backbone)  # bypasses nn.Module's submodule registration

    def forward(self, states, attention_mask, ks, target_pos, target_valid):
        batch = WindowBatch(states, attention_mask, ks, target_pos, target_valid)
        return joint_loss(self.backbone, self.sampler, batch, self.depths)


@dataclass
class Worker:
    """One Ray Train worker: the frozen backbone, the sampler it trains and its trajectories."""

    rank: int
    world: int
    device: torch.device
    bf16: bool
    backbone: Backbone
    sampler: JointSampler
    train: list
    val: list  # the held-out trajectories (rank 0 only)

    @classmethod
    def start(cls, cfg: TrainConfig, run: RunInputs) -> Worker:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device()
        if device.type == "cpu":
            torch.set_num_threads(cfg.torch_threads or 1)
        dtype = parse_dtype(cfg.dtype) or (torch.bfloat16 if run.bf16 else torch.float32)
        backbone = load_backbone(run.backbone_path, device=device, dtype=dtype)
        if backbone.identity != run.identity:
            raise ShardError(f"{run.backbone_path}: worker loaded backbone {backbone.identity}, the teacher "
                             f"data needs {run.identity}")
        train, val = load_split(run.data, backbone.identity, cfg.val_fraction, rank, world)
        sampler = JointSampler.for_backbone(backbone, seed=cfg.seed, init=cfg.init,
                                            n_layers=cfg.sampler_layers)
        return cls(rank, world, device, run.bf16, backbone, sampler, train, val)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def restore(self) -> tuple[int, dict | None]:
        """(step, optimizer state) of the checkpoint Ray Train hands this run, if any; loads the sampler."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0, None
        with ckpt.as_directory() as d:
            saved = json.loads((Path(d) / SAMPLER_CONFIG).read_text())["args"]["n_layers"]
            if saved != self.sampler.args.n_layers:  # name the setting, not the tensors that do not fit
                raise ValueError(f"sampler_layers is {self.sampler.args.n_layers} but the checkpoint to "
                                 f"resume from has {saved}: resume with sampler_layers={saved}, or train "
                                 "into a new out / run_name")
            self.sampler.load_state_dict(read_weights(d, device=str(self.device)))
            state = torch.load(Path(d) / TRAIN_STATE, map_location=self.device, weights_only=True)
        return int(state["step"]), state

    def validate(self, cfg: TrainConfig) -> dict[str, float]:
        """Held-out metrics per unroll depth (rank 0; {} elsewhere)."""
        if self.rank != 0 or not self.val:
            return {}
        self.sampler.eval()
        with self.autocast():
            depth = depth_metrics(self.backbone, self.sampler, self.val, cfg.val_k_max or cfg.k_max,
                                  windows_per_depth=cfg.val_windows_per_depth, seed=cfg.seed)
        self.sampler.train()
        return flat_depth(depth)

    def checkpoint(self, step: int, metrics: dict[str, Any], opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler) -> None:
        """Report `metrics` with a checkpoint (written by rank 0: sampler + optimizer state)."""
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            ck = None
            if self.rank == 0:
                self.sampler.save(d, extra={"step": step})
                torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                           Path(d) / TRAIN_STATE)
                ck = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=f"checkpoint-{step:07d}")


def optimizer(cfg: TrainConfig, sampler: JointSampler, state: dict | None
              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a linear warm-up, then the schedule (restored from `state` when resuming). The output
    norm's weight, the zero-initialised gate on the sampler's update, has its own rate: Adam moves a
    weight by about lr per step, so at the base rate the update's size, not its direction, limits early
    training (docs/method.md)."""
    named = list(sampler.named_parameters())
    gate = [p for n, p in named if n.endswith("norm_out.weight")]
    rest = [p for n, p in named if not n.endswith("norm_out.weight")]
    opt = torch.optim.AdamW([{"params": rest}, {"params": gate, "lr": cfg.lr * cfg.norm_out_lr_scale}],
                            lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    return opt, sched


class LossMeter:
    """Loss and marginal-baseline KL summed since the last log line, and the windows drawn meanwhile."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums, self.windows, self.t0 = np.zeros(3), 0, time.perf_counter()

    def add(self, info: dict[str, float], windows: int) -> None:
        self.sums += (info["loss"], info["kl_marginal"], 1.0)
        self.windows += windows

    def read(self, world: int) -> tuple[float, float, float]:
        """(loss, kl_marginal) averaged over workers and steps, and windows per second of all workers."""
        red = torch.tensor(self.sums, dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(red)
        dt = time.perf_counter() - self.t0
        return float(red[0] / red[2]), float(red[1] / red[2]), self.windows * world / dt if dt > 0 else 0.0


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (`config`: {"cfg": TrainConfig, "run": RunInputs})."""
    import ray.train
    import ray.train.torch

    cfg, run = config["cfg"], config["run"]
    w = Worker.start(cfg, run)
    start, state = w.restore()
    model = ray.train.torch.prepare_model(SamplerLoss(w.backbone, w.sampler, cfg.loss_depths))
    opt, sched = optimizer(cfg, w.sampler, state)
    log = RunLog(cfg, run.out, w.rank)
    log.log({"event": "start", "step": start, "resumed": state is not None, "workers": w.world,
             "train_trajectories_rank0": len(w.train), "val_trajectories": len(w.val)})
    per_worker = cfg.batch_size // w.world
    rng = np.random.default_rng([cfg.seed, w.rank, start])  # a resumed run draws new windows, reproducibly
    last: dict[str, Any] = {"step": start, "start_step": start}
    meter = LossMeter()
    w.sampler.train()
    for step in range(start, cfg.steps):
        batch = sample_windows(w.train, per_worker, cfg.k_max, rng, w.backbone.mask_id, w.backbone.pad_id,
                               weighting=cfg.k_weighting, eos_id=w.backbone.eos_id,
                               eos_keep=cfg.eos_window_keep, next_targets=cfg.next_targets).to(w.device)
        with w.autocast():
            loss, info = model(batch.states, batch.attention_mask, batch.ks, batch.target_pos,
                               batch.target_valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(w.sampler.parameters(), cfg.grad_clip))
        opt.step()
        sched.step()
        done = step + 1
        meter.add(info, per_worker)
        if not math.isfinite(info["loss"]):
            raise FloatingPointError(f"train: loss is {info['loss']} at step {done} (lower lr?)")
        if cfg.fail_at_step == done and state is None and w.rank == w.world - 1:
            # a worker dying mid-run. The controller collects reports (and registers checkpoints) on its
            # 2 s health-check poll: wait for it, so the checkpoint before this step is the one restored
            time.sleep(5)
            os.kill(os.getpid(), signal.SIGKILL)
        if done % cfg.log_every == 0 or done == cfg.steps:
            loss_mean, kl_marginal, windows_per_s = meter.read(w.world)
            last = last | {"step": done, "loss": loss_mean, "kl_marginal": kl_marginal,
                           "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                           "windows_per_s": windows_per_s}
            log.log({k: v for k, v in last.items() if not k.startswith("val")} | {"time": time.time()})
            meter.reset()
        if done % cfg.val_every == 0 or done == cfg.steps:
            val = w.validate(cfg)
            if val:
                last = last | val
                log.log({"step": done} | val)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            w.checkpoint(done, last, opt, sched)
    if start >= cfg.steps:  # nothing to train: validate and report; the restored checkpoint stays the latest
        ray.train.report(last | w.validate(cfg))
    log.close()


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def export_sampler(checkpoint_dir: Path, dest: Path, extra: dict[str, Any]) -> Path:
    """Copy the checkpoint's sampler to `dest`, a directory replaced whole: written under a temporary
    name, then swapped in by two renames (`atomic_path` is for single files)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(checkpoint_dir / SAMPLER_WEIGHTS, tmp / SAMPLER_WEIGHTS)
    conf = json.loads((checkpoint_dir / SAMPLER_CONFIG).read_text()) | extra
    (tmp / SAMPLER_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def fit_with_progress(trainer: Any, metrics_path: Path, steps: int, progress: bool) -> Any:
    """`trainer.fit()` in a thread while a tqdm bar follows the metrics rank 0 appends to metrics.jsonl."""
    import threading

    from tqdm import tqdm

    if not progress:
        return trainer.fit()
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    offset = metrics_path.stat().st_size if metrics_path.exists() else 0
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    with tqdm(total=steps, unit="step", desc="train", dynamic_ncols=True) as bar:
        while thread.is_alive():
            thread.join(timeout=1.0)
            if not metrics_path.exists():
                continue
            with open(metrics_path) as fh:
                fh.seek(offset)
                chunk = fh.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            offset += len(complete.encode())
            for line in complete.splitlines():
                m = json.loads(line)
                if m.get("event") == "start":
                    bar.n = m["step"]
                elif "loss" in m:
                    bar.n = m["step"]
                    bar.set_postfix(loss=f"{m['loss']:.4f}", marginal=f"{m['kl_marginal']:.4f}")
                elif "val/kl_sampler" in m:
                    bar.write(f"train: step {m['step']} held-out KL sampler {m['val/kl_sampler']:.4f}, "
                              f"marginal {m['val/kl_marginal']:.4f} (mean over K)")
            bar.refresh()
    if "error" in box:
        raise box["error"]
    return box["result"]


def check_data(cfg: TrainConfig) -> tuple[list[Path], Path, str, str]:
    """(teacher dirs, backbone dir, its name, its identity): every manifest's shards are checked (a
    corrupt one stops the run here, by name) and must come from that backbone."""
    dirs = data_dirs(cfg.data)
    bpath = name = identity = None
    for data in dirs:
        manifest = read_manifest(data)
        shards = manifest_shards(data)
        if not shards:
            raise ValueError(f"{data}: the manifest lists no shards")
        if not manifest["complete"]:
            print(f"train: {data} is incomplete ({len(shards)} of {manifest['num_chunks']} shards); "
                  "training on what is there", file=sys.stderr)
        recorded = manifest["backbone"]
        if bpath is None:
            bpath = backbone_path(cfg.backbone if cfg.backbone is not None else recorded.get("path"))
            name, identity = backbone_identity(bpath)
        if identity != recorded["identity"]:
            raise ShardError(f"{data}: teacher shards were decoded by backbone {recorded['name']!r} "
                             f"({recorded['identity']}), but {bpath} is {name!r} ({identity})")
    return dirs, bpath, name, identity


def fit(cfg: TrainConfig, bpath: Path, identity: str, data: str, out: Path) -> Any:
    """The Ray Train run: `workers` DDP workers, checkpoints under storage_path; returns its Result."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    run = RunInputs(str(bpath), identity, data, str(out), bool(cfg.bf16 if cfg.bf16 is not None else use_gpu))
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg, "run": run},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=bool(use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run_name, storage_path=cfg.storage_path or str(out / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    return fit_with_progress(trainer, out / "metrics.jsonl", cfg.steps, cfg.progress)


def run_train(config: TrainConfig | dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the sampler on `data` into `out`; see the module docstring."""
    cfg = validate(TrainConfig, config)
    t0 = time.perf_counter()
    dirs, bpath, name, identity = check_data(cfg)
    data = ",".join(str(d) for d in dirs)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with ray_session(cfg.ray_address, cfg.ray_num_cpus):
        result = fit(cfg, bpath, identity, data, out)
    if result.error is not None:
        raise RuntimeError(f"train: the run failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("train: the run ended without a checkpoint")
    metrics = dict(result.metrics or {})
    with result.checkpoint.as_directory() as d:
        sampler_dir = export_sampler(Path(d), out / "sampler", {
            "trained_steps": metrics.get("step"), "teacher_data": data,
            "train_config": cfg.model_dump(include=EXPORTED_TRAIN_KEYS)})
    depth = unflat_depth(metrics)
    summary = {
        "sampler_dir": str(sampler_dir), "checkpoint": result.checkpoint.path, "metrics": metrics,
        "depth_metrics": depth, "start_step": metrics.get("start_step"), "steps": metrics.get("step"),
        "wall_s": time.perf_counter() - t0, "metrics_jsonl": str(out / "metrics.jsonl"), "out": str(out),
        "backbone": {"name": name, "identity": identity, "path": str(bpath)},
    }
    write_json_atomic(out / "summary.json",
                      summary | {"depth_metrics": {str(k): v for k, v in depth.items()}})
    return summary


def format_summary(s: dict[str, Any]) -> str:
    m = s["metrics"]
    lines = [f"train: steps {s['start_step']} -> {s['steps']} in {s['wall_s']:.1f} s; "
             f"loss {m.get('loss', float('nan')):.4f} "
             f"(marginal baseline KL {m.get('kl_marginal', float('nan')):.4f})",
             f"  sampler: {s['sampler_dir']}", f"  checkpoint: {s['checkpoint']}",
             f"  metrics: {s['metrics_jsonl']}"]
    if s["depth_metrics"]:
        lines.append("  held-out   K   KL sampler  KL marginal  top1 sampler  top1 marginal")
        for k, d in sorted(s["depth_metrics"].items()):
            lines.append(f"            {k:<3} {d['kl_sampler']:>10.4f}  {d['kl_marginal']:>11.4f}  "
                         f"{d['top1_sampler']:>12.3f}  {d['top1_marginal']:>13.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jointgen train", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--data", help="teacher output directory (with manifest.json); several: comma-separated")
    p.add_argument("--backbone", help="backbone checkpoint dir (default: the one the teacher used)")
    p.add_argument("--out", help="output directory (checkpoints, metrics.jsonl, sampler/)")
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="global windows per step")
    p.add_argument("--lr", type=float)
    p.add_argument("--k-max", type=int)
    p.add_argument("--wandb", choices=("offline", "online", "disabled"), help="wandb mode (default offline)")
    p.add_argument("--address", dest="ray_address",
                   help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(TrainConfig, args, run_train,
                   lambda s: print(json.dumps(s, indent=1, default=str) if args.json else format_summary(s)))


if __name__ == "__main__":
    sys.exit(main())
