"""The GPU check's whole-epoch benchmark runs end to end (on a tiny phantom on the CPU: its chain and its table, not
its figures, which only mean something on a GPU at the paper's scale)."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def test_bench_epochs_times_every_stage_and_projects_acdc(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_epochs.py"), "--encoders", "base",
                        "--patients", "6", "--size", "32", "--batch", "8", "--width", "8", "--epochs", "2",
                        "--workers", "0", "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    base = [ln for ln in r.stdout.splitlines() if ln.startswith("| base |")]
    assert base, r.stdout
    cells = [c.strip() for c in base[-1].strip("|").split("|")]
    stage1, full, lth = (float(c.split()[0]) for c in cells[1:4])
    assert 0 < stage1 and 0 < full and 0 < lth                  # each run's last epoch, from its log.jsonl
    assert cells[4] == "- / - / -"                              # no GPU: no peak GPU memory
    n_train = int(re.search(r"(\d+) training slices", r.stdout).group(1))
    seconds = {}
    for run in ("ref", "search_full", "search_lth"):
        with open(tmp_path / "b" / "base" / run / "log.jsonl") as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == 2
        seconds[run] = rows[-1]["seconds"]
    assert float(cells[6]) == pytest.approx(200 * seconds["search_full"] * 1700 / n_train / 60, abs=0.051)
    assert float(cells[7]) == pytest.approx(43 * seconds["search_lth"] * 1700 / n_train / 60, abs=0.051)
    assert "| mean |" in r.stdout
