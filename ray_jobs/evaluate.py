"""Evaluation: quality against speed of exact, marginal@k, joint@k and confidence-threshold decoding
(`jointgen evaluate`): the quality / speed frontier of every family in one run.

Sets: exact; marginal@k and joint@k for k in `ks`; for each tau in `thresholds`, "threshold" (marginal
decoding with Fast-dLLM's rule, at most `threshold_k` tokens per full pass) and "joint+threshold" (the sure
tokens from the full pass, then the sampler fills up to k, for k in `hybrid_ks`). Same prompts and seeds
for every set.

Samples come from the batch-generation pipeline (Ray Data actor pool, resumable: rerun with the same `out`
and only missing samples are generated); scoring runs on a pool of Ray actors (the judge and the sentence
encoder load once per actor). Per row, with standard errors and sample counts:

- NLL per token under an autoregressive judge, and the share of the exact-vs-marginal gap the sampler
  recovers, (NLL_marginal - NLL_joint) / (NLL_marginal - NLL_exact), beside the paper's 41% at k=4;
- MAUVE against a second, independent exact draw (the `exact` row is the exact-vs-exact ceiling, the
  noise floor), on judge features (hidden states of one judge block, mean-pooled) and MiniLM sentence
  embeddings;
- task validity on the embedded backbone's checkable tasks (one prompt set, stop at EOS);
- speed: tokens per full pass (measured per sample), full passes, sampler passes, wall time and
  tokens/s, all from this run;
- held-out sampler KL / top-1 agreement per unroll depth (from the train job's summary);
- the verdicts: joint against marginal at each fixed k, and the best family at each measured speed.
Writes report.md, results.json and PNG plots (quality against tokens/s and against tokens per full pass,
one line per family, points labelled by k / tau) under `out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from ray_jobs.common import backbone_identity, backbone_path, ray_session, write_json_atomic
from ray_jobs.config import EvaluateConfig, add_config_args, run_cli, validate
from ray_jobs.pipeline import SampleSet, check_sources, read_outputs, run_sets
from ray_jobs.report import (
    PAPER,
    build_rows,
    depth_from_summary,
    gap_table,
    jsonable,
    markdown,
    plot,
    speed_of,
    verdict,
    verdict_by_speed,
)
from sampler import metrics
from sampler.backbone import hub_source

# ---------------------------------------------------------------------------------------------------
# What to generate
# ---------------------------------------------------------------------------------------------------


def set_name(kind: str, method: str, k: int, threshold: float | None = None) -> str:
    """The set's directory under samples/ (stable: a rerun resumes it): lang-exact, lang-joint-k4,
    lang-threshold-k8-t0.9 (marginal with a threshold), task-joint-k4-t0.9 (joint with a threshold)."""
    if method.startswith("exact"):
        return f"{kind}-{method}"
    return f"{kind}-{method}-k{k}" + ("" if threshold is None else f"-t{threshold:g}")


def plan_sets(cfg: EvaluateConfig, kind: str) -> dict[str, SampleSet]:
    """Every fixed-k method x k for one prompt kind ("lang" or "task"), k=1 being exact for every method,
    then the threshold sweep (`EvaluateConfig.sweeps`). Language samples have a second exact draw (another
    seed): MAUVE's reference."""
    task = kind == "task"
    length = cfg.task_gen_length if task else cfg.gen_length
    sets = {set_name(kind, "exact", 1): SampleSet(cfg.decode("exact", 1, task=task), length, cfg.seed)}
    if not task:
        sets[set_name(kind, "exact-ref", 1)] = SampleSet(cfg.decode("exact", 1, task=False), length,
                                                         cfg.reference_seed)
    for k in sorted(set(cfg.ks)):
        if k > 1:
            for m in cfg.methods:
                if m in ("marginal", "joint"):
                    sets[set_name(kind, m, k)] = SampleSet(cfg.decode(m, k, task=task), length, cfg.seed)
                if m == "planned":
                    sets[set_name(kind, m, k)] = SampleSet(cfg.decode("joint", k, task=task, order="planned"),
                                                           length, cfg.seed)
    for method, mode, label, order, fill in (
            ("threshold", "marginal", "threshold", "rescore", "k"),
            ("hybrid", "joint", "joint", "rescore", "k"),
            ("hybrid-planned", "joint", "planned", "planned", "k"),
            ("sure", "joint", "sure", "rescore", "sure")):
        for k, tau in cfg.sweeps[method]:
            sets[set_name(kind, label, k, tau)] = SampleSet(
                cfg.decode(mode, k, task=task, threshold=tau, order=order, fill=fill), length, cfg.seed)
    return sets


