"""grid.py: a tiny grid through the local backend, a SIGKILLed job resumed by re-running the grid (through
submitit's local executor) with the same rows, and the SLURM backend's submissions against fake SLURM tools."""
import importlib.util
import json
import os
import re
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


NNUNET = {"datasets": ["acdc"], "seeds": [0], "device": "cpu", "methods": ["ref", "lth"],
          "flags": {"plan": ["-np", "1", "-npfp", "1"], "predict": ["--disable_tta", "-npp", "1", "-nps", "1"],
                    "score": ["--n_boot", "99"]},
          "env": {"all": {"nnUNet_compile": "f", "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", "IAC_ITERS": "2",
                          "IAC_VAL_ITERS": "1", "OMP_NUM_THREADS": "1"},
                  "train": {"IAC_EPOCHS": "2"}, "search": {"IAC_EPOCHS": "4", "IAC_WARMUP": "1", "IAC_TAU0": "10"},
                  "cell": {"IAC_EPOCHS": "2"}}}


def config(tmp_path, root, raws, seeds=(0, 1), nnunet=None):
    c = {"root": str(root), **({"nnunet": nnunet} if nnunet else {}),
         "datasets": {name: {"raw": raw, "flags": ["--dataset", layout, "--crop", "32", "32", "--processes", "1"]}
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
    """2 phantom data sets x 1 backbone x 2 seeds through the local backend, two jobs side by side, and ACDC's
    nnU-Net track (reference and IAC-LTH, one seed) where nnU-Net is installed."""
    tmp = tmp_path_factory.mktemp("grid_a")
    nnunet = NNUNET if importlib.util.find_spec("nnunetv2") else None
    cfg = config(tmp, tmp / "A", raws, nnunet=nnunet)
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
    nnunet = "nnunet" in json.load(open(cfg))
    assert f"{34 + 8 * nnunet} jobs" in planned     # 2 x (01 + 2 seeds x (ref, 2 searches, 2 cells, 3 scores)) + 8
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
    if nnunet:                                       # Table 2's rows beside Table 1's, on the same test patients
        assert "nnU-Net track: 1 of 1 scoring jobs" in report and "WARNING" not in report, report
        nn = paired[(paired["backbone"] == "nnunet_2d_da:PlainConvUNet") & (paired["n"] > 0)]
        assert set(zip(nn["vs"], nn["method"])) == {("ref", "iac_lth")}, paired
        said = paired[(paired["backbone"] == "nnunet_2d_da:PlainConvUNet") & (paired["n"] == 0)]   # no IAC there
        assert list(zip(said["vs"], said["seeds_left_out"])) == [("iac", "no iac rows on this backbone (iac_lth has "
                                                                          "seed 0)")], paired
        summary = pd.read_csv(root / "acdc" / "report" / "summary.csv")
        assert set(summary.loc[summary["backbone"] == "nnunet_2d_da:PlainConvUNet", "method"]) == {"ref", "iac_lth"}
        rows_nn = pd.read_csv(root / "acdc" / "nnunet" / "2d_da" / "fold0" / "seed0" / "score" / "per_patient.csv")
        rows_sl = pd.read_csv(root / "acdc" / "base" / "seed0" / "ref" / "score" / "per_patient.csv")
        assert set(rows_nn["patient_id"].astype(str)) == set(rows_sl["patient_id"].astype(str))
        cost = pd.read_csv(root / "acdc" / "report" / "search_runs.csv")
        assert any(n.startswith("nnunet_") for n in cost["search"]), cost
        fold = root / "acdc" / "nnunet" / "seed0" / "results" / "Dataset501_acdc"
        assert (fold / "nnUNetTrainerIACLTH__nnUNetPlans__2d" / "fold_0" / "iac_cell.json").exists()


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
    assert "[submit] acdc/base/seed0/search_lth: job" in ran
    assert "resuming at epoch" in (search / "grid.log").read_text()
    assert ran.count("[submit]") == 3                                # search_lth, iac_lth, its score
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
subs = [json.loads(ln) for ln in open(log) if '"sbatch"' in ln] if os.path.exists(log) else []
if name == "sbatch":
    rec["script"] = open(sys.argv[-1]).read()
    print(f"Submitted batch job {1000 + len(subs)}")
fails = os.environ.get("FAKE_SQUEUE_FAILS")   # a file: how many of the next squeue calls fail (a busy slurmctld)
left = int(open(fails).read()) if name == "squeue" and fails else 0
if left > 0:
    open(fails, "w").write(str(left - 1))
    print("slurm_load_jobs error: Socket timed out on send/recv operation", file=sys.stderr)
    sys.exit(1)
states = os.environ.get("FAKE_SLURM_STATES")   # a file: {id: {"squeue": [STATE, reason] or null, "sacct": STATE}}
states = json.load(open(states)) if states and os.path.exists(states) else {}
if name == "squeue":                        # every job submitted so far is pending, under its name, unless told
    for i, sub in enumerate(subs):
        job_name = next(ln.split("=", 1)[1] for ln in sub["script"].splitlines() if ln.startswith("#SBATCH --job-name"))
        shown = states.get(str(1000 + i), {}).get("squeue", ["PENDING", "Dependency"])
        if shown:
            print(f"{1000 + i}|{shown[0]}|{shown[1]}|{job_name}")
if name == "sacct":
    for i in sys.argv[sys.argv.index("-j") + 1].split(","):
        if states.get(i, {}).get("sacct"):
            print(f"{i}|{states[i]['sacct']}")
with open(log, "a") as f:
    f.write(json.dumps(rec) + "\\n")
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """The FAKE SLURM tools on PATH (for subprocesses and this process); returns (env, the log of their calls)."""
    pytest.importorskip("submitit", reason="requirements-grid.txt is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "squeue", "sacct", "scontrol", "srun", "scancel"):
        (bin_dir / tool).write_text(FAKE)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "slurm.jsonl"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env, log


def test_slurm_backend_submits_a_job_per_run_with_its_own_dependencies(tmp_path, raws, fake_slurm, monkeypatch,
                                                                        capsys):
    """Fake sbatch/squeue/sacct/scontrol/srun on PATH record what grid.py --backend slurm gives them: one job per
    grid job, each `afterok` on exactly the jobs it needs, `--kill-on-invalid-dep`; a second `run` while they
    are queued submits nothing, also when squeue fails a few times first, and one while squeue keeps failing
    submits nothing and says so (a failed squeue is not an empty queue)."""
    from conftest import load_script
    g = load_script("grid")
    env, log = fake_slurm
    cfg = config(tmp_path, tmp_path / "C", raws)
    out = grid("run", cfg, "--backend", "slurm", "--partition", "a100", "--time_min", "90", env=env).stdout
    subs = [json.loads(ln) for ln in log.read_text().splitlines() if json.loads(ln)["tool"] == "sbatch"]
    scripts = [s["script"] for s in subs]
    jobs = g.plan(g.load_config(cfg))
    assert len(subs) == len(jobs) == 34, out                      # nothing done yet: every job, in plan order
    assert all("#SBATCH --partition=a100" in s and "#SBATCH --time=90" in s for s in scripts)
    assert all("--signal=USR2@" in s and "--gpus-per-node=1" in s and "--kill-on-invalid-dep=yes" in s
               and "--array" not in s for s in scripts)
    slurm_id = {j.id: str(1000 + i) for i, j in enumerate(jobs)}
    for j, script in zip(jobs, scripts):
        dep = next((ln.split("=", 1)[1] for ln in script.splitlines() if "--dependency" in ln), None)
        want = "afterok:" + ":".join(slurm_id[d] for d in j.deps) if j.deps else None
        assert dep == want, (j.id, dep, want)
        assert json.load(open(os.path.join(j.out, "grid_submit.json")))["slurm_job"] == slurm_id[j.id]
    assert "[submit] acdc/base/seed0/iac: job 1003, after 1001, 1002" in out, out
    again = grid("run", cfg, "--backend", "slurm", env=env).stdout          # all still queued: left alone
    assert sum(json.loads(ln)["tool"] == "sbatch" for ln in log.read_text().splitlines()) == 34, again
    assert again.count("[kept]") == 34 and "0 jobs submitted" in again
    status = grid("status", cfg, env=env).stdout
    line = {ln.split()[0]: ln.split()[1:] for ln in status.splitlines()[2:] if ln.strip() and ":" not in ln}
    assert line["search"][g.STATES.index("submitted")] == "8", status

    fails = tmp_path / "squeue_fails"
    for k, v in {**env, "FAKE_SQUEUE_FAILS": str(fails)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(g, "SQUEUE_WAIT_S", 0)
    fails.write_text(str(g.SQUEUE_TRIES - 1))                          # the last try answers: all kept
    g.main(g.get_args(["run", cfg, "--backend", "slurm"]))
    assert "0 jobs submitted" in capsys.readouterr().out and fails.read_text() == "0"
    fails.write_text(str(g.SQUEUE_TRIES))                              # no answer at all: nothing submitted
    with pytest.raises(g.InputError, match="squeue failed 4 times.*nothing was submitted"):
        g.main(g.get_args(["run", cfg, "--backend", "slurm"]))
    assert sum(json.loads(ln)["tool"] == "sbatch" for ln in log.read_text().splitlines()) == 34


def submitted(log):
    return [json.loads(ln) for ln in log.read_text().splitlines() if json.loads(ln)["tool"] == "sbatch"] \
        if log.exists() else []


def test_a_local_run_then_slurm(tmp_path, raws, fake_slurm):
    """A root first run with --backend local, then --backend slurm: a "running" record whose local runner and stage
    are gone (an old record without pids; a dead pid; a live pid whose start time says it is another process now)
    is `waiting` in status and submitted again, with no KeyError; a job whose stage still runs (its runner killed)
    is kept, and its dependants wait for a later run; the local backend in turn leaves a job SLURM has queued alone."""
    from conftest import load_script
    g = load_script("grid")
    env, log = fake_slurm
    cfg = config(tmp_path, tmp_path / "L", {"acdc": raws["acdc"]}, seeds=(0,))
    jobs = {j.stage: j for j in g.plan(g.load_config(cfg))}
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host, me = os.uname().nodename, os.getpid()

    def record(job, **pids):
        os.makedirs(job.out, exist_ok=True)
        g.atomic_write_json(os.path.join(job.out, g.STATE), {"state": "running", "host": host, **pids})

    g.set_state(jobs["preprocess"], "running", slot=None)                           # no pids: before this fix
    record(jobs["pretrain"], runner_pid=gone.pid, stage_pid=me, stage_start=g.process_start(me))   # stage alive
    status = grid("status", cfg, env=env).stdout
    assert "waiting: acdc/data  (its local runner" in status and "is gone" in status, status
    out = grid("run", cfg, "--backend", "slurm", env=env).stdout
    assert "[submit] acdc/data: job 1000" in out and "[kept] acdc/base/seed0/ref: local runner" in out, out
    assert "[skip] acdc/base/seed0/search_lth: needs acdc/base/seed0/ref" in out and len(submitted(log)) == 1
    record(jobs["pretrain"], runner_pid=me, runner_start=g.process_start(me) + 1)   # that pid is another process now
    out = grid("run", cfg, "--backend", "slurm", env=env).stdout
    assert "[kept] acdc/data: SLURM job 1000 PENDING" in out and "[submit] acdc/base/seed0/ref: job 1001, after 1000" \
        in out, out
    assert len(submitted(log)) == 9                                 # every job once
    local = grid("run", cfg, env=env, check=False).stdout            # all of them queued on SLURM: nothing runs here
    assert "local backend: 0 jobs to run" in local and local.count("[kept]") == 9, local


def test_two_runs_on_one_root_and_a_killed_submission(tmp_path, raws, fake_slurm, monkeypatch, capsys):
    """While one `grid.py run` works on a root a second one refuses, naming the first, and submits nothing. A run
    killed between sbatch and its record of the SLURM job id: the next run finds that job in squeue by the name it
    was submitted under and adopts it (no second copy), and its dependants depend on it."""
    from conftest import load_script
    g = load_script("grid")
    env, log = fake_slurm
    cfg = config(tmp_path, tmp_path / "T", {"acdc": raws["acdc"]}, seeds=(0,))
    root = str(tmp_path / "T")
    with g.grid_lock(root):
        for backend in ("slurm", "local"):
            r = grid("run", cfg, "--backend", backend, env=env, check=False)
            assert r.returncode == 1 and "another `grid.py run` is working on" in r.stdout + r.stderr, r
            assert f"pid {os.getpid()}" in r.stdout + r.stderr
    assert submitted(log) == [] and not os.path.exists(os.path.join(root, "acdc", "data", "grid_job.json"))

    real = g.atomic_write_json

    def killed_after_sbatch(path, obj):
        if "slurm_job" in obj:
            raise KeyboardInterrupt                                   # the run dies before it records the job id
        real(path, obj)

    monkeypatch.setattr(g, "atomic_write_json", killed_after_sbatch)
    with pytest.raises(KeyboardInterrupt):
        g.main(g.get_args(["run", cfg, "--backend", "slurm"]))
    first = g.plan(g.load_config(cfg))[0]
    assert len(submitted(log)) == 1 and "submitting" in json.load(open(os.path.join(first.out, g.SUBMIT)))
    monkeypatch.setattr(g, "atomic_write_json", real)
    capsys.readouterr()
    g.main(g.get_args(["status", cfg]))
    assert "submission iac_preprocess_" in capsys.readouterr().out
    g.main(g.get_args(["run", cfg, "--backend", "slurm"]))
    out = capsys.readouterr().out
    assert "[adopted] acdc/data: SLURM job 1000" in out and "[kept] acdc/data: SLURM job 1000 PENDING" in out, out
    assert "[submit] acdc/base/seed0/ref: job 1001, after 1000" in out and len(submitted(log)) == 9
    assert json.load(open(os.path.join(first.out, g.SUBMIT)))["slurm_job"] == "1000"


STAGE = """import sys, time
time.sleep(float(sys.argv[2]))                 # still importing: a stop signal now waits, blocked, until below
from common.runs import Preempted, check_stop, install_stop_signals
install_stop_signals()
open(sys.argv[1], "w").close()
try:
    while True:
        check_stop()
        time.sleep(0.05)
except Preempted as e:
    print(f"stopped by {e}", flush=True)
    sys.exit(75)
"""


def test_stage_job_checkpoint_stops_the_stage_and_requeues_itself(tmp_path):
    """What submitit calls on a time-limit / preemption signal: the running stage gets SIGUSR1 (it checkpoints
    and exits 75), and the same job comes back as the submission to requeue."""
    submitit = pytest.importorskip("submitit", reason="requirements-grid.txt is not installed")
    import threading

    from conftest import load_script
    g = load_script("grid")
    started = tmp_path / "started"
    job = g.Job("x/run", "search", "x", "base", 0, str(tmp_path / "run"),
                [sys.executable, "-c", STAGE, str(started), "0"], [])
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
    assert "checkpoint: the stage stopped" in (tmp_path / "run" / "grid.log").read_text()


def test_checkpoint_inside_a_signal_handler_awaits_the_stage_without_stalling(tmp_path):
    """As on SLURM: the runner's main thread waits for the stage, SIGUSR2 reaches the stage (while it is still
    importing) and the runner, whose handler calls checkpoint(). The stage stops cleanly (exit 75, not killed
    by the signal it could not handle yet), and checkpoint() returns as soon as it has: it does not wait out its
    stop_wait_s (a nested Popen.wait(timeout) from the handler did, whatever the stage did)."""
    pytest.importorskip("submitit", reason="requirements-grid.txt is not installed")
    runner = f"""import json, os, signal, sys, threading, time
sys.path.insert(0, {ROOT!r})
sys.argv = ["grid.py"]
import importlib.util
spec = importlib.util.spec_from_file_location("grid", {os.path.join(ROOT, "grid.py")!r})
g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
out = {str(tmp_path / "run")!r}
job = g.Job("x/run", "search", "x", "base", 0, out, [sys.executable, "-c", {STAGE!r}, out + "/started", "1.5"], [])
stage = g.StageJob(tuple(job), stop_wait_s=60)
def handler(signum, frame):                     # what submitit's handler does: checkpoint, then leave
    t0 = time.time()
    stage.checkpoint()
    json.dump({{"seconds": time.time() - t0, "rc": stage.process.returncode}}, open(out + "/result.json", "w"))
    sys.exit(0)
signal.signal(signal.SIGUSR2, handler)
def scheduler():                                # SLURM: the warning signal to every process of the step
    while stage.process is None:
        time.sleep(0.01)
    time.sleep(0.3)
    stage.process.send_signal(signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGUSR2)
threading.Thread(target=scheduler, daemon=True).start()
stage()
"""
    r = subprocess.run([sys.executable, "-c", runner], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.load(open(tmp_path / "run" / "result.json"))
    assert result["rc"] == 75, (result, (tmp_path / "run" / "grid.log").read_text())
    assert result["seconds"] < 30, result                       # returned when the stage left, not after 60 s
    assert re.search(r"stopped by SIGUSR[12]", (tmp_path / "run" / "grid.log").read_text())   # pending, then handled


def test_slurm_states_from_the_whole_list(tmp_path, raws, fake_slurm, monkeypatch):
    """Every state SLURM still holds a job in (stopped, suspended, preempted while squeue shows it, held, requeued,
    signalled, one this grid does not know) is live: nothing is submitted again. A failed job is submitted again,
    but first its dependant pending on it (DependencyNeverSatisfied) is cancelled, and so is one that waits on a lost
    job; a PREEMPTED job squeue no longer shows (sacct's word) is terminal. A record a local runner left on another
    host: status says how to clear it, and `forget` does."""
    env, log = fake_slurm
    states = tmp_path / "states.json"
    env = {**env, "FAKE_SLURM_STATES": str(states)}
    monkeypatch.setenv("FAKE_SLURM_STATES", str(states))
    cfg = config(tmp_path, tmp_path / "W", {"acdc": raws["acdc"]}, seeds=(0,))
    grid("run", cfg, "--backend", "slurm", env=env)
    ids = {j: str(1000 + i) for i, j in enumerate(["data", "ref", "search_full", "iac", "search_lth", "iac_lth",
                                                   "ref/score", "iac/score", "iac_lth/score"])}
    held = {"data": "STOPPED", "ref": "SUSPENDED", "search_full": "PREEMPTED", "iac": "REQUEUE_HOLD",
            "search_lth": "RESV_DEL_HOLD", "iac_lth": "SPECIAL_EXIT", "ref/score": "PENDING", "iac/score": "SIGNALING",
            "iac_lth/score": "SOME_NEW_STATE"}
    states.write_text(json.dumps({ids[j]: {"squeue": [st, "JobHeldUser" if st == "PENDING" else "None"]}
                                  for j, st in held.items()}))
    again = grid("run", cfg, "--backend", "slurm", env=env).stdout
    assert "0 jobs submitted" in again and again.count("[kept]") == 9, again
    status = grid("status", cfg, env=env).stdout
    assert "  failed:" not in status and "  blocked:" not in status and "  requeued: acdc/base/seed0/iac " in status
    assert "SOME_NEW_STATE" in again and "`scancel` it to submit anew" in again, again
    assert len(submitted(log)) == 9

    states.write_text(json.dumps({
        ids["search_full"]: {"squeue": None, "sacct": "PREEMPTED"},       # ended: preempted, not requeued
        ids["iac"]: {"squeue": ["PENDING", "DependencyNeverSatisfied"]},  # would wait forever
        ids["iac/score"]: {"squeue": ["PENDING", "Dependency"]},
        ids["search_lth"]: {"squeue": None},                              # lost: squeue and sacct forgot it
        ids["iac_lth"]: {"squeue": ["PENDING", "Dependency"]}}))          # waits on the lost job
    out = grid("run", cfg, "--backend", "slurm", env=env).stdout
    calls = [json.loads(ln) for ln in log.read_text().splitlines()]
    cancels = [c["argv"][0] for c in calls if c["tool"] == "scancel"]
    first_new = [i for i, c in enumerate(calls) if c["tool"] == "sbatch"][9]
    assert cancels[:2] == [ids["iac"], ids["iac/score"]], (cancels, out)          # blocked: before any submission
    assert all(i < first_new for i, c in enumerate(calls) if c["tool"] == "scancel" and c["argv"][0] in cancels[:2])
    assert sorted(cancels[2:]) == [ids["iac_lth"], ids["iac_lth/score"]], cancels   # wait on jobs submitted again
    assert "[cancel] acdc/base/seed0/iac: SLURM job 1003" in out, out
    new = [ln for ln in out.splitlines() if ln.startswith("[submit]")]
    assert [ln.split(":")[0] for ln in new] == ["[submit] acdc/base/seed0/search_full", "[submit] acdc/base/seed0/iac",
                                                "[submit] acdc/base/seed0/search_lth",
                                                "[submit] acdc/base/seed0/iac_lth",
                                                "[submit] acdc/base/seed0/iac/score",
                                                "[submit] acdc/base/seed0/iac_lth/score"], out
    assert "[submit] acdc/base/seed0/iac: job 1010, after 1001, 1009" in out, out
    states.write_text(json.dumps({ids["ref"]: {"squeue": None, "sacct": "RUNNING"}}))   # a stale accounting record
    status = grid("status", cfg, env=env).stdout
    assert f"SLURM job {ids['ref']} is gone" in status and "`run` submits it again" in status, status

    from conftest import load_script
    g = load_script("grid")
    job = next(j for j in g.plan(g.load_config(cfg)) if j.id == "acdc/base/seed0/ref")
    os.remove(os.path.join(job.out, g.SUBMIT))
    g.atomic_write_json(os.path.join(job.out, g.STATE), {"state": "running", "host": "gone-node", "runner_pid": 7})
    status = grid("status", cfg, env=env).stdout
    assert "not checked from this host" in status and "grid.py forget CONFIG --only acdc/base/seed0/ref" in status
    forgot = grid("forget", cfg, "--only", "acdc/base/seed0", env=env).stdout
    assert "[forgot] acdc/base/seed0/ref: was running" in forgot and "[kept] acdc/base/seed0/iac:" in forgot, forgot
    assert not os.path.exists(os.path.join(job.out, g.STATE))


FAKE_TRAINER = """import json, os, sys, time
from common.runs import Preempted, check_stop, install_stop_signals
install_stop_signals()
ckpt, final, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = json.load(open(ckpt))["epoch"] if "--c" in sys.argv and os.path.exists(ckpt) else 0
print(f"start at epoch {start}", flush=True)
try:
    for e in range(start, epochs):
        for _ in range(4):
            check_stop()
            time.sleep(0.05)
        json.dump({"epoch": e + 1}, open(ckpt + ".tmp", "w"))
        os.replace(ckpt + ".tmp", ckpt)
except Preempted as p:
    print(f"stopped by {p}", flush=True)
    sys.exit(75)
open(final, "w").write("done")
"""
FAKE_PREDICT = """import os, sys, time
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for case in sys.argv[2:]:
    time.sleep(0.3)
    open(os.path.join(out, case + ".nii.gz"), "w").write("x")
"""


def job_script(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "nnunet_job.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))


def wait_for(cond, timeout=60):
    t0 = time.time()
    while not cond() and time.time() - t0 < timeout:
        time.sleep(0.05)
    assert cond(), "timed out"


def test_nnunet_job_requeues_and_resumes(tmp_path):
    """scripts/nnunet_job.py, the nnU-Net track's job: a trainer stopped by a signal (the grid runner's USR1, SLURM's
    USR2 to every process) exits 75 after its last saved epoch, and the same job continues from it (`--c`) to
    done.json; a prediction killed half-way leaves no output folder and runs again whole; one that lacks a case is an
    error; a step whose file is there already is done without running."""
    ckpt, final, job = tmp_path / "latest.json", tmp_path / "final.txt", tmp_path / "job"
    cmd = ["--out", str(job), "--expect", str(final), "--train", "--", sys.executable, "-c", FAKE_TRAINER,
           str(ckpt), str(final), "30", "--c"]
    for sig, both in ((signal.SIGUSR1, False), (signal.SIGUSR2, True)):
        before = json.loads(ckpt.read_text())["epoch"] if ckpt.exists() else 0
        p = job_script(*cmd)
        wait_for(lambda: ckpt.exists() and json.loads(ckpt.read_text())["epoch"] >= before + 2)
        p.send_signal(sig)
        if both:                                                   # SLURM: the trainer gets it too
            subprocess.run(["pkill", f"-{sig.name[3:]}", "-P", str(p.pid)])
        out = p.communicate(timeout=60)[0]
        assert p.returncode == 75 and "stopped by SIGUSR" in out and not (job / "done.json").exists(), out
    stopped_at = json.loads(ckpt.read_text())["epoch"]
    p = job_script(*cmd)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and f"start at epoch {stopped_at}" in out and (job / "done.json").exists(), out
    p = job_script("--out", str(tmp_path / "again"), "--expect", str(final), "--train", "--", "false")
    assert p.communicate(timeout=60)[0] and p.returncode == 0 and (tmp_path / "again" / "done.json").exists()
    for end in (signal.SIGINT, signal.SIGKILL):                     # Ctrl-C, or the job killed: no step left running
        pid = tmp_path / f"pid{end}"
        p = job_script("--out", str(tmp_path / f"k{end}"), "--expect", str(tmp_path / "never"), "--", sys.executable,
                       "-c", f"import os, time; open({str(pid)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
        wait_for(lambda: pid.exists() and pid.read_text())
        p.send_signal(end)
        p.communicate(timeout=60)
        step = int(pid.read_text())
        wait_for(lambda: not os.path.exists(f"/proc/{step}") or "Z" in open(f"/proc/{step}/stat").read().split()[2],
                 timeout=10)
        assert p.returncode == (75 if end == signal.SIGINT else -9)

    images, pred = tmp_path / "imagesTs", tmp_path / "p" / "pred"
    images.mkdir()
    cases = [f"c{i}" for i in range(6)]
    for c in cases:
        (images / f"{c}_0000.nii.gz").write_text("x")
    predict = ["--out", str(tmp_path / "p"), "--expect", str(pred), "--predict", str(images), str(pred), "--",
               sys.executable, "-c", FAKE_PREDICT, str(pred) + ".partial"]
    p = job_script(*predict, *cases)
    wait_for(lambda: os.path.isdir(str(pred) + ".partial") and len(os.listdir(str(pred) + ".partial")) >= 2)
    p.send_signal(signal.SIGTERM)
    assert p.communicate(timeout=60) and p.returncode == 75 and not pred.exists()
    p = job_script(*predict, *cases[:4])                           # two cases missing: not done
    assert "lacks 2 case(s)" in p.communicate(timeout=60)[0] and p.returncode == 1 and not pred.exists()
    p = job_script(*predict, *cases)
    assert p.communicate(timeout=60) and p.returncode == 0 and sorted(os.listdir(pred)) == \
        sorted(f"{c}.nii.gz" for c in cases) and not os.path.exists(str(pred) + ".partial")


def test_nnunet_track_under_slurm(tmp_path, raws, fake_slurm, monkeypatch):
    """The nnU-Net track planned and submitted with the fake SLURM tools: every job once, each `afterok` on exactly
    the jobs it needs (conversion on the slice track's split, planning on the conversion, the cell on its search and
    reference, scoring on the predictions), the trainers resuming with `--c` inside nnunet_job.py; a search that fails
    blocks only its dependants (its cell, prediction and scoring), which a re-run cancels and submits again after it,
    leaving everything else queued."""
    from conftest import load_script
    g = load_script("grid")
    env, log = fake_slurm
    states = tmp_path / "states.json"
    env = {**env, "FAKE_SLURM_STATES": str(states)}
    cfg = config(tmp_path, tmp_path / "N", {"acdc": raws["acdc"]}, seeds=(0,),
                 nnunet={**NNUNET, "augmentation": ["da", "noda"], "methods": ["ref", "full", "lth"]})
    jobs = g.plan(g.load_config(cfg))
    out = grid("run", cfg, "--backend", "slurm", env=env).stdout
    subs = submitted(log)
    assert len(subs) == len(jobs) == 9 + 2 + 2 * 9, out            # slice track, convert + plan, 2 regimes x 9
    slurm_id = {j.id: str(1000 + i) for i, j in enumerate(jobs)}
    by_id = {j.id: j for j in jobs}
    for j, sub in zip(jobs, subs):
        dep = next((ln.split("=", 1)[1] for ln in sub["script"].splitlines() if "--dependency" in ln), None)
        assert dep == ("afterok:" + ":".join(slurm_id[d] for d in j.deps) if j.deps else None), j.id
    p = "acdc/nnunet/2d_noda/fold0/seed0"
    assert by_id["acdc/nnunet/convert"].deps == ["acdc/data"]
    assert by_id["acdc/nnunet/plan_nnUNetPlans"].deps == ["acdc/nnunet/convert"]
    assert by_id[f"{p}/iac_lth"].deps == ["acdc/nnunet/plan_nnUNetPlans", f"{p}/ref", f"{p}/search_lth"]
    assert by_id[f"{p}/score"].deps == [f"{p}/pred_ref", f"{p}/pred_iac", f"{p}/pred_iac_lth"]
    cmd = by_id[f"{p}/search_lth"].command
    assert "scripts/nnunet_job.py" in cmd[1] and "--train" in cmd and "--c" in cmd
    assert cmd[cmd.index("-tr") + 1] == "nnUNetTrainerIACSearchLTHNoDA" and "IAC_SAVE_EVERY=1" in cmd
    assert any(a.startswith("nnUNet_results=") and a.endswith("seed0/results") for a in cmd)

    states.write_text(json.dumps({slurm_id[f"{p}/search_lth"]: {"squeue": None, "sacct": "FAILED"}}))
    monkeypatch.setenv("FAKE_SLURM_STATES", str(states))
    status = grid("status", cfg, env=env).stdout
    blocked = sorted(ln.split()[1] for ln in status.splitlines() if ln.strip().startswith("blocked:"))
    assert blocked == [f"{p}/iac_lth", f"{p}/pred_iac_lth", f"{p}/score"], status
    again = grid("run", cfg, "--backend", "slurm", env=env).stdout
    assert sorted(ln.split()[1].rstrip(":") for ln in again.splitlines() if ln.startswith("[cancel]")) == \
        [f"{p}/iac_lth", f"{p}/pred_iac_lth", f"{p}/score"], again
    assert [ln.split()[1].rstrip(":") for ln in again.splitlines() if ln.startswith("[submit]")] == \
        [f"{p}/search_lth", f"{p}/iac_lth", f"{p}/pred_iac_lth", f"{p}/score"], again
