"""The batch-generation pipeline on Ray Data, shared by `jointgen generate` and `jointgen evaluate`.

    prompts (JSONL / Parquet with a `prompt` or `messages` column, an optional `suffix` column for
    infilling, or N unconditional samples)
      -> Ray Data read (row numbers kept; a malformed row becomes an error row, never a crash)
      -> map_batches(GenerateActor, compute=ActorPoolStrategy(size=n))   each actor loads the models once
      -> Parquet part files written atomically by the actors (prompt id, text, tokens, settings, counters)

`run_sets` runs several sample sets (decoding settings, length, seed) over one prompt source in one
pipeline: that is how evaluation gets exact / marginal / joint samples with the same prompts and seeds.
Rerunning with the same output directory generates only the prompt ids that have no output yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_jobs.common import atomic_path, backbone_identity, backbone_path, parse_dtype, sha256_file
from sampler.settings import DecodeSettings

META_KEY = b"jointgen_generate"
OUTPUT_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),  # row number in the prompt source (0-based)
    pa.field("prompt", pa.string()),
    pa.field("suffix", pa.string()),  # infilling: the text after the generated span (text, tokens)
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
SOURCE_SCHEMA = pa.schema([
    pa.field("row", pa.int64()), pa.field("prompt_id", pa.string()), pa.field("prompt", pa.string()),
    pa.field("suffix", pa.string()), pa.field("messages", pa.string()), pa.field("meta", pa.string()),
    pa.field("error", pa.string()),
])
SUMMARY_SCHEMA = pa.schema([  # what an actor returns: one row per input row
    pa.field("set", pa.string()), pa.field("row", pa.int64()), pa.field("prompt_id", pa.string()),
    pa.field("error", pa.string()), pa.field("tokens", pa.int64()), pa.field("wall_s", pa.float64()),
])
PROMPT_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class SampleSet:
    """One set of samples: how tokens are chosen, how many, and the seed (a batch's seed is this seed
    plus the row number of its first prompt)."""

    settings: DecodeSettings
    gen_length: int
    seed: int = 0

    def record(self) -> dict[str, Any]:
        """The settings as written into part files and summaries."""
        s = self.settings
        out = {"mode": s.mode, "k": s.k, "gen_length": self.gen_length, "temperature": s.temperature,
               "top_p": s.top_p, "policy": s.policy, "block_length": s.block_length,
               "stop_at_eos": s.stop_at_eos, "seed": self.seed}
        # only when set: outputs written before these settings existed still match, and resume
        return out | s.model_dump(include={"threshold", "kv_cache"}, exclude_defaults=True)

    def key(self, backbone_identity: str, sampler_identity: str) -> dict[str, Any]:
        """What must match for a part file on disk to count as done."""
        return self.record() | {"backbone": backbone_identity,
                                "sampler": sampler_identity if self.settings.mode == "joint" else ""}


# ---------------------------------------------------------------------------------------------------
# Reading prompts: a Ray Data datasource that keeps row numbers and turns bad rows into error rows
# ---------------------------------------------------------------------------------------------------


def parse_record(rec: Any, row: int) -> dict:
    """One input record -> a source row; problems become an `error` string naming them."""
    out = {"row": row, "prompt_id": f"row-{row}", "prompt": None, "suffix": None, "messages": None,
           "meta": None, "error": None}
    if not isinstance(rec, dict):
        out["error"] = f"expected an object with a 'prompt' or 'messages' field, got {type(rec).__name__}"
        return out
    if rec.get("id") is not None:
        out["prompt_id"] = str(rec["id"])
    prompt, messages, suffix = rec.get("prompt"), rec.get("messages"), rec.get("suffix")
    if prompt is None and messages is None:
        out["error"] = "no 'prompt' or 'messages' field"
    elif prompt is not None and not isinstance(prompt, str):
        out["error"] = f"'prompt' must be a string, got {type(prompt).__name__}"
    elif suffix is not None and not isinstance(suffix, str):
        out["error"] = f"'suffix' must be a string, got {type(suffix).__name__}"
    elif suffix is not None and prompt is None:
        out["error"] = "'suffix' (infilling) goes with a 'prompt', not with 'messages'"
    elif prompt is not None:
        out["prompt"], out["suffix"] = prompt, suffix
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
    rest = {k: v for k, v in rec.items() if k not in ("prompt", "suffix", "messages", "id")}
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
    """A Ray Data datasource over one JSONL or Parquet prompt file (rows keep their numbers). The class
    is defined here so that importing this module does not import Ray Data."""
    from ray.data.datasource import FileBasedDatasource

    class PromptDatasource(FileBasedDatasource):
        _FILE_EXTENSIONS = ["jsonl", "json", "parquet"]

        def _read_stream(self, f, path: str):
            rows = []
            for row, rec, err in _records(f, path):
                r = parse_record(rec, row) if err is None else {
                    "row": row, "prompt_id": f"row-{row}", "prompt": None, "suffix": None, "messages": None,
                    "meta": None, "error": err}
                rows.append(r)
            yield pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)

    return PromptDatasource(str(path))


def check_prompt_file(prompts: str | Path) -> Path:
    p = Path(prompts)
    if not p.exists():
        raise FileNotFoundError(f"prompt file {p} does not exist")
    if p.is_dir() or p.suffix not in PROMPT_SUFFIXES:
        raise ValueError(f"{p}: prompts must be one .jsonl or .parquet file")
    return p


def read_source(prompts: str | Path | None, num_samples: int | None):
    """The prompt source as a Ray Dataset of SOURCE_SCHEMA rows."""
    import ray

    if prompts:
        return ray.data.read_datasource(make_prompt_datasource(check_prompt_file(prompts).resolve()))
    if not num_samples or num_samples < 1:
        raise ValueError("give a prompt file (prompts=...) or num_samples >= 1 for unconditional samples")
    return ray.data.range(num_samples).map_batches(_unconditional, batch_format="pyarrow")


def _unconditional(batch: pa.Table) -> pa.Table:
    ids = batch.column("id").to_pylist()
    n = len(ids)
    cols = {"row": ids, "prompt_id": [f"sample-{i}" for i in ids], "prompt": [""] * n, "suffix": [None] * n,
            "messages": [None] * n, "meta": [None] * n, "error": [None] * n}
    return pa.Table.from_pydict(cols, schema=SOURCE_SCHEMA)


# ---------------------------------------------------------------------------------------------------
# Outputs and resume
# ---------------------------------------------------------------------------------------------------


def set_dir(out_dir: Path, name: str) -> Path:
    return out_dir / name if name else out_dir


def scan_outputs(directory: Path, key: dict, log: Callable[[str], Any] = print,
                 stale: str = "error") -> set[str]:
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
    # promote: part files written before a column existed (e.g. `suffix`) read it as null
    table = pa.concat_tables([pq.read_table(f).replace_schema_metadata(None) for f in files],
                             promote_options="default")
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
    """One part file, written atomically and named by its prompt ids so a retried batch overwrites itself."""
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256("\n".join(sorted(r["prompt_id"] for r in rows)).encode()).hexdigest()[:16]
    path = directory / f"part-{min(r['row'] for r in rows):09d}-{digest}.parquet"
    schema = OUTPUT_SCHEMA.with_metadata({META_KEY: json.dumps({"settings": key}, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, compression="zstd")
    return path


def sampler_identity(sampler: str | Path | None) -> str:
    if not sampler:
        return ""
    p = Path(sampler) / "sampler.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"{sampler}: missing sampler.safetensors (not a sampler directory)")
    return sha256_file(p)[:16]


def check_sources(prompts: str | Path | None, sampler: str | Path | None, sets: Iterable[SampleSet]) -> None:
    """Cheap checks of the input paths before any Ray start: a bad one fails at once with its name."""
    if prompts:
        check_prompt_file(prompts)
    if any(s.settings.mode == "joint" for s in sets):
        if not sampler:
            raise ValueError("mode joint needs a sampler directory (sampler=..., from `jointgen train`)")
        sampler_identity(sampler)


# ---------------------------------------------------------------------------------------------------
# The Ray Data actor
# ---------------------------------------------------------------------------------------------------


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _str_or_none(v: Any) -> str | None:
    return None if v is None or _is_nan(v) else str(v)


class GenerateActor:
    """Ray Data actor: loads the backbone (and sampler) once, decodes prepared batches, writes part files
    and returns one SUMMARY_SCHEMA row per input row (written rows and error rows)."""

    def __init__(self, backbone: str | None, sampler: str | None, sets: dict[str, SampleSet], out_dir: str,
                 device: str = "auto", torch_threads: int | None = None, chat: bool = False,
                 dtype: str | None = None):
        import torch

        from sampler import JointSampler, load_backbone

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = load_backbone(backbone, device=device, dtype=parse_dtype(dtype))
        self.sampler = JointSampler.load(sampler, self.backbone) if sampler else None
        self.sampler_identity = sampler_identity(sampler)
        self.sets = sets
        self.out_dir = Path(out_dir)
        self.chat = chat
        self.warm_up()

    def warm_up(self) -> None:
        """One tiny decode per mode in use, so lazy initialisation never lands in a timed batch."""
        from sampler import encode_prompts, generate

        prompt = encode_prompts(self.backbone, n=2)
        for mode in sorted({s.settings.mode for s in self.sets.values()}):
            generate(self.backbone, prompt, sampler=self.sampler, mode=mode, k=2, gen_length=4, seed=0)

    def encode(self, prompt: str | None, messages: str | None) -> list[int]:
        """Token ids of one source row, through the library's one encoding path."""
        from sampler.decode import encode_chat, encode_prompts, encode_text

        if messages is not None:
            return encode_chat(self.backbone, json.loads(messages))
        if not prompt:
            return encode_prompts(self.backbone, n=1)[0]
        if self.chat:
            return encode_chat(self.backbone, [{"role": "user", "content": prompt}])
        return encode_text(self.backbone, prompt)

    def prepare(self, name: str, r: dict) -> tuple[tuple[list[int], list[int]] | None, str | None]:
        """((prompt token ids, suffix token ids), None), or (None, why this row cannot be generated)."""
        from sampler.decode import encode_text

        if r["error"] is not None and not _is_nan(r["error"]):
            return None, str(r["error"])
        try:
            ids = self.encode(_str_or_none(r["prompt"]), _str_or_none(r["messages"]))
        except Exception as e:  # a template or tokenizer failure is this row's problem only
            return None, f"cannot encode the prompt ({e})"
        suffix = _str_or_none(r.get("suffix"))  # infilling: no BOS, it continues the sequence after the span
        try:
            suffix_ids = encode_text(self.backbone, suffix, bos=False) if suffix else []
        except Exception as e:
            return None, f"cannot encode the suffix ({e})"
        gen_length, context = self.sets[name].gen_length, self.backbone.args.max_seq_len
        if len(ids) + len(suffix_ids) + gen_length > context:
            return None, (f"prompt of {len(ids)} tokens + gen_length {gen_length}"
                          + (f" + suffix of {len(suffix_ids)} tokens" if suffix_ids else "")
                          + f" exceeds the context of {context}")
        return (ids, suffix_ids), None

    def decode(self, name: str, items: list[tuple[dict, tuple[list[int], list[int]]]]) -> list[dict]:
        """Generate one batch of a set and write its part file; returns the output rows."""
        from sampler import generate

        s = self.sets[name]
        seed = s.seed + min(int(r["row"]) for r, _ in items)  # same rows -> same seed in any run
        res = generate(self.backbone, [ids for _, (ids, _) in items], s.settings, sampler=self.sampler,
                       gen_length=s.gen_length, seed=seed, suffixes=[sfx for _, (_, sfx) in items])
        batch_id = hashlib.sha256(",".join(str(r["prompt_id"]) for r, _ in items).encode()).hexdigest()[:12]
        record = s.record()
        rows = []
        for b, (r, _) in enumerate(items):
            messages, passes = _str_or_none(r["messages"]), res.row_full_passes[b]
            rows.append({
                "prompt_id": str(r["prompt_id"]), "row": int(r["row"]),
                "prompt": _str_or_none(r["prompt"]) if messages is None else messages,
                "suffix": _str_or_none(r.get("suffix")), "meta": _str_or_none(r["meta"]),
                "prompt_ids": res.prompt_ids[b], "text": res.text[b], "tokens": res.tokens[b],
                "order": res.order[b],
                **{c: record[c] for c in ("mode", "k", "gen_length", "temperature", "top_p", "policy")},
                "seed": seed, "full_passes": passes, "decoded_tokens": len(res.order[b]),
                "tokens_per_pass": len(res.order[b]) / passes if passes else 0.0,
                "batch_id": batch_id, "batch_size": len(items), "batch_full_passes": res.full_passes,
                "batch_sampler_passes": res.sampler_passes, "batch_wall_s": res.wall_s,
            })
        write_part(set_dir(self.out_dir, name), rows, s.key(self.backbone.identity, self.sampler_identity))
        return rows

    def __call__(self, batch: dict) -> pa.Table:
        summary: dict[str, list] = {name: [] for name in SUMMARY_SCHEMA.names}

        def report(name: str, r: dict, error: str | None, tokens: int = 0, wall: float = 0.0) -> None:
            for col, v in zip(SUMMARY_SCHEMA.names, (name, int(r["row"]), str(r["prompt_id"]), error, tokens,
                                                     wall), strict=True):
                summary[col].append(v)

        groups: dict[str, list[tuple[dict, tuple[list[int], list[int]]]]] = {}
        for name, chunk in zip(batch["set"], batch["rows"], strict=True):
            for r in json.loads(chunk):
                ids, error = self.prepare(str(name), r)
                if error is None:
                    groups.setdefault(str(name), []).append((r, ids))
                else:
                    report(str(name), r, error)
        for name, items in groups.items():
            for r in self.decode(name, items):
                report(name, r, None, r["decoded_tokens"], r["batch_wall_s"] / len(items))
        return pa.Table.from_pydict(summary, schema=SUMMARY_SCHEMA)


