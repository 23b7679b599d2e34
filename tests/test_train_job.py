"""Train job with 2 Ray Train workers on a real local cluster: loss falls, held-out KL of the sampler below
the marginal baseline's, checkpoints, resume from the saved step, a killed worker recovered, bad data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ray_jobs.common import read_manifest
from ray_jobs.config import TrainConfig
from ray_jobs.teacher import run_teacher, shard_name
from ray_jobs.train import is_heldout, lr_factor, main, run_train
from sampler import JointSampler, ShardError, load_backbone
from sampler.testing import make_toy_backbone

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def teacher_data(tmp_path_factory, ray_cluster) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train")
    toy = make_toy_backbone(root / "toy")
    data = root / "teacher"
    run_teacher({"backbone": str(toy), "out": str(data), "num_trajectories": 64, "gen_length": 16,
                 "chunk_size": 16, "batch_size": 16, "actors": 2, "torch_threads": 1, "progress": False})
    return toy, data


def cfg(data: Path, out: Path, **kw) -> dict:
    return {"data": str(data), "out": str(out), "workers": 2, "steps": 60, "batch_size": 16, "k_max": 4,
            "lr": 3e-3, "warmup_steps": 5, "log_every": 5, "val_every": 60, "checkpoint_every": 30,
            "val_fraction": 0.2, "val_windows_per_depth": 32, "progress": False} | kw


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_two_workers_then_resume(teacher_data, tmp_path):
    toy, data = teacher_data
    out = tmp_path / "run"
    s = run_train(cfg(data, out, wandb="offline", lr_schedule="cosine", min_lr_ratio=0.1))
    assert s["start_step"] == 0 and s["steps"] == 60
    lines = log_lines(out)
    train = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train] == list(range(5, 61, 5))
    lrs = [m["lr"] for m in train]  # warm-up to 3e-3 by step 5, then the cosine down to 3e-4 at the end
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-4, rel=0.02)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    first, last = train[:2], train[-4:]
    mean = lambda ms, f: sum(f(m) for m in ms) / len(ms)  # noqa: E731
    assert mean(last, lambda m: m["loss"]) < mean(first, lambda m: m["loss"])  # loss falls
    ratio = lambda m: m["loss"] / m["kl_marginal"]  # noqa: E731  (the same windows: less noisy than loss)
    assert mean(last, ratio) < mean(first, ratio)
    depth = s["depth_metrics"]
    assert sorted(depth) == [1, 2, 3, 4]
    assert sum(d["kl_sampler"] for d in depth.values()) < sum(d["kl_marginal"] for d in depth.values())
    assert depth[4]["kl_sampler"] < depth[4]["kl_marginal"]
    ckpts = sorted(p.name for p in (out / "ray" / "train").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-0000030", "checkpoint-0000060"]
    state = torch.load(out / "ray" / "train" / "checkpoint-0000060" / "train_state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]  # the output norm's weight alone, at 10x the others' lr
    assert len(groups[1]["params"]) == 1 and groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    bb = load_backbone(toy)
    exported = JointSampler.load(s["sampler_dir"], backbone=bb)
    assert json.loads((out / "sampler" / "sampler.json").read_text())["trained_steps"] == 60
    assert any(p.name.startswith("offline-run-") for p in (out / "wandb").iterdir())  # rank 0 only: one run
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1

    # the same command with more steps resumes from step 60, where the loss was
    s2 = run_train(cfg(data, out, steps=75, wandb="disabled"))
    assert s2["start_step"] == 60 and s2["steps"] == 75
    lines = log_lines(out)
    starts = [m for m in lines if m.get("event") == "start"]
    assert [(m["step"], m["resumed"]) for m in starts] == [(0, False), (60, True)]
    resumed = [m for m in lines if "loss" in m and m["start_step"] == 60]
    assert [m["step"] for m in resumed] == [65, 70, 75]
    assert resumed[0]["loss"] / resumed[0]["kl_marginal"] < train[0]["loss"] / train[0]["kl_marginal"]
    again = JointSampler.load(s2["sampler_dir"], backbone=bb)
    assert any(not bool((a == b).all()) for a, b in zip(exported.state_dict().values(),
                                                       again.state_dict().values(), strict=True))


def test_killed_worker_recovers_from_checkpoint_via_cli(teacher_data, tmp_path, capsys):
    _, data = teacher_data
    out = tmp_path / "killed"
    conf = tmp_path / "train.yaml"
    conf.write_text(yaml.safe_dump(cfg(data, out, steps=30, checkpoint_every=10, val_every=30,
                                       wandb="disabled")))
    rc = main(["--config", str(conf), "--set", "fail_at_step=15", "--set", "max_failures=1"])
    assert rc == 0
    assert "held-out" in capsys.readouterr().out
    starts = [(m["step"], m["resumed"]) for m in log_lines(out) if m.get("event") == "start"]
    assert starts == [(0, False), (10, True)]  # worker killed at 15, group restarted from checkpoint 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["start_step"] == 10


def test_bad_data_refused_by_name(teacher_data, tmp_path, capsys):
    toy, data = teacher_data
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (bad / shard_name(1)).write_bytes(b"PAR1 not really")
    with pytest.raises(ShardError, match=shard_name(1)):
        run_train(cfg(bad, tmp_path / "o1"))
    other = make_toy_backbone(tmp_path / "other", seed=1)
    with pytest.raises(ShardError, match="decoded by backbone"):
        run_train(cfg(data, tmp_path / "o2", backbone=str(other)))
    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o3")]) == 2
    assert "no teacher manifest" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size"):
        run_train(cfg(data, tmp_path / "o4", batch_size=1))
    assert read_manifest(data)["complete"]


def test_lr_schedule_warmup_then_constant_or_cosine():
    const = TrainConfig(steps=100, warmup_steps=10)
    cos = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.2)
    assert [lr_factor(s, const) for s in (0, 4, 9, 50, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, cos) for s in (0, 9)] == [0.1, 1.0]
    assert lr_factor(10, cos) == pytest.approx(1.0) and lr_factor(99, cos) == pytest.approx(0.2)
    assert lr_factor(54, cos) == pytest.approx(0.6, abs=0.01)  # half-way: the mean of the two ends
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_heldout_split_is_stable_and_sized():
    held = [i for i in range(10000) if is_heldout(i, 0.05)]
    assert 400 < len(held) < 600 and held == [i for i in range(10000) if is_heldout(i, 0.05)]
