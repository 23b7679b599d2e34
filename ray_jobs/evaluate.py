"""Evaluation: quality against speed of exact, marginal@k and joint@k decoding (`jointgen evaluate`).

Same prompts and seeds for every method. Samples come from the batch-generation pipeline (Ray Data actor
pool, resumable: rerun with the same `out` and only missing samples are generated); scoring runs on a
pool of Ray actors (the judge and the sentence encoder load once per actor). Per row, with standard
errors and sample counts:

- NLL per token under an autoregressive judge, and the share of the exact-vs-marginal gap the sampler
  recovers, (NLL_marginal - NLL_joint) / (NLL_marginal - NLL_exact), beside the paper's 41% at k=4;
- MAUVE against a second, independent exact draw (the `exact` row is the exact-vs-exact ceiling, the
  noise floor), on judge features (hidden states of one judge block, mean-pooled) and MiniLM sentence
  embeddings;
- task validity on the embedded backbone's checkable tasks (one prompt set, stop at EOS);
- speed: tokens per full pass, full passes, sampler passes, wall time and tokens/s, all from this run;
- held-out sampler KL / top-1 agreement per unroll depth (from the train job's summary).
Writes report.md, results.json and PNG plots (quality against tokens/s, one curve per method, points
labelled by k) under `out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.common import add_config_args, init_ray, merge_config, run_job_cli, write_json_atomic
from ray_jobs.generate import Settings, check_inputs, read_outputs, run_sets

PAPER = {"k": 4, "nll_marginal": 6.52, "nll_joint": 5.58, "nll_exact": 4.25, "gap_recovered": 0.41,
         "source": "ADJUST (arXiv 2509.22738), Dream-7B"}

DEFAULTS: dict[str, Any] = {
    "backbone": None,  # null = the embedded backbone
    "dtype": None,  # null = the checkpoint's dtype; float32 | bfloat16 | float16 (generation)
    "sampler": None,  # joint sampler dir (required for joint rows)
    "judge": "auto",  # auto = the embedded judge if present and of the backbone's vocabulary; a dir; null
    "judge_backend": "torch",  # torch | vllm (optional extra) | auto (vllm when it imports)
    "ks": [1, 2, 4, 8],
    "methods": ["marginal", "joint"],  # compared against exact at every k > 1
    # language: unconditional samples (or a prompt file), fixed length
    "num_samples": 256,
    "language_prompts": None,  # JSONL/Parquet; null = unconditional
    "gen_length": 48,
    "temperature": 1.0,
    "top_p": 1.0,
    "policy": "entropy",
    "seed": 0,
    "reference_seed": 100003,  # the second exact draw: MAUVE reference
    # tasks: checkable answers, stop at EOS
    "tasks": "auto",  # auto = the embedded task prompts for a backbone trained on them; a JSONL; null = none
    "task_prompts": 150,  # how many task prompts to use
    "task_gen_length": 24,
    "task_temperature": 1.0,
    # metrics
    "mauve_features": ["judge", "minilm"],  # also: hf (a local HF LM dir in hf_features_model)
    "judge_feature_layer": -1,  # -1 = the last layer (as MAUVE uses GPT-2's); b >= 1 = block b's output
    "hf_features_model": None,  # e.g. a local gpt2-large directory (features like the paper's)
    "mauve_seeds": [1, 2, 3, 4, 5],  # k-means seeds: their spread is the MAUVE error bar
    "train_summary": None,  # run_train's summary.json (or its out dir): held-out KL / top-1 per depth
    # Ray
    "out": "runs/evaluate",
    "batch_size": 64,
    "judge_batch_size": 32,
    "actors": 1,
    "cpus_per_actor": 0.5,
    "gpus_per_actor": 0,
    "torch_threads": None,  # null = all cores / actors on CPU (one actor times every method alike)
    "ray_address": None,
    "ray_num_cpus": None,
    "progress": True,
}


# ---------------------------------------------------------------------------------------------------
# What to generate
# ---------------------------------------------------------------------------------------------------


def set_name(kind: str, method: str, k: int) -> str:
    return f"{kind}-{method}" if method.startswith("exact") else f"{kind}-{method}-k{k}"


def plan_sets(cfg: dict, kind: str) -> dict[str, Settings]:
    """Every method x k for one prompt kind ("lang" or "task"); k=1 is exact for every method."""
    lang = kind == "lang"
    base = dict(gen_length=cfg["gen_length"] if lang else cfg["task_gen_length"],
                temperature=cfg["temperature"] if lang else cfg["task_temperature"], top_p=cfg["top_p"],
                policy=cfg["policy"], stop_at_eos=not lang, seed=int(cfg["seed"]))
    sets = {set_name(kind, "exact", 1): Settings(mode="exact", k=1, **base)}
    if lang:
        sets[set_name(kind, "exact-ref", 1)] = Settings(mode="exact", k=1, **{**base,
                                                                               "seed": cfg["reference_seed"]})
    for k in sorted(set(int(k) for k in cfg["ks"])):
        if k > 1:
            for m in cfg["methods"]:
                sets[set_name(kind, m, k)] = Settings(mode=m, k=k, **base)
    return sets


def resolve_judge(judge: str | None, backbone: str | None) -> str | None:
    """auto: the embedded judge when it exists and speaks the backbone's vocabulary (a tiny judge of
    another tokenizer says nothing about a 7B model's text)."""
    from sampler.backbone import DEFAULT_JUDGE

    if judge == "auto":
        if not (DEFAULT_JUDGE / "config.json").exists():
            return None
        return str(DEFAULT_JUDGE) if same_vocabulary(backbone, str(DEFAULT_JUDGE)) else None
    if judge in (None, "", "none"):
        return None
    if not (Path(judge) / "config.json").exists():
        raise FileNotFoundError(f"judge {judge}: not a checkpoint directory (no config.json)")
    return str(judge)


