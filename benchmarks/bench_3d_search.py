"""Full (bilevel) against IAC-LTH search time with 3-D cells, in one run: nnU-Net 3d_fullres on the nnU-Net-raw
phantom, the reference trained briefly, then nnUNetTrainerIACSearchFull and ...SearchLTH with the same cap and
warm-up (scaled down from the paper's 200 / 15 for a CPU). Needs requirements-nnunet.txt."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _common import ROOT, machine, record

BIN = os.path.dirname(sys.executable)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=60, help="search cap (paper: 200)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up epochs (paper: 15)")
    p.add_argument("--iters", type=int, default=4, help="iterations per epoch (nnU-Net: 250)")
    p.add_argument("--patients", type=int, default=6)
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args()
    from common.phantom import write_phantom
    tmp = tempfile.mkdtemp(prefix="bench_3d_search_")
    env = dict(os.environ, nnUNet_raw=f"{tmp}/raw", nnUNet_preprocessed=f"{tmp}/pre", nnUNet_results=f"{tmp}/res",
               nnUNet_extTrainer=os.path.join(ROOT, "nnunet_iac"), nnUNet_compile="f", nnUNet_n_proc_DA="1",
               nnUNet_def_n_proc="1", IAC_ITERS=str(a.iters), IAC_VAL_ITERS="1", IAC_FINAL_VALIDATION="0")
    write_phantom(f"{tmp}/raw/Dataset503_Phantom", "nnunet", a.patients, seed=0, size=a.size)

    def run(*cmd, **extra):
        r = subprocess.run(cmd, env=dict(env, **extra), cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")

    run(f"{BIN}/nnUNetv2_plan_and_preprocess", "-d", "503", "-c", "3d_fullres", "-np", "1")
    train = (f"{BIN}/nnUNetv2_train", "503", "3d_fullres", "0", "-device", "cpu", "-tr")
    run(*train, "nnUNetTrainerIACRef", IAC_EPOCHS="10")
    res, wall = {}, {}
    for mode in ("Full", "LTH"):
        t = time.time()
        run(*train, f"nnUNetTrainerIACSearch{mode}", IAC_EPOCHS=str(a.epochs), IAC_WARMUP=str(a.warmup))
        wall[mode] = time.time() - t
        fold = f"{tmp}/res/Dataset503_Phantom/nnUNetTrainerIACSearch{mode}__nnUNetPlans__3d_fullres/fold_0"
        res[mode] = json.load(open(f"{fold}/genotype.json"))["search"]
    f, lth = res["Full"], res["LTH"]
    body = (f"Machine: {machine()}\n\nnnU-Net 3d_fullres on the nnU-Net-raw phantom ({a.patients} cases, ~{a.size} "
            f"voxels in-plane), 3-D cells on every level (stored edges on the CPU), cap {a.epochs} epochs, warm-up "
            f"{a.warmup}, {a.iters} iterations per epoch, the default JS test (κ {lth['lth']['tau0_rel']}).\n\n"
            "| | full | LTH |\n|---|---|---|\n"
            f"| epochs | {f['epochs_run']} | {lth['epochs_run']} |\n"
            f"| search seconds (epochs only) | {f['seconds']:.1f} | {lth['seconds']:.1f} |\n"
            f"| wall seconds (whole nnUNetv2_train) | {wall['Full']:.1f} | {wall['LTH']:.1f} |\n"
            f"| speed-up full / LTH (search seconds) | | **{f['seconds'] / lth['seconds']:.1f}x** |\n")
    record("3-D search: full against LTH (bench_3d_search.py)", body)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
