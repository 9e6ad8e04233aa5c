"""grid.py: a tiny grid through the local backend, a SIGKILLed job resumed by re-running the grid (through
submitit's local executor) with the same rows, and the SLURM backend's submissions against fake SLURM tools."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT

GRID = os.path.join(ROOT, "grid.py")
TINY = ["--width", "8", "--batch_size", "16"]


def config(tmp_path, root, raws, seeds=(0, 1)):
    c = {"root": str(root), "datasets": {name: {"raw": raw, "flags": ["--dataset", layout, "--crop", "32", "32",
                                                                     "--workers", "1"]}
                                         for name, (layout, raw) in raws.items()},
         "backbones": ["base"], "seeds": list(seeds), "baselines": [], "modes": ["full", "lth"],
         "flags": {"all": ["--device", "cpu"], "pretrain": [*TINY, "--epochs", "2"],
                   "finetune": ["--batch_size", "16", "--epochs", "2"],
                   "search": ["--epochs", "4", "--warmup", "1", "--batch_size", "16", "--gamma", "1.5"],
                   "score": ["--device", "cpu", "--n_boot", "99"], "report": ["--n_boot", "99"]},
         "slurm": {"partition": "gpu", "gpus_per_node": 1, "time_min": 60, "array_parallelism": 4}}
    path = tmp_path / f"{os.path.basename(str(root))}.json"
    path.write_text(json.dumps(c))
    return str(path)


def grid(*args, env=None, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run([sys.executable, GRID, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if check and r.returncode:
        raise AssertionError(f"grid.py {' '.join(args)} exit {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def raws(tmp_path_factory):
    d = tmp_path_factory.mktemp("grid_raw")
    out = {}
    for name, layout in (("acdc", "acdc"), ("kits", "kits")):
        raw = str(d / name)
        subprocess.run([sys.executable, os.path.join(ROOT, "01_preprocess.py"), "--make_phantom", raw, "--layout",
                        layout, "--patients", "6", "--phantom_size", "32", "--seed", "0"],
                       check=True, capture_output=True)
        out[name] = (layout, raw)
    return out


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory, raws):
    """2 phantom data sets x 1 backbone x 2 seeds through the local backend, two jobs side by side."""
    tmp = tmp_path_factory.mktemp("grid_a")
    cfg = config(tmp, tmp / "A", raws)
    planned = grid("plan", cfg)
    ran = grid("run", cfg, "--gpus", "a,b")          # two slots (no such GPUs: the jobs run on the CPU)
    return cfg, tmp / "A", planned.stdout, ran.stdout


def rows(root, prefix):
    out = {}
    for dirpath, _, files in os.walk(os.path.join(root, prefix)):
        if "per_patient.csv" in files and dirpath.endswith("score"):
            df = pd.read_csv(os.path.join(dirpath, "per_patient.csv"))
            out[os.path.relpath(dirpath, root)] = df.sort_values(["patient", "region", "metric"]).reset_index(drop=True)
    return out


def test_local_grid_end_to_end(full_grid):
    cfg, root, planned, ran = full_grid
    assert "34 jobs" in planned                     # 2 x (01 + 2 seeds x (ref, 2 searches, 2 cells, 3 scores))
    status = grid("status", cfg).stdout
    assert " score " in status and "failed" in status
    line = {ln.split()[0]: ln.split()[1:] for ln in status.splitlines()[2:] if ln.strip()}
    assert all(v[0] == v[-1] for v in line.values()), status      # every stage: done == total
    for ds in ("acdc", "kits"):
        assert os.path.isfile(root / ds / "data" / "done.json")
        for seed in (0, 1):
            for run in ("ref", "search_full", "search_lth", "iac", "iac_lth"):
                assert os.path.isfile(root / ds / "base" / f"seed{seed}" / run / "done.json"), (ds, seed, run)
            meta = json.load(open(root / ds / "base" / f"seed{seed}" / "ref" / "args.json"))
            assert meta["args"]["resume"] is False and "git_commit" in meta["versions"] and "host" in meta
    report = grid("report", cfg).stdout
    assert "acdc: 6 of 6 runs scored" in report
    paired = pd.read_csv(root / "acdc" / "report" / "paired.csv")
    assert {"iac", "iac_lth"} <= set(paired["method"])
    summary = pd.read_csv(root / "kits" / "report" / "summary.csv")
    assert set(summary["method"]) == {"ref", "iac", "iac_lth"}
    assert os.path.isfile(root / "acdc" / "report" / "search_cost.md")
    again = grid("run", cfg).stdout                                # everything done: nothing runs
    assert "0 jobs to run" in again


def test_killed_job_resumes_to_the_same_rows(tmp_path, raws, full_grid):
    """SIGKILL a search half-way, re-run the grid through submitit's local executor: the same genotype and rows
    as the uninterrupted grid. (The finished data, reference, full search and IAC runs are copied from that grid,
    so only the LTH branch runs here.)"""
    pytest.importorskip("submitit", reason="requirements-grid.txt is not installed")
    cfg = config(tmp_path, tmp_path / "B", {"acdc": raws["acdc"]}, seeds=(0,))
    root, done = tmp_path / "B", full_grid[1]
    for part in ("data", "base/seed0/ref", "base/seed0/search_full", "base/seed0/iac"):
        shutil.copytree(done / "acdc" / part, root / "acdc" / part)
    search = root / "acdc" / "base" / "seed0" / "search_lth"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, GRID, "run", cfg], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < 600:                                   # the lth search has finished an epoch
        log = search / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 2 and not (search / "done.json").exists():
            break
        time.sleep(0.05)
    assert json.load(open(search / "grid_job.json"))["state"] == "running"
    os.killpg(p.pid, signal.SIGKILL)                                  # runner and search at once: a lost node
    p.wait()
    assert not (search / "done.json").exists()
    assert "failed" in grid("status", cfg).stdout or "running" in grid("status", cfg).stdout
    ran = grid("run", cfg, "--backend", "slurm", "--cluster", "local").stdout
    assert "search: array" in ran
    assert "resuming at epoch" in (search / "grid.log").read_text()
    assert ran.count(" of 1 jobs") == 3                              # search_lth, iac_lth, its score
    assert json.load(open(search / "genotype.json"))["edges"] == \
        json.load(open(done / "acdc" / "base" / "seed0" / "search_lth" / "genotype.json"))["edges"]
    a, b = rows(str(done), "acdc/base/seed0"), rows(str(root), "acdc/base/seed0")
    assert a.keys() == b.keys() and len(a) == 3
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k], check_exact=False, rtol=1e-9)


FAKE = """#!/usr/bin/env python3
import json, os, sys
log = os.environ["FAKE_SLURM_LOG"]
name = os.path.basename(sys.argv[0])
rec = {"tool": name, "argv": sys.argv[1:]}
if name == "sbatch":
    rec["script"] = open(sys.argv[-1]).read()
    n = sum('"sbatch"' in ln for ln in open(log)) if os.path.exists(log) else 0
    print(f"Submitted batch job {1000 + n}")