def trained_on_tasks(backbone: str | None) -> bool:
    """The embedded backbone (its config records `embedded_pretrain`) learnt the sampler.tasks tasks."""
    from ray_jobs.teacher import backbone_path

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
                 backend: str = "torch", feature_layer: int = -1):
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

    def judge_ids(self, prompts: list[list[int]], gens: list[list[int]], prompt_texts: list[str],
                  texts: list[str], same_vocab: bool) -> tuple[list[list[int]], list[list[int]]]:
        if same_vocab:
            return prompts, gens
        tok = self.judge.tokenizer  # another vocabulary: score the text, re-tokenised
        bos = [self.judge.bos_id] if self.judge.bos_id is not None else []
        p = [bos + tok(t or "", add_special_tokens=False)["input_ids"] for t in prompt_texts]
        g = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        return p, g

    def score(self, name: str, prompts: list[list[int]], gens: list[list[int]], prompt_texts: list[str],
              texts: list[str], same_vocab: bool, stop_at_eos: bool) -> dict:
        from sampler import metrics

        out: dict[str, Any] = {"name": name}
        t0 = time.perf_counter()
        if self.judge is not None:
            if stop_at_eos:
                gens = [metrics.truncate_at_eos(g, self.judge.eos_id) for g in gens]
            p, g = self.judge_ids(prompts, gens, prompt_texts, texts, same_vocab)
            want_feats = "judge" in self.features
            if self.vllm is None or want_feats:
                s = metrics.judge_score(self.judge, p, g, batch_size=self.batch_size, features=want_feats,
                                        feature_layer=self.feature_layer)
            if self.vllm is not None:
                s = {**s, **self.vllm.score(p, g)} if want_feats else self.vllm.score(p, g)
            out["nll"] = metrics.per_token_nll(s["nll_sum"], s["n_tokens"])
            out["judge_backend"] = self.backend
            if "features" in s:
                out["feat_judge"] = s["features"]
        if "minilm" in self.features:
            out["feat_minilm"] = metrics.minilm_features(texts)
        if "hf" in self.features and self.hf_model:
            out["feat_hf"] = metrics.hf_lm_features(self.hf_model, texts)
        out["score_s"] = time.perf_counter() - t0
        return out


def same_vocabulary(backbone: str | None, judge: str) -> bool:
    from ray_jobs.teacher import backbone_path
    from sampler.backbone import load_tokenizer

    a, b = load_tokenizer(backbone_path(backbone)), load_tokenizer(Path(judge))
    # every backbone token with the same id in the judge (a tokenizer class may add its own extras)
    theirs = b.get_vocab()
    return all(theirs.get(tok) == i for tok, i in a.get_vocab().items())


# ---------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------


