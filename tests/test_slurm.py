"""grid.py against a real SLURM: a one-node cluster from Debian's slurm-wlm and munge (scripts/slurm_one_node.sh),
a tiny grid with a 2-minute time limit so that stages are signalled and requeued mid-run, one job requeued by hand
(`scontrol requeue`, as a preemption does) and one data set that fails on purpose. Checks: every other job ends
done, the failed job's dependants are blocked, every stage ended with exit 0 or 75 (never killed by a signal), a
requeue redoes at most one epoch, re-running `grid.py run` submits only what is not queued, and `grid.py report`
gives the same tables as the local backend on the same config (run at the same time: it also loads the 2 cores, so
the stages run longer against the time limit). Runs as root where slurmctld is installed (`.ci/run` installs it),
skipped otherwise; a few minutes on 2 cores."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT

pytestmark = [pytest.mark.skipif(not shutil.which("slurmctld") or not shutil.which("munged") or os.geteuid() != 0,
                                 reason="needs slurm-wlm and munge (apt-get install slurm-wlm munge) and root"),
              pytest.mark.timeout(2400)]           # (pytest-timeout) its own waits are bounded by 15 minutes each
GRID = os.path.join(ROOT, "grid.py")
SCRIPT = os.path.join(ROOT, "scripts", "slurm_one_node.sh")
SEARCH_EPOCHS = 80           # the full search must outlast the 2-min limit less its 30-s warning (~120 s alone on 2 idle cores)


def free_port_pair():
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("", 0))
            port = a.getsockname()[1]
        if port < 65000:
            with socket.socket() as b:
                try:
                    b.bind(("", port + 1))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no two free ports in a row")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("submitit", reason="requirements-grid.txt is not installed")
    d = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURM_TEST_PORT=str(free_port_pair()))
    r = subprocess.run(["bash", SCRIPT, "start", str(d)], env=env, capture_output=True, text=True, timeout=180)
    if r.returncode:
        logs = "".join(open(p).read()[-2000:] for p in (d / "slurmctld.log", d / "slurmd.log") if p.exists())
        pytest.fail(f"the one-node cluster did not start:\n{r.stdout}\n{r.stderr}\n{logs}")
    yield {"SLURM_CONF": str(d / "slurm.conf")}
    subprocess.run(["bash", SCRIPT, "stop", str(d)], capture_output=True, timeout=60)


def grid_env(env=None):
    return dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))


def grid(*args, env=None, check=True):
    r = subprocess.run([sys.executable, GRID, *args], cwd=ROOT, capture_output=True, text=True, env=grid_env(env),
                       timeout=900)
    if check and r.returncode:
        raise AssertionError(f"grid.py {' '.join(args)} exit {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


NNUNET = {"datasets": ["acdc"], "seeds": [0], "device": "cpu", "methods": ["ref"],   # one reference, requeued
          "flags": {"plan": ["-np", "1", "-npfp", "1"], "predict": ["--disable_tta", "-npp", "1", "-nps", "1"],
                    "score": ["--n_boot", "99"]},
          "env": {"all": {"nnUNet_compile": "f", "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", "IAC_ITERS": "2",
                          "IAC_VAL_ITERS": "1", "OMP_NUM_THREADS": "1"}, "train": {"IAC_EPOCHS": "25"}}}


def write_config(path, root, raws, nnunet=False):
    c = {"root": str(root), "python": sys.executable, **({"nnunet": NNUNET} if nnunet else {}),
         "datasets": {name: {"raw": raw, "flags": ["--dataset", "acdc", "--crop", "32", "32", "--processes", "0"]}
                      for name, raw in raws.items()},
         "backbones": ["base"], "seeds": [0], "baselines": [], "modes": ["full", "lth"],
         "flags": {"all": ["--device", "cpu", "--workers", "0"],
                   "pretrain": ["--width", "8", "--batch_size", "16", "--epochs", "2"],
                   "finetune": ["--batch_size", "16", "--epochs", "2"],
                   "search": ["--epochs", str(SEARCH_EPOCHS), "--warmup", "1", "--batch_size", "16", "--gamma", "1.5"],
                   "score": ["--device", "cpu", "--n_boot", "99"], "report": ["--n_boot", "99"]},
         "slurm": {"partition": "debug", "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1, "time_min": 2,
                   "signal_delay_s": 30, "max_requeues": 20}}
    path.write_text(json.dumps(c))
    return str(path)


def squeue(env, tries=5):
    """{job id: state} of the queued jobs; a failed squeue (a busy slurmctld) is asked again, never read as an
    empty queue."""
    for _ in range(tries):
        r = subprocess.run(["squeue", "-h", "-o", "%i|%T"], capture_output=True, text=True,
                           env=dict(os.environ, **env), timeout=60)
        if r.returncode == 0:
            return dict(ln.split("|") for ln in r.stdout.split())
        time.sleep(3)
    raise AssertionError(f"squeue failed {tries} times: {r.stderr}")


def why_not_done(tmp_path, cluster, cfg):
    """For a failure message: grid status, and for every job without done.json its grid_job.json, the end of its
    grid.log and what slurmctld logged about its SLURM job."""
    out = [grid("status", cfg, env=cluster, check=False)]
    ctld = open(os.path.join(os.path.dirname(cluster["SLURM_CONF"]), "slurmctld.log")).read().splitlines()
    for run in sorted({p.parent for p in (tmp_path / "S" / "acdc").rglob("grid_*.json")}):
        if not (run / "done.json").exists():
            recs = [json.loads((run / f).read_text()) for f in ("grid_submit.json", "grid_job.json")
                    if (run / f).exists()]
            ids = {str(r["slurm_job"]) for r in recs if r.get("slurm_job")}
            log = run / "grid.log"
            out += [f"--- {run}: {recs}", log.read_text()[-1500:] if log.exists() else "(no grid.log)",
                    *[ln for ln in ctld if any(re.search(rf"JobId={i}\b", ln) for i in ids)][-15:]]
    return "\n".join(out)


def stage_runs(log_text):
    """grid.log -> [(exit code, printed epoch numbers)] per start of the stage."""
    runs = []
    for block in log_text.split("\n== ")[1:]:
        if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d /", block):           # a start: the command line
            runs.append([None, []])
        m = re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d exit (-?\d+)", block)
        if m and runs:
            runs[-1][0] = int(m.group(1))
        if runs:
            runs[-1][1] += [int(e) for e in re.findall(r"^epoch (\d+)/", block, re.M)]
    return runs


def test_grid_on_a_real_slurm_cluster(tmp_path, cluster):
    raws = {"acdc": str(tmp_path / "raw_acdc"), "broken": str(tmp_path / "raw_broken")}
    subprocess.run([sys.executable, os.path.join(ROOT, "01_preprocess.py"), "--make_phantom", raws["acdc"], "--layout",
                    "acdc", "--patients", "6", "--phantom_size", "32", "--seed", "0"], check=True, capture_output=True)
    os.makedirs(raws["broken"])                                   # no cases: its 01 fails, on purpose
    nnunet = pytest.importorskip("nnunetv2", reason="requirements-nnunet.txt is not installed") is not None
    cfg = write_config(tmp_path / "slurm.json", tmp_path / "S", raws, nnunet=nnunet)
    out = grid("run", cfg, "--backend", "slurm", env=cluster)
    assert out.count("[submit]") == 18 + 5 * nnunet and "after" in out, out
    local = write_config(tmp_path / "local.json", tmp_path / "L", {"acdc": raws["acdc"]})
    with open(tmp_path / "local.log", "w") as local_log:           # the same grid on the local backend, meanwhile
        local_run = subprocess.Popen([sys.executable, GRID, "run", local], cwd=ROOT, stdout=local_log,
                                     stderr=subprocess.STDOUT, env=grid_env())
    try:
        check_slurm_run(tmp_path, cluster, cfg)
        assert local_run.wait(timeout=900) == 0, (tmp_path / "local.log").read_text()[-3000:]
    finally:
        if local_run.poll() is None:                               # a failed check: stop it, not the rest of the suite
            local_run.kill()
            local_run.wait()
    tables = []
    for c in (cfg, local):
        grid("report", c)
        root = json.load(open(c))["root"]
        tables.append([pd.read_csv(os.path.join(root, "acdc", "report", f)) for f in ("summary.csv", "paired.csv")])
    summary = tables[0][0]
    assert {"ref"} == set(summary.loc[summary["backbone"].str.startswith("nnunet"), "method"])   # the nnU-Net row
    tables[0][0] = summary[~summary["backbone"].str.startswith("nnunet")].reset_index(drop=True)
    for a, b in zip(*tables):                         # the slice track's: as the local backend's
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9)


def check_slurm_run(tmp_path, cluster, cfg):
    """The SLURM grid to its end, with one search requeued by hand, and what its stages logged."""
    lth = tmp_path / "S" / "acdc" / "base" / "seed0" / "search_lth"
    nn_ref = tmp_path / "S" / "acdc" / "nnunet" / "2d_da" / "fold0" / "seed0" / "ref"
    nn_fold = (tmp_path / "S" / "acdc" / "nnunet" / "seed0" / "results" / "Dataset501_acdc" /
               "nnUNetTrainerIACRef__nnUNetPlans__2d" / "fold_0")
    watched = {lth: lambda: (lth / "log.jsonl").exists() and len((lth / "log.jsonl").read_text().splitlines()) >= 2}
    if json.load(open(cfg)).get("nnunet"):
        watched[nn_ref] = lambda: (nn_fold / "checkpoint_latest.pth").exists()        # an epoch is saved
    by_hand, t0 = {}, time.time()
    while time.time() - t0 < 900:
        queue = squeue(cluster)
        for run, ready in watched.items():
            rec = json.load(open(run / "grid_job.json")) if (run / "grid_job.json").exists() else {}
            if (run not in by_hand and rec.get("state") == "running" and queue.get(rec.get("slurm_job")) == "RUNNING"
                    and ready()):
                by_hand[run] = rec["slurm_job"]                  # a preemption: requeue the running job by hand
                subprocess.run(["scontrol", "requeue", by_hand[run]], check=True, env=dict(os.environ, **cluster),
                               timeout=60)
        if not queue:
            break
        time.sleep(2)
    assert not squeue(cluster), "the grid did not finish in 15 minutes"
    assert by_hand.keys() == watched.keys(), \
        f"never ran long enough to be requeued by hand: {watched.keys() - by_hand.keys()}"

    again = grid("run", cfg, "--backend", "slurm", "--only", "acdc", env=cluster)   # all done: nothing to submit
    assert "0 jobs submitted" in again, f"{again}\n{why_not_done(tmp_path, cluster, cfg)}"
    status = grid("status", cfg, env=cluster)
    assert "failed: broken/data" in status, status
    assert status.count("blocked: broken/") == 8, status
    rows = {ln.split()[0]: dict(zip(("done", "failed", "blocked"), (ln.split()[1], ln.split()[6], ln.split()[7])))
            for ln in status.splitlines()[2:7]}
    assert rows["search"] == {"done": "2", "failed": "0", "blocked": "2"}, status

    stopped, by_signal = 0, {}
    for run in ("data", "base/seed0/ref", "base/seed0/search_full", "base/seed0/search_lth", "base/seed0/iac",
                "base/seed0/iac_lth"):
        folder = tmp_path / "S" / "acdc" / run
        text = (folder / "grid.log").read_text()
        runs = stage_runs(text)
        exits = [rc for rc, _ in runs]
        assert exits[-1] == 0 and all(rc == 75 for rc in exits[:-1]), (run, exits, text[-3000:])
        stopped += len(exits) - 1
        for sig in re.findall(r"stopped by (SIG\w+)", text):
            by_signal[sig] = by_signal.get(sig, 0) + 1
        if "search" in run:                                      # a requeue redoes at most the epoch it stopped in
            printed = [e for _, epochs in runs for e in epochs]
            assert sorted(set(printed)) == list(range(1, max(printed) + 1)), (run, printed)
            assert len(printed) - len(set(printed)) <= len(runs) - 1, (run, printed)
        for secs in re.findall(r"checkpoint: the stage stopped ([\d.]+) s after", text):
            assert float(secs) < 25, (run, secs)                 # stopped by itself, not killed after stop_wait
    assert stopped >= 2 and by_signal.get("SIGTERM", 0) >= 1, (stopped, by_signal)   # time limit(s) + the preemption
    print(f"requeues: {stopped}, stop signals seen by the stages: {by_signal}")
    if nn_ref in watched:                             # the nnU-Net reference: stopped, requeued, continued with --c
        text = (nn_ref / "grid.log").read_text()
        exits = [rc for rc, _ in stage_runs(text)]
        assert exits[-1] == 0 and 75 in exits and all(rc == 75 for rc in exits[:-1]), (exits, text[-3000:])
        assert re.search(r"stopped by SIG(TERM|USR[12])", text), text[-3000:]
        logs = sorted(nn_fold.glob("training_log_*.txt"))
        epochs = [int(e) for f in logs for e in re.findall(r"Epoch (\d+)\s*$", f.read_text(), re.M)]
        assert len(logs) >= 2 and sorted(set(epochs)) == list(range(25)), (len(logs), epochs)
        assert len(epochs) - len(set(epochs)) <= len(exits) - 1, epochs     # at most the epoch in progress redone
        assert (nn_ref / "done.json").exists() and (nn_fold / "checkpoint_final.pth").exists()
        score = tmp_path / "S" / "acdc" / "nnunet" / "2d_da" / "fold0" / "seed0" / "score"
        assert (score / "done.json").exists()
        assert "nnunet_2d_da:PlainConvUNet" in (score / "per_patient.csv").read_text()

