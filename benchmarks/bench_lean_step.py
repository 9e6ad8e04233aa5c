"""The lean supernet step against the edge-by-edge one (#21 item 2): seconds per search step of a frozen U-Net with
its search cells, both steps from the same weights, timed alternately in one process (so a load on the machine
slows both alike), lth and full, with the median of --reps steps each.

    python benchmarks/bench_lean_step.py [--width 8 16] [--batch 32] [--size 64] [--reps 7] [--threads 2] [--record]
"""
import argparse
import copy
import statistics
import time

import torch

from _common import machine, record
from common.backbones import UNet
from common.iac import IACSearchSkips
from common.losses import SegLoss
from common.search import arch_optimizer, search_step, weight_optimizer


def stepper(net, skips, mode, x, y):
    net = copy.deepcopy(net)
    skips = copy.deepcopy(skips)
    net.set_skips(skips)
    net.train()
    w_opt, a_opt = weight_optimizer(skips, 0.01), arch_optimizer(skips, 1e-3, (0.5, 0.999), 1e-3)
    loss_fn = SegLoss()

    def loss_of(_):
        return loss_fn(net(x), y)

    return lambda: search_step(mode, True, skips, w_opt, a_opt, loss_of, None, lambda: None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, nargs="+", default=[8, 16])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--record", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = ["| width | mode | edge by edge (s / step) | lean (s / step) | speed-up |", "|---|---|---|---|---|"]
    for width in a.width:
        torch.manual_seed(0)
        net = UNet("base", 1, 3, "ref", width=width).to(device)
        net.freeze_backbone()
        skips = IACSearchSkips(net.skip_channels, net.up_channels, lean=False).to(device)
        x = torch.randn(a.batch, 1, a.size, a.size, device=device)
        y = torch.randint(0, 3, (a.batch, a.size, a.size), device=device)
        for mode in ("lth", "full"):
            steps = {}
            for lean in (False, True):
                s = copy.deepcopy(skips)
                for cell in s.cells:
                    cell.lean = lean
                steps[lean] = stepper(net, s, mode, x, y)
            times = {False: [], True: []}
            for rep in range(a.reps + 2):                       # two of warm-up, then alternately
                for lean in (False, True):
                    t = time.perf_counter()
                    steps[lean]()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if rep >= 2:
                        times[lean].append(time.perf_counter() - t)
            old, new = statistics.median(times[False]), statistics.median(times[True])
            row = f"| {width} | {mode} | {old:.3f} | {new:.3f} | {old / new:.2f}x |"
            rows.append(row)
            print(row, flush=True)
    table = "\n".join(rows)
    if a.record:
        record(f"Lean supernet step, {device.type} (bench_lean_step.py)",
               f"Machine: {machine()}, {a.threads} thread(s). A frozen base U-Net (width as given) with its four "
               f"search cells, all 98 ops, batch {a.batch}, {a.size}x{a.size}, SegLoss; the median of {a.reps} steps, "
               f"the two steps timed alternately from the same start.\n\n{table}\n")


if __name__ == "__main__":
    main()
