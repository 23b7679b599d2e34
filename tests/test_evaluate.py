"""Evaluation on a small run (real local Ray cluster, real Parquet samples, real PNGs): the table, the JSON
and the plots carry the right rows; a rerun resumes from the samples on disk; bad configs are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ray_jobs.config import EvaluateConfig, validate
from ray_jobs.evaluate import main, plan_sets, run_evaluate
from ray_jobs.pipeline import read_outputs
from ray_jobs.report import family, verdict, verdict_by_speed
from sampler import JointSampler, ModelArgs, Transformer, load_backbone, save_backbone
from sampler.backbone import load_tokenizer
from sampler.embedded.tasks import make_task_examples
from sampler.testing import make_toy_backbone

pytestmark = pytest.mark.ray
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval")
    bb = make_toy_backbone(d / "backbone")
    b = load_backbone(bb)
    JointSampler.for_backbone(b, seed=0).save(d / "sampler")
    torch.manual_seed(3)
    judge = Transformer(ModelArgs(vocab_size=b.args.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  intermediate_size=128, causal=True, max_seq_len=256))
    save_backbone(judge, d / "judge", layout="qwen2", mask_id=None, bos_id=b.bos_id, eos_id=b.eos_id,
                  pad_id=b.pad_id, tokenizer=load_tokenizer(bb), dtype=torch.float32)
    tasks = d / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", **ex}) + "\n"
                             for i, ex in enumerate(make_task_examples(12, seed=0))))
    summary = d / "train_summary.json"  # the shape run_train writes
    summary.write_text(json.dumps({"depth_metrics": {
        str(k): {"kl_sampler": 0.01 * k, "kl_marginal": 0.02 * k, "top1_sampler": 0.9, "top1_marginal": 0.8,
                 "positions": 100} for k in (1, 2, 3)}}))
    return {"backbone": bb, "sampler": d / "sampler", "judge": d / "judge", "tasks": tasks,
            "summary": summary}


def small(assets: dict, out: Path, **kw) -> dict:
    return {"backbone": str(assets["backbone"]), "sampler": str(assets["sampler"]),
            "judge": str(assets["judge"]),
            "tasks": str(assets["tasks"]), "train_summary": str(assets["summary"]), "ks": [1, 2, 4],
            "num_samples": 24, "gen_length": 8, "task_gen_length": 6, "batch_size": 12, "mauve_seeds": [1],
            "thresholds": [0.5], "threshold_k": 4, "hybrid_ks": [2],  # one threshold set, one hybrid set
            "out": str(out), "progress": False, "torch_threads": 1} | kw


def test_small_run_table_json_plots_and_resume(assets, ray_cluster, tmp_path):
    out = tmp_path / "ev"
    res = run_evaluate(small(assets, out), log=lambda *_: None)
    rows = [(r["method"], r["k"], r["threshold"]) for r in res["rows"]]
    assert rows == [("exact", 1, None), ("marginal", 2, None), ("marginal", 4, None), ("joint", 2, None),
                    ("joint", 4, None), ("joint-planned", 2, None), ("joint-planned", 4, None),
                    ("threshold", 4, 0.5), ("joint+threshold", 2, 0.5)]
    for r in res["rows"]:
        assert r["n"] == 24 and r["task_validity"]["n"] == 12
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0 and r["task_tokens_per_full_pass"] >= 1
        # measured: the mean over samples of the outputs' tokens_per_pass column
        column = read_outputs(out / "samples" / r["set"]).column("tokens_per_pass").to_pylist()
        assert len(column) == 24 and r["tokens_per_full_pass"] == pytest.approx(sum(column) / 24)
        if r["method"] == "threshold":  # the sure ones (at least one) of each pass, at most threshold_k
            assert 1 <= r["tokens_per_full_pass"] <= 4 and r["sampler_passes_per_full_pass"] == 0
        elif r["method"] == "joint+threshold":  # the sampler fills up to k: k tokens per pass
            assert r["tokens_per_full_pass"] == pytest.approx(2) and r["full_passes_per_sample"] == 4
            assert 0 <= r["sampler_passes_per_full_pass"] <= 1
        else:
            assert r["full_passes_per_sample"] == pytest.approx(8 / r["k"])
            assert r["tokens_per_full_pass"] == pytest.approx(r["k"])
            sampler_passes = r["k"] - 1 if r["method"] in ("joint", "joint-planned") else 0
            assert r["sampler_passes_per_full_pass"] == pytest.approx(sampler_passes)
        for key in ("nll", "mauve_judge", "mauve_minilm"):
            assert math_ok(r[key]["mean"]) and r[key]["n"] == 24
    assert set(res["gap_recovered"]) == {"2", "4"} and set(res["verdict"]) == {"4"}
    by = {(r["method"], r["k"]): r["nll"]["mean"] for r in res["rows"]}
    g4 = res["gap_recovered"]["4"]["planned"]  # the planned order's share of the same gap
    assert g4["value"] == pytest.approx((by["marginal", 4] - by["joint-planned", 4])
                                        / (by["marginal", 4] - by["exact", 1]))
    assert list(res["depth_metrics"]) == ["1", "2", "3"]
    levels = res["verdict_by_speed"]["levels"]
    assert sorted(lv["set"] for lv in levels) == sorted(r["set"] for r in res["rows"][1:])
    by_set = {r["set"]: r for r in res["rows"]}
    for lv in levels:  # the best NLL among the sets at least as fast
        pool = [r for r in res["rows"][1:] if r["tokens_per_s"] >= lv["tokens_per_s"]]
        assert lv["measures"]["nll"]["best"] == min(pool, key=lambda r: r["nll"]["mean"])["set"]
        assert by_set[lv["measures"]["nll"]["best"]]["method"] == lv["measures"]["nll"]["family"]

    saved = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["k"], r["threshold"]) for r in saved["rows"]] == rows
    saved_sets = {r["set"]: r for r in saved["rows"]}
    for name in ("lang-threshold-k4-t0.5", "lang-joint-k2-t0.5"):
        assert saved_sets[name]["tokens_per_full_pass"] == pytest.approx(by_set[name]["tokens_per_full_pass"])
        assert saved_sets[name]["threshold"] == 0.5 and "nll" in saved_sets[name]
    assert len(saved["verdict_by_speed"]["levels"]) == 8  # one speed level per non-exact set
    assert saved["paper"]["gap_recovered"] == 0.41
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| method |"))
    table = lines[start + 2:lines.index("", start)]
    assert [ln.split("|")[1].strip() for ln in table] == [m for m, _, _ in rows]
    assert [ln.split("|")[3].strip() for ln in table] == ["-"] * 7 + ["0.5", "0.5"]  # the τ column
    assert "judge NLL / token" in report and "MAUVE (MiniLM)" in report and "task validity" in report
    assert "41%" in report and "unroll depth" in report and "## Best family at each measured speed" in report
    assert res["plots"] == ["quality_vs_speed.png", "quality_vs_tokens_per_pass.png", "depth_metrics.png"]
    for png in res["plots"]:
        data = (out / png).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(
        ["lang-exact", "lang-exact-ref", "lang-marginal-k2", "lang-joint-k2", "lang-marginal-k4",
         "lang-joint-k4", "lang-planned-k2", "lang-planned-k4", "lang-threshold-k4-t0.5",
         "lang-joint-k2-t0.5", "task-exact", "task-marginal-k2", "task-joint-k2", "task-marginal-k4",
         "task-joint-k4", "task-planned-k2", "task-planned-k4", "task-threshold-k4-t0.5",
         "task-joint-k2-t0.5"])

    # a rerun finds every sample on disk: nothing is generated again, the numbers are the same
    parts = {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("part-*.parquet")}
    again = run_evaluate(small(assets, out), log=lambda *_: None)
    assert {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("part-*.parquet")} == parts
    assert [r["nll"]["mean"] for r in again["rows"]] == [r["nll"]["mean"] for r in res["rows"]]


def math_ok(x: float) -> bool:
    return x == x and abs(x) < 1e6


def test_bad_configs_are_refused(assets, tmp_path, capsys):
    with pytest.raises(ValueError, match="sampler"):
        run_evaluate(small(assets, tmp_path / "a", sampler=None))
    with pytest.raises(ValueError, match="ks"):
        run_evaluate(small(assets, tmp_path / "b", ks=[0, 2]))
    with pytest.raises(FileNotFoundError, match="judge"):
        run_evaluate(small(assets, tmp_path / "c", judge=str(tmp_path / "nope")))
    assert main(["--set", "num_samples=3", "--sampler", str(assets["sampler"]),
                 "--backbone", str(assets["backbone"])]) == 2
    assert "num_samples" in capsys.readouterr().err
    with pytest.raises(ValueError, match="judge_feature_layer"):
        run_evaluate(small(assets, tmp_path / "d", judge_feature_layer=0))


def test_verdict_counts_only_measures_that_separate_exact_from_marginal():
    """A measure on which exact is within the error bars of marginal (MAUVE at its ceiling) cannot rank
    the methods: it is reported, not counted; a separating measure the sampler loses on fails it."""
    def row(method, k, nll, mauve, valid):
        return {"method": method, "k": k, "speedup": 2.0, "nll": {"mean": nll, "se": 0.03},
                "mauve_judge": {"mean": mauve, "se": 0.01}, "task_validity": {"mean": valid, "se": 0.02}}

    rows = [row("exact", 1, 6.4, 0.96, 0.95), row("joint", 4, 7.1, 0.95, 0.70),
            row("marginal", 4, 7.4, 0.955, 0.42)]
    v = verdict(rows, [4])["4"]
    assert v["beats_marginal"] == {"nll": True, "mauve_judge": False, "task_validity": True}
    assert v["exact_separates"] == {"nll": True, "mauve_judge": False, "task_validity": True}
    assert v["all"] is True
    rows[2]["mauve_judge"]["mean"] = 0.80  # now exact separates, and joint (0.95) beats it
    assert verdict(rows, [4])["4"]["all"] is True
    rows[1]["mauve_judge"]["mean"] = 0.79  # ... and now joint loses on a measure that counts
    assert verdict(rows, [4])["4"]["all"] is False


def test_plan_sets_names_and_method_selection():
    """Fixed-k set names as before (old outputs resume); the sweep's names carry k and tau; `methods`
    picks the families, and the threshold families run only with thresholds."""
    cfg = validate(EvaluateConfig, {"sampler": "s", "ks": [1, 4], "thresholds": [0.7, 0.9], "hybrid_ks": [4]})
    assert list(plan_sets(cfg, "lang")) == [
        "lang-exact", "lang-exact-ref", "lang-marginal-k4", "lang-joint-k4", "lang-planned-k4",
        "lang-threshold-k8-t0.9", "lang-threshold-k8-t0.7", "lang-joint-k4-t0.9", "lang-joint-k4-t0.7"]
    s = plan_sets(cfg, "task")["task-planned-k4"].settings
    assert (s.mode, s.k, s.order, s.threshold) == ("joint", 4, "planned", None)
    s = plan_sets(cfg, "task")["task-joint-k4-t0.7"].settings
    assert (s.mode, s.k, s.threshold, s.stop_at_eos) == ("joint", 4, 0.7, True)
    s = plan_sets(cfg, "lang")["lang-threshold-k8-t0.9"].settings
    assert (s.mode, s.k, s.threshold, s.stop_at_eos) == ("marginal", 8, 0.9, False)
    fixed = validate(EvaluateConfig, {"sampler": "s", "ks": [1, 4], "methods": ["marginal", "joint"]})
    assert list(plan_sets(fixed, "task")) == ["task-exact", "task-marginal-k4", "task-joint-k4"]
    # fill "sure" is opt-in: its own family beside the hybrid, at the hybrid's k and taus
    sure = validate(EvaluateConfig, {"sampler": "s", "ks": [1], "thresholds": [0.9], "hybrid_ks": [8],
                                     "methods": ["hybrid", "sure"]})
    assert list(plan_sets(sure, "task")) == ["task-exact", "task-joint-k8-t0.9", "task-sure-k8-t0.9"]
    s = plan_sets(sure, "task")["task-sure-k8-t0.9"].settings
    assert (s.mode, s.k, s.threshold, s.fill) == ("joint", 8, 0.9, "sure") and family(s) == "joint+sure"
    assert family(plan_sets(sure, "task")["task-joint-k8-t0.9"].settings) == "joint+threshold"
    # the hybrid with the planned order is opt-in too, its own family, set names apart from fixed-k planned
    planned = validate(EvaluateConfig, {"sampler": "s", "ks": [1, 6], "thresholds": [0.9], "hybrid_ks": [6],
                                        "methods": ["planned", "hybrid-planned"]})
    assert list(plan_sets(planned, "task")) == ["task-exact", "task-planned-k6", "task-planned-k6-t0.9"]
    s = plan_sets(planned, "task")["task-planned-k6-t0.9"].settings
    assert (s.mode, s.k, s.threshold, s.order, s.fill) == ("joint", 6, 0.9, "planned", "k")
    assert family(s) == "joint+threshold-planned"
    assert family(plan_sets(planned, "task")["task-planned-k6"].settings) == "joint-planned"
    with pytest.raises(ValueError, match="sampler"):
        validate(EvaluateConfig, {"ks": [1], "thresholds": [0.9], "methods": ["hybrid-planned"]})
    # no thresholds: no threshold families, and no joint set at all, so no sampler is needed
    none = validate(EvaluateConfig, {"ks": [1, 4], "thresholds": [], "methods": ["marginal", "hybrid"]})
    assert list(plan_sets(none, "task")) == ["task-exact", "task-marginal-k4"]


def test_verdict_by_speed_ranks_families_among_the_sets_at_least_as_fast():
    def row(method, k, tau, tps, nll, task_tps, valid):
        return {"method": method, "k": k, "threshold": tau, "set": f"{method}-{k}-{tau}",
                "tokens_per_s": tps, "tokens_per_full_pass": k / 2, "nll": {"mean": nll, "se": 0.03},
                "task_tokens_per_s": task_tps, "task_validity": {"mean": valid, "se": 0.02}}

    rows = [row("exact", 1, None, 100, 6.0, 30, 0.95), row("marginal", 4, None, 300, 7.4, 70, 0.4),
            row("joint", 4, None, 250, 7.0, 60, 0.7), row("threshold", 8, 0.9, 280, 6.6, 90, 0.5),
            row("joint+threshold", 4, 0.9, 240, 6.5, 50, 0.8)]
    v = verdict_by_speed(rows)
    assert [lv["method"] for lv in v["levels"]] == ["joint+threshold", "joint", "threshold", "marginal"]
    nll = [lv["measures"]["nll"] for lv in v["levels"]]
    assert [m["family"] for m in nll] == ["joint+threshold", "threshold", "threshold", "marginal"]
    assert [m["runner_up_family"] for m in nll] == ["threshold", "joint", "marginal", None]
    assert [m["beyond_error_bars"] for m in nll] == [True, True, True, None]
    assert nll[0]["point"] == "k=4 τ=0.9" and nll[1]["point"] == "τ=0.9"
    # task validity is ranked at the task sets' speed: nothing else is as fast as the threshold task set
    at_threshold = v["levels"][2]["measures"]["task_validity"]
    assert (at_threshold["best"], at_threshold["runner_up"]) == ("threshold-8-0.9", None)
    assert v["exact_separates"] == {"nll": True, "task_validity": True}
    rows[4]["nll"]["mean"] = 6.58  # within the error bars of the threshold point
    assert verdict_by_speed(rows)["levels"][0]["measures"]["nll"]["beyond_error_bars"] is False
    rows[0]["nll"]["mean"] = 7.39  # exact no better than the worst point: NLL cannot rank anything
    assert verdict_by_speed(rows)["exact_separates"]["nll"] is False


def test_quickstart_end_to_end_on_a_toy_backbone(assets, ray_cluster, tmp_path, capsys):
    """`jointgen quickstart`: teacher -> train -> evaluate under one directory, every stage small."""
    from ray_jobs.quickstart import main as quickstart_main

    out = tmp_path / "qs"
    args = ["--out", str(out), "--backbone", str(assets["backbone"]), "--set", "gen_length=8",
            "--set", "teacher={num_trajectories: 32, batch_size: 16, chunk_size: 16, actors: 1}",
            "--set", "train={steps: 6, val_every: 3, checkpoint_every: 3, val_windows_per_depth: 4, "
                     "k_max: 3, workers: 1}",
            "--set", f"evaluate={{ks: [1, 2], num_samples: 16, batch_size: 16, judge: {assets['judge']}, "
                     "mauve_features: [judge], mauve_seeds: [1, 2]}"]
    assert quickstart_main(args) == 0
    printed = capsys.readouterr().out
    assert "# jointgen quickstart" in printed and "| joint | 2 |" in printed
    assert "| threshold | 8 | 0.9 |" in printed and "| joint+threshold | 4 | 0.9 |" in printed  # its sweep
    assert (out / "teacher" / "manifest.json").exists()  # unconditional trajectories
    assert (out / "teacher_tasks" / "manifest.json").exists()  # task answers, their own short run
    teacher_data = json.loads((out / "train" / "sampler" / "sampler.json").read_text())["teacher_data"]
    assert teacher_data == f"{out / 'teacher'},{out / 'teacher_tasks'}"  # trained on both
    for f in ("report.md", "quickstart.json", "evaluate/report.md", "evaluate/results.json",
              "evaluate/quality_vs_speed.png", "evaluate/depth_metrics.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "quickstart.json").read_text())
    assert set(saved["times"]) == {"teacher_s", "train_s", "evaluate_s", "total_s"}
    assert saved["train"]["steps"] == 6
    assert quickstart_main(["--set", "no_such_key=1"]) == 2
