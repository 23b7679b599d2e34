"""Small shared helpers for the Ray jobs. Stable interface, imported by every job module:

- `merge_config(defaults, config, job)` -> dict: defaults overlaid with `config`; unknown keys are an error
  naming them (a typo never silently falls back to a default).
- `parse_sets(["key=value", ...])` -> dict: `--set` overrides, values parsed as YAML (`3`, `1e-3`, `null`,
  `true`, `[1, 2]`); dotted keys (`a.b=1`) give nested dicts.
- `load_config(defaults, job, path=None, overrides=None, sets=None)` -> dict: defaults < YAML file <
  explicit overrides (None values ignored: flags not given) < `--set`.
- `add_config_args(parser)`: the `--config` and `--set` flags every job shares.
- `init_ray(address=None, num_cpus=None)` -> bool: connect to a cluster (`address`, or `RAY_ADDRESS` as set by
  `ray job submit`), else start a local one; True when this call started Ray (the caller shuts it down).
- `sha256_file(path)`, `write_json_atomic(path, obj)`.
- Teacher manifest (written by `ray_jobs.teacher`, read by training and evaluation):
  `MANIFEST_NAME`, `read_manifest(dir)` -> dict, `manifest_shards(dir, verify=True)` -> list of
  (path, entry), raising `ShardError` naming the shard when one is missing or its checksum differs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sampler.schema import ShardError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "jointgen-teacher-manifest"


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def _deep_update(base: dict, upd: Mapping, known: Mapping | None, job: str, prefix: str = "") -> dict:
    for k, v in upd.items():
        if known is not None and k not in known:
            raise ValueError(f"{job}: unknown config key {prefix + k!r}; "
                             f"known keys: {', '.join(sorted(known))}")
        sub_known = known.get(k) if known is not None else None
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            base[k] = _deep_update(base[k], v, sub_known if isinstance(sub_known, Mapping) else None, job,
                                   f"{prefix}{k}.")
        else:
            base[k] = copy.deepcopy(v)
    return base


def merge_config(defaults: Mapping[str, Any], config: Mapping[str, Any] | None, job: str) -> dict[str, Any]:
    """`defaults` overlaid with `config` (nested dicts merged); unknown keys raise ValueError."""
    return _deep_update(copy.deepcopy(dict(defaults)), dict(config or {}), defaults, job)


def parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: value is not valid YAML ({e})") from e
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(defaults: Mapping[str, Any], job: str, path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None, sets: Sequence[str] | None = None
                ) -> dict[str, Any]:
    cfg = merge_config(defaults, read_yaml(path) if path else {}, job)
    cfg = merge_config(cfg, {k: v for k, v in (overrides or {}).items() if v is not None}, job)
    return merge_config(cfg, parse_sets(sets), job)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (keys as in configs/*.yaml); flags override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key (value parsed as YAML); repeatable")


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------


def init_ray(address: str | None = None, num_cpus: float | None = None) -> bool:
    """Use the running Ray (already initialised, `address`, or RAY_ADDRESS from `ray job submit`), else
    start a local cluster. Returns True when this call started Ray, so the caller shuts it down."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=True)
    return True


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Temporary file in the same folder, fsync, rename: readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


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


def run_job_cli(job: str, args: argparse.Namespace, defaults: Mapping[str, Any],
                run: Callable[[dict[str, Any]], Any]) -> tuple[int, Any]:
    """The body every `jointgen <job>` shares: flags given -> config overrides -> run. Bad input exits
    with 2 and one line naming the problem (ShardError and CheckpointError are ValueErrors)."""
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "set", "json")}
    try:
        return 0, run(load_config(defaults, job, args.config, overrides, args.set))
    except (ValueError, FileNotFoundError) as e:
        print(f"jointgen {job}: error: {e}", file=sys.stderr)
        return 2, None