def resolve_judge(judge: str | None, backbone: str | None) -> str | None:
    """auto: the embedded judge when it exists and speaks the backbone's vocabulary (a tiny judge of
    another tokenizer says nothing about a 7B model's text)."""
    from sampler.backbone import DEFAULT_JUDGE, CheckpointError, resolve_checkpoint

    if judge == "auto":
        if not (DEFAULT_JUDGE / "config.json").exists():
            return None
        return str(DEFAULT_JUDGE) if same_vocabulary(backbone, str(DEFAULT_JUDGE)) else None
    if judge in (None, "", "none"):
        return None
    try:
        path = resolve_checkpoint(judge)  # a directory or a hub id, as for the backbone
    except CheckpointError as e:
        raise FileNotFoundError(f"judge {e}") from e
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"judge {judge}: not a checkpoint directory (no config.json)")
    return str(path)


def trained_on_tasks(backbone: str | None) -> bool:
    """The embedded backbone (its config records `embedded_pretrain`) learnt sampler.embedded.tasks."""
    cfg = backbone_path(backbone) / "config.json"
    return cfg.exists() and "embedded_pretrain" in json.loads(cfg.read_text())


def resolve_tasks(tasks: str | None, backbone: str | None, out: Path, n: int) -> Path | None:
    """The task prompt file: the embedded prompts (only meaningful for the embedded backbone), a user
    JSONL, or none."""
    if tasks in (None, "", "none"):
        return None
    if tasks == "auto":
        if not trained_on_tasks(backbone):
            return None
        src = Path(__file__).resolve().parent.parent / "sampler" / "assets" / "prompts" / "tasks.jsonl"
        if not src.exists():
            return None
    else:
        src = Path(tasks)
        if not src.exists():
            raise FileNotFoundError(f"task prompt file {src} does not exist")
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()][:n]
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "task_prompts.jsonl"  # the subset used, so a rerun (resume) sees the same rows
    if not dest.exists() or dest.read_text() != "\n".join(lines) + "\n":
        dest.write_text("\n".join(lines) + "\n")
    return dest


# ---------------------------------------------------------------------------------------------------
# Scoring actor
# ---------------------------------------------------------------------------------------------------


