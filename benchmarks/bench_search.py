"""Search cost: epoch time against active ops, full vs LTH total time in one run, supernet step per backbone."""
import argparse
import json
import shutil
import tempfile
import time

import torch

from _common import machine, phantom_backbone, record, run
from common.backbones import ENCODERS, UNet
from common.lean_cell import LeanSearchSkips
from common.losses import SegLoss


def step_time(encoder, device, batch, size, reps=3):
    model = UNet(encoder, 1, 4, "ref", width=16).to(device)
    model.freeze_backbone()
    skips = LeanSearchSkips(model.skip_channels, model.up_channels).to(device)
    model.set_skips(skips)
    opt = torch.optim.SGD(skips.weight_parameters(), lr=0.01)
    x, y = torch.randn(batch, 1, size, size, device=device), torch.randint(0, 4, (batch, size, size), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for i in range(reps + 1):
        t = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = SegLoss()(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            ts.append(time.time() - t)
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return sum(ts) / len(ts), mem


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=200, help="search cap (paper: 200)")
    p.add_argument("--warmup", type=int, default=15, help="warm-up epochs (paper: 15)")
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_search_")
    data, _ = phantom_backbone(tmp, a.patients, a.size)
    E = a.epochs
    times = {}
    for mode in ("full", "lth"):
        t = time.time()
        run(["03_search.py", "--backbone", f"{tmp}/ref/ckpt_best.pt", *data, "--mode", mode, "--epochs", str(E),
             "--warmup", str(a.warmup), "--out", f"{tmp}/{mode}"])
        times[mode] = time.time() - t
    traj = [json.loads(ln) for ln in open(f"{tmp}/lth/trajectory.jsonl")]
    g = json.load(open(f"{tmp}/lth/genotype.json"))["search"]
    gf = json.load(open(f"{tmp}/full/genotype.json"))["search"]
    body = (f"Machine: {machine()}\n\nACDC phantom ({a.patients} patients, {a.size}x{a.size}), frozen base U-Net "
            f"width 8, batch 16, cap {E} epochs, warm-up {a.warmup}, the default JS test (κ {g['lth']['tau0_rel']}, "
            f"calibrated τ0 {g['lth']['tau0']:.2e}, γ 1.1, k 1.0).\n\n"
            f"| | full | LTH |\n|---|---|---|\n| epochs | {gf['epochs_run']} | {g['epochs_run']} |\n"
            f"| search seconds (epochs only) | {gf['seconds']:.1f} | {g['seconds']:.1f} |\n"
            f"| wall seconds (whole script) | {times['full']:.1f} | {times['lth']:.1f} |\n"
            f"| speed-up full / LTH (search seconds) | | **{gf['seconds'] / g['seconds']:.1f}x** |\n\n"
            "LTH epoch time against active ops (ops pruned at the end of an epoch leave the next one):\n\n"
            "| epoch | active ops (of 98) at epoch start | epoch seconds |\n|---|---|---|\n")
    active = 98
    for t in traj:
        body += f"| {t['epoch'] + 1} | {active} | {t['seconds']:.2f} |\n"
        active = sum(map(sum, t["op_mask"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, size = (128, 256) if device.type == "cuda" else (8, 128)
    body += f"\nSupernet step (forward+backward+SGD, all 98 ops, width 16, batch {batch}, {size}x{size}, {device.type}):\n\n"
    body += "| encoder | step (s) | peak GPU memory (MiB) |\n|---|---|---|\n"
    for enc in ENCODERS:
        s, mem = step_time(enc, device, batch, size)
        body += f"| {enc} | {s:.3f} | {mem:,.0f} |\n"
    record("Search (bench_search.py)", body)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
