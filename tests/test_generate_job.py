"""Batch generation (`jointgen generate`) on a real local Ray cluster with real Parquet files: outputs and
counters, bad rows reported by row number, resume after a killed run, settings mismatch, corrupt part."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs.generate import main, run_generate
from ray_jobs.pipeline import read_outputs, scan_outputs
from sampler import JointSampler, generate, load_backbone
from sampler.testing import make_toy_backbone

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("gen")
    bb = make_toy_backbone(d / "backbone")
    JointSampler.for_backbone(load_backbone(bb), seed=0).save(d / "sampler")
    return bb, d / "sampler"


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_outputs_counters_and_bad_rows(toy, ray_cluster, tmp_path):
    bb, samp = toy
    lines = [json.dumps({"prompt": "The quick", "task": "city"}), "{not json",
             json.dumps({"id": "chat-1", "messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"prompt": 3}), json.dumps({"other": "x"})]
    lines += [json.dumps({"prompt": f"Name {i}"}) for i in range(7)]
    src = write_jsonl(tmp_path / "prompts.jsonl", lines)
    res = run_generate({"backbone": str(bb), "sampler": str(samp), "prompts": str(src),
                        "out": str(tmp_path / "o"), "mode": "joint", "k": 4, "gen_length": 8, "batch_size": 4,
                        "progress": False})
    assert [e["row"] for e in res["errors"]] == [1, 3, 4]
    assert "not valid JSON" in res["errors"][0]["error"] and "must be a string" in res["errors"][1]["error"]
    assert res["rows"] == 9 and res["new_rows"] == 9
    t = read_outputs(tmp_path / "o")
    rows = t.to_pylist()
    assert [r["row"] for r in rows] == [0, 2] + list(range(5, 12))
    assert rows[1]["prompt_id"] == "chat-1" and rows[0]["prompt_id"] == "row-0"
    assert json.loads(rows[0]["meta"]) == {"task": "city"}
    for r in rows:
        assert len(r["tokens"]) == 8 and r["mode"] == "joint" and r["k"] == 4
        assert sorted(r["order"]) == sorted(set(r["order"])) and r["decoded_tokens"] == len(r["order"])
        # k=4 tokens per full pass on 8 tokens: at least 2 passes, at most 4 tokens per pass
        assert r["full_passes"] >= 2 and r["tokens_per_pass"] <= 4.0 + 1e-9
        assert r["batch_sampler_passes"] > 0
    # each batch of consecutive valid rows replays with the library call at seed = settings seed + first row
    b = load_backbone(bb)
    sampler = JointSampler.load(samp, b)
    for chunk in (rows[:4], rows[4:8], rows[8:]):
        again = generate(b, [r["prompt_ids"] for r in chunk], sampler=sampler, mode="joint", k=4,
                         gen_length=8, seed=chunk[0]["row"])
        assert again.tokens == [r["tokens"] for r in chunk] and chunk[0]["seed"] == chunk[0]["row"]
        assert {r["batch_size"] for r in chunk} == {len(chunk)}
    errs = [json.loads(x) for x in (tmp_path / "o" / "errors.jsonl").read_text().splitlines()]
    assert [e["row"] for e in errs] == [1, 3, 4]
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["rows"] == 9


def test_parquet_prompts_and_unconditional(toy, ray_cluster, tmp_path):
    bb, _ = toy
    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["The quick", None, "San"]}), src)
    res = run_generate({"backbone": str(bb), "prompts": str(src), "out": str(tmp_path / "o"),
                        "mode": "marginal", "k": 2, "gen_length": 6, "progress": False})
    assert [e["prompt_id"] for e in res["errors"]] == ["b"] and res["rows"] == 2
    res = run_generate({"backbone": str(bb), "num_samples": 5, "out": str(tmp_path / "u"), "mode": "exact",
                        "gen_length": 6, "progress": False})
    t = read_outputs(tmp_path / "u")
    assert t.column("prompt_id").to_pylist() == [f"sample-{i}" for i in range(5)]
    assert set(t.column("full_passes").to_pylist()) == {6}  # exact: one token per pass
    assert t.column("k").to_pylist() == [1] * 5


def test_resume_after_killed_run(toy, ray_cluster, tmp_path):
    """A run killed mid-way leaves complete part files only; the rerun generates just the missing ids."""
    bb, _ = toy
    n = 160
    lines = [json.dumps({"prompt": f"Name {i}"}) for i in range(n)]
    lines.insert(7, "[1, 2]")  # a bad row: reported in both runs, never fatal
    src = write_jsonl(tmp_path / "prompts.jsonl", lines)
    out = tmp_path / "o"
    args = ["--prompts", str(src), "--out", str(out), "--backbone", str(bb), "--mode", "exact",
            "--gen-length", "48", "--address", ray_cluster, "--set", "batch_size=2",
            "--set", "progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.cli", "generate", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
            assert proc.poll() is None, "the first run ended before it could be interrupted"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    # the dead driver's actors can finish the batch in hand (an atomic part file) before Ray reaps
    # them: count what is done once no part file has appeared for 3 s
    seen, quiet_since, deadline = -1, time.time(), time.time() + 60
    while time.time() < deadline and time.time() - quiet_since < 3:
        now = len(list(out.glob("part-*.parquet")))
        if now != seen:
            seen, quiet_since = now, time.time()
        time.sleep(0.2)
    first = {f.name: f.stat().st_mtime_ns for f in out.glob("part-*.parquet")}
    done_before = read_outputs(out).num_rows
    assert 0 < done_before < n, f"interrupt landed outside the run ({done_before} rows)"

    res = run_generate({"backbone": str(bb), "prompts": str(src), "out": str(out), "mode": "exact",
                        "gen_length": 48, "batch_size": 8, "progress": False})
    assert res["new_rows"] == n - done_before and res["rows"] == n
    assert [e["row"] for e in res["errors"]] == [7]
    after = {f.name: f.stat().st_mtime_ns for f in out.glob("part-*.parquet")}
    assert all(after[name] == mtime for name, mtime in first.items()), "finished parts were rewritten"
    ids = read_outputs(out).column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == n
    # nothing left to do: a third run generates nothing
    assert run_generate({"backbone": str(bb), "prompts": str(src), "out": str(out), "mode": "exact",
                         "gen_length": 48, "progress": False})["new_rows"] == 0


def test_settings_mismatch_and_corrupt_part(toy, ray_cluster, tmp_path):
    bb, _ = toy
    cfg = {"backbone": str(bb), "num_samples": 6, "out": str(tmp_path / "o"), "mode": "marginal", "k": 2,
           "gen_length": 6, "batch_size": 3, "progress": False}
    run_generate(cfg)
    with pytest.raises(ValueError, match="other settings"):
        run_generate({**cfg, "k": 3})
    parts = sorted((tmp_path / "o").glob("part-*.parquet"))
    assert len(parts) == 2
    parts[0].write_bytes(b"PAR1 garbage")
    res = run_generate(cfg)
    assert res["new_rows"] == 3 and res["rows"] == 6
    assert len(list((tmp_path / "o").glob("*.corrupt"))) == 1
    # a job that owns its directory (evaluation) moves outputs of other settings aside, keeping them
    logged: list[str] = []
    assert scan_outputs(tmp_path / "o", {"mode": "joint"}, logged.append, stale="move") == set()
    assert not (tmp_path / "o").exists() and len(list((tmp_path / "o.stale-1").glob("part-*.parquet"))) == 2
    assert "moved to o.stale-1" in logged[0]


def test_cli_errors_and_config_mirror(toy, tmp_path, capsys):
    assert main(["--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"),
                 "--mode", "exact"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o")]) == 2  # mode joint (the default) without a sampler
    assert "generate: sampler: mode joint needs a sampler" in capsys.readouterr().err
    assert main(["--set", "no_such_key=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
