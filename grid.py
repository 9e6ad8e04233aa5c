r"""The paper's grid from one command: data sets x backbones x seeds, every stage a job, on this machine or SLURM.

    python grid.py plan   CONFIG.json                       # the jobs (ROOT/grid/manifest.jsonl) and their counts
    python grid.py run    CONFIG.json [--backend local|slurm] [--gpus 0,1,2,3]
    python grid.py status CONFIG.json                       # done / running / submitted / failed / blocked ...
    python grid.py report CONFIG.json                       # tables and figures from the scored rows, no model
    python grid.py forget CONFIG.json --only JOB            # clear a record nothing is known to run

Jobs per data set: 01 (once); per backbone and seed: 02 ref and each baseline skip, 03 full and lth, 04 IAC
(from the full search) and IAC-LTH (from the lth search), then 05 --rows_only for every trained run (its
per-patient rows into RUN/score). With an "nnunet" block, the nnU-Net track too (Table 2; plan_nnunet):
conversion on the slice track's split, planning, then per configuration, augmentation regime, fold and seed the
reference, the searches, the cells, their predictions of the test patients and a scoring job, each nnU-Net step
inside scripts/nnunet_job.py (`--c`, exit 75 on a stop signal). `report` builds each data set's tables from the
rows of both tracks (05 --rows).

Every stage command carries `--resume auto`, so one command line is right on a first start and on every
requeue; a job whose run folder has done.json is skipped, a requeued one continues from its last epoch.
State lives in the run folders alone (done.json; grid_job.json written by the runner; grid_submit.json with the
SLURM job that `run --backend slurm` submitted, checked against squeue / sacct), so `status` and a re-run of
`run` need nothing else. The config (JSON; see configs/grid_example.json):

    root        the folder every run goes under (ROOT/DATASET/BACKBONE/seedS/RUN)
    datasets    {name: {"raw": folder, "flags": [01_preprocess.py flags, e.g. "--dataset", "acdc"]}}
    backbones   encoders (02_pretrain.py --encoder); encoder_weights: {encoder: state-dict path} (optional)
    seeds       training seeds;  baselines: skip types besides ref (att, nested, resatt);  modes: full, lth
    flags       extra flags per stage: {"all" (02-04), "preprocess", "pretrain", "search", "finetune", "score",
                "report"}: [..]
    nnunet      the nnU-Net track (optional): configurations, plans, augmentation (da, noda), folds, seeds,
                methods (ref, full, lth), backbone (a path pattern of your own trained models), datasets,
                dataset_ids, device, flags {plan, train, predict, score}, env {all, train, search, cell, predict}
                (docs/grid.md)
    slurm       partition, gres / gpus_per_node (0: no GPU), time_min, mem_gb, cpus_per_task, account,
                signal_delay_s (SLURM's warning before the time limit), max_requeues (SLURM requeues per job);
                `run --backend slurm --partition ...` flags override partition, gres, time_min, mem_gb,
                cpus_per_task, account and array_parallelism; one SLURM job per grid job (SLURM's own limits
                throttle them; array_parallelism applies to submitit's local executor only)
"""
import argparse
import collections
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

from common.runs import REQUEUE_EXIT, block_stop_signals, cli, is_done
from common.utils import HelpFormatter, InputError, atomic_write_json, read_json

ROOT = os.path.dirname(os.path.abspath(__file__))
STAGES = ("preprocess", "pretrain", "baseline", "search", "finetune", "score", "nnunet_convert", "nnunet_plan",
          "nnunet_train", "nnunet_search", "nnunet_cell", "nnunet_predict", "nnunet_score")
NNUNET_METHODS = {"ref": None, "full": ("search_full", "iac", "nnUNetTrainerIACSearchFull", "nnUNetTrainerIAC"),
                  "lth": ("search_lth", "iac_lth", "nnUNetTrainerIACSearchLTH", "nnUNetTrainerIACLTH")}
PLANNERS = {"nnUNetPlans": None, "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
            "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL", "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL"}
CONVERTIBLE = ("acdc", "brats", "kits", "amos")          # the layouts scripts/convert_to_nnunet.py reads
SCRIPTS = {"preprocess": "01_preprocess.py", "pretrain": "02_pretrain.py", "baseline": "02_pretrain.py",
           "search": "03_search.py", "finetune": "04_finetune.py", "score": "05_evaluate.py"}
FLAG_KEYS = {"preprocess": "preprocess", "pretrain": "pretrain", "baseline": "pretrain", "search": "search",
             "finetune": "finetune", "score": "score"}
SLURM_FLAGS = {"partition": str, "gres": str, "time_min": int, "mem_gb": int, "cpus_per_task": int, "account": str,
               "array_parallelism": int}
SLURM_HELP = {"partition": "SLURM partition the jobs are submitted to (default: the config's, else the cluster's "
                           "default partition)",
              "gres": "SLURM generic resources of each job, e.g. gpu:a100:1 (default: the config's, else "
                      "gpus_per_node GPUs, 1 unless the config says 0)",
              "time_min": "time limit of each job in minutes; a job stopped by it is requeued and resumes (default: "
                          "the config's, else 1440)",
              "mem_gb": "memory of each job in GB (default: the config's, else 64)",
              "cpus_per_task": "CPU cores of each job (default: the config's, else 8)",
              "account": "SLURM account the jobs are charged to (default: the config's, else the user's default)",
              "array_parallelism": "jobs at once under submitit's local executor, --cluster local (default: the "
                                   "config's, else 32)"}
SQUEUE_TRIES, SQUEUE_WAIT_S = 4, 5                  # `run --backend slurm` asks squeue this often before it gives up
STATE = "grid_job.json"                              # written by the runner into each job's folder
SUBMIT = "grid_submit.json"                          # written by `run --backend slurm`: the SLURM job it submitted
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
    if c.get("nnunet") is not None:
        c["nnunet"] = nnunet_config(c, path)
    return c


