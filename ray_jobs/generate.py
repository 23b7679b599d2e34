"""Batch offline generation with Ray Data (`jointgen generate`).

    prompts (JSONL / Parquet with a `prompt` or `messages` column, or N unconditional samples)
      -> Ray Data read (row numbers kept; a malformed row becomes an error row, never a crash)
      -> map_batches(Generator, compute=ActorPoolStrategy(size=n))   each actor loads backbone + sampler once
      -> Parquet part files written atomically by the actors (prompt id, text, tokens, settings, counters)

Rerunning with the same output directory generates only the prompt ids that have no output yet. The
same machinery runs several decoding settings ("sets") over one prompt source in one pipeline, which is
how `jointgen evaluate` produces exact / marginal / joint samples with the same prompts and seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_jobs.common import add_config_args, init_ray, merge_config, run_job_cli, write_json_atomic

META_KEY = b"jointgen_generate"
OUTPUT_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),  # row number in the prompt source (0-based)
    pa.field("prompt", pa.string()),
    pa.field("meta", pa.string()),  # the input row's other fields, JSON (task examples keep their data)
    pa.field("prompt_ids", pa.list_(pa.int32())),
    pa.field("text", pa.string()),
    pa.field("tokens", pa.list_(pa.int32())),
    pa.field("order", pa.list_(pa.int32())),
    pa.field("mode", pa.string()),
    pa.field("k", pa.int32()),
    pa.field("gen_length", pa.int32()),
    pa.field("temperature", pa.float64()),
    pa.field("top_p", pa.float64()),
    pa.field("policy", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("full_passes", pa.int32()),  # full passes in which this row decoded a token
    pa.field("decoded_tokens", pa.int32()),
    pa.field("tokens_per_pass", pa.float64()),
    pa.field("batch_id", pa.string()),
    pa.field("batch_size", pa.int32()),
    pa.field("batch_full_passes", pa.int32()),
    pa.field("batch_sampler_passes", pa.int32()),
    pa.field("batch_wall_s", pa.float64()),
])


# Defaults (configs/generate.yaml mirrors them, with comments)
DEFAULTS: dict[str, Any] = {
    "backbone": None, "dtype": None, "sampler": None, "prompts": None, "num_samples": 64, "chat": False,
    "out": "runs/generate",
    "mode": "joint", "k": 4, "gen_length": 48, "temperature": 1.0, "top_p": 1.0, "policy": "entropy",
    "block_length": None, "stop_at_eos": True, "seed": 0,
    "ray_address": None, "ray_num_cpus": None, "batch_size": 16, "actors": 1, "cpus_per_actor": 0.5,
    "gpus_per_actor": 0, "torch_threads": None, "progress": True,
}


# ---------------------------------------------------------------------------------------------------
# Decoding settings
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    mode: str = "joint"
    k: int = 4
    gen_length: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    policy: str = "entropy"
    block_length: int | None = None
    stop_at_eos: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: dict) -> Settings:
        s = cls(**{f: cfg[f] for f in cls.__dataclass_fields__ if f in cfg})
        if s.mode == "exact":
            s = cls(**{**asdict(s), "k": 1})
        return s


def settings_key(s: Settings, backbone_identity: str, sampler_identity: str) -> dict:
    return {**asdict(s), "backbone": backbone_identity, "sampler": sampler_identity if s.mode == "joint"
            else ""}


# ---------------------------------------------------------------------------------------------------
# Reading prompts: a Ray Data datasource that keeps row numbers and turns bad rows into error rows
# ---------------------------------------------------------------------------------------------------

SOURCE_SCHEMA = pa.schema([
    pa.field("row", pa.int64()), pa.field("prompt_id", pa.string()), pa.field("prompt", pa.string()),
    pa.field("messages", pa.string()), pa.field("meta", pa.string()), pa.field("error", pa.string()),
])


def parse_record(rec: Any, row: int) -> dict:
    """One input record -> a source row; problems become an `error` string naming them."""
    out = {"row": row, "prompt_id": f"row-{row}", "prompt": None, "messages": None, "meta": None,
           "error": None}
    if not isinstance(rec, dict):
        out["error"] = f"expected an object with a 'prompt' or 'messages' field, got {type(rec).__name__}"
        return out
    if rec.get("id") is not None:
        out["prompt_id"] = str(rec["id"])
    prompt, messages = rec.get("prompt"), rec.get("messages")
    if prompt is None and messages is None:
        out["error"] = "no 'prompt' or 'messages' field"
    elif prompt is not None and not isinstance(prompt, str):
        out["error"] = f"'prompt' must be a string, got {type(prompt).__name__}"
    elif prompt is not None:
        out["prompt"] = prompt
    else:
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                messages = None
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m
                           for m in messages)):
            out["error"] = "'messages' must be a non-empty list of {role, content} objects"
        else:
            out["messages"] = json.dumps(messages)
    rest = {k: v for k, v in rec.items() if k not in ("prompt", "messages", "id")}
    try:
        out["meta"] = json.dumps(rest, default=str) if rest else None
    except (TypeError, ValueError):
        out["meta"] = None
    return out


def _records(f, path: str) -> Iterator[tuple[int, Any, str | None]]:
    """(row, record, parse error) for every row of a JSONL or Parquet file."""
    if path.endswith(".parquet"):
        pf = pq.ParquetFile(pa.BufferReader(f.readall()))  # the stream is not seekable
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                yield row, rec, None
                row += 1
        return
    for row, line in enumerate(f.readall().decode("utf-8", errors="replace").splitlines()):
        if not line.strip():
            yield row, None, "empty line"
            continue
        try:
            yield row, json.loads(line), None
        except json.JSONDecodeError as e:
            yield row, None, f"not valid JSON ({e.msg} at column {e.colno})"


def make_prompt_datasource(path: str | Path):
    """A Ray Data datasource over one JSONL or Parquet prompt file (rows keep their numbers)."""
    from ray.data.datasource import FileBasedDatasource

    class PromptDatasource(FileBasedDatasource):
        _FILE_EXTENSIONS = ["jsonl", "json", "parquet"]

        def _read_stream(self, f, path: str):
            rows = []
            for row, rec, err in _records(f, path):
                r = parse_record(rec, row) if err is None else {
                    "row": row, "prompt_id": f"row-{row}", "prompt": None, "messages": None, "meta": None,
                    "error": err}
                rows.append(r)
            yield pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)

    return PromptDatasource(str(path))


def read_source(prompts: str | Path | None, num_samples: int | None):
    """The prompt source as a Ray Dataset of SOURCE_SCHEMA rows."""
    import ray

    if prompts:
        p = Path(prompts)
        if not p.exists():
            raise FileNotFoundError(f"prompt file {p} does not exist")
        if p.is_dir() or p.suffix not in (".jsonl", ".json", ".parquet"):
            raise ValueError(f"{p}: prompts must be one .jsonl or .parquet file")
        return ray.data.read_datasource(make_prompt_datasource(p.resolve()))
    if not num_samples or num_samples < 1:
        raise ValueError("give a prompt file (prompts=...) or num_samples >= 1 for unconditional samples")

    def unconditional(batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        n = len(ids)
        cols = {"row": ids, "prompt_id": [f"sample-{i}" for i in ids], "prompt": [""] * n,
                "messages": [None] * n, "meta": [None] * n, "error": [None] * n}
        return pa.Table.from_pydict(cols, schema=SOURCE_SCHEMA)

    return ray.data.range(num_samples).map_batches(unconditional, batch_format="pyarrow")


# ---------------------------------------------------------------------------------------------------
# Outputs and resume
# ---------------------------------------------------------------------------------------------------


def set_dir(out_dir: Path, name: str) -> Path:
    return out_dir / name if name else out_dir


def scan_outputs(directory: Path, key: dict, log=print, stale: str = "error") -> set[str]:
    """Prompt ids already generated in `directory` with the same settings. A damaged part file is moved
    aside (`*.corrupt`) and reported, so its prompts are generated again; a file written with other
    settings is an error (use another output directory), or with stale="move" (a job that owns the
    directory, such as evaluation after the sampler was trained further) the whole directory is moved
    aside to `<name>.stale-N` and reported, and everything is generated again."""
    done: set[str] = set()
    if not directory.exists():
        return done
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)  # a write interrupted before its rename
    for f in sorted(directory.glob("part-*.parquet")):
        try:
            schema = pq.read_schema(f)
            meta = json.loads((schema.metadata or {}).get(META_KEY, b"{}"))
            ids = pq.read_table(f, columns=["prompt_id"]).column("prompt_id").to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            bad = f.with_suffix(".parquet.corrupt")
            os.replace(f, bad)
            log(f"warning: {f} is unreadable ({e}); moved to {bad.name}, its prompts will be redone")
            continue
        if meta.get("settings") != key:
            if stale == "move":
                n = 1
                while directory.with_name(f"{directory.name}.stale-{n}").exists():
                    n += 1
                aside = directory.with_name(f"{directory.name}.stale-{n}")
                os.replace(directory, aside)
                log(f"warning: {directory} holds outputs of other settings ({meta.get('settings')}); "
                    f"moved to {aside.name}, generating again")
                return set()
            raise ValueError(f"{f}: written with other settings ({meta.get('settings')}); this run uses "
                             f"{key}. Use a new output directory.")
        done.update(ids)
    return done


def read_outputs(directory: str | Path) -> pa.Table:
    """All generated rows of one output directory (one per prompt id), sorted by row number."""
    directory = Path(directory)
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{directory}: no part-*.parquet outputs")
    table = pa.concat_tables([pq.read_table(f).replace_schema_metadata(None) for f in files])
    ids = table.column("prompt_id").to_pylist()
    seen: set[str] = set()
    keep = []
    for i, pid in enumerate(ids):  # a retried batch may have rewritten a prompt: keep one copy
        if pid not in seen:
            seen.add(pid)
            keep.append(i)
    table = table.take(keep)
    return table.take(pc.sort_indices(table, [("row", "ascending")]))


def write_part(directory: Path, rows: list[dict], key: dict) -> Path:
    """Atomic part file (temp + rename), named by its prompt ids so a retried batch overwrites itself."""
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256("\n".join(sorted(r["prompt_id"] for r in rows)).encode()).hexdigest()[:16]
    path = directory / f"part-{min(r['row'] for r in rows):09d}-{digest}.parquet"
    schema = OUTPUT_SCHEMA.with_metadata({META_KEY: json.dumps({"settings": key}, sort_keys=True).encode()})
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, compression="zstd")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------
# The generator actor
# ---------------------------------------------------------------------------------------------------


class Generator:
    """Ray Data actor: loads the backbone (and sampler) once, decodes batches, writes part files and
    returns one summary row per input row (written rows and error rows)."""

    def __init__(self, backbone: str | None, sampler: str | None, sets: dict[str, dict], out_dir: str,
                 device: str = "auto", torch_threads: int | None = None, chat: bool = False,
                 dtype: str | None = None):
        import torch

        from sampler import JointSampler, load_backbone

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype or "")
        self.backbone = load_backbone(backbone, device=device, dtype=dt)
        self.sampler = JointSampler.load(sampler, self.backbone) if sampler else None
        self.sampler_identity = _sampler_identity(sampler)
        self.sets = {name: Settings(**s) for name, s in sets.items()}
        self.out_dir = Path(out_dir)
        self.chat = chat
        self.warm_up()

    def warm_up(self) -> None:
        """One tiny decode per mode in use, so lazy initialisation never lands in a timed batch."""
        from sampler import encode_prompts, generate

        prompt = encode_prompts(self.backbone, n=2)
        for mode in sorted({s.mode for s in self.sets.values()}):
            generate(self.backbone, prompt, sampler=self.sampler, mode=mode, k=2, gen_length=4, seed=0)

    def encode(self, prompt: str | None, messages: str | None) -> list[int]:
        from sampler import encode_prompts

        if messages is None and prompt and self.chat:
            messages = json.dumps([{"role": "user", "content": prompt}])
        if messages is not None:
            ids = self.backbone.tokenizer.apply_chat_template(json.loads(messages),
                                                              add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)  # BatchEncoding in v5
        if not prompt:
            return encode_prompts(self.backbone, n=1)[0]
        return encode_prompts(self.backbone, [prompt])[0]

    def __call__(self, batch: dict) -> pa.Table:
        from sampler import generate

        rows, names = [], []
        for name, chunk in zip(batch["set"], batch["rows"], strict=True):
            for r in json.loads(chunk):
                rows.append(r)
                names.append(str(name))
        n = len(rows)
        cols = {c: [r[c] for r in rows] for c in ("row", "prompt_id", "prompt", "messages", "meta", "error")}
        cols["set"] = names
        summary: dict[str, list] = {"set": [], "row": [], "prompt_id": [], "error": [], "tokens": [],
                                    "wall_s": []}

        def report(i: int, error: str | None, tokens: int = 0, wall: float = 0.0) -> None:
            summary["set"].append(str(cols["set"][i]))
            summary["row"].append(int(cols["row"][i]))
            summary["prompt_id"].append(str(cols["prompt_id"][i]))
            summary["error"].append(error)
            summary["tokens"].append(tokens)
            summary["wall_s"].append(wall)

        groups: dict[str, list[tuple[int, list[int]]]] = {}
        for i in range(n):
            if cols["error"][i] is not None and not _is_nan(cols["error"][i]):
                report(i, str(cols["error"][i]))
                continue
            s = self.sets[str(cols["set"][i])]
            try:
                ids = self.encode(_str_or_none(cols["prompt"][i]), _str_or_none(cols["messages"][i]))
            except Exception as e:  # a template or tokenizer failure is this row's problem only
                report(i, f"cannot encode the prompt ({e})")
                continue
            if len(ids) + s.gen_length > self.backbone.args.max_seq_len:
                report(i, f"prompt of {len(ids)} tokens + gen_length {s.gen_length} exceeds the context "
                          f"of {self.backbone.args.max_seq_len}")
                continue
            groups.setdefault(str(cols["set"][i]), []).append((i, ids))

        for name, items in groups.items():
            s = self.sets[name]
            seed = s.seed + min(int(cols["row"][i]) for i, _ in items)  # same rows -> same seed in any run
            res = generate(self.backbone, [ids for _, ids in items], sampler=self.sampler, mode=s.mode, k=s.k,
                           gen_length=s.gen_length, temperature=s.temperature, top_p=s.top_p,
                           policy=s.policy, block_length=s.block_length, stop_at_eos=s.stop_at_eos,
                           seed=seed)
            key = settings_key(s, self.backbone.identity, self.sampler_identity)
            batch_id = hashlib.sha256(",".join(str(cols["prompt_id"][i]) for i, _ in items).encode()
                                      ).hexdigest()[:12]
            rows = []
            for b, (i, _) in enumerate(items):
                rp = res.row_full_passes[b]
                rows.append({
                    "prompt_id": str(cols["prompt_id"][i]), "row": int(cols["row"][i]),
                    "prompt": _str_or_none(cols["prompt"][i]) if cols["messages"][i] is None
                    or _is_nan(cols["messages"][i]) else str(cols["messages"][i]),
                    "meta": _str_or_none(cols["meta"][i]), "prompt_ids": res.prompt_ids[b],
                    "text": res.text[b], "tokens": res.tokens[b], "order": res.order[b],
                    "mode": s.mode, "k": s.k, "gen_length": s.gen_length, "temperature": s.temperature,
                    "top_p": s.top_p, "policy": s.policy, "seed": seed, "full_passes": rp,
                    "decoded_tokens": len(res.order[b]),
                    "tokens_per_pass": len(res.order[b]) / rp if rp else 0.0,
                    "batch_id": batch_id, "batch_size": len(items), "batch_full_passes": res.full_passes,
                    "batch_sampler_passes": res.sampler_passes, "batch_wall_s": res.wall_s,
                })
            write_part(set_dir(self.out_dir, name), rows, key)
            for b, (i, _) in enumerate(items):
                report(i, None, len(res.order[b]), res.wall_s / len(items))
        return pa.Table.from_pydict(summary, schema=SUMMARY_SCHEMA)


SUMMARY_SCHEMA = pa.schema([
    pa.field("set", pa.string()), pa.field("row", pa.int64()), pa.field("prompt_id", pa.string()),
    pa.field("error", pa.string()), pa.field("tokens", pa.int64()), pa.field("wall_s", pa.float64()),
])


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _str_or_none(v: Any) -> str | None:
    return None if v is None or _is_nan(v) else str(v)


def _sampler_identity(sampler: str | None) -> str:
    if not sampler:
        return ""
    p = Path(sampler) / "sampler.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"{sampler}: missing sampler.safetensors (not a sampler directory)")
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------


def run_sets(sets: dict[str, Settings], *, out_dir: str | Path, backbone: str | None = None,
             sampler: str | None = None, prompts: str | Path | None = None, num_samples: int | None = None,
             chat: bool = False, batch_size: int = 16, num_actors: int = 1, num_cpus_per_actor: float = 0.5,
             num_gpus_per_actor: float = 0, torch_threads: int | None = None, progress: bool = True,
             dtype: str | None = None, stale: str = "error", log=print) -> dict:
    """Generate every set (name -> settings) over the prompt source into out_dir/<name>/ (name "" =
    out_dir itself), skipping prompt ids already there (`stale`: see `scan_outputs`). Returns counts,
    errors and speed per set."""
    import ray
    from tqdm import tqdm

    from ray_jobs.teacher import backbone_identity, backbone_path

    out_dir = Path(out_dir)
    if progress:  # our own bar counts rows and tokens/s; Ray Data's per-operator log lines are noise here
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if any(s.mode == "joint" for s in sets.values()) and not sampler:
        raise ValueError("a joint set needs a sampler directory (sampler=...)")
    # what part files record, without loading the weights on the driver; a bad checkpoint fails here
    identity = backbone_identity(backbone_path(backbone))[1]
    sampler_identity = _sampler_identity(sampler)
    done = {name: scan_outputs(set_dir(out_dir, name), settings_key(s, identity, sampler_identity), log,
                               stale) for name, s in sets.items()}

    # small (prompts only): read once for every set, in one block so a set is cut into batches in one place
    source = read_source(prompts, num_samples).repartition(1).materialize()
    total_rows = source.count()
    first = next(iter(sets))

    def for_set(name: str):
        skip = done[name]

        def chunks(block: pa.Table) -> pa.Table:
            """The set's rows still to do, cut into generate() batches here rather than by Ray Data's
            bundling: every batch holds one set's consecutive rows, so its seed (settings seed + first row)
            and its size are the same in every run and for every method."""
            todo = [r for r in block.to_pylist() if r["error"] is None and r["prompt_id"] not in skip]
            cut = [todo[a:a + batch_size] for a in range(0, len(todo), batch_size)]
            bad = [r for r in block.to_pylist() if r["error"] is not None]
            if bad and name == first:  # bad rows are reported once, in a chunk of their own
                cut.append(bad)
            return pa.table({"set": pa.array([name] * len(cut), pa.string()),
                             "rows": pa.array([json.dumps(c) for c in cut], pa.string())})

        return source.map_batches(chunks, batch_format="pyarrow", batch_size=None)

    already = sum(len(done[n]) for n in sets)
    datasets = [for_set(name) for name in sets]
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    ds = ds.map_batches(
        Generator, batch_format="numpy", batch_size=1,  # one row = one prepared batch of one set
        fn_constructor_kwargs={"backbone": None if backbone is None else str(backbone),
                               "sampler": None if sampler is None else str(sampler),
                               "sets": {n: asdict(s) for n, s in sets.items()}, "out_dir": str(out_dir),
                               "device": "cuda" if num_gpus_per_actor else "cpu",
                               "torch_threads": torch_threads, "chat": chat, "dtype": dtype},
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=num_cpus_per_actor,
        **({"num_gpus": num_gpus_per_actor} if num_gpus_per_actor else {}),
    )
    expected = total_rows * len(sets) - already
    log(f"generate: {len(sets)} set(s) x {total_rows} prompts -> {out_dir} ({already} rows already done, "
        f"{max(expected, 0)} to go)")
    errors: list[dict] = []
    per_set = {n: {"new_rows": 0, "tokens": 0, "wall_s": 0.0} for n in sets}
    t0 = time.perf_counter()
    bar = tqdm(total=max(expected, 0), desc="generate", unit="row", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["row"])):
            name = str(batch["set"][i])
            if batch["error"][i] is not None:
                errors.append({"row": int(batch["row"][i]), "prompt_id": str(batch["prompt_id"][i]),
                               "error": str(batch["error"][i])})
            else:
                per_set[name]["new_rows"] += 1
                per_set[name]["tokens"] += int(batch["tokens"][i])
                per_set[name]["wall_s"] += float(batch["wall_s"][i])
        bar.update(len(batch["row"]))
        toks = sum(v["tokens"] for v in per_set.values())
        bar.set_postfix(tok_s=f"{toks / max(time.perf_counter() - t0, 1e-9):.0f}", errors=len(errors))
    bar.close()
    errors.sort(key=lambda e: e["row"])
    src = Path(prompts).name if prompts else "unconditional"
    for e in errors:
        log(f"skipped {src} row {e['row']} ({e['prompt_id']}): {e['error']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if errors:
        with open(out_dir / "errors.jsonl", "w") as fh:
            for e in errors:
                fh.write(json.dumps(e) + "\n")
    result = {"out_dir": str(out_dir), "prompts": total_rows, "errors": errors, "sets": {}}
    for name, s in sets.items():
        d = set_dir(out_dir, name)
        rows = read_outputs(d).num_rows if any(d.glob("part-*.parquet")) else 0
        result["sets"][name] = {"settings": asdict(s), "rows": rows, **per_set[name]}
    result["wall_s"] = time.perf_counter() - t0
    return result


def check_inputs(prompts: str | Path | None, num_samples: int | None, sampler: str | Path | None,
                 settings: list[Settings], dtype: str | None = None) -> None:
    """Cheap checks before any Ray start: a bad path or setting fails at once with its name."""
    if prompts:
        p = Path(prompts)
        if not p.exists():
            raise FileNotFoundError(f"prompt file {p} does not exist")
        if p.is_dir() or p.suffix not in (".jsonl", ".json", ".parquet"):
            raise ValueError(f"{p}: prompts must be one .jsonl or .parquet file")
    elif not num_samples or num_samples < 1:
        raise ValueError("give a prompt file (prompts=...) or num_samples >= 1 for unconditional samples")
    if any(s.mode == "joint" for s in settings):
        if not sampler:
            raise ValueError("mode joint needs a sampler directory (sampler=..., from `jointgen train`)")
        _sampler_identity(str(sampler))
    check_settings(settings, dtype)


def check_settings(settings: list[Settings], dtype: str | None = None) -> None:
    """The decoding settings' values (no file is touched)."""
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be null, float32, bfloat16 or float16, got {dtype!r}")
    for s in settings:
        if s.mode not in ("exact", "marginal", "joint"):
            raise ValueError(f"mode must be exact, marginal or joint, got {s.mode!r}")
        if not isinstance(s.k, int) or s.k < 1 or not isinstance(s.gen_length, int) or s.gen_length < 1:
            raise ValueError(f"k and gen_length must be integers >= 1, got k={s.k!r}, "
                             f"gen_length={s.gen_length!r}")


