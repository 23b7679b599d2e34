"""The evaluation report: rows per method family, k and confidence threshold, the share of the NLL gap
recovered, the verdicts (the sampler against the marginal baseline at fixed k; the best family at each
measured speed), report.md, results.json and the PNG plots (`ray_jobs.evaluate` computes the numbers these
are made of)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.pipeline import SampleSet
from sampler import metrics
from sampler.settings import DecodeSettings

PAPER = {"k": 4, "nll_marginal": 6.52, "nll_joint": 5.58, "nll_exact": 4.25, "gap_recovered": 0.41,
         "source": "ADJUST (arXiv 2509.22738), Dream-7B"}


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
        "tokens_per_full_pass_se": metrics.mean_se([r["tokens_per_pass"] for r in rows])["se"],
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
# a row's `method` is its family: threshold = marginal decoding with a confidence threshold (Fast-dLLM),
# joint+threshold = joint decoding with one (the hybrid), joint+sure = the hybrid with fill "sure",
# joint-planned = joint with order "planned", joint+threshold-planned = the hybrid with order "planned"
FAMILIES = ("exact", "marginal", "joint", "joint-planned", "threshold", "joint+threshold",
            "joint+threshold-planned", "joint+sure")


def family(settings: DecodeSettings) -> str:
    """The method family of a set's decoding (one of FAMILIES)."""
    if settings.threshold is None:
        return "joint-planned" if settings.mode == "joint" and settings.order == "planned" else settings.mode
    if settings.mode == "marginal":
        return "threshold"
    if settings.fill == "sure":
        return "joint+sure"
    return "joint+threshold-planned" if settings.order == "planned" else "joint+threshold"


def speed_keys(key: str) -> tuple[str, str]:
    """(tokens/s, tokens per full pass) a quality measure is set against: task validity comes from the
    task sets, the rest from the language sets."""
    return ("task_tokens_per_s", "task_tokens_per_full_pass") if key == "task_validity" else \
        ("tokens_per_s", "tokens_per_full_pass")


def point_label(r: dict) -> str:
    """A row's k / tau, as the plots and the verdict name it."""
    if r["method"] == "exact":
        return "exact"
    if r.get("threshold") is None:
        return f"k={r['k']}"
    return f"τ={r['threshold']:g}" if r["method"] == "threshold" else f"k={r['k']} τ={r['threshold']:g}"


def build_rows(lang: dict[str, SampleSet], speeds: dict, scores: dict, validity: dict) -> list[dict]:
    """One row per language set (the exact reference draw aside): speed, judge NLL, MAUVE, and the task
    validity of the task set of the same decoding."""
    rows = []
    for name, s in lang.items():
        if name.endswith("exact-ref"):
            continue
        row: dict[str, Any] = {"method": family(s.settings), "mode": s.settings.mode, "k": s.settings.k,
                               "threshold": s.settings.threshold, "set": name, **speeds[name]}
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
            row["task_tokens_per_full_pass"] = speeds.get(tname, {}).get("tokens_per_full_pass")
        rows.append(row)
    exact_speed = next(r["tokens_per_s"] for r in rows if r["method"] == "exact")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / exact_speed if exact_speed else float("nan")
    rows.sort(key=lambda r: (FAMILIES.index(r["method"]), r["k"], -(r["threshold"] or 0.0)))
    return rows


def gap_table(rows: list[dict]) -> dict[str, dict]:
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
                p = next((x for x in rows if x["method"] == "joint-planned" and x["k"] == r["k"]), None)
                if p is not None and "nll" in p:  # the same gap, closed by the planned order
                    g["planned"] = metrics.gap_recovered(m["nll"], p["nll"], exact["nll"])
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


