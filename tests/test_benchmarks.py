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


def test_record_replaces_its_section_in_place_and_adds_new_ones_above_the_archive(tmp_path, monkeypatch):
    """benchmarks/_common.record: a re-run replaces the section of its heading where it stands (under its question,
    headings inside the body demoted so they stay inside it: the duplicate 'Search cost' section of 2026-12-02);
    a new heading lands just above the archive; the file is never left half-written."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import _common
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n# 1. Question\n\n## A (a.py)\n\nold A\n\n## Reading: A\n\nby hand\n\n"
                    "# 2. Other\n\n## B (b.py)\n\nold B\n\n# Archive\n\n## Archived: C\n\nold C\n")
    monkeypatch.setattr(_common, "RESULTS", str(path))
    for _ in range(2):
        _common.record("A (a.py)", "new A\n\n## sub\n\ntable")
    _common.record("D (d.py)", "new D")
    text = path.read_text()
    assert text.count("## A (a.py)") == 1 and "old A" not in text and "#### sub" in text and "\n## sub" not in text
    assert text.index("# 1. Question") < text.index("## A (a.py)") < text.index("## Reading: A") < text.index("# 2.")
    assert "by hand" in text and "old B" in text and "old C" in text
    assert text.index("## B (b.py)") < text.index("## D (d.py)") < text.index("# Archive")
    assert not os.path.exists(str(path) + ".tmp")
