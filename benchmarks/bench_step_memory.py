"""What the search step keeps for its backward pass, per backbone, at the paper's batch 128 and 256x256 (#21 item 3):
common/memory.py's count (saved_tensors_hooks on the meta device: shapes only, so it runs on a laptop), per cell
level stored and checkpointed, for the edge-by-edge step (--lean_step off) and the lean one (on), and the
--checkpoint_edges auto plan for a 24 GB card. bf16 stands for AMP (the stage scripts' CUDA default).

    python benchmarks/bench_step_memory.py [--encoders base vgg16 ...] [--batch 128] [--size 256] [--record]
    python benchmarks/bench_step_memory.py --calibrate [--record]    # the estimate against a real step's peak RSS

--calibrate checks the estimate where it can be measured without a GPU: one lth search step on the CPU (base U-Net,
batch 16, 128x128, float32) in a fresh process per setting, its peak resident memory above the memory held just
before the step, against step_bytes() less the weights (already held before the step) and the CUDA reserve.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from _common import ROOT, machine, record
from common.backbones import ENCODERS, UNet
from common.lean_cell import LeanSearchSkips
from common.memory import (BUDGET_SHARE, CUDA_RESERVE, GIB, LABELS, checkpoint_plan, held_bytes, plan_summary,
                           search_memory, step_bytes)


CHILD = r"""
import json, resource, sys, torch
from common.backbones import UNet
from common.lean_cell import LeanSearchSkips
from common.losses import SegLoss
from common.search import arch_optimizer, search_step, weight_optimizer
lean, ckpt, batch, size = json.loads(sys.argv[1])
torch.set_num_threads(2); torch.manual_seed(0)
net = UNet("base", 1, 4, "ref", width=16); net.freeze_backbone()
skips = LeanSearchSkips(net.skip_channels, net.up_channels, lean=lean, checkpoint_edges=ckpt); net.set_skips(skips)
x, y = torch.randn(batch, 1, size, size), torch.randint(0, 4, (batch, size, size))
w_opt, a_opt = weight_optimizer(skips, 0.01), arch_optimizer(skips, 1e-3, (0.5, 0.999), 1e-3)
loss = lambda _: SegLoss()(net(x), y)
with torch.no_grad():
    net(x)                                             # the allocator's pools for a forward, before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