def speed_of(table) -> dict:
    """Speed counters of one set, from its part files (each batch's wall time measured in its actor)."""
    rows = table.to_pylist()
    batches: dict[str, dict] = {}
    for r in rows:
        b = batches.setdefault(r["batch_id"], {"wall": r["batch_wall_s"], "full": r["batch_full_passes"],
                                               "sampler": r["batch_sampler_passes"], "tokens": 0})
        b["tokens"] += r["decoded_tokens"]
    wall = sum(b["wall"] for b in batches.values())
    tokens = sum(b["tokens"] for b in batches.values())
    full = sum(b["full"] for b in batches.values())
    return {
        "n": len(rows), "tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else float("nan"),
        "tokens_per_full_pass": float(np.mean([r["tokens_per_pass"] for r in rows])),
        "full_passes_per_sample": float(np.mean([r["full_passes"] for r in rows])),
        "batch_full_passes": full, "batch_sampler_passes": sum(b["sampler"] for b in batches.values()),
        "sampler_passes_per_full_pass": sum(b["sampler"] for b in batches.values()) / full if full else 0.0,
    }


def depth_from_summary(path: str | None) -> dict[str, dict] | None:
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.exists():
        raise FileNotFoundError(f"train summary {p} does not exist")
    depth = json.loads(p.read_text()).get("depth_metrics") or {}
    return {str(k): v for k, v in sorted(depth.items(), key=lambda kv: int(kv[0]))} or None


def beats(a: dict | None, b: dict | None, higher_is_better: bool) -> bool | None:
    """a better than b by more than the error bars (the 1-SE intervals do not overlap)."""
    if not a or not b or any(not math.isfinite(x.get("mean", float("nan"))) for x in (a, b)):
        return None
    d = (a["mean"] - b["mean"]) if higher_is_better else (b["mean"] - a["mean"])
    err = a.get("se", float("nan")) + b.get("se", float("nan"))
    if not math.isfinite(err):
        return None  # no error bar (one MAUVE seed): no claim either way
    return bool(d > err)


QUALITY = [  # key, label, higher is better
    ("nll", "judge NLL / token", False),
    ("mauve_judge", "MAUVE (judge features)", True),
    ("mauve_minilm", "MAUVE (MiniLM)", True),
    ("mauve_hf", "MAUVE (HF LM features)", True),
    ("task_validity", "task validity", True),
]


def build_rows(cfg: dict, lang: dict[str, Settings], task_sets: dict[str, Settings], speeds: dict,
               scores: dict, validity: dict) -> list[dict]:
    from sampler import metrics

    rows = []
    for name, s in lang.items():
        if name.endswith("exact-ref"):
            continue
        method = "exact" if s.mode == "exact" else s.mode
        row: dict[str, Any] = {"method": method, "k": s.k, "set": name, **speeds[name]}
        sc = scores.get(name, {})
        if "nll" in sc:
            row["nll"] = metrics.mean_se(sc["nll"])
        for feat in ("judge", "minilm", "hf"):
            if f"mauve_{feat}" in sc:
                row[f"mauve_{feat}"] = sc[f"mauve_{feat}"]
        tname = name.replace("lang-", "task-", 1)
        if tname in validity:
            row["task_validity"] = validity[tname]
            row["task_tokens_per_s"] = speeds.get(tname, {}).get("tokens_per_s")
        rows.append(row)
    exact_speed = next(r["tokens_per_s"] for r in rows if r["method"] == "exact")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / exact_speed if exact_speed else float("nan")
    rows.sort(key=lambda r: (r["method"] != "exact", r["method"], r["k"]))
    return rows


def gap_table(rows: list[dict]) -> dict[str, dict]:
    from sampler import metrics

    exact = next((r for r in rows if r["method"] == "exact"), None)
    out = {}
    if exact is None or "nll" not in exact:
        return out
    for r in rows:
        if r["method"] == "joint":
            m = next((x for x in rows if x["method"] == "marginal" and x["k"] == r["k"]), None)
            if m is not None and "nll" in m:
                g = metrics.gap_recovered(m["nll"], r["nll"], exact["nll"])
                gap_se = math.hypot(m["nll"]["se"], exact["nll"]["se"])
                g["gap"] = m["nll"]["mean"] - exact["nll"]["mean"]
                g["gap_significant"] = bool(g["gap"] > 2 * gap_se)
                out[str(r["k"])] = g
    return out