# ---------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------


def cut_batches(block: pa.Table, name: str, skip: set[str], batch_size: int, with_bad: bool) -> pa.Table:
    """A set's rows still to do, cut into generate() batches here rather than by Ray Data's bundling:
    every batch holds one set's consecutive rows, so its seed (the set's seed + first row) and its size
    are the same in every run and for every method. Bad rows (`with_bad`: reported once, by the first
    set) go in a chunk of their own. Rows are sorted first: Ray Data does not keep the source's order when
    it joins blocks, and a batch's rows (and so every row's random draws) must not depend on it."""
    rows = sorted(block.to_pylist(), key=lambda r: r["row"])
    todo = [r for r in rows if r["error"] is None and r["prompt_id"] not in skip]
    cut = [todo[a:a + batch_size] for a in range(0, len(todo), batch_size)]
    bad = [r for r in rows if r["error"] is not None]
    if bad and with_bad:
        cut.append(bad)
    return pa.table({"set": pa.array([name] * len(cut), pa.string()),
                     "rows": pa.array([json.dumps(c) for c in cut], pa.string())})


def collect(ds, sets: Mapping[str, SampleSet], expected: int, progress: bool) -> tuple[list[dict], dict]:
    """Drain the pipeline: (bad input rows, by row number; {set: new_rows, tokens, wall_s})."""
    from tqdm import tqdm

    errors: list[dict] = []
    per_set = {n: {"new_rows": 0, "tokens": 0, "wall_s": 0.0} for n in sets}
    t0 = time.perf_counter()
    bar = tqdm(total=expected, desc="generate", unit="row", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["row"])):
            if batch["error"][i] is not None:
                errors.append({"row": int(batch["row"][i]), "prompt_id": str(batch["prompt_id"][i]),
                               "error": str(batch["error"][i])})
            else:
                counts = per_set[str(batch["set"][i])]
                counts["new_rows"] += 1
                counts["tokens"] += int(batch["tokens"][i])
                counts["wall_s"] += float(batch["wall_s"][i])
        bar.update(len(batch["row"]))
        toks = sum(v["tokens"] for v in per_set.values())
        bar.set_postfix(tok_s=f"{toks / max(time.perf_counter() - t0, 1e-9):.0f}", errors=len(errors))
    bar.close()
    errors.sort(key=lambda e: e["row"])
    return errors, per_set