class Scorer:
    """Judge NLL + judge features + sentence-encoder features for one set of samples."""

    def __init__(self, judge: str | None, features: list[str], hf_model: str | None,
                 torch_threads: int | None, device: str = "cpu", batch_size: int = 32,
                 backend: str = "torch", feature_layer: int = -1, progress: bool = False):
        import torch

        from sampler import load_backbone
        from sampler.judge_vllm import VllmJudge, vllm_available

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        self.judge = load_backbone(judge, device=device, require_mask=False) if judge else None
        if backend == "auto":
            backend = "vllm" if vllm_available() else "torch"
        self.backend = backend
        # on CPU, vLLM's memory share is of host RAM (0.92 by default): keep it small there
        extra = {} if device == "cuda" else {"gpu_memory_utilization": 0.2}
        self.vllm = VllmJudge(judge, **extra) if judge and backend == "vllm" else None
        self.features = features
        self.hf_model = hf_model
        self.batch_size = batch_size
        self.feature_layer = feature_layer
        self.progress = progress

    @contextmanager
    def bar(self, desc: str, total: int) -> Iterator[Callable[[int], None] | None]:
        """A progress bar of `total` samples, drawn by the driver from this actor (Ray's tqdm_ray: a plain
        tqdm in an actor would reach the job's log only as one line at the end); yields its `update`, or
        None without `progress`."""
        if not self.progress:
            yield None
            return
        from ray.experimental import tqdm_ray

        bar = tqdm_ray.tqdm(desc=desc, total=total, unit="sample")
        try:
            yield bar.update
        finally:
            bar.close()

    def judge_ids(self, prompts: list[list[int]], generated: list[list[int]], prompt_texts: list[str],
                  texts: list[str], same_vocab: bool) -> tuple[list[list[int]], list[list[int]]]:
        if same_vocab:
            return prompts, generated
        tok = self.judge.tokenizer  # another vocabulary: score the text, re-tokenised
        bos = [self.judge.bos_id] if self.judge.bos_id is not None else []
        p = [bos + tok(t or "", add_special_tokens=False)["input_ids"] for t in prompt_texts]
        g = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        return p, g

    def score(self, name: str, prompts: list[list[int]], generated: list[list[int]], prompt_texts: list[str],
              texts: list[str], same_vocab: bool, stop_at_eos: bool) -> dict:
        out: dict[str, Any] = {"name": name}
        t0 = time.perf_counter()
        if self.judge is not None:
            if stop_at_eos:
                generated = [metrics.truncate_at_eos(g, self.judge.eos_id) for g in generated]
            p, g = self.judge_ids(prompts, generated, prompt_texts, texts, same_vocab)
            want_feats = "judge" in self.features
            if self.vllm is None or want_feats:
                with self.bar(f"judge {name}", len(g)) as progress:
                    s = metrics.judge_score(self.judge, p, g, batch_size=self.batch_size, features=want_feats,
                                            feature_layer=self.feature_layer, progress=progress)
            if self.vllm is not None:
                s = {**s, **self.vllm.score(p, g)} if want_feats else self.vllm.score(p, g)
            out["nll"] = metrics.per_token_nll(s["nll_sum"], s["n_tokens"])
            out["judge_backend"] = self.backend
            if "features" in s:
                out["feat_judge"] = s["features"]
        if "minilm" in self.features:
            out["feat_minilm"] = metrics.minilm_features(texts)
        if "hf" in self.features and self.hf_model:
            with self.bar(f"features {name}", len(texts)) as progress:
                out["feat_hf"] = metrics.hf_lm_features(self.hf_model, texts, progress=progress)
        out["score_s"] = time.perf_counter() - t0
        return out


def same_vocabulary(backbone: str | None, judge: str) -> bool:
    from sampler.backbone import load_tokenizer

    a, b = load_tokenizer(backbone_path(backbone)), load_tokenizer(Path(judge))
    # every backbone token with the same id in the judge (a tokenizer class may add its own extras)
    theirs = b.get_vocab()
    return all(theirs.get(tok) == i for tok, i in a.get_vocab().items())


# ---------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------


def generate_samples(cfg: EvaluateConfig, lang_sets: dict[str, SampleSet], task_sets: dict[str, SampleSet],
                     task_file: Path | None, threads: int | None, log: Callable) -> tuple[dict, list]:
    """Every set's samples (read back from out/samples/<set>/) and the bad input rows."""
    common: dict[str, Any] = dict(
        backbone=cfg.backbone, sampler=cfg.sampler, batch_size=cfg.batch_size, num_actors=cfg.actors,
        num_cpus_per_actor=cfg.cpus_per_actor, num_gpus_per_actor=cfg.gpus_per_actor, torch_threads=threads,
        progress=cfg.progress, dtype=cfg.dtype, stale="move", log=log)  # a retrained sampler: samples anew
    samples = Path(cfg.out) / "samples"
    lang = run_sets(lang_sets, out_dir=samples, prompts=cfg.language_prompts,
                    num_samples=None if cfg.language_prompts else cfg.num_samples, **common)
    task = run_sets(task_sets, out_dir=samples, prompts=task_file, **common) if task_sets else {"errors": []}
    tables = {n: read_outputs(samples / n) for n in [*lang_sets, *task_sets]}
    return tables, lang["errors"] + task["errors"]