def nnunet_config(c, path):
    """The config's "nnunet" block with its defaults, checked (docs/grid.md, "The nnU-Net track")."""
    n = {"datasets": list(c["datasets"]), "configurations": ["2d"], "plans": ["nnUNetPlans"], "augmentation": ["da"],
         "folds": [0], "seeds": c["seeds"], "methods": ["ref", "full", "lth"], "backbone": None, "device": "cuda",
         "planners": {}, "dataset_ids": {}, "flags": {}, "env": {}, **c["nnunet"]}
    n["plans"] = [n["plans"]] if isinstance(n["plans"], str) else list(n["plans"])
    if n["backbone"]:                                # relative to the config's folder, as root
        n["backbone"] = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(n["backbone"]))
    where = f"grid config {path}: nnunet"
    for key, allowed in (("methods", NNUNET_METHODS), ("augmentation", ("da", "noda")),
                         ("configurations", ("2d", "3d_fullres", "3d_lowres"))):
        bad = sorted(set(n[key]) - set(allowed))
        if bad or not n[key]:
            raise InputError(f"{where}.{key}: {bad or 'empty'}; use some of {', '.join(allowed)}")
    for plans in n["plans"]:
        if plans not in PLANNERS and plans not in n["planners"]:
            raise InputError(f"{where}.plans: {plans} is not one of {', '.join(PLANNERS)}; name its experiment "
                             f"planner in nnunet.planners {{\"{plans}\": \"PlannerClass\"}}")
    unknown = set(n["flags"]) - {"plan", "train", "predict", "score"} | set(n["env"]) - {"all", "train", "search",
                                                                                          "cell", "predict"}
    if unknown:
        raise InputError(f"{where}: unknown flag / env groups {sorted(unknown)}; flags: plan, train, predict, score; "
                         "env: all, train, search, cell, predict")
    if set(n["datasets"]) - set(c["datasets"]):
        raise InputError(f"{where}.datasets: {sorted(set(n['datasets']) - set(c['datasets']))} are not data sets of "
                         "this config")
    for ds in n["datasets"]:
        d = c["datasets"][ds]
        layout = next((x for a, x in zip(d.get("flags", []), d.get("flags", [])[1:]) if a == "--dataset"), None)
        if layout not in CONVERTIBLE:
            raise InputError(f"{where}: data set {ds} has layout {layout!r} (its --dataset flag); the nnU-Net track "
                             f"converts {', '.join(CONVERTIBLE)} (scripts/convert_to_nnunet.py)")
        n.setdefault("layouts", {})[ds] = layout
    return n


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
        if c.get("nnunet") and ds in c["nnunet"]["datasets"]:
            jobs += plan_nnunet(c, ds, d, py)
    return jobs


def nnunet_paths(c, ds):
    """Where the nnU-Net track of data set `ds` lives: its nnU-Net raw, preprocessed and (per seed) results folders
    under ROOT/DATASET/nnunet, its data set id and name."""
    n = c["nnunet"]
    ds_id = int(n["dataset_ids"].get(ds, 501 + list(c["datasets"]).index(ds)))
    base = os.path.join(c["root"], ds, "nnunet")
    return {"base": base, "id": str(ds_id), "name": f"Dataset{ds_id:03d}_{ds}", "raw": os.path.join(base, "raw"),
            "pre": os.path.join(base, "preprocessed"), "results": lambda seed: os.path.join(base, f"seed{seed}",
                                                                                             "results")}


def plan_nnunet(c, ds, d, py):
    """The nnU-Net track of one data set (paper Table 2): conversion with the slice track's test patients, planning
    and preprocessing once per plans, then per configuration, augmentation regime, fold and seed: the reference
    (nnUNetTrainerIACRef, or the user's model: nnunet.backbone), the searches, the cells, the predictions of the
    test patients and one scoring job (05 --rows_only). Each job is scripts/nnunet_job.py around the nnU-Net
    command: `--c` resumes, a stop signal requeues (exit 75), JOB/done.json when the step's file is there."""
    n, P = c["nnunet"], nnunet_paths(c, ds)
    bin_dir = os.path.dirname(py)
    tool = (lambda name: os.path.join(bin_dir, name) if os.path.exists(os.path.join(bin_dir, name)) else name)
    job_py = [py, os.path.join(ROOT, "scripts", "nnunet_job.py")]
    flags = n["flags"]
    raw = os.path.join(P["raw"], P["name"])
    jobs = []

    def job(jid, stage, label, seed, expect, cmd, deps, env=None, *, train=False, predict=None, always=False):
        """A job in ROOT/JOB_ID; with `expect`, its command wrapped by scripts/nnunet_job.py (else a stage of ours,
        which writes done.json itself)."""
        out = os.path.join(c["root"], *jid.split("/"))
        if expect is None:
            jobs.append(Job(jid, stage, ds, label, seed, out, [str(x) for x in cmd], deps))
            return jid
        env = {"nnUNet_raw": P["raw"], "nnUNet_preprocessed": P["pre"], "nnUNet_results": P["results"](
            seed if seed is not None else n["seeds"][0]), "nnUNet_extTrainer": os.path.join(ROOT, "nnunet_iac"),
               **(env or {})}
        wrap = [*job_py, "--out", out, *sum((["--env", f"{k}={v}"] for k, v in env.items()), []), "--expect", expect,
                *(["--train"] if train else []), *(["--always"] if always else []),
                *(["--predict", *predict] if predict else []), "--"]
        jobs.append(Job(jid, stage, ds, label, seed, out, [str(x) for x in wrap + cmd], deps))
        return jid

    convert = job(f"{ds}/nnunet/convert", "nnunet_convert", None, None, os.path.join(raw, "dataset.json"),
                  [py, os.path.join(ROOT, "scripts", "convert_to_nnunet.py"), "--dataset", n["layouts"][ds], "--raw",
                   d["raw"], "--out", raw, "--splits", os.path.join(c["root"], ds, "data", "splits.json"),
                   *d.get("nnunet_flags", [])], [f"{ds}/data"])
    plan_of, previous = {}, convert
    for plans in n["plans"]:                       # one after another: they share the fingerprint
        planner = n["planners"].get(plans, PLANNERS.get(plans))
        plan_of[plans] = previous = job(
            f"{ds}/nnunet/plan_{plans}", "nnunet_plan", None, None, os.path.join(P["pre"], P["name"], f"{plans}.json"),
            [tool("nnUNetv2_plan_and_preprocess"), "-d", P["id"], "-c", *n["configurations"],
             *(["-pl", planner] if planner else []), "--verify_dataset_integrity", *flags.get("plan", [])],
            [previous], always=True)
    device = ["-device", n["device"]]
    for plans in n["plans"]:
        for conf in n["configurations"]:
            for aug in n["augmentation"]:
                tag = aug + ("" if plans == "nnUNetPlans" else f"_{plans}")
                for fold in n["folds"]:               # several folds: each fold's models a row of their own
                    for seed in n["seeds"]:
                        jobs_of_seed(c, ds, P, raw, job, tool, plans, plan_of[plans], conf, aug, fold, seed,
                                     tag + (f"_fold{fold}" if len(n["folds"]) > 1 else ""), device)
    return jobs