search_step("lth", True, skips, w_opt, a_opt, loss, None, lambda: None)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before))
"""


def calibrate(a):
    rows = ["| step | edge checkpointing | estimate (MiB) | measured peak RSS above the start (MiB) | ratio |",
            "|---|---|---|---|---|"]
    batch, size = 16, 128
    net = UNet("base", 1, 4, "ref", width=16)
    net.freeze_backbone()
    for lean in (False, True):
        skips = LeanSearchSkips(net.skip_channels, net.up_channels, lean=lean)
        est = search_memory(net, skips, batch, 1, (size, size), torch.float32)
        for ckpt in LABELS:
            want = step_bytes(est, [ckpt] * len(est["levels"])) - est["params"] - CUDA_RESERVE
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([lean, ckpt, batch, size])], check=True,
                                 capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
            got = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(f"| {'lean' if lean else 'edge by edge'} | {LABELS[ckpt]} | {want / 2**20:,.0f} | "
                        f"{got / 2**20:,.0f} | {got / want:.2f} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    if a.record:
        record("Search-step memory: the estimate against a measured step (bench_step_memory.py --calibrate)",
               f"Machine: {machine()}. One lth step of the base U-Net (width 16) with its search cells, batch {batch}, "
               f"{size}x{size}, float32, on the CPU, each setting in a fresh process: the peak resident memory (ru_maxrss) "
               "above what the process held after a no-grad forward, against common/memory.py's step_bytes() less "
               f"the weights and the CUDA reserve.\n\n{table}\n")


def largest_batch(est, budget):
    """The largest batch whose step fits `budget` with every whole cell recomputed op by op (the least memory):
    what the step holds besides the weights and the CUDA reserve grows with the batch (every tensor counted has the
    batch as its first dimension)."""
    fixed = held_bytes(est)
    per_sample = (step_bytes(est, ["fine"] * len(est["levels"])) - fixed) / est["batch"]
    return max(0, int((budget - fixed) // per_sample))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--budget_gib", type=float, default=24 * BUDGET_SHARE,
                   help="what the plan may use (as 03_search.py does on a 24 GB card)")
    p.add_argument("--calibrate", action="store_true", help="the estimate against a measured CPU step")
    p.add_argument("--record", action="store_true")
    a = p.parse_args()
    if a.calibrate:
        return calibrate(a)
    dtype = getattr(torch, a.dtype)
    rows = ["| encoder | step | levels stored (GiB) | levels, edges checkpointed (GiB) | levels, whole cell (GiB) | "
            "level 0's largest region recomputed, edges / whole cell / op by op (GiB) | decoder + loss (GiB) | "
            "all stored (GiB) | all edges checkpointed (GiB) | all whole cells (GiB) | all whole cells, op by op "
            "(GiB) | auto plan for 24 GB | plan total (GiB) | largest batch for 24 GB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    t0 = time.time()
    for enc in a.encoders:
        net = UNet(enc, 1, 4, "ref", width=a.width)
        net.freeze_backbone()
        for lean in (False, True):
            skips = LeanSearchSkips(net.skip_channels, net.up_channels, lean=lean)
            est = search_memory(net, skips, a.batch, 1, (a.size, a.size), dtype)
            n = len(est["levels"])
            plan, need, fits = checkpoint_plan(est, a.budget_gib * GIB)
            g = (lambda b: f"{b / GIB:.1f}")
            row = (f"| {enc} | {'lean' if lean else 'edge by edge'} | "
                   f"{' / '.join(g(lv['stored']) for lv in est['levels'])} | "
                   f"{' / '.join(g(lv['checkpointed']) for lv in est['levels'])} | "
                   f"{' / '.join(g(lv['cell']) for lv in est['levels'])} | "
                   f"{g(est['levels'][0]['region'])} / {g(est['levels'][0]['cell_region'])} / "
                   f"{g(est['levels'][0]['fine_region'])} | {g(est['rest'])} | "
                   f"{g(step_bytes(est, [False] * n))} | {g(step_bytes(est, [True] * n))} | "
                   f"{g(step_bytes(est, ['cell'] * n))} | {g(step_bytes(est, ['fine'] * n))} | "
                   f"{plan_summary(plan)}"
                   f"{'' if fits else ' (does not fit)'} | {g(need)} | {largest_batch(est, a.budget_gib * GIB)} |")
            rows.append(row)
            print(row, flush=True)
    table = "\n".join(rows)
    print(f"{time.time() - t0:.0f} s")
    if a.record:
        record(f"Search-step memory per backbone, batch {a.batch}, {a.size}x{a.size} (bench_step_memory.py)",
               f"Machine: {machine()} (a count, not a run: common/memory.py on the meta device). U-Net width "
               f"{a.width}, 4 classes, {a.dtype} activations (standing for AMP), the supernet with all 98 ops. "
               "Levels 0 (shallowest) to the deepest; `all stored` / `all checkpointed` and `plan total` are "
               "step_bytes(): the kept bytes plus weights, the largest recomputation in the backward pass "
               "(RECOMPUTE_FACTOR x the most one checkpointed region saves inside, plus a whole cell's own graph) and "
               f"the {CUDA_RESERVE / GIB:.0f} GiB CUDA reserve (common/memory.py, fitted to H200 peaks); the plan "
               "(per level: edges or the whole cell checkpointed, or the whole cell op by op: 'fine', one region per "
               f"op of each edge in the lean step) fits "
               f"{a.budget_gib:.1f} GiB ({BUDGET_SHARE:.0%} of 24 GB); the largest batch is for that budget with "
               f"every whole cell recomputed op by op (the activations scale with the batch). The frozen "
               f"decoder keeps only its ReLU masks (common/frozen.py).\n\n{table}\n")


if __name__ == "__main__":
    main()
