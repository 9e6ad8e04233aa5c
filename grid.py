"""The paper's grid from one command: data sets x backbones x seeds, every stage a job, on this machine or SLURM.

    python grid.py plan   CONFIG.json                       # the jobs (ROOT/grid/manifest.jsonl) and their counts
    python grid.py run    CONFIG.json [--backend local|slurm] [--gpus 0,1,2,3]
    python grid.py status CONFIG.json                       # done / running / failed / waiting per stage
    python grid.py report CONFIG.json                       # tables and figures from the scored rows, no model

Jobs per data set: 01 (once); per backbone and seed: 02 ref and each baseline skip, 03 full and lth, 04 IAC
(from the full search) and IAC-LTH (from the lth search), then 05 --rows_only for every trained run (its
per-patient rows into RUN/score). `report` builds each data set's tables from those rows (05 --rows).

Every stage command carries `--resume auto`, so one command line is right on a first start and on every
requeue; a job whose run folder has done.json is skipped, a requeued one continues from its last epoch.
State lives in the run folders alone (done.json, and grid_job.json written by the runner), so `status` and a
re-run of `run` need nothing else. The config (JSON; see configs/grid_example.json):

    root        the folder every run goes under (ROOT/DATASET/BACKBONE/seedS/RUN)
    datasets    {name: {"raw": folder, "flags": [01_preprocess.py flags, e.g. "--dataset", "acdc"]}}
    backbones   encoders (02_pretrain.py --encoder); encoder_weights: {encoder: state-dict path} (optional)
    seeds       training seeds;  baselines: skip types besides ref (att, nested, resatt);  modes: full, lth
    flags       extra flags per stage: {"all" (02-04), "preprocess", "pretrain", "search", "finetune", "score",
                "report"}: [..]
    slurm       partition, gres / gpus_per_node, time_min, mem_gb, cpus_per_task, account, array_parallelism,
                max_requeues (flags of `run --backend slurm` override them)
"""
import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time

from common.runs import REQUEUE_EXIT, is_done
from common.utils import InputError, atomic_write_json, cli, read_json

ROOT = os.path.dirname(os.path.abspath(__file__))
STAGES = ("preprocess", "pretrain", "baseline", "search", "finetune", "score")
SCRIPTS = {"preprocess": "01_preprocess.py", "pretrain": "02_pretrain.py", "baseline": "02_pretrain.py",
           "search": "03_search.py", "finetune": "04_finetune.py", "score": "05_evaluate.py"}
FLAG_KEYS = {"preprocess": "preprocess", "pretrain": "pretrain", "baseline": "pretrain", "search": "search",
             "finetune": "finetune", "score": "score"}
SLURM_FLAGS = {"partition": str, "gres": str, "time_min": int, "mem_gb": int, "cpus_per_task": int, "account": str,
               "array_parallelism": int}
STATE = "grid_job.json"                              # written by the runner into each job's folder
Job = collections.namedtuple("Job", "id stage dataset backbone seed out command deps")


# --------------------------------------------------------------------------- config and plan
def load_config(path):
    c = read_json(path, "grid config")
    for key in ("root", "datasets", "backbones", "seeds"):
        if key not in c:
            raise InputError(f"grid config {path}: no '{key}' (see configs/grid_example.json)")
    for name, d in c["datasets"].items():
        if "raw" not in d:
            raise InputError(f"grid config {path}: data set {name} has no 'raw' folder")
    unknown = set(c.get("flags", {})) - {"all", "report", *FLAG_KEYS.values()}
    if unknown:
        raise InputError(f"grid config {path}: unknown flag groups {sorted(unknown)}; use all, report, "
                         f"{', '.join(sorted(set(FLAG_KEYS.values())))}")
    c.setdefault("baselines", ["att", "nested", "resatt"])
    c.setdefault("modes", ["full", "lth"])
    c["root"] = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(path)), c["root"]))
    return c