def jobs_of_seed(c, ds, P, raw, job, tool, plans, plan, conf, aug, fold, seed, tag, device):
    """The nnU-Net jobs of one configuration, augmentation regime, fold and seed (see plan_nnunet)."""
    n, flags, envs = c["nnunet"], c["nnunet"]["flags"], c["nnunet"]["env"]
    noda = "NoDA" if aug == "noda" else ""
    prefix = f"{ds}/nnunet/{conf}_{aug}" + ("" if plans == "nnUNetPlans" else f"_{plans}") + f"/fold{fold}/seed{seed}"
    label = f"nnunet_{conf}_{tag}"
    fold_dir = (lambda tr: os.path.join(P["results"](seed), P["name"], f"{tr}__{plans}__{conf}", f"fold_{fold}"))
    base_env = {"IAC_SEED": seed, "IAC_SAVE_EVERY": 1, "IAC_FINAL_VALIDATION": 0, **envs.get("all", {})}
    train = [tool("nnUNetv2_train"), P["id"], conf, fold, "-p", plans, "--c", *device, *flags.get("train", [])]
    images = os.path.join(raw, "imagesTs")
    user = n["backbone"].format(dataset=ds, dataset_id=P["id"], dataset_name=P["name"], configuration=conf,
                                plans=plans, fold=fold, seed=seed) if n["backbone"] else None
    ref_deps, backbone_env = [plan], {}
    if user:
        backbone_env = {"IAC_BACKBONE": os.path.abspath(user)}
    else:
        tr = f"nnUNetTrainerIACRef{noda}"
        ref_deps = [plan, job(f"{prefix}/ref", "nnunet_train", label, seed,
                              os.path.join(fold_dir(tr), "checkpoint_final.pth"), [*train[:4], "-tr", tr, *train[4:]],
                              [plan], {**base_env, **envs.get("train", {})}, train=True)]
    preds = {}
    if "ref" in n["methods"]:
        out = os.path.join(c["root"], *prefix.split("/"), "pred_ref")
        if user:                       # the user's model, predicted from its own folder
            model_dir, chk = os.path.dirname(os.path.dirname(os.path.abspath(user))), os.path.basename(user)
            cmd = [tool("nnUNetv2_predict_from_modelfolder"), "-i", images, "-o", out + "/pred.partial", "-m",
                   model_dir, "-f", fold, "-chk", chk, *device, *flags.get("predict", [])]
        else:
            cmd = [tool("nnUNetv2_predict"), "-i", images, "-o", out + "/pred.partial", "-d", P["id"], "-c", conf,
                   "-f", fold, "-tr", f"nnUNetTrainerIACRef{noda}", "-p", plans, *device, *flags.get("predict", [])]
        preds["ref"] = job(f"{prefix}/pred_ref", "nnunet_predict", label, seed, os.path.join(out, "pred"), cmd,
                           ref_deps, {**base_env, **envs.get("predict", {})},
                           predict=(images, os.path.join(out, "pred")))
    for mode in ("full", "lth"):
        if mode not in n["methods"]:
            continue
        s_name, cell, s_tr, c_tr = NNUNET_METHODS[mode]
        s_tr, c_tr = s_tr + noda, c_tr + noda
        genotype = os.path.join(fold_dir(s_tr), "genotype.json")
        search = job(f"{prefix}/{s_name}", "nnunet_search", label, seed,      # done.json: after genotype.json
                     os.path.join(fold_dir(s_tr), "done.json"), [*train[:4], "-tr", s_tr, *train[4:]], ref_deps,
                     {**base_env, **backbone_env, **envs.get("search", {})}, train=True)
        cell_env = {**base_env, "IAC_GENOTYPE": genotype, **envs.get("cell", {})}
        trained = job(f"{prefix}/{cell}", "nnunet_cell", label, seed,
                      os.path.join(fold_dir(c_tr), "checkpoint_final.pth"), [*train[:4], "-tr", c_tr, *train[4:]],
                      [*ref_deps, search], cell_env, train=True)
        out = os.path.join(c["root"], *prefix.split("/"), f"pred_{cell}")
        preds[cell] = job(f"{prefix}/pred_{cell}", "nnunet_predict", label, seed, os.path.join(out, "pred"),
                          [tool("nnUNetv2_predict"), "-i", images, "-o", out + "/pred.partial", "-d", P["id"], "-c",
                           conf, "-f", fold, "-tr", c_tr, "-p", plans, *device, *flags.get("predict", [])],
                          [trained], {**cell_env, **envs.get("predict", {})},
                          predict=(images, os.path.join(out, "pred")))
    score = os.path.join(c["root"], *prefix.split("/"), "score")
    jobs_score = [c.get("python") or sys.executable, os.path.join(ROOT, "05_evaluate.py"),
                  *sum((["--nnunet_pred", f"{m}@{seed}={os.path.join(c['root'], *preds[m].split('/'), 'pred')}"]
                        for m in preds), []),
                  "--nnunet_gt", os.path.join(raw, "labelsTs"), "--nnunet_configuration", conf, "--nnunet_tag", tag,
                  "--rows_only", "--out", score, *flags.get("score", [])]
    job(f"{prefix}/score", "nnunet_score", label, seed, None, jobs_score, list(preds.values()))


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
STATES = ("done", "running", "submitted", "requeued", "stopped", "failed", "blocked", "waiting")
ALIVE = ("submitted", "running", "requeued")          # states in which a recorded SLURM job may still be queued
# SLURM's job states (squeue / sacct "JOB STATE CODES"): a job ends in one of SLURM_TERMINAL; every other state,
# and one not listed here, is a job SLURM still holds (pending, running, suspended, stopped, held, requeued, being
# signalled, completing ...): never submitted again while it is in it. PREEMPTED is terminal only where squeue no
# longer shows it (sacct's word): while squeue shows it, SLURM may still requeue it.
SLURM_TERMINAL = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                  "PREEMPTED", "REVOKED", "TIMEOUT"}
SLURM_KNOWN_LIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT",
                    "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED",
                    "POWER_UP_NODE", "UPDATE_DB"}