def run_generate(config: dict | None = None) -> dict:
    """`jointgen generate` with a config dict (keys and defaults: DEFAULTS / configs/generate.yaml)."""
    cfg = merge_config(DEFAULTS, config, "generate")
    check_inputs(cfg["prompts"], cfg["num_samples"], cfg["sampler"], [Settings.from_config(cfg)],
                 cfg["dtype"])
    started = init_ray(cfg["ray_address"], cfg["ray_num_cpus"])
    try:
        settings = Settings.from_config(cfg)
        res = run_sets({"": settings}, out_dir=cfg["out"], backbone=cfg["backbone"], sampler=cfg["sampler"],
                       prompts=cfg["prompts"], num_samples=cfg["num_samples"], chat=bool(cfg["chat"]),
                       batch_size=int(cfg["batch_size"]), num_actors=int(cfg["actors"]),
                       num_cpus_per_actor=float(cfg["cpus_per_actor"]),
                       num_gpus_per_actor=float(cfg["gpus_per_actor"] or 0),
                       torch_threads=cfg["torch_threads"], progress=bool(cfg["progress"]), dtype=cfg["dtype"])
    finally:
        if started:
            import ray

            ray.shutdown()
    out = res["sets"][""]
    summary = {"out_dir": res["out_dir"], "rows": out["rows"], "new_rows": out["new_rows"],
               "errors": res["errors"], "settings": out["settings"],
               "tokens_per_s": out["tokens"] / out["wall_s"] if out["wall_s"] else None}
    write_json_atomic(Path(res["out_dir"]) / "summary.json", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jointgen generate", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--prompts", help="JSONL or Parquet file with a 'prompt' or 'messages' column")
    p.add_argument("--num-samples", type=int, help="unconditional samples when no prompt file is given")
    p.add_argument("--out", "-o", help="output directory (rerun with the same one to resume)")
    p.add_argument("--backbone", help="backbone checkpoint dir (default: the embedded backbone)")
    p.add_argument("--sampler", help="joint sampler dir (needed for --mode joint)")
    p.add_argument("--mode", choices=["exact", "marginal", "joint"])
    p.add_argument("--k", type=int, help="tokens per full pass")
    p.add_argument("--gen-length", type=int)
    p.add_argument("--actors", type=int, help="generator actors (one per GPU on a cluster)")
    p.add_argument("--gpus-per-actor", type=float)
    p.add_argument("--address", dest="ray_address",
                   help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    return p


def main(argv: list[str] | None = None) -> int:
    code, res = run_job_cli("generate", build_parser().parse_args(argv), DEFAULTS, run_generate)
    if code == 0:
        print(f"{res['rows']} rows in {res['out_dir']} ({res['new_rows']} new, "
              f"{len(res['errors'])} bad input rows skipped); tokens/s {res['tokens_per_s'] or 0:.1f}")
    return code