def plan(c):
    """Every job of the grid, in an order where each job comes after its dependencies."""
    flags = c.get("flags", {})
    py = c.get("python") or sys.executable
    jobs = []

    def add(jid, stage, ds, bb, seed, out, args, deps):
        extra = [] if stage in ("preprocess", "score") else flags.get("all", [])
        cmd = [py, os.path.join(ROOT, SCRIPTS[stage]), *args, *extra, *flags.get(FLAG_KEYS[stage], [])]
        jobs.append(Job(jid, stage, ds, bb, seed, out, [str(a) for a in cmd], deps))

    for ds, d in c["datasets"].items():
        data_dir = os.path.join(c["root"], ds, "data")
        add(f"{ds}/data", "preprocess", ds, None, None, data_dir,
            ["--raw", d["raw"], "--out", data_dir, "--overwrite", *d.get("flags", [])], [])
        data = ["--data", os.path.join(data_dir, "slices.h5"), "--splits", os.path.join(data_dir, "splits.json")]
        for bb in c["backbones"]:
            weights = c.get("encoder_weights", {}).get(bb)
            enc = ["--encoder", bb] + (["--encoder_weights", weights] if weights else [])
            for seed in c["seeds"]:
                base, prefix = os.path.join(c["root"], ds, bb, f"seed{seed}"), f"{ds}/{bb}/seed{seed}"
                run = ["--seed", seed, "--resume", "auto"]
                ref = os.path.join(base, "ref")
                add(f"{prefix}/ref", "pretrain", ds, bb, seed, ref, [*data, *enc, "--skip", "ref", *run, "--out", ref],
                    [f"{ds}/data"])
                trained = [("ref", ref, f"{prefix}/ref")]
                for sk in c["baselines"]:
                    out = os.path.join(base, sk)
                    add(f"{prefix}/{sk}", "baseline", ds, bb, seed, out,
                        [*data, *enc, "--skip", sk, *run, "--out", out], [f"{ds}/data"])
                    trained.append((sk, out, f"{prefix}/{sk}"))
                backbone = ["--backbone", os.path.join(ref, "ckpt_best.pt")]
                for mode in c["modes"]:
                    s_out = os.path.join(base, f"search_{mode}")
                    add(f"{prefix}/search_{mode}", "search", ds, bb, seed, s_out,
                        [*backbone, *data, "--mode", mode, *run, "--out", s_out], [f"{prefix}/ref"])
                    name = "iac" if mode == "full" else "iac_lth"
                    out = os.path.join(base, name)
                    add(f"{prefix}/{name}", "finetune", ds, bb, seed, out,
                        [*backbone, "--genotype", os.path.join(s_out, "genotype.json"), *data, *run, "--out", out],
                        [f"{prefix}/ref", f"{prefix}/search_{mode}"])
                    trained.append((name, out, f"{prefix}/{name}"))
                for name, out, jid in trained:
                    score = os.path.join(out, "score")
                    add(f"{jid}/score", "score", ds, bb, seed, score,
                        [*data, "--run", f"{name}={out}", "--rows_only", "--out", score], [jid])
    return jobs


def write_manifest(c, jobs):
    path = os.path.join(c["root"], "grid", "manifest.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for j in jobs:
            f.write(json.dumps(j._asdict()) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- state, from the run folders
def job_state(j):
    """done (done.json), else what the runner last wrote in grid_job.json (running / failed / requeued), else
    waiting."""
    if is_done(j.out):
        return "done"
    try:
        with open(os.path.join(j.out, STATE)) as f:
            return json.load(f)["state"]
    except (OSError, json.JSONDecodeError, KeyError):
        return "waiting"


def set_state(j, state, **info):
    os.makedirs(j.out, exist_ok=True)
    atomic_write_json(os.path.join(j.out, STATE), {"state": state, "job": j.id, "host": os.uname().nodename,
                                                   "time": time.strftime("%Y-%m-%d %H:%M:%S"), **info})


def counts(jobs):
    table = collections.OrderedDict((s, collections.Counter()) for s in STAGES)
    for j in jobs:
        table[j.stage][job_state(j)] += 1
    return table


def print_counts(table, title):
    states = ("done", "running", "requeued", "failed", "waiting")
    print(title)
    print(f"  {'stage':<11}" + "".join(f"{s:>10}" for s in (*states, "total")))
    for stage, n in table.items():
        if sum(n.values()):
            print(f"  {stage:<11}" + "".join(f"{n.get(s, 0):>10}" for s in states) + f"{sum(n.values()):>10}")


# --------------------------------------------------------------------------- starting a job
def start_stage(j, env=None, **info):
    """Mark the job running and start its stage command, output appended to RUN/grid.log; returns the process."""
    os.makedirs(j.out, exist_ok=True)
    set_state(j, "running", **info)
    with open(os.path.join(j.out, "grid.log"), "a") as log:
        log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(j.command)}\n")
        log.flush()
        return subprocess.Popen(j.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


# --------------------------------------------------------------------------- one job on SLURM
class StageJob:
    """A grid job as submitit runs it on a SLURM node. On a time-limit or preemption signal submitit calls
    checkpoint(): the stage is told to stop (SIGUSR1: it keeps its last epoch's checkpoint), and the same job is
    requeued; its `--resume auto` continues where it stopped."""

    def __init__(self, job):
        self.job = Job(*job)
        self.process = None

    def __call__(self):
        j = self.job
        if is_done(j.out):
            return 0
        self.process = start_stage(j, slurm_job=os.environ.get("SLURM_JOB_ID"))
        rc = self.process.wait()
        if rc == REQUEUE_EXIT:
            set_state(j, "requeued", exit_code=rc)
            raise RuntimeError(f"{j.id} was stopped (exit {rc}); requeue it or re-run grid.py run")
        if rc:
            set_state(j, "failed", exit_code=rc)
            raise RuntimeError(f"{j.id} failed (exit {rc}); see {os.path.join(j.out, 'grid.log')}")
        return 0

    def checkpoint(self, *args, **kwargs):
        import submitit
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        set_state(self.job, "requeued")
        return submitit.helpers.DelayedSubmission(StageJob(self.job), *args, **kwargs)


# --------------------------------------------------------------------------- backends
def gpu_slots(gpus):
    """--gpus 0,1,2 -> one job per GPU; none given: CUDA_VISIBLE_DEVICES's GPUs, else every GPU torch sees, else
    (no GPU) one job at a time."""
    if gpus:
        return [g.strip() for g in gpus.split(",") if g.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()] or [None]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())] or [None]


