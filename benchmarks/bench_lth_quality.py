"""Is the early (LTH) cell as good as the full search's? Three seeds on one phantom.

    python benchmarks/bench_lth_quality.py [--seeds 0 1 2] [--batch_size 16] [--finetune_epochs 40]

Per seed: a frozen base U-Net (stage I), `03_search.py --mode full` (200 epochs) and `--mode lth`
(default JS test) in the same run, stage III for both genotypes (`04_finetune.py`, IAC fresh,
IAC-LTH from θ0), patient-level Dice on the test patients (`05_evaluate.py`). Records the Dice of
both, the share of the LTH's chosen ops that are in the full search's final top-3 on their edge,
and the full / LTH search-time ratio (goals: |ΔDice| <= 0.01, ratio >= 4).
"""
import argparse
import json
import os
import shutil
import tempfile

import numpy as np
import pandas as pd

from _common import machine, phantom_backbone, record, run
from common.iac import EDGES, OPS
from common.utils import read_jsonl


def top3_share(lth_dir, full_dir):
    """Share of the LTH genotype's (edge, op) that are among the full search's final top-3 of that edge."""
    last = np.array(read_jsonl(os.path.join(full_dir, "trajectory.jsonl"))[-1]["importance"])
    edges = json.load(open(os.path.join(lth_dir, "genotype.json")))["edges"]
    hits = [OPS.index(op) in np.argsort(-last[EDGES.index((s, d))], kind="stable")[:3] for op, s, d in edges]
    return sum(hits) / len(hits)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--finetune_epochs", type=int, default=40)
    p.add_argument("--threads", type=int, default=None, help="OMP threads per stage (default: torch's)")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_quality_")
    data, _ = phantom_backbone(tmp, a.patients, a.size, batch_size=a.batch_size)
    rows = []
    for seed in a.seeds:
        d = f"{tmp}/seed{seed}"
        ref = f"{d}/ref"
        run(["02_pretrain.py", *data, "--width", "8", "--epochs", "15", "--seed", str(seed), "--out", ref],
            threads=a.threads)
        bb = ["--backbone", f"{ref}/ckpt_best.pt", *data, "--seed", str(seed)]
        for mode in ("full", "lth"):
            run(["03_search.py", *bb, "--mode", mode, "--out", f"{d}/{mode}"], threads=a.threads)
            run(["04_finetune.py", *bb, "--genotype", f"{d}/{mode}/genotype.json", "--epochs", str(a.finetune_epochs),
                 "--out", f"{d}/cell_{mode}"], threads=a.threads)
        run(["05_evaluate.py", *data[:4], "--run", f"iac={d}/cell_full", "--run", f"iac_lth={d}/cell_lth",
             "--reference", "iac", "--n_boot", "999", "--out", f"{d}/eval"], threads=a.threads)
        df = pd.read_csv(f"{d}/eval/per_patient.csv")
        df = df[df["metric"] == "dice"]
        dice = df.groupby(["method", "patient"])["value"].mean().groupby("method").mean()
        s = {m: json.load(open(f"{d}/{m}/genotype.json"))["search"] for m in ("full", "lth")}
        rows.append({"seed": seed, "Dice IAC (full)": dice["iac"], "Dice IAC-LTH": dice["iac_lth"],
                     "ΔDice": dice["iac_lth"] - dice["iac"], "LTH ops in full top-3": top3_share(f"{d}/lth", f"{d}/full"),
                     "full epochs": s["full"]["epochs_run"], "LTH epochs": s["lth"]["epochs_run"],
                     "full s": s["full"]["seconds"], "LTH s": s["lth"]["seconds"],
                     "time ratio": s["full"]["seconds"] / s["lth"]["seconds"]})
        print(rows[-1], flush=True)
    t = pd.DataFrame(rows)
    mean = {k: (t[k].mean() if k != "seed" else "mean") for k in t.columns}
    std = {k: (t[k].std() if k != "seed" else "std") for k in t.columns}
    t = pd.concat([t, pd.DataFrame([mean, std])], ignore_index=True)
    fmt = {"Dice IAC (full)": "{:.4f}", "Dice IAC-LTH": "{:.4f}", "ΔDice": "{:+.4f}", "LTH ops in full top-3": "{:.2f}",
           "full epochs": "{:.0f}", "LTH epochs": "{:.1f}", "full s": "{:.0f}", "LTH s": "{:.0f}", "time ratio": "{:.1f}"}
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    for r in t.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) if k == "seed" else fmt[k].format(v) for k, v in zip(t.columns, r)) + " |")
    body = (f"Machine: {machine()}\n\nACDC phantom, {a.patients} patients, {a.size}x{a.size}; per seed a base U-Net "
            f"width 8 (15 epochs), `03_search.py` full (200 epochs) and lth (defaults: κ, common support, "
            f"edge rule w') at batch {a.batch_size}, `04_finetune.py --epochs {a.finetune_epochs}` for both genotypes "
            "(IAC fresh, IAC-LTH from θ0), patient-level mean foreground Dice on the test patients.\n\n"
            + "\n".join(lines) + "\n")
    record("LTH against full search, three seeds (bench_lth_quality.py)", body)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
