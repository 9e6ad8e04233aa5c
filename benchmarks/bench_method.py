"""Do the cells help? The paper's two claims on one real MRI volume (MNI152) warped into subjects, over seeds.

    python benchmarks/bench_method.py [--seeds 0 1 2] [--jobs 2] [--out bench_runs/method] [--record]
    python benchmarks/bench_method.py --tiny --out /tmp/m          # the suite's one-minute version

Data: benchmarks/make_mni_dataset.py (nnU-Net raw layout, GM / WM labels, a fixed --split_file with
--test subjects), then `01_preprocess.py --dataset nnunet`. Per seed, every stage script with the
same flags but the seed:
  stage I    ref, att, nested (02_pretrain.py, --epochs_i epochs, best validation checkpoint), and the
             control ref_long: ref trained on for the --epochs_iii epochs stage III adds (stage I's
             Adam lr is constant, so the same seed with epochs_i + epochs_iii epochs is ref continued);
  stage II   03_search.py --mode full and --mode lth on the same frozen ref, the same cap and warm-up;
  stage III  04_finetune.py: iac (full genotype, fresh) and iac_lth (LTH genotype, θ0), the paper's pair;
             the 2x2 that separates "which ops" from "which start": iac_theta0 (full genotype from its
             own search's θ0) and iac_lth_fresh (LTH genotype, fresh); with --residual also both cells
             with --cell_output residual (the output conv starts at zero, the cell at the identity skip);
             with --late_stop also the LTH search with a later stop (--tau0_rel of --late_kappa) and its cell,
             with --fast_gamma G an LTH search with --gamma G (the demo's 1.5 suits a short cap) and its cell,
             with --lth_batches B.. LTH searches (γ G when given) at batch B (other steps per epoch) and their cells,
             with --search_residual both searches with --cell_output residual (the supernet starts as the identity
             skip) and their cells trained residual: iac_sres (fresh) and iac_lth_sres (θ0), against iac_res /
             iac_lth_res, whose cells were searched with `replace` (the one change: the search's cell output).
Then one 05_evaluate.py over all seeds, whose tables are the result: per comparison the ΔDice with each
method's Dice averaged over the seeds (95% bootstrap CI and Wilcoxon p over the test subjects, conditional on the
trained models), each seed's ΔDice, and a 95% CI over seeds and subjects; the paper's two claims (ref -> iac,
iac -> iac_lth) are primary, every other comparison exploratory with Holm-adjusted p, and a difference is a gain or
a loss only where the CI with seeds excludes 0. OUT/eval/paired_by_seed.csv holds every seed's ΔDice per subject.
Every test subject is a warp of the same real volume the training subjects come from, so the p-values measure
robustness to warping, not generalisation to new people. The schedule is the paper's scaled down the same way for both
searches (cap, warm-up and stage-I/III epochs are flags, recorded in the table's header).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import pandas as pd

import make_mni_dataset
from _common import ROOT, load_script, machine, record
from common.utils import read_jsonl

FULL = dict(subjects=36, test=20, val=4, spacing=3.0, slab=48.0, crop=64, width=8, batch_size=16,
            search_batch=32, epochs_i=40, epochs_iii=40, cap=30, warmup=5)
TINY = dict(subjects=8, test=3, val=2, spacing=6.0, slab=24.0, crop=32, width=4, batch_size=8,
            search_batch=16, epochs_i=2, epochs_iii=2, cap=3, warmup=1)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "bench_runs", "method"), help="working folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="seeds run side by side (each with --threads threads)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per seed (default: 2 // jobs, min 1)")
    p.add_argument("--tiny", action="store_true", help="the test suite's size (seconds, not a result)")
    for k, v in FULL.items():
        p.add_argument(f"--{k}", type=type(v), default=None, help=f"default {v} (--tiny: {TINY[k]})")
    p.add_argument("--residual", action="store_true", help="also stage III with --cell_output residual")
    p.add_argument("--late_stop", action="store_true", help="also an LTH search with a later stop")
    p.add_argument("--late_kappa", type=float, default=0.02, help="--tau0_rel of the later-stopping LTH search")
    p.add_argument("--fast_gamma", type=float, default=None,
                   help="also an LTH search with this --gamma (the demo's 1.5 for a short cap) and its cell (θ0)")
    p.add_argument("--lth_batches", type=int, nargs="*", default=[],
                   help="also LTH searches at these batch sizes (other steps per epoch; --gamma --fast_gamma when "
                        "given) and their cells (θ0): does the stop epoch, and the cell, depend on the steps?")
    p.add_argument("--search_residual", action="store_true",
                   help="also both searches with --cell_output residual and their cells trained residual")
    p.add_argument("--record", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    p.add_argument("--reuse_eval", action="store_true", help="keep OUT/eval when it is finished (only re-record)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)     # one seed's chain
    a = p.parse_args(argv)
    for k, v in (TINY if a.tiny else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def stage(name, argv):
    """Run a stage script in this process (its main(get_args(argv)))."""
    m = load_script(name)
    m.main(m.get_args([str(x) for x in argv]))


def data_flags(a):
    d = os.path.join(a.out, "data")
    return ["--data", f"{d}/slices.h5", "--splits", f"{d}/splits.json"]


def make_data(a):
    raw, d = os.path.join(a.out, "raw"), os.path.join(a.out, "data")
    if not os.path.isfile(os.path.join(d, "done.json")):
        make_mni_dataset.main(make_mni_dataset.get_args([str(x) for x in (
            "--out", raw, "--subjects", a.subjects, "--test", a.test, "--val", a.val, "--spacing", a.spacing,
            "--slab", a.slab, "--seed", 0, "--overwrite")]))
        stage("01_preprocess", ["--dataset", "nnunet", "--raw", raw, "--out", d, "--crop", a.crop, a.crop,
                                "--split_file", f"{raw}/split.json", "--overwrite"])


def seed_chain(a, seed):
    """Every run of one seed (skipping those already done, so an interrupted study continues)."""
    d, data = os.path.join(a.out, f"seed{seed}"), data_flags(a)
    common = [*data, "--seed", seed, "--workers", 0]

    def once(name, script, argv):
        if not os.path.isfile(os.path.join(d, name, "done.json")):
            t0 = time.time()
            stage(script, [*argv, "--out", os.path.join(d, name), "--overwrite"])
            print(f"[seed {seed}] {name}: {time.time() - t0:.0f} s", flush=True)

    for skip in ("ref", "att", "nested"):
        once(skip, "02_pretrain", [*common, "--skip", skip, "--width", a.width, "--epochs", a.epochs_i,
                                   "--batch_size", a.batch_size])
    once("ref_long", "02_pretrain", [*common, "--width", a.width, "--epochs", a.epochs_i + a.epochs_iii,
                                     "--batch_size", a.batch_size])
    bb = ["--backbone", os.path.join(d, "ref", "ckpt_best.pt"), *common]
    search = ["--epochs", a.cap, "--warmup", a.warmup, "--batch_size", a.search_batch]
    once("search_full", "03_search", [*bb, "--mode", "full", *search])
    once("search_lth", "03_search", [*bb, "--mode", "lth", *search])
    cells = {"iac": ("search_full", "fresh"), "iac_lth": ("search_lth", "theta0"),
             "iac_theta0": ("search_full", "theta0"), "iac_lth_fresh": ("search_lth", "fresh")}
    if a.late_stop:
        once("search_lth_late", "03_search", [*bb, "--mode", "lth", *search, "--tau0_rel", a.late_kappa])
        cells["iac_lth_late"] = ("search_lth_late", "theta0")
    if a.fast_gamma:
        once("search_lth_g", "03_search", [*bb, "--mode", "lth", *search, "--gamma", a.fast_gamma])
        cells["iac_lth_g"] = ("search_lth_g", "theta0")
    for b in a.lth_batches:
        gamma = ["--gamma", a.fast_gamma] if a.fast_gamma else []
        once(f"search_lth_b{b}", "03_search", [*bb, "--mode", "lth", "--epochs", a.cap, "--warmup", a.warmup,
                                               "--batch_size", b, *gamma])
        cells[f"iac_lth_b{b}"] = (f"search_lth_b{b}", "theta0")
    runs = {name: (s, init, "replace") for name, (s, init) in cells.items()}
    if a.residual:
        runs.update({"iac_res": ("search_full", "fresh", "residual"), "iac_lth_res": ("search_lth", "theta0", "residual")})
    if a.search_residual:
        for mode in ("full", "lth"):
            once(f"search_{mode}_sres", "03_search", [*bb, "--mode", mode, *search, "--cell_output", "residual"])
        runs.update({"iac_sres": ("search_full_sres", "fresh", "residual"),
                     "iac_lth_sres": ("search_lth_sres", "theta0", "residual")})
    for name, (s, init, output) in runs.items():
        once(name, "04_finetune", [*bb, "--genotype", os.path.join(d, s, "genotype.json"), "--init", init,
                                   "--cell_output", output, "--epochs", a.epochs_iii, "--batch_size", a.batch_size])


def run_seeds(a):
    threads = a.threads or max(1, 2 // a.jobs)
    argv = [x for x in sys.argv[1:] if x not in ("--record",)]
    pending, procs = list(a.seeds), []
    while pending or procs:
        while pending and len(procs) < a.jobs:
            s = pending.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", str(s)]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            procs.append((s, subprocess.Popen(cmd, env=env)))
        time.sleep(1)
        for s, pr in list(procs):
            if pr.poll() is not None:
                procs.remove((s, pr))
                if pr.returncode:
                    raise SystemExit(f"error: seed {s} failed ({pr.returncode})")


def evaluate(a):
    names = ["ref", "att", "nested", "ref_long", "iac", "iac_lth", "iac_theta0", "iac_lth_fresh"]
    names += ["iac_lth_late"] if a.late_stop else []
    names += ["iac_lth_g"] if a.fast_gamma else []
    names += ["iac_res", "iac_lth_res"] if a.residual else []
    names += [f"iac_lth_b{b}" for b in a.lth_batches]
    names += ["iac_sres", "iac_lth_sres"] if a.search_residual else []
    runs = [x for s in a.seeds for n in names for x in ("--run", f"{n}={a.out}/seed{s}/{n}")]
    modes = search_modes(a)
    searches = [x for s in a.seeds for m in modes for x in ("--search", f"{m}={a.out}/seed{s}/search_{m}")]
    compare = ["iac:iac_lth", "ref_long:iac", "ref_long:iac_lth", "iac:iac_theta0", "iac_lth:iac_lth_fresh",
               "iac_theta0:iac_lth"] + (["iac_lth:iac_lth_late"] if a.late_stop else []) + \
              (["iac:iac_res", "iac_lth:iac_lth_res", "ref_long:iac_res"] if a.residual else []) + \
              (["iac:iac_lth_g", "ref_long:iac_lth_g", "iac_lth:iac_lth_g"] if a.fast_gamma else []) + \
              (["iac_res:iac_sres", "iac_lth_res:iac_lth_sres", "ref_long:iac_sres", "ref_long:iac_lth_sres",
                "iac_sres:iac_lth_sres"] if a.search_residual else []) + \
              [f"{'iac_lth_g' if a.fast_gamma else 'iac_lth'}:iac_lth_b{b}" for b in a.lth_batches]
    if a.reuse_eval and os.path.isfile(f"{a.out}/eval/done.json"):
        return f"{a.out}/eval"
    stage("05_evaluate", [*data_flags(a), *runs, *searches, "--reference", "ref",
                          *[x for c in compare for x in ("--compare", c)], "--nsd_tolerance", 1.0,
                          "--n_boot", 999 if a.tiny else 9999, "--device", "cpu", "--out", f"{a.out}/eval"])
    return f"{a.out}/eval"


def search_modes(a):
    return (("full", "lth") + (("lth_late",) if a.late_stop else ()) + (("lth_g",) if a.fast_gamma else ())
            + tuple(f"lth_b{b}" for b in a.lth_batches) + (("full_sres", "lth_sres") if a.search_residual else ()))


def search_rows(a):
    rows = []
    for s in a.seeds:
        for m in search_modes(a):
            g = json.load(open(f"{a.out}/seed{s}/search_{m}/genotype.json"))["search"]
            rows.append({"seed": s, "search": m, "epochs": g["epochs_run"], "seconds": round(g["seconds"], 1),
                         "tau0": g.get("lth", {}).get("tau0")})
    return pd.DataFrame(rows)


def stage_i_rows(a):
    """Where stage I stopped improving: the best validation epoch and Dice of each stage-I run."""
    rows = []
    for s in a.seeds:
        for n in ("ref", "att", "nested", "ref_long"):
            log = read_jsonl(f"{a.out}/seed{s}/{n}/log.jsonl")
            rows.append({"seed": s, "run": n, "epochs": len(log), "best epoch": log[-1]["best_epoch"] + 1,
                         "best val Dice": round(log[-1]["best_dice"], 4)})
    return pd.DataFrame(rows)


def main(a):
    if a.worker is not None:
        seed_chain(a, a.worker)
        return
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    make_data(a)
    run_seeds(a)
    ev = evaluate(a)
    sr = search_rows(a)
    piv = sr.pivot(index="seed", columns="search", values="seconds")
    sr_md = sr.to_string(index=False)
    st_md = stage_i_rows(a).to_string(index=False)
    full_of = (lambda m: "full_sres" if m.endswith("_sres") else "full")     # each LTH search against its full one
    ratio = {m: (piv[full_of(m)] / piv[m]).round(2).to_dict() for m in piv.columns if not m.startswith("full")}
    print(f"\nstage I:\n{st_md}\nsearches:\n{sr_md}\nfull / LTH search time per seed: {ratio}\nstudy: {time.time() - t0:.0f} s")
    if a.record:
        body = (f"Machine: {machine()}\n\nWarped MNI152 subjects (`make_mni_dataset.py`: {a.subjects} subjects, "
                f"{a.test} test / {a.val} val, {a.spacing} mm, {a.slab} mm slab, crop {a.crop}), base U-Net width "
                f"{a.width}; stage I / III {a.epochs_i} / {a.epochs_iii} epochs at batch {a.batch_size}; both searches "
                f"cap {a.cap}, warm-up {a.warmup}, batch {a.search_batch}; seeds {a.seeds}; study {time.time() - t0:.0f} s."
                f"\n\n{open(f'{ev}/summary.md').read()}\n{open(f'{ev}/paired.md').read()}\n"
                f"Every seed's ΔDice per subject: `{ev}/paired_by_seed.csv`.\n\n"
                f"Stage I (validation plateau):\n\n```\n{st_md}\n```\n\n"
                f"Searches (seconds of the epochs, same run):\n\n```\n{sr_md}\n```\n\nfull / LTH time: {ratio}\n")
        record("Do the cells help? Warped-template MRI over seeds (bench_method.py)", body)


if __name__ == "__main__":
    main(get_args())
