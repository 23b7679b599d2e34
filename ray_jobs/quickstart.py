"""`jointgen quickstart`: the whole method on the embedded backbone, one command, no network.

    teacher trajectories (exact decoding on Ray actors)  ->  sampler training (Ray Train)
      ->  evaluation at k = 1, 2, 4, 8 (Ray Data generation + scoring actors)  ->  table + plots

Every artefact lands under one output directory (`out`, default runs/quickstart):
teacher/ (shards + manifest), train/ (checkpoints, metrics.jsonl, sampler/), evaluate/ (samples, report.md,
results.json, PNG plots), and at the top report.md (the evaluation report with each stage's time) and
quickstart.json. Rerunning with the same `out` resumes every stage. `--quick` runs each stage small
(a few minutes); the default aims at about 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ray_jobs.common import add_config_args, init_ray, merge_config, parse_sets, read_yaml, write_json_atomic

DEFAULTS: dict[str, Any] = {
    "out": "runs/quickstart",
    "backbone": None,  # null = the embedded backbone (the judge and task prompts come with it)
    "gen_length": 32,  # tokens per language sample, teacher and evaluation alike
    "seed": 0,
    "teacher_task_share": 0.4,  # share of teacher trajectories answering task prompts (rest: unconditional)
    "task_gen_length": 16,  # tokens per task answer (teacher and evaluation): answers end well before it
    "teacher": {  # overrides of ray_jobs.teacher.DEFAULTS
        "num_trajectories": 2400, "batch_size": 100, "chunk_size": 200,
    },
    "train": {  # overrides of ray_jobs.train.DEFAULTS
        "steps": 3000, "batch_size": 32, "lr": 1.0e-3, "warmup_steps": 50, "k_max": 7,
        "bf16": True,  # autocast: 2.1x the windows/s of float32 on a CPU with bf16 units (avx512_bf16)
        "val_every": 150, "checkpoint_every": 150, "val_windows_per_depth": 64,
    },
    "evaluate": {  # overrides of ray_jobs.evaluate.DEFAULTS
        "ks": [1, 2, 4, 8], "num_samples": 2000, "task_prompts": 300, "batch_size": 100,
    },
    "ray_address": None,  # null = RAY_ADDRESS or a local cluster
    "ray_num_cpus": None,
    "progress": True,
}

# `--quick`: every stage, small (a few minutes on 2 cores)
QUICK: dict[str, Any] = {
    "out": "runs/quickstart-quick",
    "teacher": {"num_trajectories": 320, "batch_size": 80, "chunk_size": 80},
    "train": {"steps": 120, "val_every": 60, "checkpoint_every": 60, "val_windows_per_depth": 32},
    "evaluate": {"num_samples": 100, "task_prompts": 60, "batch_size": 50, "mauve_seeds": [1, 2]},
}


def teacher_prompts(out: Path, n: int, task_share: float, seed: int) -> dict[str, tuple[Path, int]]:
    """Two prompt files: unconditional rows (empty prompt -> [BOS]) and fresh task prompts. Task answers
    get their own teacher run with a short gen_length, so that their dependencies are not drowned in
    windows that only fill an EOS tail. Returns {"language"|"tasks": (file, rows)}."""
    from sampler.embedded.tasks import make_task_examples

    n_task = int(round(n * task_share))
    tasks = make_task_examples(n_task, seed=seed + 7919)
    files = {"language": [{"id": f"uncond-{i}", "prompt": ""} for i in range(n - n_task)],
             "tasks": [{"id": f"task-{i}", "prompt": ex["prompt"]} for i, ex in enumerate(tasks)]}
    out_files = {}
    for name, rows in files.items():
        path = out / f"teacher_prompts_{name}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not path.exists() or path.read_text() != text:  # unchanged file -> the teacher resumes
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        out_files[name] = (path, len(rows))
    return out_files


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def run_quickstart(config: dict | None = None, log=print) -> dict:
    """teacher -> train -> evaluate under one output directory; returns the evaluation results."""
    from ray_jobs.evaluate import run_evaluate
    from ray_jobs.teacher import backbone_path
    from ray_jobs.train import run_train

    cfg = merge_quickstart(DEFAULTS, config)
    out = Path(cfg["out"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bpath = backbone_path(cfg["backbone"])
    if not (bpath / "config.json").exists():
        raise FileNotFoundError(f"{bpath}: no backbone checkpoint (the embedded one ships in "
                                "sampler/assets/backbone; pass backbone=DIR for another)")
    common = {"ray_address": cfg["ray_address"], "ray_num_cpus": cfg["ray_num_cpus"],
              "progress": cfg["progress"]}
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    started = init_ray(cfg["ray_address"], cfg["ray_num_cpus"])  # one cluster for every stage
    try:
        t0 = time.perf_counter()
        n_traj = int(cfg["teacher"].get("num_trajectories") or 1024)
        prompt_files = teacher_prompts(out, n_traj, float(cfg["teacher_task_share"]), int(cfg["seed"]))
        teacher_dirs, teacher = [], {"trajectories": 0}
        for name, subdir, gen_length in (("language", "teacher", cfg["gen_length"]),
                                         ("tasks", "teacher_tasks", cfg["task_gen_length"])):
            path, rows = prompt_files[name]
            if rows == 0:
                continue
            tdir = out / subdir
            tcfg = {"backbone": cfg["backbone"], "gen_length": gen_length, "seed": cfg["seed"],
                    "prompts": str(path), "out": str(tdir), **common, **cfg["teacher"],
                    "num_trajectories": rows}
            log(f"quickstart [1/3] teacher ({name}): {rows} exact trajectories of {gen_length} tokens "
                f"-> {tdir}")
            summary = run_teacher_stage(tcfg)
            teacher_dirs.append(str(tdir))
            teacher["trajectories"] += summary["trajectories"]
        times["teacher_s"] = time.perf_counter() - t0
        log(f"quickstart [1/3] teacher done in {_fmt_s(times['teacher_s'])}")

        t0 = time.perf_counter()
        rcfg = {"data": teacher_dirs, "backbone": cfg["backbone"], "out": str(out / "train"),
                "seed": cfg["seed"], **common, **cfg["train"]}
        log(f"quickstart [2/3] train: {rcfg['steps']} steps of {rcfg.get('batch_size', 32)} windows "
            f"-> {out / 'train'}")
        train = run_train(rcfg)
        times["train_s"] = time.perf_counter() - t0
        log(f"quickstart [2/3] train done in {_fmt_s(times['train_s'])}")

        t0 = time.perf_counter()
        ecfg = {"backbone": cfg["backbone"], "sampler": train["sampler_dir"],
                "train_summary": str(out / "train" / "summary.json"), "gen_length": cfg["gen_length"],
                "task_gen_length": cfg["task_gen_length"],
                "seed": cfg["seed"], "out": str(out / "evaluate"), **common, **cfg["evaluate"]}
        log(f"quickstart [3/3] evaluate: exact, marginal and joint at k={ecfg['ks']} -> {out / 'evaluate'}")
        result = run_evaluate(ecfg, log=log)
        times["evaluate_s"] = time.perf_counter() - t0
        log(f"quickstart [3/3] evaluate done in {_fmt_s(times['evaluate_s'])}")
    finally:
        if started:
            import ray

            ray.shutdown()
    times["total_s"] = time.perf_counter() - t_all
    report = (out / "evaluate" / "report.md").read_text()
    head = ["# jointgen quickstart", "",
            f"Stages: teacher {_fmt_s(times['teacher_s'])}, train {_fmt_s(times['train_s'])}, evaluate "
            f"{_fmt_s(times['evaluate_s'])}; total {_fmt_s(times['total_s'])}. Teacher: "
            f"{teacher['trajectories']} trajectories; sampler trained "
            f"{train.get('steps')} steps. Artefacts: teacher/, train/, evaluate/ (plots: "
            f"{', '.join('evaluate/' + p for p in result['plots'])}).", ""]
    (out / "report.md").write_text("\n".join(head) + report.split("\n", 1)[1])
    write_json_atomic(out / "quickstart.json", {"config": cfg, "times": times, "teacher": _small(teacher),
                                                 "train": _small(train), "evaluate": str(out / "evaluate")})
    result["times"] = times
    result["quickstart_out"] = str(out)
    return result


def run_teacher_stage(tcfg: dict) -> dict:
    from ray_jobs.teacher import format_summary, run_teacher

    summary = run_teacher(tcfg)
    print(format_summary(summary), flush=True)
    return summary


STAGES = ("teacher", "train", "evaluate")


def merge_quickstart(base: dict, top: dict | None) -> dict:
    """Top-level keys are checked here; a stage section's keys are checked by that stage's job."""
    top = dict(top or {})
    stages = {k: top.pop(k) for k in STAGES if k in top}
    cfg = merge_config({k: v for k, v in base.items() if k not in STAGES}, top, "quickstart")
    for k in STAGES:
        section = stages.get(k) or {}
        if not isinstance(section, dict):
            raise ValueError(f"quickstart: {k} must be a mapping of {k} config keys")
        cfg[k] = {**base.get(k, {}), **section}
    return cfg


def _small(d: dict) -> dict:
    """The JSON-friendly, short part of a stage summary."""
    return {k: v for k, v in d.items() if isinstance(v, str | int | float | bool | type(None))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jointgen quickstart", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--quick", action="store_true", help="every stage small: a few minutes on 2 cores")
    p.add_argument("--out", "-o", help="output directory for every artefact (rerun to resume)")
    p.add_argument("--backbone", help="another backbone checkpoint dir (default: the embedded one)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = merge_quickstart(DEFAULTS, QUICK) if a.quick else merge_quickstart(DEFAULTS, None)
        if a.config:
            cfg = merge_quickstart(cfg, read_yaml(a.config))
        flags = {"out": a.out, "backbone": a.backbone, "ray_address": a.address}
        cfg = merge_quickstart(cfg, {k: v for k, v in flags.items() if v is not None})
        cfg = merge_quickstart(cfg, parse_sets(a.set))
        res = run_quickstart(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"jointgen quickstart: error: {e}", file=sys.stderr)
        return 2
    print((Path(res["quickstart_out"]) / "report.md").read_text())
    return 0