with open(log, "a") as f:
    f.write(json.dumps(rec) + "\\n")
"""


def test_slurm_backend_submits_arrays_with_dependencies(tmp_path, raws):
    """Fake sbatch/squeue/sacct/scontrol/srun on PATH record what grid.py --backend slurm gives them."""
    pytest.importorskip("submitit", reason="requirements-grid.txt is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "squeue", "sacct", "scontrol", "srun", "scancel"):
        (bin_dir / tool).write_text(FAKE)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "slurm.jsonl"
    cfg = config(tmp_path, tmp_path / "C", raws)
    out = grid("run", cfg, "--backend", "slurm", "--partition", "a100", "--time_min", "90",
               env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log)}).stdout
    subs = [json.loads(ln) for ln in log.read_text().splitlines() if json.loads(ln)["tool"] == "sbatch"]
    scripts = [s["script"] for s in subs]
    assert len(subs) == 5, out                                      # preprocess, pretrain, search, finetune, score
    sizes = [int(next(ln for ln in s.splitlines() if "--array" in ln).split("-")[-1].split("%")[0]) + 1
             for s in scripts]
    assert sizes == [2, 4, 8, 8, 12]
    assert all("#SBATCH --partition=a100" in s and "#SBATCH --time=90" in s for s in scripts)
    arrays = [next(ln for ln in s.splitlines() if "--array" in ln) for s in scripts]
    assert all(a.endswith(f"%{min(n, 4)}") for a, n in zip(arrays, sizes)), arrays   # array_parallelism 4
    assert all("--signal=USR2@" in s and "--gpus-per-node=1" in s for s in scripts)
    deps = [next((ln.split("=", 1)[1] for ln in s.splitlines() if "--dependency" in ln), None) for s in scripts]
    assert deps[0] is None and deps[1] == "afterok:1000" and deps[2] == "afterok:1001"
    assert deps[3] == "afterok:1001:1002" and deps[4] == "afterok:1001:1003"
    assert "array 1000 of 2 jobs" in out and "after 1001, 1003" in out


def test_stage_job_checkpoint_stops_the_stage_and_requeues_itself(tmp_path):
    """What submitit calls on a time-limit / preemption signal: the running stage gets SIGUSR1 (it checkpoints
    and exits 75), and the same job comes back as the submission to requeue."""
    submitit = pytest.importorskip("submitit", reason="requirements-grid.txt is not installed")
    import threading

    from conftest import load_script
    g = load_script("grid")
    child = ("import signal, sys, time\nsignal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
             "open(sys.argv[1], 'w').close()\ntime.sleep(60)\n")
    started = tmp_path / "started"
    job = g.Job("x/run", "search", "x", "base", 0, str(tmp_path / "run"), [sys.executable, "-c", child, str(started)],
                [])
    stage = g.StageJob(tuple(job))
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, stage)))
    t.start()
    t0 = time.time()
    while not started.exists() and time.time() - t0 < 30:
        time.sleep(0.02)
    requeued = stage.checkpoint()
    t.join(timeout=30)
    assert isinstance(requeued, submitit.helpers.DelayedSubmission) and isinstance(requeued.function, g.StageJob)
    assert requeued.function.job == job and stage.process.returncode == 75
    assert json.load(open(tmp_path / "run" / "grid_job.json"))["state"] == "requeued"