def verdict(rows: list[dict], ks: list[int]) -> dict[str, dict]:
    """For k in (4, 8) where present: joint beats marginal on each quality measure beyond the error bars,
    and its speed relative to exact. A measure on which exact itself does not beat marginal beyond the
    error bars (for MAUVE: the exact-vs-exact ceiling) cannot rank the methods at this sample size: it is
    reported as not separating and left out of `all`."""
    ex = next((r for r in rows if r["method"] == "exact"), None)
    out = {}
    for k in ks:
        j = next((r for r in rows if r["method"] == "joint" and r["k"] == k), None)
        m = next((r for r in rows if r["method"] == "marginal" and r["k"] == k), None)
        if j is None or m is None:
            continue
        keys = [(key, hib) for key, _, hib in QUALITY if key in j and key in m]
        v = {key: beats(j.get(key), m.get(key), hib) for key, hib in keys}
        sep = {key: beats(ex.get(key), m.get(key), hib) if ex else None for key, hib in keys}
        counted = [v[key] for key in v if v[key] is not None and sep[key] is not False]
        out[str(k)] = {"beats_marginal": v, "exact_separates": sep, "all": bool(counted) and all(counted),
                       "speedup_vs_exact": j["speedup"]}
    return out


# ---------------------------------------------------------------------------------------------------
# Report: Markdown, JSON, plots
# ---------------------------------------------------------------------------------------------------


def _fmt(m: dict | None, digits: int = 3) -> str:
    if not m or not math.isfinite(m.get("mean", float("nan"))):
        return "-"
    se = m.get("se")
    return f"{m['mean']:.{digits}f} ± {se:.{digits}f}" if se is not None and math.isfinite(se) else \
        f"{m['mean']:.{digits}f}"


def markdown(result: dict) -> str:
    rows = result["rows"]
    layer = result.get("config", {}).get("judge_feature_layer", -1)
    present = [(key, label) for key, label, _ in QUALITY if any(key in r for r in rows)]
    head = ["method", "k", "tok/full pass", "full passes", "sampler/full pass", "wall s", "tok/s", "speedup"]
    head += [label for _, label in present] + ["n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["k"]), f"{r['tokens_per_full_pass']:.2f}",
                 f"{r['full_passes_per_sample']:.1f}", f"{r['sampler_passes_per_full_pass']:.2f}",
                 f"{r['wall_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}x"]
        cells += [_fmt(r.get(key)) for key, _ in present]
        n = str(r["n"]) + (f" (+{r['task_validity']['n']} task)" if "task_validity" in r else "")
        lines.append("| " + " | ".join(cells + [n]) + " |")
    out = [f"# Evaluation: {result['backbone']['name']}", "",
           f"Samples per set: {result['num_samples']} (language, {result['gen_length']} tokens, same prompts "
           f"and seeds for every method); the `exact` row's MAUVE is exact against a second exact draw: the "
           "ceiling. ± is a standard error (MAUVE: spread over k-means seeds). Judge features: "
           + ("its last layer" if layer == -1 else f"its block {layer}") + ", mean-pooled over the generated "
           "tokens. Speed: measured in this run, batch " + str(result["batch_size"]) + ".", "", *lines, ""]
    if result["gap_recovered"]:
        out += ["## Share of the exact-vs-marginal NLL gap recovered by the sampler", "",
                "| k | gap recovered | paper (Dream-7B, k=4) |", "|---|---|---|"]
        for k, g in result["gap_recovered"].items():
            paper = f"{PAPER['gap_recovered']:.0%} ({PAPER['nll_marginal']} -> {PAPER['nll_joint']}, exact " \
                    f"{PAPER['nll_exact']})" if int(k) == PAPER["k"] else ""
            val = f"{g['value']:.0%} ± {g['se']:.0%}" if math.isfinite(g["value"]) else "- (no gap)"
            if math.isfinite(g["value"]) and not g.get("gap_significant", True):
                val += " (exact-vs-marginal gap within its error bars: not meaningful)"
            out.append(f"| {k} | {val} | {paper} |")
        out.append("")
    if result["verdict"]:
        out += ["## Sampler vs marginal baseline (beyond the error bars)", ""]
        for k, v in result["verdict"].items():
            sep = v.get("exact_separates", {})
            items = ", ".join(f"{key}: {'yes' if b else 'no' if b is not None else '-'}"
                              + (" (exact does not separate from marginal either)" if sep.get(key) is False
                                 else "") for key, b in v["beats_marginal"].items())
            out.append(f"- k={k}: {'BEATS' if v['all'] else 'does not beat'} marginal on every measure that "
                       f"separates exact from marginal ({items}); {v['speedup_vs_exact']:.2f}x the speed "
                       "of exact")
        out.append("")
    if result.get("depth_metrics"):
        out += ["## Held-out KL to the backbone and top-1 agreement per unroll depth", "",
                "| K | KL sampler | KL marginal | ratio | top-1 sampler | top-1 marginal | positions |",
                "|---|---|---|---|---|---|---|"]
        for k, d in result["depth_metrics"].items():
            ratio = d["kl_sampler"] / d["kl_marginal"] if d["kl_marginal"] else float("nan")
            out.append(f"| {k} | {d['kl_sampler']:.4f} | {d['kl_marginal']:.4f} | {ratio:.2f} | "
                       f"{d['top1_sampler']:.3f} | {d['top1_marginal']:.3f} | {int(d['positions'])} |")
        out.append("")
    if result.get("task_breakdown"):
        out += ["## Task validity per task", "", "| set | " + " | ".join(result["task_tasks"]) + " |",
                "|---|" + "---|" * len(result["task_tasks"])]
        for name, per in result["task_breakdown"].items():
            out.append(f"| {name} | " + " | ".join(_fmt(per.get(t), 2) for t in result["task_tasks"]) + " |")
        out.append("")
    out += [f"Plots: {', '.join(result['plots'])}", ""]
    return "\n".join(out)