def verdict_by_speed(rows: list[dict]) -> dict[str, Any]:
    """At the measured speed of each set (tokens/s; task validity: that of its task set), for each quality
    measure: the best point among the sets at least as fast, its family, and whether it beats the best point
    of every other family at that speed by more than the error bars (`beyond_error_bars` against the
    runner-up family; None when no other family is that fast). `exact_separates`: whether exact beats the
    worst point beyond the error bars; a measure on which it does not cannot rank anything at this size."""
    ex = next((r for r in rows if r["method"] == "exact"), None)
    points = [r for r in rows if r["method"] != "exact"]
    keys = [(key, hib) for key, _, hib in QUALITY if any(key in r for r in points)]

    def scored(key: str) -> list[dict]:
        speed = speed_keys(key)[0]
        return [r for r in points if key in r and r.get(speed) is not None
                and math.isfinite(r[key].get("mean", float("nan")))]

    def ranked(pool: list[dict], key: str, hib: bool) -> list[dict]:
        return sorted(pool, key=lambda r: -r[key]["mean"] if hib else r[key]["mean"])

    sep = {}
    for key, hib in keys:
        pool = ranked(scored(key), key, hib)
        sep[key] = beats(ex.get(key), pool[-1][key], hib) if ex and pool else None
    levels = []
    for level in sorted(points, key=lambda r: r["tokens_per_s"]):
        measures = {}
        for key, hib in keys:
            speed = speed_keys(key)[0]
            if level.get(speed) is None:
                continue
            best_of: dict[str, dict] = {}  # family -> its best point at least as fast as this level
            for r in ranked([r for r in scored(key) if r[speed] >= level[speed]], key, hib):
                best_of.setdefault(r["method"], r)
            if not best_of:
                continue
            best, *others = best_of.values()
            runner = others[0] if others else None
            measures[key] = {"best": best["set"], "family": best["method"], "point": point_label(best),
                             "runner_up": runner["set"] if runner else None,
                             "runner_up_family": runner["method"] if runner else None,
                             "beyond_error_bars": beats(best[key], runner[key], hib) if runner else None}
        levels.append({"set": level["set"], "method": level["method"], "point": point_label(level),
                       "tokens_per_s": level["tokens_per_s"],
                       "tokens_per_full_pass": level["tokens_per_full_pass"], "measures": measures})
    return {"levels": levels, "exact_separates": sep}


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
    """report.md: the main table, then the sections that have data."""
    out = _main_table(result)
    out += _gap_section(result["gap_recovered"]) + _verdict_section(result["verdict"])
    out += _speed_verdict_section(result.get("verdict_by_speed"))
    out += _depth_section(result.get("depth_metrics")) + _task_section(result)
    out += [f"Plots: {', '.join(result['plots'])}", ""]
    return "\n".join(out)