def run_sets(sets: dict[str, SampleSet], *, out_dir: str | Path, backbone: str | None = None,
             sampler: str | None = None, prompts: str | Path | None = None, num_samples: int | None = None,
             chat: bool = False, batch_size: int = 16, num_actors: int = 1, num_cpus_per_actor: float = 0.5,
             num_gpus_per_actor: float = 0, torch_threads: int | None = None, progress: bool = True,
             dtype: str | None = None, stale: str = "error", log: Callable[[str], Any] = print) -> dict:
    """Generate every set (name -> SampleSet) over the prompt source into out_dir/<name>/ (name "" =
    out_dir itself), skipping prompt ids already there (`stale`: see `scan_outputs`). Returns counts,
    errors and speed per set. Ray must be running."""
    import ray

    out_dir = Path(out_dir)
    if progress:  # our own bar counts rows and tokens/s; Ray Data's per-operator log lines are noise here
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    check_sources(None, sampler, sets.values())
    # what part files record, without loading the weights on the driver; a bad checkpoint fails here
    identity, sampler_id = backbone_identity(backbone_path(backbone))[1], sampler_identity(sampler)
    done = {name: scan_outputs(set_dir(out_dir, name), s.key(identity, sampler_id), log, stale)
            for name, s in sets.items()}

    # small (prompts only): read once for every set, in one block so a set is cut into batches in one place
    source = read_source(prompts, num_samples).repartition(1).materialize()
    total_rows = source.count()
    first = next(iter(sets))
    batches = [source.map_batches(cut_batches, batch_format="pyarrow", batch_size=None,
                                  fn_kwargs={"name": name, "skip": done[name], "batch_size": batch_size,
                                             "with_bad": name == first}) for name in sets]
    ds = batches[0].union(*batches[1:]) if len(batches) > 1 else batches[0]
    ds = ds.map_batches(
        GenerateActor, batch_format="numpy", batch_size=1,  # one row = one prepared batch of one set
        fn_constructor_kwargs={"backbone": None if backbone is None else str(backbone),
                               "sampler": None if sampler is None else str(sampler), "sets": sets,
                               "out_dir": str(out_dir), "device": "cuda" if num_gpus_per_actor else "cpu",
                               "torch_threads": torch_threads, "chat": chat, "dtype": dtype},
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=num_cpus_per_actor,
        **({"num_gpus": num_gpus_per_actor} if num_gpus_per_actor else {}),
    )
    already = sum(len(done[n]) for n in sets)
    expected = max(total_rows * len(sets) - already, 0)
    log(f"generate: {len(sets)} set(s) x {total_rows} prompts -> {out_dir} ({already} rows already done, "
        f"{expected} to go)")
    t0 = time.perf_counter()
    errors, per_set = collect(ds, sets, expected, progress)
    report_errors(errors, out_dir, prompts, log)
    result: dict[str, Any] = {"out_dir": str(out_dir), "prompts": total_rows, "errors": errors, "sets": {}}
    for name, s in sets.items():
        d = set_dir(out_dir, name)
        rows = read_outputs(d).num_rows if any(d.glob("part-*.parquet")) else 0
        result["sets"][name] = {"settings": s.record(), "rows": rows, **per_set[name]}
    result["wall_s"] = time.perf_counter() - t0
    return result


def report_errors(errors: list[dict], out_dir: Path, prompts: str | Path | None, log: Callable) -> None:
    """Log every bad input row and list them in out_dir/errors.jsonl."""
    src = Path(prompts).name if prompts else "unconditional"
    for e in errors:
        log(f"skipped {src} row {e['row']} ({e['prompt_id']}): {e['error']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if errors:
        with open(out_dir / "errors.jsonl", "w") as fh:
            for e in errors:
                fh.write(json.dumps(e) + "\n")
