"""Where a supernet step spends its time (issue: a leaner supernet step with the same math): torch.profiler over
a few search steps of the base U-Net's four cells, CPU (or CUDA when present), by aten op.

    python benchmarks/profile_search_step.py [--mode lth|full] [--batch 8] [--size 64] [--steps 3] [--lean_step on|off]
                                             [--record]

The cells see random skip / up-sampled tensors at the base U-Net's widths (16, 32, 64, 128 at sizes S, S/2,
S/4, S/8), as in a search step; the loss is a stand-in (mean square of the cell outputs), so the table is the
supernet's own cost without the frozen backbone's.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from _common import machine, record
from common.lean_cell import LeanSearchSkips
from common.search import arch_optimizer, search_step, weight_optimizer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["lth", "full"], default="lth")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="the largest level's side (the others halve)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--lean_step", choices=["on", "off"], default="on", help="the lean step or edge by edge")
    p.add_argument("--record", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    widths = [16, 32, 64, 128]
    skips = LeanSearchSkips(widths, widths, lean=a.lean_step == "on").to(device)
    x = [(torch.randn(a.batch, c, a.size >> i, a.size >> i, device=device),
          torch.randn(a.batch, c, a.size >> i, a.size >> i, device=device)) for i, c in enumerate(widths)]
    w_opt = weight_optimizer(skips, 0.01)
    a_opt = arch_optimizer(skips, 3e-4, (0.5, 0.999), 1e-3)

    def loss_of(_):
        skips.prepare(None)
        return sum(skips(level, s, u).square().mean() for level, (s, u) in enumerate(x))

    def step():
        search_step(a.mode, True, skips, w_opt, a_opt, loss_of, None, lambda: None)

    for _ in range(2):                                                   # warm-up
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(a.steps):
            step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=a.rows)
    print(table)
    if a.record:
        record(f"Supernet step profile, {a.mode}, {device.type}{', lean step' if a.lean_step == 'on' else ''} "
               "(profile_search_step.py)",
               f"Machine: {machine()}, {a.threads} thread(s); the base U-Net's four search cells (widths 16-128, "
               f"batch {a.batch}, {a.size}x{a.size} at the top level), {a.steps} {a.mode} steps after 2 of "
               f"warm-up; stand-in loss.\n\n```\n{table}\n```\n")


if __name__ == "__main__":
    main()
