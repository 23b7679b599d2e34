"""The benchmark scripts run (their numbers are printed, never asserted: speed is not a test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_decode_speed_prints_every_row():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_speed.py"), "--batches", "1,2",
         "--gen-length", "8", "--ks", "2", "--repeats", "1", "--trials", "2", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=True).stdout
    assert out.count("(median of 2 trial(s))") == 2 and "c_step" in out
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] in (["exact"], ["marginal"], ["joint"])]
    assert [r[:2] for r in rows] == [["exact", "1"], ["marginal", "2"], ["joint", "2"]] * 2
    for r in rows:  # tokens/s, full passes and sampler passes are numbers; joint used the sampler
        assert float(r[2]) > 0 and int(r[3]) == (8 if r[0] == "exact" else 4)
        assert int(r[4]) == (4 if r[0] == "joint" else 0)
