"""The benchmark scripts run (their numbers are printed, never asserted: speed is not a test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_decode_speed_prints_every_row():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_speed.py"), "--batches", "1,2",
         "--gen-length", "8", "--ks", "2", "--repeats", "1", "--trials", "2", "--threads", "1",
         "--thresholds", "1.5", "--planned"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=True).stdout
    assert out.count("(median of 2 trial(s))") == 2 and "c_step" in out
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] in (["exact"], ["marginal"], ["joint"])]
    assert [r[:4] for r in rows] == [["exact", "-", "1", "-"], ["marginal", "-", "2", "-"],
                                     ["joint", "rescore", "2", "-"], ["joint", "planned", "2", "-"],
                                     ["marginal", "-", "8", "1.5"], ["joint", "rescore", "2", "1.5"]] * 2
    for r in rows:  # tokens per pass, tokens/s, full and sampler passes; joint used the sampler
        full = 8 if r[0] == "exact" or r[3] == "1.5" and r[0] == "marginal" else 4  # tau > 1: exact
        assert float(r[4]) == 8 / full and float(r[5]) > 0 and int(r[6]) == full
        assert int(r[7]) == (4 if r[0] == "joint" else 0)


def test_decode_speed_kv_cache_rows():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_speed.py"), "--kv-cache", "--batches", "1,2",
         "--prompt-length", "6", "--gen-length", "8", "--block-length", "4", "--ks", "2", "--repeats", "1",
         "--threads", "1", "--sampler-layers", "2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=True).stdout
    assert "sampler 2 layer(s)" in out.splitlines()[0]  # a two-layer sampler, cached layer by layer
    heads = [ln for ln in out.splitlines() if ln.startswith("batch ")]
    assert len(heads) == 2 and all("prompt 6, block 4" in h for h in heads)
    assert all(f"{kv}: full pass" in h and h.count("c = ") == 3 for h in heads
               for kv in ("none", "prefix", "dual"))
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] in (["exact"], ["marginal"], ["joint"])]
    want = [[m, k, kv] for m, k in (("exact", "1"), ("marginal", "2"), ("joint", "2"))
            for kv in ("none", "prefix", "dual")]
    assert [r[:3] for r in rows] == want * 2
    for r in rows:  # tokens/s, passes, speed-ups are numbers; the same passes with and without a cache
        assert float(r[3]) > 0 and int(r[4]) == (8 if r[0] == "exact" else 4)
        assert int(r[5]) == (4 if r[0] == "joint" else 0)
        assert float(r[6].rstrip("x")) > 0 and float(r[7].rstrip("x")) > 0
        if r[2] == "none":
            assert r[7] == "1.00x"
