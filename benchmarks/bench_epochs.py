"""Whole epochs as a user waits for them (#21 item 1): stage I (02) and the two searches (03 --mode full / lth) per
encoder on an ACDC-sized phantom, each stage run as its own process with the default flags (batch 128, --device auto:
bf16 + channels_last on CUDA, --checkpoint_edges auto, the lean step), the epoch seconds and peak GPU memory read
from each run's log.jsonl, and the search time projected to the paper's ACDC next to its Table 4.

    python benchmarks/bench_epochs.py [--encoders base resnet50 ...] [--patients 150] [--size 256] [--epochs 2]
                                      [--out /tmp/bench_epochs] [--record]

The phantom: --patients ACDC-layout patients (150 is ACDC's: 60% of them, 2 frames each, give the ~1,700 training
slices of the paper's ACDC at ~9.5 slices a frame), --size x --size. Each stage runs --epochs epochs and the last
one is reported (the first holds cuDNN autotuning and the data loader's start). The searches run with --warmup 0,
so the epochs timed are bilevel (full) and single-level with α (lth) as after the warm-up, with all 98 ops (an LTH
epoch gets cheaper as it prunes: its projection is an upper bound). Projection: seconds per epoch x (ACDC's training
slices / the phantom's) x epochs, 200 for the full search and Table 4's 43 for IAC-LTH on ACDC. A small run on the
CPU (tests/test_benchmarks.py) checks the chain, not the figures.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time

from _common import machine, record, run
from common.backbones import ENCODERS
from common.data import load_splits, read_meta

ACDC_TRAIN_SLICES = 1700                 # the issue's figure: 90 training patients x 2 frames x ~9.5 slices
PAPER_TABLE4_ACDC = {"full_min": 16.3, "lth_epochs": 43, "lth_min": 3.7}   # mean over the six backbones, RTX 3090 Ti


def last_epoch(run_dir):
    """The last epoch's record in a run's log.jsonl (seconds, peak_gpu_mib, for a search active_ops)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise RuntimeError(f"{run_dir}/log.jsonl has no epoch")
    return rows[-1]


def train_slices(data_dir):
    """Training slices of a preprocessed data set (the cases of splits.json's train list)."""
    meta = read_meta(os.path.join(data_dir, "slices.h5"))
    train = load_splits(os.path.join(data_dir, "splits.json"), meta)["train"]
    return int(sum(meta["cases"]["n_slices"][meta["case_index"][c]] for c in train))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    p.add_argument("--patients", type=int, default=150)
    p.add_argument("--size", type=int, default=256, help="the crop (01 --crop size size)")
    p.add_argument("--phantom_size", type=int, default=None,
                   help="the phantom's in-plane size (default --size; smaller is generated faster and padded to the "
                        "crop: the same compute per slice)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=32, help="U-Net width of the base encoder (02 --width)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: the scripts')")
    p.add_argument("--out", default="/tmp/bench_epochs")
    p.add_argument("--record", action="store_true")
    a = p.parse_args()
    t_all = time.time()
    raw, data = os.path.join(a.out, "raw"), os.path.join(a.out, "data")
    if not os.path.exists(os.path.join(data, "slices.h5")):
        shutil.rmtree(a.out, ignore_errors=True)
        run(["01_preprocess.py", "--make_phantom", raw, "--layout", "acdc", "--patients", str(a.patients),
             "--phantom_size", str(a.phantom_size or a.size), "--seed", "0"])
        run(["01_preprocess.py", "--dataset", "acdc", "--raw", raw, "--out", data, "--crop", str(a.size), str(a.size)])
    n_train = train_slices(data)
    scale = ACDC_TRAIN_SLICES / n_train
    print(f"phantom: {a.patients} patients, {n_train} training slices, {a.size}x{a.size} ({time.time() - t_all:.0f} s)",
          flush=True)
    flags = ["--data", f"{data}/slices.h5", "--splits", f"{data}/splits.json", "--batch_size", str(a.batch),
              "--epochs", str(a.epochs), *(["--workers", str(a.workers)] if a.workers is not None else [])]
    rows, full_min, lth_min = [], [], []
    mib = (lambda m: "-" if m is None else f"{m:,.0f}")
    for enc in a.encoders:
        ref = os.path.join(a.out, enc, "ref")
        t = time.time()
        run(["02_pretrain.py", *flags, "--encoder", enc, "--width", str(a.width), "--out", ref, "--overwrite"])
        walls = {"ref": time.time() - t}
        for mode in ("full", "lth"):
            t = time.time()
            run(["03_search.py", *flags, "--backbone", f"{ref}/ckpt_best.pt", "--mode", mode, "--warmup", "0",
                 "--out", os.path.join(a.out, enc, f"search_{mode}"), "--overwrite"])
            walls[mode] = time.time() - t
        r1, rf, rl = (last_epoch(os.path.join(a.out, enc, d)) for d in ("ref", "search_full", "search_lth"))
        (s1, m1), (sf, mf), (sl, ml) = ((r["seconds"], r.get("peak_gpu_mib")) for r in (r1, rf, rl))
        full_min.append(200 * sf * scale / 60)
        lth_min.append(PAPER_TABLE4_ACDC["lth_epochs"] * sl * scale / 60)
        rows.append(f"| {enc} | {s1:.1f} | {sf:.1f} | {sl:.1f} ({rl['active_ops']}) | "
                    f"{mib(m1)} / {mib(mf)} / {mib(ml)} | "
                    f"{walls['ref']:.0f} / {walls['full']:.0f} / {walls['lth']:.0f} | {full_min[-1]:.1f} | "
                    f"{lth_min[-1]:.1f} |")
        print(rows[-1], flush=True)
    mean_f, mean_l = statistics.mean(full_min), statistics.mean(lth_min)
    rows.append(f"| mean | | | | | | **{mean_f:.1f}** (paper {PAPER_TABLE4_ACDC['full_min']}) | "
                f"**{mean_l:.1f}** (paper {PAPER_TABLE4_ACDC['lth_min']}) |")
    table = "\n".join(["| encoder | stage I epoch (s) | full search epoch (s) | "
                       "LTH epoch (s; its ops after the epoch) | peak GPU MiB (I / full / LTH) | "
                       "process wall time (s, I / full / LTH) | "
                       f"ACDC full search, 200 epochs (min) | ACDC IAC-LTH, {PAPER_TABLE4_ACDC['lth_epochs']} epochs "
                       "(min) |",
                       "|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    print(f"{time.time() - t_all:.0f} s in all")
    if a.record:
        record(f"Whole epochs and the projected ACDC search (bench_epochs.py, {a.size}x{a.size})",
               f"Machine: {machine()}. ACDC-layout phantom, {a.patients} patients, {n_train} training slices, "
               f"{a.size}x{a.size} crops (phantom {a.phantom_size or a.size} px, padded); each stage its own process "
               f"with the default flags (batch {a.batch}, --device auto, U-Net width {a.width}), {a.epochs} epochs, "
               "the last one reported (02's includes its validation); searches with --warmup 0 from all 98 ops "
               "(the LTH column gives the ops left after its epoch). Projection to ACDC "
               f"({ACDC_TRAIN_SLICES} training slices): epoch seconds x {ACDC_TRAIN_SLICES}/{n_train} x 200 (full) "
               f"or x {PAPER_TABLE4_ACDC['lth_epochs']} (IAC-LTH, Table 4's epochs; an upper bound, as pruned epochs "
               "are cheaper); the paper's Table 4 gives the mean over the six "
               f"backbones on one RTX 3090 Ti.\n\n{table}\n")


if __name__ == "__main__":
    sys.exit(main())