def task_validity(tables: dict[str, pa.Table], task_sets: dict[str, SampleSet]) -> tuple[dict, dict]:
    """({set: validity}, {set: validity per task}) of the task sets."""
    validity, breakdown = {}, {}
    for n in task_sets:
        rows = tables[n].to_pylist()
        examples = [{**json.loads(r["meta"] or "{}"), "prompt": r["prompt"]} for r in rows]
        v = metrics.validity(examples, [r["text"] for r in rows])
        breakdown[n] = v.pop("per_task")
        validity[n] = v
    return validity, breakdown


def score_sets(cfg: EvaluateConfig, judge: str | None, features: list[str], tables: dict[str, pa.Table],
               lang_sets: dict[str, SampleSet], threads: int | None, log: Callable) -> dict[str, dict]:
    """Judge NLL and features of every language set on a pool of Scorer actors, then MAUVE of each set
    against the exact reference draw."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    same_vocab = same_vocabulary(cfg.backbone, judge) if judge else True
    scorer = ray.remote(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor)(Scorer)
    actors = [scorer.remote(judge, features, cfg.hf_features_model, threads,
                            "cuda" if cfg.gpus_per_actor else "cpu", cfg.judge_batch_size, cfg.judge_backend,
                            cfg.judge_feature_layer, cfg.progress) for _ in range(cfg.actors)]

    def submit(actor, n: str):
        t = tables[n]
        return actor.score.remote(n, t.column("prompt_ids").to_pylist(), t.column("tokens").to_pylist(),
                                  [p or "" for p in t.column("prompt").to_pylist()],
                                  t.column("text").to_pylist(), same_vocab, lang_sets[n].settings.stop_at_eos)

    scores: dict[str, dict] = {}
    try:
        for s in ActorPool(actors).map_unordered(submit, list(lang_sets)):
            scores[s["name"]] = s
            log(f"  scored {s['name']} in {s['score_s']:.1f}s")
    finally:  # free their CPUs / GPUs at once on a shared cluster
        for a in actors:
            ray.kill(a)
    ref = scores[set_name("lang", "exact-ref", 1)]
    todo = [(s, feat) for n, s in scores.items() if not n.endswith("exact-ref")
            for feat in ("judge", "minilm", "hf") if f"feat_{feat}" in s]
    with tqdm(total=len(todo) * len(cfg.mauve_seeds), desc="MAUVE", unit="fit", disable=not cfg.progress,
              file=sys.stderr, dynamic_ncols=True) as bar:  # one k-means fit per set, feature and seed
        for s, feat in todo:
            s[f"mauve_{feat}"] = metrics.mauve_score(ref[f"feat_{feat}"], s[f"feat_{feat}"],
                                                     seeds=cfg.mauve_seeds, progress=bar.update)
    return scores


def run_evaluate(config: EvaluateConfig | dict[str, Any] | None = None, log: Callable = print) -> dict:
    """Generate, score and report; see the module docstring. Returns the results dict (results.json)."""
    cfg = validate(EvaluateConfig, config)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = resolve_judge(cfg.judge, cfg.backbone)
    features = [f for f in cfg.mauve_features if f != "judge" or judge]
    task_file = resolve_tasks(cfg.tasks, cfg.backbone, out, cfg.task_prompts)
    lang_sets = plan_sets(cfg, "lang")
    task_sets = plan_sets(cfg, "task") if task_file else {}
    check_sources(cfg.language_prompts, cfg.sampler, [*lang_sets.values(), *task_sets.values()])
    bpath = backbone_path(cfg.backbone)
    name, identity = backbone_identity(bpath)
    cores = os.cpu_count() or 1  # one actor on CPU: all cores (every method is timed alike)
    threads = cfg.torch_threads or (None if cfg.gpus_per_actor else max(1, cores // cfg.actors))
    t0 = time.perf_counter()
    with ray_session(cfg.ray_address, cfg.ray_num_cpus):
        log(f"evaluate: [1/3] generating {len(lang_sets)} language sets x {cfg.num_samples} samples"
            + (f" and {len(task_sets)} task sets" if task_sets else ""))
        tables, errors = generate_samples(cfg, lang_sets, task_sets, task_file, threads, log)
        validity, breakdown = task_validity(tables, task_sets)
        log(f"evaluate: [2/3] scoring {len(lang_sets)} sets (judge: {judge or 'none'}; features: "
            f"{', '.join(features) or 'none'})")
        scores = (score_sets(cfg, judge, features, tables, lang_sets, threads, log) if judge or features
                  else {})

    log("evaluate: [3/3] report")
    rows = build_rows(lang_sets, {n: speed_of(t) for n, t in tables.items()}, scores, validity)
    ref = scores.get(set_name("lang", "exact-ref", 1), {})
    result = {
        "backbone": {"name": name, "identity": identity, "path": str(bpath),
                     **hub_source(bpath)},  # a hub checkpoint: its repo id and commit
        "sampler": cfg.sampler, "judge": judge, "num_samples": cfg.num_samples, "gen_length": cfg.gen_length,
        "batch_size": cfg.batch_size, "ks": cfg.ks, "rows": rows, "gap_recovered": gap_table(rows),
        "paper": PAPER, "exact_reference_nll": metrics.mean_se(ref["nll"]) if "nll" in ref else None,
        "verdict": verdict(rows, [k for k in (4, 8) if k in cfg.ks]),
        "verdict_by_speed": verdict_by_speed(rows),  # the frontier: every family, threshold sets included
        "depth_metrics": depth_from_summary(cfg.train_summary),
        "task_breakdown": breakdown, "task_tasks": sorted({t for per in breakdown.values() for t in per}),
        "errors": errors, "wall_s": time.perf_counter() - t0, "config": cfg.model_dump(),
    }
    result["plots"] = plot(result, out)
    (out / "report.md").write_text(markdown(result))
    write_json_atomic(out / "results.json", jsonable(result))
    log(f"evaluate: wrote {out / 'report.md'}, {out / 'results.json'} and {len(result['plots'])} plot(s)")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jointgen evaluate", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--backbone", help="backbone checkpoint dir or hub id owner/name[@revision] "
                   "(default: the embedded backbone)")
    p.add_argument("--sampler", help="joint sampler dir (from `jointgen train`)")
    p.add_argument("--judge", help="causal LM judge dir; 'auto' = the embedded judge; 'none' = skip")
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], help="fixed k, e.g. 1,2,4,8")
    p.add_argument("--thresholds", type=lambda s: [float(x) for x in s.split(",") if x.strip()],
                   help="confidence thresholds swept beside fixed k, e.g. 0.9,0.7,0.5 ('' = none)")
    p.add_argument("--threshold-k", type=int, help="the most tokens per full pass of a threshold set")
    p.add_argument("--hybrid-ks", type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                   help="k of the joint+threshold sets, e.g. 4,8 ('' = none)")
    p.add_argument("--num-samples", type=int, help="language samples per set")
    p.add_argument("--train-summary", help="run_train's summary.json (held-out KL per depth)")
    p.add_argument("--out", "-o", help="output directory (rerun with the same one to resume)")
    p.add_argument("--actors", type=int)
    p.add_argument("--gpus-per-actor", type=float)
    p.add_argument("--address", dest="ray_address",
                   help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(EvaluateConfig, build_parser().parse_args(argv), run_evaluate,
                   lambda res: print((Path(res["config"]["out"]) / "report.md").read_text()))


if __name__ == "__main__":
    sys.exit(main())