def run_local(jobs, gpus=None, max_requeues=3):
    """Jobs in dependency order, one per GPU slot at a time; a job stopped with REQUEUE_EXIT runs again
    (its --resume auto continues), a failed one leaves its dependants waiting."""
    slots = gpu_slots(gpus)
    done = {j.id for j in jobs if job_state(j) == "done"}
    pending = [j for j in jobs if j.id not in done]
    failed, requeues, running = set(), collections.Counter(), {}
    print(f"local backend: {len(pending)} jobs to run ({len(jobs) - len(pending)} done), "
          f"{len(slots)} slot(s): {', '.join(s or 'default device' for s in slots)}")
    while pending or running:
        for slot, (j, p) in list(running.items()):
            rc = p.poll()
            if rc is None:
                continue
            del running[slot]
            state = "done" if rc == 0 else "requeued" if rc == REQUEUE_EXIT else "failed"
            set_state(j, state, exit_code=rc)
            print(f"[{state}] {j.id} (exit {rc})", flush=True)
            if rc == 0:
                done.add(j.id)
            elif rc == REQUEUE_EXIT and requeues[j.id] < max_requeues:
                requeues[j.id] += 1
                pending.insert(0, j)
            else:
                failed.add(j.id)
        for slot in slots:
            if slot in running:
                continue
            ready = next((j for j in pending if all(d in done for d in j.deps)), None)
            if ready is None:
                break
            pending.remove(ready)
            env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {}))
            running[slot] = (ready, start_stage(ready, env, slot=slot))
            print(f"[start] {ready.id}" + (f" on GPU {slot}" if slot is not None else ""), flush=True)
        if not running and pending:                              # nothing ready: what is left needs a failed job
            print(f"{len(pending)} jobs cannot run: a job they depend on failed ({', '.join(sorted(failed))})")
            break
        time.sleep(0.2)
    return not failed


def slurm_executor(c, a, folder):
    import submitit
    s = dict(c.get("slurm", {}))
    s.update({k: getattr(a, k) for k in SLURM_FLAGS if getattr(a, k) is not None})
    ex = submitit.AutoExecutor(folder=folder, cluster=a.cluster, slurm_max_num_timeout=s.get("max_requeues", 3))
    params = {"timeout_min": s.get("time_min", 24 * 60), "slurm_array_parallelism": s.get("array_parallelism", 32)}
    if a.cluster != "local":
        params.update(slurm_partition=s.get("partition"), cpus_per_task=s.get("cpus_per_task", 8),
                      mem_gb=s.get("mem_gb", 64), slurm_signal_delay_s=s.get("signal_delay_s", 180))
        if s.get("gres"):
            params["slurm_gres"] = s["gres"]
        else:
            params["gpus_per_node"] = s.get("gpus_per_node", 1)
        if s.get("account"):
            params["slurm_account"] = s["account"]
        params = {k: v for k, v in params.items() if v is not None}
    ex.update_parameters(**params)
    return ex


