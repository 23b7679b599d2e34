"""The Arrow schema of teacher trajectories, shared by the teacher job (writer) and training (reader).

A shard is one Parquet file; its schema metadata carries the generation settings and the backbone's
identity, so a shard from another backbone or with another layout is refused by name, never read."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sampler.trajectory import Trajectory

SCHEMA_VERSION = "1"
TRAJECTORY_SCHEMA = pa.schema([
    pa.field("traj_id", pa.int64(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("tokens", pa.list_(pa.int32()), nullable=False),
    pa.field("order", pa.list_(pa.int32()), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
])
META_KEY = b"jointgen"


class ShardError(ValueError):
    """A shard that must not be read as valid (unreadable, wrong schema, foreign backbone)."""


def to_table(trajs: Sequence[Trajectory], metadata: dict[str, Any] | None = None) -> pa.Table:
    cols = {
        "traj_id": [t.traj_id for t in trajs], "prompt_id": [t.prompt_id for t in trajs],
        "prompt_ids": [t.prompt_ids for t in trajs], "tokens": [t.tokens for t in trajs],
        "order": [t.order for t in trajs], "seed": [t.seed for t in trajs],
    }
    meta = {"schema_version": SCHEMA_VERSION, **(metadata or {})}
    schema = TRAJECTORY_SCHEMA.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    return pa.Table.from_pydict(cols, schema=schema)


def write_trajectories(path: str | Path, trajs: Sequence[Trajectory],
                       metadata: dict[str, Any] | None = None) -> Path:
    """Write a shard atomically: a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(to_table(trajs, metadata), tmp, compression="zstd")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def shard_metadata(path: str | Path) -> dict[str, Any]:
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ShardError(f"{path}: unreadable Parquet shard ({e})") from e
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ShardError(f"{path}: not a trajectory shard (no {META_KEY.decode()} metadata)")
    return json.loads(raw)


def read_trajectories(path: str | Path, *, backbone_identity: str | None = None
                      ) -> tuple[list[Trajectory], dict[str, Any]]:
    """Read and check one shard; raises ShardError naming the file for anything not valid."""
    meta = shard_metadata(path)
    if backbone_identity and meta.get("backbone_identity") != backbone_identity:
        raise ShardError(f"{path}: written for backbone {meta.get('backbone_identity')!r}, "
                         f"expected {backbone_identity!r}")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise ShardError(f"{path}: unreadable Parquet shard ({e})") from e
    if not table.schema.remove_metadata().equals(TRAJECTORY_SCHEMA):
        raise ShardError(f"{path}: schema differs from the trajectory schema: {table.schema}")
    trajs = [Trajectory(r["prompt_ids"], r["tokens"], r["order"], r["traj_id"], r["prompt_id"], r["seed"])
             for r in table.to_pylist()]
    for t in trajs:
        try:
            t.validate()
        except ValueError as e:
            raise ShardError(f"{path}: {e}") from e
    return trajs, meta
