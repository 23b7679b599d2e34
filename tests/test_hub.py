"""Hugging Face hub ids ("owner/name[@revision]") wherever a checkpoint is named, resolved from a real hub
cache built here: the toy backbone's files as blobs, a snapshot per commit linking to them and refs/main,
the layout `huggingface_hub` writes and reads (its own cache scanner must list it). The loading runs in a
fresh interpreter with HF_HUB_CACHE and HF_HUB_OFFLINE=1 set, as a user sets them: huggingface_hub reads
both when it is imported."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

from sampler.backbone import HUB_FILES, parse_hub_id

ROOT = Path(__file__).resolve().parent.parent
REPO = "jointgen-test/toy-dream"
COMMIT = "a" * 40  # main: the toy's safetensors, plus a pickle that must never be opened
PICKLE_ONLY = "b" * 40  # a revision with pickled weights only

RESOLVE = """
import json, sys
from ray_jobs.common import backbone_identity, backbone_path
from sampler.backbone import CheckpointError, backbone_dir, hub_source, load_backbone

out = {}
for ref in sys.argv[1:]:
    try:
        bb = load_backbone(ref)
    except CheckpointError as e:
        out[ref] = {"error": str(e)}
        continue
    path = backbone_path(ref)
    out[ref] = {"name": bb.name, "identity": bb.identity, "repo": bb.repo, "revision": bb.revision,
                "path": str(path), "serve_dir": str(backbone_dir(ref)), "job": list(backbone_identity(path)),
                "manifest": hub_source(path)}
print(json.dumps(out))
"""


class Trap:
    """Unpickling this creates the file it names: proof that a pickle was opened."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def cache_revision(cache: Path, repo: str, commit: str, files: dict[str, bytes], ref: str | None) -> Path:
    """One revision of a model repo in the hub cache: content-addressed blobs, the snapshot's relative
    symlinks to them, and refs/<ref> holding the commit."""
    from huggingface_hub.file_download import repo_folder_name

    root = cache / repo_folder_name(repo_id=repo, repo_type="model")
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


def resolve(cache: Path, *refs: str) -> dict:
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", RESOLVE, *refs], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hub_ids_are_told_from_paths():
    assert parse_hub_id("Dream-org/Dream-v0-Base-7B") == ("Dream-org/Dream-v0-Base-7B", None)
    assert parse_hub_id("GSAI-ML/LLaDA-8B-Base@v1.0") == ("GSAI-ML/LLaDA-8B-Base", "v1.0")
    for path in ("/mnt/shared/models/Dream", "./models/dream", "a/b/c", "embedded", "owner/"):
        assert parse_hub_id(path) is None, path
    assert not any(p.endswith((".bin", ".pt", ".pth", ".py", ".pkl")) for p in HUB_FILES)


def test_hub_id_loads_from_the_local_cache_and_records_repo_and_revision(toy_dir, toy, tmp_path):
    from huggingface_hub import scan_cache_dir

    cache, marker = tmp_path / "hub", tmp_path / "unpickled"
    files = {f.name: f.read_bytes() for f in sorted(toy_dir.iterdir()) if f.is_file()}
    assert "model.safetensors" in files and "config.json" in files
    cache_revision(cache, REPO, COMMIT, files | {"pytorch_model.bin": pickle.dumps(Trap(marker))}, "main")
    cache_revision(cache, REPO, PICKLE_ONLY, {"config.json": files["config.json"],
                                              "pytorch_model.bin": pickle.dumps(Trap(marker))}, None)
    (info,) = scan_cache_dir(cache).repos  # huggingface_hub's own reading of the cache built above
    assert info.repo_id == REPO and {r.commit_hash for r in info.revisions} == {COMMIT, PICKLE_ONLY}
    assert {ref for r in info.revisions for ref in r.refs} == {"main"}

    got = resolve(cache, REPO, f"{REPO}@{COMMIT}", f"{REPO}@main", f"{REPO}@{PICKLE_ONLY}",
                  "jointgen-test/missing", f"{REPO}@v9")
    for ref in (REPO, f"{REPO}@{COMMIT}", f"{REPO}@main"):
        r = got[ref]
        assert "error" not in r, r
        assert (r["repo"], r["revision"], r["name"]) == (REPO, COMMIT, REPO)
        assert r["identity"] == toy.identity, "the same config and safetensors as the toy directory"
        assert r["path"] == r["serve_dir"] and r["path"].endswith(f"snapshots/{COMMIT}")
        assert r["job"] == [REPO, toy.identity]  # what the teacher and evaluation write to their manifests
        assert r["manifest"] == {"repo": REPO, "revision": COMMIT}
    assert not marker.exists(), "a pickle in the snapshot was opened"
    assert "only pickle weights" in got[f"{REPO}@{PICKLE_ONLY}"]["error"]
    for ref in ("jointgen-test/missing", f"{REPO}@v9"):
        err = got[ref]["error"]
        assert err.startswith(f"{ref}: checkpoint directory does not exist"), err
        assert "HF_HUB_OFFLINE is set" in err and str(cache) in err
    assert not marker.exists()


def test_a_local_directory_wins_over_a_hub_id_of_the_same_name(toy_dir, toy, tmp_path, monkeypatch):
    from sampler.backbone import load_backbone

    local = tmp_path / "owner" / "name"
    local.parent.mkdir()
    local.symlink_to(toy_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    bb = load_backbone("owner/name")  # a directory: never looked up on the hub
    assert bb.identity == toy.identity and bb.repo is None and bb.revision is None
