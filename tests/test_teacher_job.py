"""Teacher job on a real local Ray cluster with real Parquet shards: manifest, replay, resume, killed actor,
corrupt and foreign shards, configuration."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from ray_jobs.common import manifest_shards, read_manifest, sha256_file
from ray_jobs.teacher import main, run_teacher, shard_name
from sampler import ShardError, encode_prompts, generate, load_backbone, read_trajectories
from sampler.schema import write_trajectories

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def toy(toy_dir) -> Path:
    """The checkpoint directory (conftest's `toy` is the loaded backbone)."""
    return toy_dir


def small(toy: Path, out: Path, **kw) -> dict:
    cfg = {"backbone": str(toy), "out": str(out), "num_trajectories": 24, "gen_length": 12, "chunk_size": 8,
           "batch_size": 4, "actors": 2, "torch_threads": 1, "progress": False}
    return cfg | kw


def all_trajs(out: Path, identity: str) -> list:
    trajs = []
    for path, entry in manifest_shards(out):
        got, meta = read_trajectories(path, backbone_identity=identity)
        assert len(got) == entry["rows"] and meta["chunk"] == entry["chunk"]
        trajs += got
    return trajs


def assert_replays(toy: Path, trajs: list, gen_length: int, prompts: list[list[int]] | None = None) -> None:
    """Each batch (trajectories sharing a seed) equals a single-process exact decode with that seed."""
    import torch

    torch.set_num_threads(1)
    bb = load_backbone(toy)
    by_seed = defaultdict(list)
    for t in trajs:
        by_seed[t.seed].append(t)
    for seed, group in by_seed.items():
        group.sort(key=lambda t: t.traj_id)
        res = generate(bb, [t.prompt_ids for t in group], mode="exact", gen_length=gen_length, seed=seed)
        assert res.tokens == [t.tokens for t in group], f"batch with seed {seed} does not replay"
        assert res.order == [t.order for t in group]


@pytest.fixture(scope="module")
def first_run(toy, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    return out, run_teacher(small(toy, out))


def test_end_to_end_manifest_and_replay(toy, first_run):
    out, summary = first_run
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["num_chunks"] == 3
    assert "kv_cache" not in manifest["settings"]  # left out while unset: older manifests still resume
    assert [e["file"] for e in manifest["shards"]] == [shard_name(c) for c in range(3)]
    assert all(e["rows"] == 8 and e["sha256"] == sha256_file(out / e["file"]) for e in manifest["shards"])
    assert sorted(p.name for p in out.glob("*.parquet")) == [shard_name(c) for c in range(3)]
    assert summary["trajectories"] == 24 and summary["tokens"] == 24 * 12
    assert summary["chunks_done"] == 3 and len(summary["per_actor"]) == 2
    assert sum(a["trajectories"] for a in summary["per_actor"]) == 24
    trajs = all_trajs(out, load_backbone(toy).identity)
    assert sorted(t.traj_id for t in trajs) == list(range(24))  # complete, no duplicates
    assert all(len(t.tokens) == 12 and sorted(t.order) == list(range(12)) for t in trajs)
    assert_replays(toy, trajs, 12)


def test_rerun_skips_and_actor_count_does_not_change_output(toy, first_run, tmp_path):
    out, _ = first_run
    before = (out / "manifest.json").read_text()
    again = run_teacher(small(toy, out))
    assert again["chunks_skipped"] == 3 and again["chunks_done"] == 0 and again["per_actor"] == []
    assert json.loads((out / "manifest.json").read_text())["shards"] == json.loads(before)["shards"]
    one = run_teacher(small(toy, tmp_path / "one", actors=1))
    assert len(one["per_actor"]) == 1
    assert ([e["sha256"] for e in read_manifest(tmp_path / "one")["shards"]]
            == [e["sha256"] for e in read_manifest(out)["shards"]])


def test_killed_actor_is_restarted_and_output_complete(toy, ray_cluster, tmp_path):
    out = tmp_path / "killed"
    killed: list[int] = []

    def on_event(ev: dict) -> None:
        # kill the actor that was just handed chunk 2, while that chunk is in flight
        if ev["event"] == "submitted" and ev["chunk"] == 2 and not killed:
            os.kill(ev["pid"], signal.SIGKILL)
            killed.append(ev["pid"])

    summary = run_teacher(small(toy, out, num_trajectories=48, gen_length=32), on_event=on_event)
    assert killed and summary["actor_failures"] >= 1
    manifest = read_manifest(out)
    assert manifest["complete"] and len(manifest["shards"]) == 6
    trajs = all_trajs(out, load_backbone(toy).identity)
    assert sorted(t.traj_id for t in trajs) == list(range(48))
    assert_replays(toy, [t for t in trajs if 16 <= t.traj_id < 24], 32)  # the chunk that was redone


def test_corrupt_and_foreign_shards_reported_by_name(toy, first_run, tmp_path):
    src, _ = first_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    good = sha256_file(out / shard_name(1))
    data = bytearray((out / shard_name(1)).read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = b"\x00" * 16
    (out / shard_name(1)).write_bytes(bytes(data))

    with pytest.raises(ShardError, match=shard_name(1)):
        manifest_shards(out)  # what training reads through
    with pytest.raises(ShardError, match=shard_name(1)):
        run_teacher(small(toy, out, on_bad_shard="refuse"))
    redo = run_teacher(small(toy, out))
    assert redo["chunks_done"] == 1 and shard_name(1) in redo["bad_shards"][0]
    assert sha256_file(out / shard_name(1)) == good  # deterministic: the same shard again

    # a shard from another backbone, on disk but not in the manifest (as after a crash before listing)
    manifest = read_manifest(out)
    manifest["shards"] = [e for e in manifest["shards"] if e["chunk"] != 2]
    (out / "manifest.json").write_text(json.dumps(manifest))
    trajs, meta = read_trajectories(out / shard_name(2))
    write_trajectories(out / shard_name(2), trajs, meta | {"backbone_identity": "0123456789abcdef"})
    with pytest.raises(ShardError, match=f"{shard_name(2)}.*backbone"):
        run_teacher(small(toy, out, on_bad_shard="refuse"))
    fixed = run_teacher(small(toy, out))
    assert fixed["chunks_done"] == 1 and read_manifest(out)["complete"]


def test_orphan_shard_is_adopted_after_full_read(toy, first_run, tmp_path):
    out = tmp_path / "orphan"
    shutil.copytree(first_run[0], out)
    manifest = read_manifest(out)
    manifest["shards"] = manifest["shards"][:2]  # the driver died between writing shard 2 and listing it
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = run_teacher(small(toy, out))
    assert again["chunks_skipped"] == 3 and again["chunks_done"] == 0 and read_manifest(out)["complete"]


def test_other_settings_refused(toy, first_run):
    out, _ = first_run
    with pytest.raises(ValueError, match="gen_length"):
        run_teacher(small(toy, out, gen_length=10))
    with pytest.raises(ValueError, match="unknown config key 'gen_lenght'"):
        run_teacher(small(toy, out, gen_lenght=10))


def test_cli_with_prompt_file_and_chat(toy, ray_cluster, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": p})
                                 for i, p in enumerate(["Name three fruits", "To be, or not"])) + "\n")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump({"gen_length": 8, "chunk_size": 3, "batch_size": 3, "progress": False}))
    out = tmp_path / "cli"
    rc = main(["--config", str(cfg), "--backbone", str(toy), "--out", str(out), "--prompts", str(prompts),
               "--chat", "--num-trajectories", "5", "--actors", "1", "--set", "torch_threads=1"])
    assert rc == 0 and "5 trajectories" in capsys.readouterr().out
    trajs = all_trajs(out, load_backbone(toy).identity)
    assert [t.prompt_id for t in sorted(trajs, key=lambda t: t.traj_id)] == ["q0", "q1", "q0", "q1", "q0"]
    chat_ids = encode_prompts(load_backbone(toy), ["Name three fruits", "To be, or not"], chat=True)
    assert all(t.prompt_ids == chat_ids[t.traj_id % 2] for t in trajs)
    assert_replays(toy, trajs, 8)
    assert main(["--backbone", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