def slurm_holds(state, reason=""):
    """Whether SLURM still holds a job in `state` (reason "sacct": the state comes from sacct, squeue no longer
    shows the job): every state but the terminal ones, and PREEMPTED while squeue shows it."""
    if state in SLURM_TERMINAL:
        return state == "PREEMPTED" and reason != "sacct"
    return True


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def recorded(j):
    """What the runner last wrote in RUN/grid_job.json ({} when nothing), or "submitted" with the SLURM job from
    RUN/grid_submit.json while the runner has not yet started that SLURM job. (Two files, one writer each: a
    job that starts at once cannot have its "running" overwritten by the submitter's "submitted".)"""
    rec, sub = _read(os.path.join(j.out, STATE)), _read(os.path.join(j.out, SUBMIT))
    if sub.get("slurm_job") and str(rec.get("slurm_job")) != str(sub["slurm_job"]):
        return {"state": "submitted", **sub}
    if sub.get("submitting"):                       # written before sbatch: did it reach SLURM? (adopt_submissions)
        return {"state": "submitted", **sub}
    return rec


def process_start(pid):
    """A process's start time (clock ticks since boot, /proc/PID/stat field 22): with its pid, what names it, since
    pids are reused; None where /proc cannot tell (no such process, another OS)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid, start=None):
    """Whether process `pid` runs on this host and, where its start time was recorded, is that same process."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                          # alive, someone else's
        pass
    return start is None or process_start(pid) in (start, None)


def this_runner():
    """What a record says of the local runner that writes it: this process's pid and start time."""
    return {"runner_pid": os.getpid(), "runner_start": process_start(os.getpid())}


def local_runner_alive(rec):
    """Whether the job a local runner recorded (no SLURM job: run --backend local, or submitit's local executor)
    still runs: its runner or its stage process alive, checked by pid and start time, on the host that wrote the
    record (True / False); None elsewhere (it cannot be checked from here). A record without pids (written before
    they were recorded) reads as gone."""
    if rec.get("host") != os.uname().nodename:
        return None
    return process_alive(rec.get("runner_pid"), rec.get("runner_start")) or \
        process_alive(rec.get("stage_pid"), rec.get("stage_start"))


def squeue_jobs(tries=1, wait_s=5):
    """[(SLURM job id, STATE, reason, job name)] of every job squeue shows; None where there is no SLURM to ask: no
    squeue, or squeue failed `tries` times, `wait_s` seconds apart (a busy slurmctld times out now and then)."""
    for attempt in range(tries):
        if attempt:
            time.sleep(wait_s)
        try:
            r = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r|%j"], capture_output=True, text=True,
                               timeout=60)
        except OSError:
            return None
        except subprocess.SubprocessError:
            continue
        if r.returncode == 0:
            return [tuple(parts) for ln in r.stdout.splitlines() if len(parts := ln.strip().split("|", 3)) == 4]
    return None


def slurm_states(ids, tries=1, wait_s=5, queue=None):
    """{SLURM job id: (STATE, reason)} for the jobs the scheduler still knows (squeue keeps finished jobs for
    MinJobAge; sacct, where accounting runs, for longer: only its terminal states are taken, since a job squeue
    answered without is not held, whatever a stale accounting record says); None where there is no SLURM to ask
    (squeue_jobs). `queue`: squeue_jobs' answer, when already asked."""
    ids = sorted({str(i) for i in ids if i})
    if not ids:
        return {}
    queue = squeue_jobs(tries, wait_s) if queue is None else queue
    if queue is None:
        return None
    out = {i: (state, reason) for i, state, reason, _ in queue if i in ids}
    unknown = [i for i in ids if i not in out]
    if unknown:
        try:
            r = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(unknown)],
                               capture_output=True, text=True, timeout=60)
            for ln in r.stdout.splitlines() if r.returncode == 0 else []:
                parts = ln.strip().split("|")
                if len(parts) >= 2 and parts[0] in unknown and parts[1].split()[0] in SLURM_TERMINAL:
                    out[parts[0]] = (parts[1].split()[0], "sacct")
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def live_states(jobs, tries=1, wait_s=5, queue=None):
    """slurm_states of the SLURM jobs the run folders record."""
    return slurm_states((recorded(j).get("slurm_job") for j in jobs), tries, wait_s, queue)


def job_states(jobs, live=None):
    """{job id: (state, why)} for every job. done: done.json. Otherwise what grid_job.json says, checked against
    SLURM where `live` (slurm_states) is given: a recorded job the scheduler still holds is submitted / running /
    requeued, one it ended without done.json failed, one it cancelled for a failed dependency is blocked, one it
    no longer knows is waiting (lost: run it again). Then every job that needs a failed, stopped or blocked job is
    blocked, with the job it waits for."""
    out = {}
    for j in jobs:
        if is_done(j.out):
            out[j.id] = ("done", "")
            continue
        rec = recorded(j)
        state, why = rec.get("state", "waiting"), ""
        if state == "failed":
            why = f"{rec.get('why') or 'exit ' + str(rec.get('exit_code'))}; log {os.path.join(j.out, 'grid.log')}"
        elif state == "stopped":
            why = "exit 0 without done.json (--stop_after?); run the grid again to continue it"
        if state in ALIVE and rec.get("submitting"):
            why = (f"submission {rec['submitting']} interrupted or in progress; `run` asks squeue whether it reached "
                   "SLURM")
        elif state in ALIVE and not rec.get("slurm_job"):              # a local runner's job (run --backend local)
            alive = local_runner_alive(rec)
            where = f"{rec.get('host')}, pid {rec.get('runner_pid')}"
            if alive is False:
                state, why = "waiting", f"its local runner ({where}) is gone; `run` starts it again"
            else:
                why = f"local runner {where}" + ("" if alive else (
                    f", not checked from this host: run `grid.py status` on {rec.get('host')}; if that runner is gone "
                    f"(the host rebooted or left), `grid.py forget CONFIG --only {j.id}` clears its record and the "
                    "next `run` starts the job again"))
        elif live is not None and state in ALIVE and rec.get("slurm_job"):
            slurm, reason = live.get(str(rec["slurm_job"]), (None, ""))
            if slurm is None:
                state, why = "waiting", f"SLURM job {rec['slurm_job']} is gone (lost); `run` submits it again"
            elif slurm == "RUNNING":
                state, why = "running", f"SLURM job {rec['slurm_job']}"
            elif slurm_holds(slurm, reason):
                state = "requeued" if state == "requeued" or slurm.startswith("REQUEUE") or slurm == "PREEMPTED" \
                    else "submitted"
                why = (f"SLURM job {rec['slurm_job']} {slurm} ({reason})"
                       + ("" if slurm in SLURM_KNOWN_LIVE or slurm == "PREEMPTED" else
                          "; a state this grid does not know, taken as held by SLURM: `scancel` it to submit anew"))
            elif slurm == "CANCELLED" and "Dependency" in reason:
                state, why = "blocked", f"SLURM job {rec['slurm_job']} cancelled: {reason}"
            else:
                state = "failed"
                why = f"SLURM job {rec['slurm_job']} ended {slurm}; log {os.path.join(j.out, 'grid.log')}"
        out[j.id] = (state, why)
    for j in jobs:                                    # plan order: dependencies come first
        if out[j.id][0] in ("done", "running", "failed", "stopped"):
            continue
        bad = [d for d in j.deps if d in out and out[d][0] in ("failed", "stopped", "blocked")]
        if bad:
            out[j.id] = ("blocked", f"needs {bad[0]} ({out[bad[0]][0]})")
    return out