def _main_table(result: dict) -> list[str]:
    rows = result["rows"]
    layer = result.get("config", {}).get("judge_feature_layer", -1)
    present = [(key, label) for key, label, _ in QUALITY if any(key in r for r in rows)]
    head = ["method", "k", "τ", "tok/full pass", "full passes", "sampler/full pass", "wall s", "tok/s",
            "speedup"]
    head += [label for _, label in present] + ["n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tpp = {"mean": r["tokens_per_full_pass"], "se": r.get("tokens_per_full_pass_se")}
        cells = [r["method"], str(r["k"]), "-" if r.get("threshold") is None else f"{r['threshold']:g}",
                 _fmt(tpp, 2), f"{r['full_passes_per_sample']:.1f}",
                 f"{r['sampler_passes_per_full_pass']:.2f}",
                 f"{r['wall_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}x"]
        cells += [_fmt(r.get(key)) for key, _ in present]
        n = str(r["n"]) + (f" (+{r['task_validity']['n']} task)" if "task_validity" in r else "")
        lines.append("| " + " | ".join(cells + [n]) + " |")
    features = "its last layer" if layer == -1 else f"its block {layer}"
    return [f"# Evaluation: {result['backbone']['name']}", "",
            f"Samples per set: {result['num_samples']} (language, {result['gen_length']} tokens, same "
            f"prompts and seeds for every method); the `exact` row's MAUVE is exact against a second exact "
            "draw: the ceiling. ± is a standard error (MAUVE: spread over k-means seeds). Judge features: "
            f"{features}, mean-pooled over the generated tokens. Speed: measured in this run, batch "
            f"{result['batch_size']}. `threshold`: marginal decoding with confidence threshold τ (every "
            "candidate of the block whose top probability is >= τ, at least one, at most k per full pass); "
            "`joint+threshold`: the sure ones from the full pass, then the sampler fills up to k; "
            "`joint+threshold-planned`: the same with the rest of k in the full pass's order "
            "(order \"planned\"); "
            "`joint+sure`: the hybrid, but the sampler takes only what it made sure (fill \"sure\").",
            "", *lines, ""]


def _gap_section(gaps: dict[str, dict]) -> list[str]:
    if not gaps:
        return []
    out = ["## Share of the exact-vs-marginal NLL gap recovered by the sampler", "",
           "| k | joint | joint-planned | paper (Dream-7B, k=4) |", "|---|---|---|---|"]

    def share(g: dict | None) -> str:
        if g is None:
            return "-"
        return f"{g['value']:.0%} ± {g['se']:.0%}" if math.isfinite(g["value"]) else "- (no gap)"

    for k, g in gaps.items():
        paper = f"{PAPER['gap_recovered']:.0%} ({PAPER['nll_marginal']} -> {PAPER['nll_joint']}, exact " \
                f"{PAPER['nll_exact']})" if int(k) == PAPER["k"] else ""
        val = share(g)
        if math.isfinite(g["value"]) and not g.get("gap_significant", True):
            val += " (exact-vs-marginal gap within its error bars: not meaningful)"
        out.append(f"| {k} | {val} | {share(g.get('planned'))} | {paper} |")
    return out + [""]


def _verdict_section(verdicts: dict[str, dict]) -> list[str]:
    if not verdicts:
        return []
    out = ["## Sampler vs marginal baseline (beyond the error bars)", ""]
    for k, v in verdicts.items():
        sep = v.get("exact_separates", {})
        items = ", ".join(f"{key}: {'yes' if b else 'no' if b is not None else '-'}"
                          + (" (exact does not separate from marginal either)" if sep.get(key) is False
                             else "") for key, b in v["beats_marginal"].items())
        out.append(f"- k={k}: {'BEATS' if v['all'] else 'does not beat'} marginal on every measure that "
                   f"separates exact from marginal ({items}); {v['speedup_vs_exact']:.2f}x the speed "
                   "of exact")
    return out + [""]


def _speed_verdict_section(v: dict | None) -> list[str]:
    if not v or not v["levels"]:
        return []
    keys = [(key, label) for key, label, _ in QUALITY if key in v["exact_separates"]]
    out = ["## Best family at each measured speed", "",
           "At the speed of each set: the best point on each measure among the sets at least as fast "
           "(task validity: at the speed of the task sets). ✓ = it beats the best point of every other "
           "family that fast beyond the error bars, ≈ = within them, ? = no error bar (one MAUVE seed), "
           "no mark = no other family that fast.",
           "",
           "| at the speed of | tok/s | tok/full pass | " + " | ".join(label for _, label in keys) + " |",
           "|---|---|---|" + "---|" * len(keys)]
    for lv in v["levels"]:
        cells = []
        for key, _ in keys:
            m = lv["measures"].get(key)
            mark = "" if not m or m["runner_up"] is None else {True: " ✓", False: " ≈", None: " ?"}[
                m["beyond_error_bars"]]
            cells.append(f"{m['family']} {m['point']}{mark}" if m else "-")
        out.append(f"| {lv['method']} {lv['point']} | {lv['tokens_per_s']:.0f} | "
                   f"{lv['tokens_per_full_pass']:.2f} | " + " | ".join(cells) + " |")
    blind = [label for key, label in keys if v["exact_separates"][key] is False]
    if blind:
        out += ["", f"Exact does not beat the worst point beyond the error bars on: {', '.join(blind)}; "
                "those columns cannot rank the families at this sample size."]
    return out + [""]


def _depth_section(depth: dict[str, dict] | None) -> list[str]:
    if not depth:
        return []
    out = ["## Held-out KL to the backbone and top-1 agreement per unroll depth", "",
           "| K | KL sampler | KL marginal | ratio | top-1 sampler | top-1 marginal | positions |",
           "|---|---|---|---|---|---|---|"]
    for k, d in depth.items():
        ratio = d["kl_sampler"] / d["kl_marginal"] if d["kl_marginal"] else float("nan")
        out.append(f"| {k} | {d['kl_sampler']:.4f} | {d['kl_marginal']:.4f} | {ratio:.2f} | "
                   f"{d['top1_sampler']:.3f} | {d['top1_marginal']:.3f} | {int(d['positions'])} |")
    return out + [""]


def _task_section(result: dict) -> list[str]:
    if not result.get("task_breakdown"):
        return []
    tasks = result["task_tasks"]
    out = ["## Task validity per task", "", "| set | " + " | ".join(tasks) + " |",
           "|---|" + "---|" * len(tasks)]
    for name, per in result["task_breakdown"].items():
        out.append(f"| {name} | " + " | ".join(_fmt(per.get(t), 2) for t in tasks) + " |")
    return out + [""]


def plot(result: dict, out: Path) -> list[str]:
    """The PNG plots under `out`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    files = []
    for axis, name in enumerate(("quality_vs_speed.png", "quality_vs_tokens_per_pass.png")):
        if _plot_quality(result, out / name, axis):
            files.append(name)
    if _plot_depth(result.get("depth_metrics"), out / "depth_metrics.png"):
        files.append("depth_metrics.png")
    return files


PLOT_STYLES = {"marginal": "s--", "joint": "o-", "joint-planned": "v-", "threshold": "^:",
               "joint+threshold": "D-.", "joint+threshold-planned": "X-.", "joint+sure": "P-."}


def _plot_quality(result: dict, path: Path, axis: int) -> bool:
    """Each quality measure against tokens/s (axis 0) or tokens per full pass (axis 1), one line per
    method family, points labelled by k / τ; the fixed-k lines start at exact (k=1)."""
    import matplotlib.pyplot as plt

    rows = result["rows"]
    present = [(key, label, hib) for key, label, hib in QUALITY if any(key in r for r in rows)]
    if not present:
        return False
    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 4), squeeze=False)
    for ax, (key, label, hib) in zip(axes[0], present, strict=True):
        speed_key, lang_key = speed_keys(key)[axis], speed_keys("nll")[axis]
        x_of = {r["set"]: r.get(speed_key) or r[lang_key] for r in rows}  # no task set: language speed
        for method, style in PLOT_STYLES.items():
            with_exact = ("exact",) if method in ("marginal", "joint", "joint-planned") else ()
            pts = sorted((r for r in rows if r["method"] in (method, *with_exact) and key in r),
                         key=lambda r: x_of[r["set"]])
            if len(pts) < 1 + len(with_exact):
                continue
            xs = [x_of[r["set"]] for r in pts]
            ys = [r[key]["mean"] for r in pts]
            es = [r[key].get("se") or 0.0 for r in pts]
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=method)
            for x, y, r in zip(xs, ys, pts, strict=True):
                if r["method"] != "exact":
                    ax.annotate(point_label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ex = next((r for r in rows if r["method"] == "exact" and key in r), None)
        if ex is not None:
            ax.errorbar([x_of[ex["set"]]], [ex[key]["mean"]], yerr=[ex[key].get("se") or 0.0], fmt="k*",
                        markersize=11, capsize=3, label="exact", zorder=3)
        ax.set_xlabel("tokens / s (this run)" if axis == 0 else "tokens per full pass (measured)")
        ax.set_ylabel(label + (" (higher is better)" if hib else " (lower is better)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    what = "speed" if axis == 0 else "tokens per full pass"
    fig.suptitle(f"Quality vs {what}: {result['backbone']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_depth(depth: dict[str, dict] | None, path: Path) -> bool:
    """Held-out KL and top-1 agreement per unroll depth, sampler against the marginal baseline."""
    import matplotlib.pyplot as plt

    if not depth:
        return False
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x