def plot(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    present = [(key, label, hib) for key, label, hib in QUALITY if any(key in r for r in rows)]
    files = []
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 4), squeeze=False)
        for ax, (key, label, hib) in zip(axes[0], present, strict=True):
            speed_key = "task_tokens_per_s" if key == "task_validity" else "tokens_per_s"
            for method, style in (("marginal", "s--"), ("joint", "o-")):
                pts = sorted((r for r in rows if r["method"] in (method, "exact") and key in r),
                             key=lambda r: r["k"])
                if len(pts) < 2:
                    continue
                xs = [r.get(speed_key) or r["tokens_per_s"] for r in pts]
                ys = [r[key]["mean"] for r in pts]
                es = [r[key].get("se") or 0.0 for r in pts]
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=method)
                for x, y, r in zip(xs, ys, pts, strict=True):
                    ax.annotate(f"k={r['k']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xlabel("tokens / s (this run)")
            ax.set_ylabel(label + (" (higher is better)" if hib else " (lower is better)"))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"Quality vs speed: {result['backbone']['name']}")
        fig.tight_layout()
        fig.savefig(out / "quality_vs_speed.png", dpi=110)
        plt.close(fig)
        files.append("quality_vs_speed.png")
    depth = result.get("depth_metrics")
    if depth:
        ks = [int(k) for k in depth]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        axes[0].plot(ks, [depth[str(k)]["kl_marginal"] for k in ks], "s--", label="marginal")
        axes[0].plot(ks, [depth[str(k)]["kl_sampler"] for k in ks], "o-", label="sampler")
        axes[0].set_ylabel("held-out KL to the backbone")
        axes[1].plot(ks, [depth[str(k)]["top1_marginal"] for k in ks], "s--", label="marginal")
        axes[1].plot(ks, [depth[str(k)]["top1_sampler"] for k in ks], "o-", label="sampler")
        axes[1].set_ylabel("top-1 agreement")
        for ax in axes:
            ax.set_xlabel("unroll depth K")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "depth_metrics.png", dpi=110)
        plt.close(fig)
        files.append("depth_metrics.png")
    return files


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------


