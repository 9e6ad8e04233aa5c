"""The lean supernet step against the edge-by-edge one (#21 item 2): seconds per search step of a frozen U-Net with
its search cells, both steps from the same weights, timed alternately in one process (so a load on the machine
slows both alike), lth and full, with the median of --reps steps each.

    python benchmarks/bench_lean_step.py [--width 8 16] [--batch 32] [--size 64] [--reps 7] [--threads 2] [--record]
    python benchmarks/bench_lean_step.py --encoders base resnet50 --width 32 --batch 128 --size 256 --checkpoint on
                                         --reps 3 --record        # on a GPU: bf16 autocast, channels_last, peak memory
    python benchmarks/bench_lean_step.py --encoders vgg16 base --width 32 --batch 128 --size 256 --budget_gib 21.6
                                         --modes lth --reps 1 --record  # each step with its plan for a 24 GB card

--budget_gib: instead of one --checkpoint_edges for both, each step kind runs with the per-level plan that
03_search.py --checkpoint_edges auto would choose for that budget (common/memory.py checkpoint_plan() on its own
estimate), and the table sets the plan and its estimate beside the measured peak (on a GPU).
"""
import argparse
import copy
import statistics
import time

import torch

from _common import machine, record
from common.backbones import UNet
from common.lean_cell import LeanSearchSkips
from common.losses import SegLoss
from common.memory import GIB, SETTINGS, checkpoint_plan, plan_summary, search_memory
from common.search import arch_optimizer, search_step, weight_optimizer
from common.utils import autocast


def stepper(net, skips, mode, x, y, amp):
    net = copy.deepcopy(net)
    skips = copy.deepcopy(skips)
    net.set_skips(skips)
    net.train()
    w_opt, a_opt = weight_optimizer(skips, 0.01), arch_optimizer(skips, 1e-3, (0.5, 0.999), 1e-3)
    loss_fn = SegLoss()

    def loss_of(_):
        with autocast(x.device, amp):
            return loss_fn(net(x), y)

    return lambda: search_step(mode, True, skips, w_opt, a_opt, loss_of, None, lambda: None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", default=["base"])
    p.add_argument("--width", type=int, nargs="+", default=[8, 16])
    p.add_argument("--checkpoint", choices=list(SETTINGS), default="off", help="--checkpoint_edges of both steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget_gib", type=float, default=None,
                   help="each step kind with checkpoint_plan()'s plan for this budget (21.6: a 24 GB card)")
    p.add_argument("--modes", nargs="+", choices=["lth", "full"], default=["lth", "full"])
    p.add_argument("--record", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    ckpt = SETTINGS[a.checkpoint]
    budget = a.budget_gib is not None
    rows = ["| encoder | width | mode | edge by edge (s / step) | lean (s / step) | speed-up |"
            + (" plan, edge by edge / lean | estimate GiB, edge by edge / lean |" if budget else "")
            + (" peak GPU MiB, edge by edge / lean |" if cuda else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if budget else "") + ("---|" if cuda else "")]
    for encoder in a.encoders:
        for width in a.width:
            torch.manual_seed(0)
            net = UNet(encoder, 1, 3, "ref", width=width)
            net.freeze_backbone()
            skips = LeanSearchSkips(net.skip_channels, net.up_channels, lean=False, checkpoint_edges=ckpt)
            plans, need = {}, {}
            for lean in (False, True) if budget else ():    # the plan auto would run with, from this kind's estimate
                for cell in skips.cells:
                    cell.lean = lean
                est = search_memory(net, skips, a.batch, 1, (a.size, a.size), torch.bfloat16 if cuda else torch.float32)
                plans[lean], need[lean], _ = checkpoint_plan(est, a.budget_gib * GIB)
            net, skips = net.to(device), skips.to(device)
            x = torch.randn(a.batch, 1, a.size, a.size, device=device)
            if cuda:                                            # the stage scripts' CUDA defaults
                net, skips = net.to(memory_format=torch.channels_last), skips.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 3, (a.batch, a.size, a.size), device=device)
            for mode in a.modes:
                times, peak = {False: [], True: []}, {}
                steps = {}
                for lean in (False, True):
                    s = copy.deepcopy(skips)
                    for lv, cell in enumerate(s.cells):
                        cell.lean = lean
                        if budget:
                            cell.checkpoint_edges = plans[lean][lv]
                    steps[lean] = stepper(net, s, mode, x, y, cuda)
                order = [(rep, lean) for lean in (False, True) for rep in range(a.reps + 2)] if cuda else \
                    [(rep, lean) for rep in range(a.reps + 2) for lean in (False, True)]
                for rep, lean in order:       # two of warm-up each; on a GPU one step kind after the other (memory)
                    if cuda and rep == 0:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    t = time.perf_counter()
                    steps[lean]()
                    if cuda:
                        torch.cuda.synchronize()
                        peak[lean] = torch.cuda.max_memory_allocated() / 2 ** 20
                    if rep >= 2:
                        times[lean].append(time.perf_counter() - t)
                old, new = statistics.median(times[False]), statistics.median(times[True])
                row = (f"| {encoder} | {width} | {mode} | {old:.3f} | {new:.3f} | {old / new:.2f}x |"
                       + (f" {plan_summary(plans[False])} / {plan_summary(plans[True])} | {need[False] / GIB:.1f} / {need[True] / GIB:.1f} |"
                          if budget else "")
                       + (f" {peak[False]:,.0f} / {peak[True]:,.0f} |" if cuda else ""))
                rows.append(row)
                print(row, flush=True)
    table = "\n".join(rows)
    if a.record:
        how = f", plans for {a.budget_gib:g} GiB" if budget else "" if a.checkpoint == "off" else \
            ", checkpoint " + a.checkpoint
        flag = ("auto: each step kind's plan for the budget (checkpoint_plan() on its own estimate; the estimate is "
                "step_bytes(), with the CUDA reserve)") if budget else a.checkpoint
        record(f"Lean supernet step, {device.type}{how} (bench_lean_step.py)",
               f"Machine: {machine()}, {a.threads} thread(s). A frozen U-Net (encoder and width as given) with its "
               f"search cells, all 98 ops, batch {a.batch}, {a.size}x{a.size}, SegLoss, --checkpoint_edges "
               f"{flag}{', bf16 autocast and channels_last' if device.type == 'cuda' else ''}; the median of "
               f"{a.reps} steps after two of warm-up, both steps from the same start (on the CPU timed alternately).\n\n"
               f"{table}\n")


if __name__ == "__main__":
    main()
