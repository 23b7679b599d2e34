"""Batch offline generation with Ray Data (`jointgen generate`): one sample set over a prompt file (or N
unconditional samples), through the pipeline of `ray_jobs.pipeline`.

    jointgen generate --prompts sampler/assets/prompts/tasks.jsonl --sampler runs/train/sampler \
        --mode joint --k 4

A `suffix` column in the prompt file asks for infilling: prompt, `gen_length` generated tokens, suffix
(the output's text and tokens are the generated span; the suffix is kept in its own column).

Writes Parquet part files (prompt id, text, tokens, settings, counters), `errors.jsonl` (bad input rows,
by row number) and `summary.json` under `out`. Rerunning with the same `out` generates only the prompt ids
that have no output yet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ray_jobs.common import ray_session, write_json_atomic
from ray_jobs.config import GenerateConfig, add_config_args, run_cli, validate
from ray_jobs.pipeline import SampleSet, check_sources, run_sets
from sampler.settings import MODES


def run_generate(config: GenerateConfig | dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate the configured set into `out`; returns the summary (also `out/summary.json`)."""
    cfg = validate(GenerateConfig, config)
    sample_set = SampleSet(cfg.decode, cfg.gen_length, cfg.seed)
    check_sources(cfg.prompts, cfg.sampler, [sample_set])  # before Ray starts
    with ray_session(cfg.ray_address, cfg.ray_num_cpus):
        res = run_sets({"": sample_set}, out_dir=cfg.out, backbone=cfg.backbone, sampler=cfg.sampler,
                       prompts=cfg.prompts, num_samples=cfg.num_samples, chat=cfg.chat,
                       batch_size=cfg.batch_size, num_actors=cfg.actors,
                       num_cpus_per_actor=cfg.cpus_per_actor,
                       num_gpus_per_actor=cfg.gpus_per_actor, torch_threads=cfg.torch_threads,
                       progress=cfg.progress, dtype=cfg.dtype)
    out = res["sets"][""]
    summary = {"out_dir": res["out_dir"], "rows": out["rows"], "new_rows": out["new_rows"],
               "errors": res["errors"], "settings": out["settings"],
               "tokens_per_s": out["tokens"] / out["wall_s"] if out["wall_s"] else None}
    write_json_atomic(Path(res["out_dir"]) / "summary.json", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jointgen generate", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--prompts", help="JSONL or Parquet file with a 'prompt' or 'messages' column "
                                     "(and an optional 'suffix' column: infilling)")
    p.add_argument("--num-samples", type=int, help="unconditional samples when no prompt file is given")
    p.add_argument("--out", "-o", help="output directory (rerun with the same one to resume)")
    p.add_argument("--backbone", help="backbone checkpoint dir or hub id owner/name[@revision] "
                   "(default: the embedded backbone)")
    p.add_argument("--sampler", help="joint sampler dir (needed for --mode joint)")
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--k", type=int, help="tokens per full pass")
    p.add_argument("--gen-length", type=int)
    p.add_argument("--actors", type=int, help="generator actors (one per GPU on a cluster)")
    p.add_argument("--gpus-per-actor", type=float)
    p.add_argument("--address", dest="ray_address",
                   help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    return p


def show(res: dict[str, Any]) -> None:
    print(f"{res['rows']} rows in {res['out_dir']} ({res['new_rows']} new, "
          f"{len(res['errors'])} bad input rows skipped); tokens/s {res['tokens_per_s'] or 0:.1f}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(GenerateConfig, build_parser().parse_args(argv), run_generate, show)


if __name__ == "__main__":
    sys.exit(main())
