"""Tune the LTH heuristics (τ0, γ, k) on the phantom with the paper's schedule (cap 200, warm-up 15).

    python benchmarks/tune_lth.py [--tau0 1e-3 3e-4 1e-4] [--gamma 1.1] [--patients 8] [--size 32]

For each setting it runs `03_search.py --mode lth` on the same frozen backbone and records
the stop epoch (paper: 43-57 of 200) in benchmarks/RESULTS.md.
"""
import argparse
import json
import shutil
import tempfile

from _common import machine, phantom_backbone, record, run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tau0", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4, 3e-5])
    p.add_argument("--gamma", type=float, nargs="+", default=[1.1])
    p.add_argument("--k_std", type=float, default=1.0)
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="tune_lth_")
    data, splits = phantom_backbone(tmp, a.patients, a.size, batch_size=a.batch_size)
    n_train = len(json.load(open(splits))["train"])
    body = (f"Machine: {machine()}\n\nACDC phantom, {a.patients} patients ({n_train} training cases), "
            f"{a.size}x{a.size}, frozen base U-Net width 8, batch {a.batch_size}; `--epochs 200 --warmup 15`, "
            f"k = {a.k_std}.\n\n| τ0 | γ | stop epoch (of 200) | search seconds |\n|---|---|---|---|\n")
    for gamma in a.gamma:
        for tau0 in a.tau0:
            out = f"{tmp}/lth_{tau0}_{gamma}"
            run(["03_search.py", "--backbone", f"{tmp}/ref/ckpt_best.pt", *data, "--mode", "lth", "--epochs", "200",
                 "--warmup", "15", "--tau0", str(tau0), "--gamma", str(gamma), "--k_std", str(a.k_std), "--out", out])
            s = json.load(open(f"{out}/genotype.json"))["search"]
            body += f"| {tau0:g} | {gamma:g} | {s['epochs_run']} | {s['seconds']:.0f} |\n"
            print(body.splitlines()[-1], flush=True)
    record("LTH tuning (tune_lth.py)", body)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