def set_state(j, state, **info):
    os.makedirs(j.out, exist_ok=True)
    atomic_write_json(os.path.join(j.out, STATE), {"state": state, "job": j.id, "host": os.uname().nodename,
                                                   "time": time.strftime("%Y-%m-%d %H:%M:%S"), **info})


def finished_state(j, rc):
    """A stage's exit code -> done (0 and done.json), stopped (0 without it), requeued (75) or failed."""
    return ("done" if is_done(j.out) else "stopped") if rc == 0 else "requeued" if rc == REQUEUE_EXIT else "failed"


def counts(jobs, states):
    table = collections.OrderedDict((s, collections.Counter()) for s in STAGES)
    for j in jobs:
        table[j.stage][states[j.id][0]] += 1
    return table


def print_counts(table, title):
    print(title)
    print(f"  {'stage':<15}" + "".join(f"{s:>10}" for s in (*STATES, "total")))
    for stage, n in table.items():
        if sum(n.values()):
            print(f"  {stage:<15}" + "".join(f"{n.get(s, 0):>10}" for s in STATES) + f"{sum(n.values()):>10}")


# --------------------------------------------------------------------------- starting a job
def start_stage(j, env=None, **info):
    """Mark the job running and start its stage command, output appended to RUN/grid.log; returns the process."""
    os.makedirs(j.out, exist_ok=True)
    if not info.get("slurm_job") and os.path.exists(os.path.join(j.out, SUBMIT)):
        os.remove(os.path.join(j.out, SUBMIT))       # run here, not by the SLURM job it once recorded
    runner = this_runner()
    set_state(j, "running", **runner, **info)
    with open(os.path.join(j.out, "grid.log"), "a") as log:
        log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(j.command)}\n")
        log.flush()
        p = subprocess.Popen(j.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                             preexec_fn=block_stop_signals)        # until the stage can stop cleanly
    set_state(j, "running", **runner, stage_pid=p.pid, stage_start=process_start(p.pid), **info)
    return p


def log_line(j, text):
    """A line of the runner's own in RUN/grid.log (the stage's output goes there too)."""
    with open(os.path.join(j.out, "grid.log"), "a") as log:
        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