def run_slurm(c, jobs, a):
    """One job array per stage (only the jobs not done), each depending (afterok) on the arrays of the stages
    its jobs need; requeue on time limit / preemption through submitit's checkpointing."""
    todo = [j for j in jobs if job_state(j) != "done"]
    folder = os.path.join(c["root"], "grid", "submitit", "%j")
    ex = slurm_executor(c, a, folder)
    stage_of = {j.id: j.stage for j in jobs}
    todo_ids = {j.id for j in todo}
    arrays, submitted = {}, []
    for stage in STAGES:
        group = [j for j in todo if j.stage == stage]
        if not group:
            continue
        needs = {stage_of[d] for j in group for d in j.deps if d in todo_ids}
        after = [arrays[s] for s in STAGES if s in needs and s in arrays]
        if a.cluster != "local":
            ex.update_parameters(slurm_additional_parameters={"dependency": "afterok:" + ":".join(after)}
                                 if after else {}, name=f"iac_{stage}")
        with ex.batch():
            handles = [ex.submit(StageJob(tuple(j))) for j in group]
        arrays[stage] = str(handles[0].job_id).split("_")[0]
        for j, h in zip(group, handles):
            set_state(j, "submitted", slurm_job=str(h.job_id))
        submitted += handles
        if a.cluster == "local":                                      # no scheduler to hold dependants back
            wait_all(handles)
        print(f"{stage}: array {arrays[stage]} of {len(group)} jobs" + (f", after {', '.join(after)}" if after
                                                                        else ""))
    return submitted


def wait_all(handles):
    ok = True
    for h in handles:
        try:
            h.result()
        except Exception as e:                                         # noqa: BLE001 - reported per job
            ok = False
            print(f"job {h.job_id}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
    return ok


# --------------------------------------------------------------------------- report
def report(c, jobs, a):
    """Per data set: 05_evaluate.py --rows over the scored runs (+ --search for the cost tables)."""
    ok = True
    for ds in c["datasets"]:
        rows = [os.path.join(j.out, "per_patient.csv") for j in jobs if j.dataset == ds and j.stage == "score"
                and job_state(j) == "done"]
        searches = [f"{j.id.split('/', 1)[1].replace('/', '_')}={j.out}" for j in jobs
                    if j.dataset == ds and j.stage == "search" and job_state(j) == "done"]
        total = sum(j.dataset == ds and j.stage == "score" for j in jobs)
        if not rows:
            print(f"{ds}: no scored run yet")
            continue
        print(f"{ds}: {len(rows)} of {total} runs scored")
        cmd = [sys.executable, os.path.join(ROOT, "05_evaluate.py"), *sum((["--rows", r] for r in rows), []),
               "--reference", "ref", *sum((["--search", s] for s in searches), []),
               "--out", os.path.join(c["root"], ds, "report"), *c.get("flags", {}).get("report", [])]
        methods = {r.split(os.sep)[-3] for r in rows}
        if {"iac", "iac_lth"} <= methods:
            cmd += ["--compare", "iac:iac_lth"]
        ok &= subprocess.run(cmd, cwd=ROOT).returncode == 0
    return ok


# --------------------------------------------------------------------------- command line
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["plan", "run", "status", "report"])
    p.add_argument("config", help="grid config (JSON)")
    p.add_argument("--backend", choices=["local", "slurm"], default="local", help="run: where the jobs run")
    p.add_argument("--gpus", default=None,
                   help="local: GPUs to use, one job each (default: CUDA_VISIBLE_DEVICES, else every visible GPU)")
    p.add_argument("--only", default=None, help="run/status: jobs whose id starts with this (e.g. acdc/resnet50)")
    p.add_argument("--cluster", choices=["slurm", "local"], default="slurm",
                   help="slurm backend: submitit's cluster (local: submitit's local executor, for testing)")
    p.add_argument("--wait", action="store_true", help="slurm backend: wait for the submitted jobs")
    p.add_argument("--max_requeues", type=int, default=3, help="local: reruns of a job stopped with exit 75")
    for name, typ in SLURM_FLAGS.items():
        p.add_argument(f"--{name}", type=typ, default=None, help=f"slurm: {name} (default: the config's)")
    return p.parse_args(argv)


def main(a):
    c = load_config(a.config)
    jobs = [j for j in plan(c) if not a.only or j.id.startswith(a.only)]
    if a.command == "plan":
        path = write_manifest(c, jobs)
        print_counts(counts(jobs), f"{len(jobs)} jobs, manifest {path}")
    elif a.command == "status":
        print_counts(counts(jobs), f"grid {c['root']}: {len(jobs)} jobs")
        for j in jobs:
            if job_state(j) == "failed":
                print(f"  failed: {j.id}  (log: {os.path.join(j.out, 'grid.log')})")
    elif a.command == "run":
        write_manifest(c, jobs)
        if a.backend == "local":
            ok = run_local(jobs, a.gpus, a.max_requeues)
            print_counts(counts(jobs), "grid after this run:")
            if not ok:
                sys.exit(1)
        else:
            handles = run_slurm(c, jobs, a)
            if a.wait or a.cluster == "local":
                ok = wait_all(handles)
                print_counts(counts(jobs), "grid after this run:")
                if not ok:
                    sys.exit(1)
    elif a.command == "report" and not report(c, jobs, a):
        sys.exit(1)


if __name__ == "__main__":
    cli(main, get_args)
