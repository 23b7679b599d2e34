"""`jointgen quickstart`: the whole method on the embedded backbone, one command, no network.

    teacher trajectories (exact decoding on Ray actors)  ->  sampler training (Ray Train)
      ->  evaluation at k = 1, 2, 4, 8 and a small threshold sweep (Ray Data generation + scoring actors)
      ->  table + plots

Every artefact lands under one output directory (`out`, default runs/quickstart):
teacher/ (shards + manifest), train/ (checkpoints, metrics.jsonl, sampler/), evaluate/ (samples, report.md,
results.json, PNG plots), and at the top report.md (the evaluation report with each stage's time) and
quickstart.json. Rerunning with the same `out` resumes every stage. `--quick` runs each stage small
(a few minutes); the default aims at about 20 minutes on 2 CPU cores. The stage configs come from
`QuickstartConfig` (ray_jobs/config.py): its teacher / train / evaluate sections override those jobs' keys.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_jobs.common import backbone_path, ray_session, write_json_atomic
from ray_jobs.config import QUICK, QuickstartConfig, add_config_args, run_cli, validate
from ray_jobs.evaluate import run_evaluate
from ray_jobs.teacher import format_summary, run_teacher
from ray_jobs.train import run_train


def teacher_prompts(cfg: QuickstartConfig) -> None:
    """The teacher's prompt files: unconditional rows (empty prompt -> [BOS]) and fresh task prompts."""
    from sampler.embedded.tasks import make_task_examples

    rows = cfg.teacher_rows()
    tasks = make_task_examples(rows["tasks"], seed=cfg.seed + 7919)
    files = {"language": [{"id": f"uncond-{i}", "prompt": ""} for i in range(rows["language"])],
             "tasks": [{"id": f"task-{i}", "prompt": ex["prompt"]} for i, ex in enumerate(tasks)]}
    for name, records in files.items():
        path = cfg.root / f"teacher_prompts_{name}.jsonl"  # the path QuickstartConfig.teacher_runs names
        text = "".join(json.dumps(r) + "\n" for r in records)
        if not path.exists() or path.read_text() != text:  # unchanged file -> the teacher resumes
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def run_stages(cfg: QuickstartConfig, log: Callable) -> tuple[dict, dict, dict, dict[str, float]]:
    """teacher -> train -> evaluate on one Ray cluster: (teacher counts, train summary, evaluation
    results, seconds per stage)."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    teacher_prompts(cfg)
    teacher = {"trajectories": 0}
    for name, tcfg in cfg.teacher_runs():
        log(f"quickstart [1/3] teacher ({name}): {tcfg.num_trajectories} exact trajectories of "
            f"{tcfg.gen_length} tokens -> {tcfg.out}")
        summary = run_teacher(tcfg)
        print(format_summary(summary), flush=True)
        teacher["trajectories"] += summary["trajectories"]
    times["teacher_s"] = time.perf_counter() - t0
    log(f"quickstart [1/3] teacher done in {_fmt_s(times['teacher_s'])}")

    t0 = time.perf_counter()
    rcfg = cfg.train_config()
    log(f"quickstart [2/3] train: {rcfg.steps} steps of {rcfg.batch_size} windows -> {rcfg.out}")
    train = run_train(rcfg)
    times["train_s"] = time.perf_counter() - t0
    log(f"quickstart [2/3] train done in {_fmt_s(times['train_s'])}")

    t0 = time.perf_counter()
    ecfg = cfg.evaluate_config()
    log(f"quickstart [3/3] evaluate: exact, marginal and joint at k={ecfg.ks}, thresholds {ecfg.thresholds} "
        f"(threshold k={ecfg.threshold_k}, joint+threshold k={ecfg.hybrid_ks}) -> {ecfg.out}")
    result = run_evaluate(ecfg, log=log)
    times["evaluate_s"] = time.perf_counter() - t0
    log(f"quickstart [3/3] evaluate done in {_fmt_s(times['evaluate_s'])}")
    return teacher, train, result, times


def run_quickstart(config: QuickstartConfig | dict[str, Any] | None = None, log: Callable = print) -> dict:
    """teacher -> train -> evaluate under one output directory; returns the evaluation results."""
    cfg = validate(QuickstartConfig, config)
    out = cfg.root
    out.mkdir(parents=True, exist_ok=True)
    bpath = backbone_path(cfg.backbone)
    if not (bpath / "config.json").exists():
        raise FileNotFoundError(f"{bpath}: no backbone checkpoint (the embedded one ships in "
                                "sampler/assets/backbone; pass backbone=DIR for another)")
    t_all = time.perf_counter()
    with ray_session(cfg.ray_address, cfg.ray_num_cpus):  # one cluster for every stage
        teacher, train, result, times = run_stages(cfg, log)
    times["total_s"] = time.perf_counter() - t_all
    report = (out / "evaluate" / "report.md").read_text()
    head = ["# jointgen quickstart", "",
            f"Stages: teacher {_fmt_s(times['teacher_s'])}, train {_fmt_s(times['train_s'])}, evaluate "
            f"{_fmt_s(times['evaluate_s'])}; total {_fmt_s(times['total_s'])}. Teacher: "
            f"{teacher['trajectories']} trajectories; sampler trained "
            f"{train.get('steps')} steps. Artefacts: teacher/, train/, evaluate/ (plots: "
            f"{', '.join('evaluate/' + p for p in result['plots'])}).", ""]
    (out / "report.md").write_text("\n".join(head) + report.split("\n", 1)[1])
    write_json_atomic(out / "quickstart.json", {"config": cfg.model_dump(), "times": times,
                                                 "teacher": _small(teacher), "train": _small(train),
                                                 "evaluate": str(out / "evaluate")})
    result["times"] = times
    result["quickstart_out"] = str(out)
    return result


def _small(d: dict) -> dict:
    """The JSON-friendly, short part of a stage summary."""
    return {k: v for k, v in d.items() if isinstance(v, str | int | float | bool | type(None))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jointgen quickstart", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--quick", action="store_true", help="every stage small: a few minutes on 2 cores")
    p.add_argument("--out", "-o", help="output directory for every artefact (rerun to resume)")
    p.add_argument("--backbone", help="another backbone checkpoint dir (default: the embedded one)")
    p.add_argument("--address", dest="ray_address",
                   help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(QuickstartConfig, args, run_quickstart,
                   lambda res: print((Path(res["quickstart_out"]) / "report.md").read_text()),
                   preset=QUICK if args.quick else None)


if __name__ == "__main__":
    sys.exit(main())