def check_config(cfg: dict) -> None:
    ks = cfg["ks"]
    if not isinstance(ks, list) or not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"evaluate: ks must be a list of integers >= 1, got {ks!r}")
    bad = [m for m in cfg["methods"] if m not in ("marginal", "joint")]
    if bad:
        raise ValueError(f"evaluate: unknown method(s) {bad}; methods are marginal and joint")
    if "joint" in cfg["methods"] and not cfg["sampler"]:
        raise ValueError("evaluate: joint rows need a sampler (sampler=DIR, from `jointgen train`)")
    if int(cfg["num_samples"]) < 10:
        raise ValueError("evaluate: num_samples must be >= 10 (MAUVE needs at least 10 samples per set)")
    if cfg["judge_backend"] not in ("torch", "vllm", "auto"):
        raise ValueError(f"evaluate: judge_backend must be torch, vllm or auto, got {cfg['judge_backend']!r}")
    bad = [f for f in cfg["mauve_features"] if f not in ("judge", "minilm", "hf")]
    if bad:
        raise ValueError(f"evaluate: unknown mauve_features {bad}; known: judge, minilm, hf")
    layer = cfg["judge_feature_layer"]
    if not isinstance(layer, int) or not (layer == -1 or layer >= 1):
        raise ValueError(f"evaluate: judge_feature_layer must be -1 (last layer) or a block number >= 1, "
                         f"got {layer!r}")
    if "hf" in cfg["mauve_features"] and not cfg["hf_features_model"]:
        raise ValueError("evaluate: mauve_features 'hf' needs hf_features_model (a local model directory)")


