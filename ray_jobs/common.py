"""What every job shares (its configuration lives in `ray_jobs.config`):

- Ray: `ray_session(address, num_cpus)` uses the running cluster (`address`, or RAY_ADDRESS as set by
  `ray job submit`) or starts a local one, and shuts down only what it started.
- Inputs: `backbone_path(dir, hub id or None)` (None = the embedded backbone), `backbone_identity(path)`
  -> (name, identity) without loading the weights, `load_prompts(path, field)` -> (texts, ids),
  `parse_dtype(name)`.
- Files: `sha256_file`, `atomic_path` (the one way a job writes a file atomically), `write_json_atomic`.
- Teacher manifest (written by `ray_jobs.teacher`, read by training and evaluation): `MANIFEST_NAME`,
  `read_manifest(dir)` -> dict, `manifest_shards(dir, verify=True)` -> [(path, entry)], raising `ShardError`
  naming the shard when one is missing or its checksum differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sampler.backbone import Dtype, parse_dtype  # noqa: F401  (dtype names live in one place, with the loader)
from sampler.schema import ShardError

if TYPE_CHECKING:
    pass

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "jointgen-teacher-manifest"


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray (already initialised, `address`, or RAY_ADDRESS from `ray job submit`), else
    start a local cluster; a cluster started here is shut down on exit."""
    import ray

    started = not ray.is_initialized()
    if started:
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus, log_to_driver=True)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def backbone_path(path: str | Path | None) -> Path:
    """The backbone's checkpoint dir (`sampler.backbone.backbone_dir`: None = the embedded backbone; a
    hub id "owner/name[@revision]" = its snapshot in the Hugging Face cache)."""
    from sampler.backbone import backbone_dir

    return backbone_dir(path)


def backbone_identity(path: Path) -> tuple[str, str]:
    """(name, identity) of a checkpoint without loading it: the values `load_backbone` gives. A checkpoint
    from the hub cache is named by its repo id; `sampler.backbone.hub_source(path)` gives repo and commit."""
    from sampler.backbone import CheckpointError, checkpoint_name, fingerprint

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        hint = " (the embedded backbone is not built yet: pass --backbone)" if path.name == "backbone" else ""
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json){hint}")
    return checkpoint_name(path, json.loads(cfg_file.read_text())), fingerprint(path)


def load_prompts(path: str | Path, field: str) -> tuple[list[str], list[str]]:
    """(texts, ids) from a JSONL file (one object per line with `field`, optional "id") or a Parquet file
    (column `field`, optional column "id")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise ValueError(f"{path}: no column {field!r} (columns: {table.column_names})")
        texts = [str(t) for t in table.column(field).to_pylist()]
        ids = ([str(i) for i in table.column("id").to_pylist()] if "id" in table.column_names
               else [str(i) for i in range(len(texts))])
    elif path.suffix in (".jsonl", ".json"):
        texts, ids = [], []
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


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name in `path`'s folder to write to; when the block ends it is fsynced and renamed
    over `path`, so readers see the old file or the new one, never half (on an error it is removed).
    Its name, `.<name>.<pid>.tmp`, is what readers clean up after a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    return Path(path)


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher manifest "
                                f"(run `jointgen teacher --out {data_dir}` first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: manifest is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a jointgen teacher manifest")
    return manifest


def manifest_shards(data_dir: str | Path, verify: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    """The shards a manifest lists, in chunk order; with `verify`, each must exist with its checksum."""
    data_dir = Path(data_dir)
    out = []
    for entry in sorted(read_manifest(data_dir)["shards"], key=lambda e: e["chunk"]):
        path = data_dir / entry["file"]
        if verify:
            if not path.is_file():
                raise ShardError(f"{path}: listed in the manifest but missing")
            if sha256_file(path) != entry["sha256"]:
                raise ShardError(f"{path}: checksum differs from the manifest (corrupt or replaced shard)")
        out.append((path, entry))
    return out