# --------------------------------------------------------------------------- one job on SLURM
class StageJob:
    """A grid job as submitit runs it on a SLURM node.

    Stopping: SLURM sends submitit's warning signal (USR2, `--signal=USR2@signal_delay_s`) to every process of
    the job step, the stage included, and every stage stops on it by itself (common/runs.py: USR1, USR2, TERM
    and $SUBMITIT_PREEMPT_SIGNAL all end it at the next step with exit 75), so a stage stops cleanly whoever
    signals it: this runner, SLURM, `scancel --signal`, a preemption's TERM. submitit's handler then calls
    checkpoint(): the stage is told once more (SIGUSR1) and its exit awaited, and the same job is requeued;
    its `--resume auto` continues where it stopped.

    The exit is awaited on an Event that a reaper thread sets, never by Popen.wait() from inside the signal
    handler: the interrupted main thread may hold Popen's wait lock, and a nested wait(timeout) then times
    out although the stage has long exited (the full minute, on every requeue, was what made SLURM mark
    requeued tasks TIMEOUT)."""

    def __init__(self, job, stop_wait_s=60):
        self.job = Job(*job)
        self.stop_wait_s = stop_wait_s
        self.process, self.exited = None, None

    def __getstate__(self):                            # pickled by submitit: the job, never a live process
        return {"job": tuple(self.job), "stop_wait_s": self.stop_wait_s}

    def __setstate__(self, state):
        self.__init__(state["job"], state["stop_wait_s"])

    def _reap(self):
        self.process.wait()
        self.exited.set()

    def __call__(self):
        j = self.job
        if is_done(j.out):
            return 0
        self.exited = threading.Event()
        self.process = start_stage(j, slurm_job=os.environ.get("SLURM_JOB_ID"),
                                   restarts=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        threading.Thread(target=self._reap, daemon=True).start()
        while not self.exited.wait(0.5):               # signal handlers (checkpoint) run between the waits
            pass
        rc = self.process.returncode
        state = finished_state(j, rc)
        log_line(j, f"exit {rc} ({state})")
        if state != "done":
            set_state(j, state, exit_code=rc, slurm_job=os.environ.get("SLURM_JOB_ID"))
        if state == "requeued":
            raise RuntimeError(f"{j.id} was stopped (exit {rc}); requeue it or re-run grid.py run")
        if state == "stopped":
            raise RuntimeError(f"{j.id} exited 0 without done.json (stopped early); re-run grid.py run to continue")
        if state == "failed":
            raise RuntimeError(f"{j.id} failed (exit {rc}); see {os.path.join(j.out, 'grid.log')}")
        return 0

    def checkpoint(self, *args, **kwargs):
        import submitit
        t0, rc = time.time(), None
        if self.process is not None:
            if not self.exited.is_set():
                try:
                    self.process.send_signal(signal.SIGUSR1)
                except ProcessLookupError:
                    pass
                if not self.exited.wait(self.stop_wait_s):
                    print(f"{self.job.id}: the stage did not stop within {self.stop_wait_s} s; killing it",
                          file=sys.stderr, flush=True)
                    self.process.kill()
                    self.exited.wait(10)
            rc = self.process.returncode
        seconds = time.time() - t0
        log_line(self.job, f"exit {rc} (requeued): checkpoint: the stage stopped {seconds:.1f} s after the signal; "
                           "requeueing")
        set_state(self.job, "requeued", exit_code=rc, slurm_job=os.environ.get("SLURM_JOB_ID"),
                  stop_seconds=round(seconds, 2))
        return submitit.helpers.DelayedSubmission(StageJob(self.job, self.stop_wait_s), *args, **kwargs)


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


def run_local(jobs, selected, gpus=None, max_requeues=3):
    """The selected jobs in dependency order, one per GPU slot at a time; a job stopped with REQUEUE_EXIT runs
    again (its --resume auto continues), a failed or stopped one blocks its dependants. Dependencies outside
    the selection count when they are done. A job queued or running elsewhere (a SLURM job of `run --backend
    slurm`, another local runner) is left to it."""
    slots = gpu_slots(gpus)
    done = {j.id for j in jobs if is_done(j.out)}
    queue = squeue_jobs()                                        # None where there is no SLURM here
    if queue is not None:
        adopt_submissions(jobs, queue)                           # a killed `run --backend slurm`'s leftovers
    states = job_states(jobs, live_states(jobs, queue=queue) if queue is not None else None)
    elsewhere = {j.id for j in selected if j.id not in done and states[j.id][0] in ALIVE}
    for jid in sorted(elsewhere):
        print(f"[kept] {jid}: {states[jid][1] or states[jid][0]}; not run here")
    pending = [j for j in selected if j.id not in done and j.id not in elsewhere]
    failed, requeues, running = set(), collections.Counter(), {}
    selected_ids = {j.id for j in pending}
    outside = sorted({d for j in pending for d in j.deps if d not in done and d not in selected_ids})
    print(f"local backend: {len(pending)} jobs to run ({len(selected) - len(pending)} done), "
          f"{len(slots)} slot(s): {', '.join(s or 'default device' for s in slots)}")
    if outside:
        print(f"  not done and not run here (not selected, or queued / running elsewhere; their dependants cannot run "
              f"now): {', '.join(outside)}")
    while pending or running:
        for slot, (j, p) in list(running.items()):
            rc = p.poll()
            if rc is None:
                continue
            del running[slot]
            state = finished_state(j, rc)
            again = state == "requeued" and requeues[j.id] < max_requeues        # this runner runs it again
            if state == "requeued" and not again:
                state = "failed"
                set_state(j, state, exit_code=rc, why=f"stopped for a requeue {max_requeues + 1} times "
                                                      "(--max_requeues)")
            else:
                set_state(j, state, exit_code=rc, **(this_runner() if again else {}))
            log_line(j, f"exit {rc} ({state})")
            print(f"[{state}] {j.id} (exit {rc})", flush=True)
            if state == "done":
                done.add(j.id)
            elif again:
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
            why = ", ".join(sorted(failed | set(outside))) or "?"
            print(f"{len(pending)} jobs cannot run: a job they depend on failed, stopped or is not selected ({why})")
            break
        time.sleep(0.2)
    return not failed and not pending


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
        elif s.get("gpus_per_node", 1):                          # 0: a CPU-only cluster (or a test cluster)
            params["gpus_per_node"] = s.get("gpus_per_node", 1)
        if s.get("account"):
            params["slurm_account"] = s["account"]
        params = {k: v for k, v in params.items() if v is not None}
    ex.update_parameters(**params)
    return ex


def adopt_submissions(jobs, queue):
    """Submissions a killed `run` left half-done: RUN/grid_submit.json says "submitting" (written before sbatch)
    without the SLURM job id (written after). A job squeue shows under that submission's name is recorded as this
    grid job's; where there is none, nothing reached SLURM and the record goes."""
    by_name = {name: i for i, _, _, name in queue}
    for j in jobs:
        path = os.path.join(j.out, SUBMIT)
        sub = _read(path)
        if not sub.get("submitting"):
            continue
        name = sub["submitting"]
        if name in by_name:
            atomic_write_json(path, {"slurm_job": by_name[name], "after": sub.get("after", []), "name": name,
                                     "time": sub.get("time")})
            print(f"[adopted] {j.id}: SLURM job {by_name[name]} ({name}), submitted by a run that was interrupted")
        else:
            os.remove(path)


@contextlib.contextmanager
def grid_lock(root):
    """One `grid.py run` at a time on a root: a POSIX lock on ROOT/grid/run.lock (released by the kernel when the
    holder dies, also over NFS with lockd), the holder's host, pid and command written in it for the message."""
    os.makedirs(os.path.join(root, "grid"), exist_ok=True)
    path = os.path.join(root, "grid", "run.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "?"
            raise InputError(f"another `grid.py run` is working on {root} ({holder}; lock {path}): wait for it to "
                             "finish (`grid.py status` shows its jobs); two runs would start or submit the same jobs "
                             "twice") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {os.uname().nodename}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(sys.argv)}\n".encode(), 0)
        yield
    finally:
        os.close(fd)                                  # (closing releases the lock)


def run_slurm(c, jobs, selected, a):
    """One SLURM job per grid job not done, each depending (afterok) on exactly the SLURM jobs of the grid jobs
    it needs, with --kill-on-invalid-dep so that the dependants of a failed job are cancelled (status: blocked)
    instead of pending forever; requeue on time limit / preemption through submitit's checkpointing.

    Safe to re-run: a job whose recorded SLURM job SLURM still holds (any state but a terminal one: pending,
    running, suspended, stopped, held, requeued, preempted while squeue shows it; slurm_holds) is left alone (and
    its dependants wait on it), one that ended without done.json (failed, timed out, cancelled) or vanished is
    submitted again. Before anything is submitted, a job SLURM still holds whose dependency failed is cancelled
    (scancel: it would wait forever), and so is one that waits on a lost job being submitted again; a job a live
    local runner runs
    (run --backend local) is left alone too, and its dependants wait for a later run. While squeue does not answer,
    nothing is submitted (a failed squeue must not read as an empty queue). A submission is recorded before sbatch
    (its SLURM job name) and after (its id), so a run killed in between leaves no job unaccounted for
    (adopt_submissions). Returns the new handles."""
    queue = squeue_jobs(SQUEUE_TRIES, SQUEUE_WAIT_S) if a.cluster != "local" else None
    pending = [j.id for j in jobs if (r := recorded(j)).get("state") in ALIVE and
               (r.get("slurm_job") or r.get("submitting"))]
    if queue is None and a.cluster != "local" and pending:
        raise InputError(f"squeue failed {SQUEUE_TRIES} times, so it is not known which of the {len(pending)} SLURM "
                         f"jobs the run folders record (e.g. {pending[0]}) are still queued; nothing was submitted (a "
                         "second copy of a queued job would run it twice). Check `squeue` and SLURM_CONF, then run "
                         "again.")
    if queue is not None:
        adopt_submissions(jobs, queue)
    live = live_states(jobs, queue=queue) if queue is not None else None
    states = job_states(jobs, live)
    if live is not None:                              # before anything is submitted: what SLURM would keep forever
        for j in jobs:
            job = recorded(j).get("slurm_job")
            if states[j.id][0] == "blocked" and job and slurm_holds(*live.get(str(job), ("COMPLETED", ""))):
                scancel(j, job, f"{states[j.id][1]}: it would wait on a failed job")
    s = dict(c.get("slurm", {}))
    ex = slurm_executor(c, a, os.path.join(c["root"], "grid", "submitit", "%j"))
    stop_wait = max(5, min(120, int(s.get("signal_delay_s", 180)) - 15))   # the requeue must beat the time limit
    chosen = {j.id for j in selected}
    slurm_id, handle_of, handles, again = {}, {}, [], set()
    for j in jobs:
        state, why = states[j.id]
        if state == "done":
            continue
        rec = recorded(j)
        if state in ALIVE and (live is not None or not rec.get("slurm_job")):   # queued / running: left alone
            stale = [d for d in j.deps if d in again]          # ... unless it waits on a job submitted again
            if not (stale and rec.get("slurm_job") and j.id in chosen and state != "running"):
                if rec.get("slurm_job"):
                    slurm_id[j.id] = str(rec["slurm_job"])
                if j.id in chosen:
                    print(f"[kept] {j.id}: {why}" + (f" (but it waits on the lost job of {stale[0]}: run it again "
                                                     "with this job selected)" if stale else ""))
                continue
            scancel(j, rec["slurm_job"], f"it waits on the lost SLURM job of {stale[0]}, submitted again now")
        if j.id not in chosen:
            continue
        need = [d for d in j.deps if states[d][0] != "done"]
        missing = [d for d in need if d not in slurm_id]
        if missing:
            print(f"[skip] {j.id}: needs {', '.join(missing)} (not done and not submitted: outside --only, running "
                  "under a local runner, or it could not be submitted)")
            continue
        if a.cluster == "local" and not all(wait_all([handle_of[d]]) for d in need):   # no scheduler to hold
            set_state(j, "blocked", why=f"a dependency failed: {', '.join(need)}")          # dependants back
            print(f"[blocked] {j.id}: a job it needs failed")
            continue
        after = [slurm_id[d] for d in need]
        name = f"iac_{j.stage}_{uuid.uuid4().hex[:12]}"            # how a killed run's submission is found again
        if a.cluster != "local":
            extra = {"kill-on-invalid-dep": "yes", **({"dependency": "afterok:" + ":".join(after)} if after else {})}
            ex.update_parameters(slurm_additional_parameters=extra, name=name)
            os.makedirs(j.out, exist_ok=True)
            atomic_write_json(os.path.join(j.out, SUBMIT), {"submitting": name, "after": after,
                                                            "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        h = ex.submit(StageJob(tuple(j), stop_wait))
        slurm_id[j.id], handle_of[j.id] = str(h.job_id), h
        again.add(j.id)
        handles.append(h)
        if a.cluster != "local":
            atomic_write_json(os.path.join(j.out, SUBMIT), {"slurm_job": str(h.job_id), "after": after, "name": name,
                                                            "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        print(f"[submit] {j.id}: job {h.job_id}" + (f", after {', '.join(after)}" if after else ""), flush=True)
    print(f"{len(handles)} jobs submitted")
    return handles


def scancel(j, job, why):
    """Cancel SLURM job `job` recorded for grid job j (its record then says blocked, with why); a failed scancel
    stops the run before a second copy could be submitted."""
    try:
        r = subprocess.run(["scancel", str(job)], capture_output=True, text=True, timeout=60)
        err = r.stderr.strip() if r.returncode else ""
    except (OSError, subprocess.SubprocessError) as e:
        err = str(e)
    if err:
        raise InputError(f"scancel {job} ({j.id}) failed ({err}); nothing more was submitted. Cancel it by hand "
                         "(`scancel`), then run again")
    log_line(j, f"cancelled SLURM job {job}: {why}")
    if os.path.exists(os.path.join(j.out, SUBMIT)):
        os.remove(os.path.join(j.out, SUBMIT))
    set_state(j, "blocked", why=f"SLURM job {job} cancelled: {why}", cancelled_slurm_job=str(job))
    print(f"[cancel] {j.id}: SLURM job {job} ({why})")


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
    """Per data set: 05_evaluate.py --rows over the scored runs of both tracks (the nnU-Net rows, Table 2, beside
    the slice track's, Table 1, in the same tables: backbones nnunet_CONF_REGIME:NETWORK) and --search over the
    finished searches (Tables 4-5)."""
    import pandas as pd
    ok = True
    for ds in c["datasets"]:
        scored = [j for j in jobs if j.dataset == ds and j.stage in ("score", "nnunet_score")]
        rows = [os.path.join(j.out, "per_patient.csv") for j in scored if is_done(j.out)]
        searches = [f"{j.id.split('/', 1)[1].replace('/', '_')}={search_folder(j)}" for j in jobs
                    if j.dataset == ds and j.stage in ("search", "nnunet_search") and is_done(j.out)]
        if not rows:
            print(f"{ds}: no scored run yet")
            continue
        tables = [pd.read_csv(r) for r in rows]
        print(f"{ds}: {sum(j.stage == 'score' and is_done(j.out) for j in scored)} of "
              f"{sum(j.stage == 'score' for j in scored)} runs scored"
              + (f"; nnU-Net track: {sum(j.stage == 'nnunet_score' and is_done(j.out) for j in scored)} of "
                 f"{sum(j.stage == 'nnunet_score' for j in scored)} scoring jobs" if c.get("nnunet") else ""))
        patients = {"slices": set(), "nnunet": set()}
        for t in tables:                               # the test patients each track scored
            track = "nnunet" if t["backbone"].astype(str).str.startswith("nnunet").all() else "slices"
            patients[track] |= set(t["patient_id" if "patient_id" in t else "patient"].astype(str))
        if all(patients.values()) and patients["slices"] != patients["nnunet"]:
            print(f"{ds}: WARNING: the nnU-Net rows score {len(patients['nnunet'])} test patients, the slice track's "
                  f"{len(patients['slices'])}; they differ ({sorted(patients['slices'] ^ patients['nnunet'])[:3]} "
                  "...): the tables compare methods within a backbone only")
        cmd = [sys.executable, os.path.join(ROOT, "05_evaluate.py"), *sum((["--rows", r] for r in rows), []),
               "--reference", "ref", *sum((["--search", s] for s in searches), []),
               "--out", os.path.join(c["root"], ds, "report"), *c.get("flags", {}).get("report", [])]
        methods = set().union(*(set(t["method"]) for t in tables))
        if {"iac", "iac_lth"} <= methods:
            cmd += ["--compare", "iac:iac_lth"]
        ok &= subprocess.run(cmd, cwd=ROOT).returncode == 0
    return ok


def search_folder(j):
    """Where a search job's genotype.json and trajectory.jsonl are: its run folder, or, for the nnU-Net track, the
    fold folder its --expect names."""
    if j.stage != "nnunet_search":
        return j.out
    return os.path.dirname(j.command[j.command.index("--expect") + 1])


# --------------------------------------------------------------------------- command line
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("command", choices=["plan", "run", "status", "report", "forget"],
                   help="plan: list the jobs; run: run the jobs not done yet; status: where each job stands; "
                        "report: the tables and figures from the scored runs; forget: clear the records of jobs "
                        "(--only) that nothing is known to run, e.g. a local runner's on a host that is gone")
    p.add_argument("config", help="grid config (JSON; see configs/grid_example.json)")
    p.add_argument("--backend", choices=["local", "slurm"], default="local",
                   help="run: where the jobs run: local = on this machine, one job per GPU; slurm = one SLURM job "
                        "each, submitted with submitit")
    p.add_argument("--gpus", default=None, metavar="0,1,..",
                   help="--backend local: GPUs to use, one job each (default: CUDA_VISIBLE_DEVICES, else every "
                        "visible GPU)")
    p.add_argument("--only", default=None, metavar="PREFIX",
                   help="run / status: only the jobs whose id starts with PREFIX, e.g. acdc/resnet50 (default: all "
                        "jobs)")
    p.add_argument("--cluster", choices=["slurm", "local"], default="slurm",
                   help="--backend slurm: submitit's cluster (local: submitit's local executor, for testing)")
    p.add_argument("--wait", action="store_true",
                   help="--backend slurm: wait for the submitted jobs to finish (without it, run returns once they "
                        "are submitted)")
    p.add_argument("--max_requeues", type=int, default=3,
                   help="--backend local: reruns of a job that stopped to be requeued (exit 75)")
    for name, typ in SLURM_FLAGS.items():
        p.add_argument(f"--{name}", type=typ, default=None, help=f"--backend slurm: {SLURM_HELP[name]}")
    return p.parse_args(argv)


def print_status(c, jobs, selected):
    live = live_states(jobs)
    states = job_states(jobs, live)
    print_counts(counts(selected, states), f"grid {c['root']}: {len(selected)} jobs"
                 + ("" if live is None else " (states checked with squeue / sacct)"))
    for j in selected:
        state, why = states[j.id]
        if state in ("failed", "blocked", "stopped", "requeued") or (state == "waiting" and why) or \
                recorded(j).get("submitting") or "not checked from this host" in why:
            print(f"  {state}: {j.id}  ({why})")
    return states


def main(a):
    c = load_config(a.config)
    jobs = plan(c)
    selected = [j for j in jobs if not a.only or j.id.startswith(a.only)]
    if a.command == "plan":
        path = write_manifest(c, jobs)
        print_counts(counts(selected, job_states(selected)), f"{len(selected)} jobs, manifest {path}")
    elif a.command == "status":
        print_status(c, jobs, selected)
    elif a.command == "run":
        with grid_lock(c["root"]):
            run(c, jobs, selected, a)
    elif a.command == "forget":
        with grid_lock(c["root"]):
            forget(jobs, selected)
    elif a.command == "report" and not report(c, jobs, a):
        sys.exit(1)


def forget(jobs, selected):
    """`grid.py forget`: clear the runner's records (grid_job.json, grid_submit.json) of the selected jobs that are
    not done and that nothing is known to run: a local runner's record written on another host (which this host
    cannot check: the host rebooted or left the cluster), a failed, stopped or lost one. A job SLURM still holds or
    a live local runner on this host runs is kept. The next `run` starts a forgotten job again (its --resume auto
    continues from its checkpoint)."""
    states = job_states(jobs, live_states(jobs))
    for j in selected:
        state, why = states[j.id]
        rec = recorded(j)
        if state == "done" or not rec:
            continue
        if state in ALIVE and (rec.get("slurm_job") or rec.get("submitting") or local_runner_alive(rec)):
            print(f"[kept] {j.id}: {why}" + ("; `scancel` it first" if rec.get("slurm_job") else ""))
            continue
        for name in (STATE, SUBMIT):
            if os.path.exists(os.path.join(j.out, name)):
                os.remove(os.path.join(j.out, name))
        log_line(j, f"record cleared by `grid.py forget` (was {state}: {why})")
        print(f"[forgot] {j.id}: was {state} ({why})")


def run(c, jobs, selected, a):
    """`grid.py run` (under grid_lock): the local or the SLURM backend."""
    write_manifest(c, jobs)
    if a.backend == "local":
        ok = run_local(jobs, selected, a.gpus, a.max_requeues)
        print_counts(counts(selected, job_states(jobs)), "grid after this run:")
    else:
        handles = run_slurm(c, jobs, selected, a)
        ok = True
        if a.wait or a.cluster == "local":
            ok = wait_all(handles)
            print_status(c, jobs, selected)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    cli(main, get_args)