def run_evaluate(config: dict | None = None, log=print) -> dict:
    """Generate, score and report; see the module docstring. Returns the results dict (results.json)."""
    import ray
    from ray.util import ActorPool

    from ray_jobs.teacher import backbone_identity, backbone_path
    from sampler import metrics

    cfg = merge_config(DEFAULTS, config, "evaluate")
    check_config(cfg)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    judge = resolve_judge(cfg["judge"], cfg["backbone"])
    features = [f for f in cfg["mauve_features"] if f != "judge" or judge]
    task_file = resolve_tasks(cfg["tasks"], cfg["backbone"], out, int(cfg["task_prompts"]))
    lang_sets = plan_sets(cfg, "lang")
    task_sets = plan_sets(cfg, "task") if task_file else {}
    check_inputs(cfg["language_prompts"], cfg["num_samples"], cfg["sampler"],
                 list(lang_sets.values()) + list(task_sets.values()), cfg["dtype"])
    name, identity = backbone_identity(backbone_path(cfg["backbone"]))
    t0 = time.perf_counter()
    started = init_ray(cfg["ray_address"], cfg["ray_num_cpus"])
    try:
        gpus = float(cfg["gpus_per_actor"] or 0)
        threads = cfg["torch_threads"] or (None if gpus else max(1, (os.cpu_count() or 1)
                                                                  // int(cfg["actors"])))
        common = dict(backbone=cfg["backbone"], sampler=cfg["sampler"], batch_size=int(cfg["batch_size"]),
                      num_actors=int(cfg["actors"]), num_cpus_per_actor=float(cfg["cpus_per_actor"]),
                      num_gpus_per_actor=gpus, torch_threads=threads, progress=bool(cfg["progress"]),
                      dtype=cfg["dtype"], stale="move", log=log)  # a retrained sampler: samples anew
        log(f"evaluate: [1/3] generating {len(lang_sets)} language sets x {cfg['num_samples']} samples"
            + (f" and {len(task_sets)} task sets" if task_sets else ""))
        n_uncond = None if cfg["language_prompts"] else int(cfg["num_samples"])
        gen_lang = run_sets(lang_sets, out_dir=out / "samples", prompts=cfg["language_prompts"],
                            num_samples=n_uncond, **common)
        gen_task = run_sets(task_sets, out_dir=out / "samples", prompts=task_file, **common) if task_sets \
            else {"errors": []}
        tables = {n: read_outputs(out / "samples" / n) for n in list(lang_sets) + list(task_sets)}

        validity, breakdown = {}, {}
        for n in task_sets:
            rows = tables[n].to_pylist()
            examples = [{**json.loads(r["meta"] or "{}"), "prompt": r["prompt"]} for r in rows]
            v = metrics.validity(examples, [r["text"] for r in rows])
            breakdown[n] = v.pop("per_task")
            validity[n] = v

        log(f"evaluate: [2/3] scoring {len(lang_sets)} sets (judge: {judge or 'none'}; features: "
            f"{', '.join(features) or 'none'})")
        scores: dict[str, dict] = {}
        if judge or features:
            same_vocab = same_vocabulary(cfg["backbone"], judge) if judge else True
            scorer_cls = ray.remote(num_cpus=float(cfg["cpus_per_actor"]), num_gpus=gpus)(Scorer)
            scorers = [scorer_cls.remote(judge, features, cfg["hf_features_model"], threads,
                                         "cuda" if gpus else "cpu", int(cfg["judge_batch_size"]),
                                         cfg["judge_backend"], int(cfg["judge_feature_layer"]))
                       for _ in range(int(cfg["actors"]))]
            pool = ActorPool(scorers)

            def submit(actor, n):
                t = tables[n]
                return actor.score.remote(n, t.column("prompt_ids").to_pylist(),
                                          t.column("tokens").to_pylist(),
                                          [p or "" for p in t.column("prompt").to_pylist()],
                                          t.column("text").to_pylist(), same_vocab, lang_sets[n].stop_at_eos)

            try:
                for s in pool.map_unordered(submit, list(lang_sets)):
                    scores[s["name"]] = s
                    log(f"  scored {s['name']} in {s['score_s']:.1f}s")
            finally:  # free their CPUs / GPUs at once on a shared cluster
                for a in scorers:
                    ray.kill(a)
            ref = scores[set_name("lang", "exact-ref", 1)]
            for n, s in scores.items():
                if n.endswith("exact-ref"):
                    continue
                for feat in ("judge", "minilm", "hf"):
                    if f"feat_{feat}" in s:
                        s[f"mauve_{feat}"] = metrics.mauve_score(ref[f"feat_{feat}"], s[f"feat_{feat}"],
                                                                 seeds=cfg["mauve_seeds"])
    finally:
        if started:
            ray.shutdown()

    log("evaluate: [3/3] report")
    speeds = {n: speed_of(t) for n, t in tables.items()}
    rows = build_rows(cfg, lang_sets, task_sets, speeds, scores, validity)
    gaps = gap_table(rows)
    if "nll" in next(iter(scores.values()), {}):
        ref = metrics.mean_se(scores[set_name("lang", "exact-ref", 1)]["nll"])
    else:
        ref = None
    task_names = sorted({t for per in breakdown.values() for t in per})
    result = {
        "backbone": {"name": name, "identity": identity, "path": str(backbone_path(cfg["backbone"]))},
        "sampler": cfg["sampler"], "judge": judge, "num_samples": int(cfg["num_samples"]),
        "gen_length": int(cfg["gen_length"]), "batch_size": int(cfg["batch_size"]), "ks": cfg["ks"],
        "rows": rows, "gap_recovered": gaps, "paper": PAPER, "exact_reference_nll": ref,
        "verdict": verdict(rows, [k for k in (4, 8) if k in cfg["ks"]]),
        "depth_metrics": depth_from_summary(cfg["train_summary"]),
        "task_breakdown": breakdown, "task_tasks": task_names,
        "errors": gen_lang["errors"] + gen_task["errors"], "wall_s": time.perf_counter() - t0,
        "config": cfg,
    }
    result["plots"] = plot(result, out)
    (out / "report.md").write_text(markdown(result))
    write_json_atomic(out / "results.json", _jsonable(result))
    log(f"evaluate: wrote {out / 'report.md'}, {out / 'results.json'} and {len(result['plots'])} plot(s)")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jointgen evaluate", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--backbone", help="backbone checkpoint dir (default: the embedded backbone)")
    p.add_argument("--sampler", help="joint sampler dir (from `jointgen train`)")
    p.add_argument("--judge", help="causal LM judge dir; 'auto' = the embedded judge; 'none' = skip")
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 1,2,4,8")
    p.add_argument("--num-samples", type=int, help="language samples per set")
    p.add_argument("--train-summary", help="run_train's summary.json (held-out KL per depth)")
    p.add_argument("--out", "-o", help="output directory (rerun with the same one to resume)")
    p.add_argument("--actors", type=int)
    p.add_argument("--gpus-per-actor", type=float)
    p.add_argument("--address", dest="ray_address",
                   help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    return p


def main(argv: list[str] | None = None) -> int:
    code, res = run_job_cli("evaluate", build_parser().parse_args(argv), DEFAULTS, run_evaluate)
    if code == 0:
        print((Path(res["config"]["out"]) / "report.md").read_text())
    return code
