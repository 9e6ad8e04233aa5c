"""Does the LTH stop epoch depend on the data set's size? (issue: JS test on every data-set size)

    python benchmarks/bench_lth_invariance.py [--batches 64 16 4 1] [--jobs 2] \
        [--settings tau0=1e-3 tau0_rel=0.2 "tau0_rel=0.2 js_support=all"]

One ACDC phantom and one frozen base U-Net; the optimizer steps per epoch are varied through
the batch size (62 training slices: 1, 4, 16 and 62 steps, a 62x span, like a small ACDC run
against BraTS at batch 128). For each regime and each setting of the JS test it runs
`03_search.py --mode lth --epochs 200 --warmup 15` and records the stop epoch, the median edge
JS at the first test after warm-up (the scale the threshold has to match) and the τ0 in force.
Goal for the default: every regime stops inside one band <= 15 epochs wide within 35-65 of 200.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor

from _common import machine, phantom_backbone, record, run
from common.data import SliceDataset, load_splits
from common.utils import read_jsonl


def search(tmp, data_flags, batch, setting, seed, threads):
    """One LTH search; returns its stop epoch, seconds, first-test median JS and τ0."""
    flags = [f"--{kv}" for kv in setting.split()]                       # argparse takes --name=value
    out = os.path.join(tmp, f"b{batch}_s{seed}_" + "_".join(setting.split()).replace("=", ""))
    run(["03_search.py", "--backbone", f"{tmp}/ref/ckpt_best.pt", *data_flags, "--batch_size", str(batch),
         "--mode", "lth", "--epochs", "200", "--warmup", "15", "--seed", str(seed), *flags, "--out", out],
        threads=threads)
    genotype = json.load(open(f"{out}/genotype.json"))
    g = genotype["search"]
    traj = read_jsonl(f"{out}/trajectory.jsonl")
    first = next(t for t in traj if t["js"] is not None)
    multi = [js for js, m in zip(first["js"], first["op_mask"]) if sum(m) > 1]
    return {"stop": g["epochs_run"], "seconds": g["seconds"], "median_js": statistics.median(multi),
            "tau0": g["lth"]["tau0"], "genotype": [e[0] for e in genotype["edges"]]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[64, 16, 4, 1])
    p.add_argument("--settings", nargs="+", default=["tau0=1e-3", "tau0_rel=0.2", "tau0_rel=0.2 js_support=all"],
                   help="03_search.py flags per setting, as 'name=value ...'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--jobs", type=int, default=2, help="searches run side by side (one thread each if > 1)")
    p.add_argument("--section", default="LTH stop epoch across steps per epoch (bench_lth_invariance.py)")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_lth_")
    data_flags, splits = phantom_backbone(tmp, a.patients, a.size)
    data_flags = data_flags[:4]                                         # --data, --splits (batch set per run)
    n_slices = len(SliceDataset(data_flags[1], load_splits(splits)["train"]))
    jobs = [(b, s) for s in a.settings for b in a.batches]
    threads = 1 if a.jobs > 1 else None
    with ThreadPoolExecutor(a.jobs) as ex:
        res = dict(zip(jobs, ex.map(lambda j: search(tmp, data_flags, j[0], j[1], a.seed, threads), jobs)))
    steps = {b: math.ceil(n_slices / b) for b in a.batches}
    head = " | ".join(f"batch {b} ({steps[b]} steps)" for b in a.batches)
    body = (f"Machine: {machine()}\n\nACDC phantom, {a.patients} patients, {a.size}x{a.size}, {n_slices} training "
            f"slices; frozen base U-Net width 8 (15 epochs); `03_search.py --mode lth --epochs 200 --warmup 15 "
            f"--seed {a.seed}`, γ 1.1, k 1.0; steps per epoch = ceil({n_slices} / batch).\n\n"
            "Median edge JS at the first test after warm-up (the scale τ0 must match):\n\n"
            f"| | {head} |\n|---|" + "---|" * len(a.batches) + "\n"
            "| median JS_e | " + " | ".join(f"{res[(b, a.settings[0])]['median_js']:.2e}" for b in a.batches)
            + " |\n\nStop epoch of 200 (τ0 in force):\n\n"
            f"| setting | {head} | band (max − min) |\n|---|" + "---|" * (len(a.batches) + 1) + "\n")
    for s in a.settings:
        stops = [res[(b, s)]["stop"] for b in a.batches]
        cells = " | ".join(f"{res[(b, s)]['stop']} ({res[(b, s)]['tau0'] or float('nan'):.1e})" for b in a.batches)
        ok = max(stops) - min(stops) <= 15 and min(stops) >= 35 and max(stops) <= 65
        body += f"| `{s}` | {cells} | {max(stops) - min(stops)}{' (goal met)' if ok else ''} |\n"
    body += "\nSearch seconds: " + "; ".join(
        f"`{s}`: " + ", ".join(f"{res[(b, s)]['seconds']:.0f}" for b in a.batches) for s in a.settings) + "\n"
    record(a.section, body)
    print(json.dumps({f"{b} {s}": r for (b, s), r in res.items()}, indent=1))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
