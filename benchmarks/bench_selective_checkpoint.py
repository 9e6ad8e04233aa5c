"""Selective activation checkpointing of the search cells' edges, tried (#21 item 2): does keeping the convolutions'
outputs, and recomputing only the ReLUs, BatchNorms, pools and weighted sums, make the checkpointed step faster?

It is not a --checkpoint_edges setting (this benchmark's answer on the CPU was no); it is built here around the lean
step's own checkpointed regions: every torch.utils.checkpoint call of common/lean_cell.py gets, besides its
BatchNorm-statistics guard, torch's selective-checkpoint contexts with a policy that keeps aten.convolution's
outputs (create_selective_checkpoint_contexts). The same gradients as `on` (checked here, float32, to 1e-5). Times
the lean step (lth, full) stored, `on` and selective, alternately in one process from the same weights; counts
what each keeps for the backward pass at --count_batch and --count_size (common/memory.py on the meta device, the
selective region's kept outputs through saved_tensors_hooks).

    python benchmarks/bench_selective_checkpoint.py [--width 16] [--batch 32] [--size 64] [--reps 9] [--record]
"""
import argparse
import contextlib
import functools
import statistics
import time

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from _common import machine, record
from bench_lean_step import stepper
from common.backbones import UNet
from common.lean_cell import LeanSearchSkips, checkpoint_hook
from common.memory import GIB, search_memory

SELECTIVE = "selective (convolutions kept)"


def keep_convolutions(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.convolution.default else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _both(outer, inner):
    with outer, inner:
        yield


def _selective_context(context_fn):
    forward, recompute = create_selective_checkpoint_contexts(keep_convolutions)
    _, bn_frozen = context_fn()               # lean_cell's guard: BN statistics not updated again while recomputing
    return forward, _both(bn_frozen, recompute)   # the guard's own clone / copy_ outside the policy's dispatch


def selective(through_hooks=False):
    """lean_cell's checkpointed regions with the convolutions' outputs kept (through its checkpoint_hook); `through_hooks`: those outputs pass through any
    saved_tensors_hooks around the region (for common/memory.py's count)."""
    def selective_checkpoint(fn, *args, context_fn, **kw):
        return checkpoint(fn, *args, context_fn=functools.partial(_selective_context, context_fn),
                          respect_saved_tensors_hooks=through_hooks, **kw)
    return checkpoint_hook(selective_checkpoint)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--count_batch", type=int, default=128)
    p.add_argument("--count_size", type=int, default=256)
    p.add_argument("--record", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = UNet("base", 1, 4, "ref", width=a.width)
    net.freeze_backbone()
    x, y = torch.randn(a.batch, 1, a.size, a.size), torch.randint(0, 4, (a.batch, a.size, a.size))
    kinds = {"stored": False, "edges checkpointed (on)": True, SELECTIVE: True}   # kind -> its checkpoint_edges

    def run(kind, fn):
        with selective() if kind == SELECTIVE else contextlib.nullcontext():
            return fn()

    # the same gradients as `on`: one forward and backward from the same weights
    grads = {}
    for kind in ("edges checkpointed (on)", SELECTIVE):
        torch.manual_seed(1)
        skips = LeanSearchSkips(net.skip_channels, net.up_channels, checkpoint_edges=True)
        net.set_skips(skips)
        run(kind, lambda: torch.nn.functional.cross_entropy(net(x), y).backward())
        grads[kind] = {n: q.grad.clone() for n, q in skips.named_parameters() if q.grad is not None}
    a_, b_ = grads.values()
    assert a_.keys() == b_.keys() and len(a_) > 0
    for n in a_:
        torch.testing.assert_close(b_[n], a_[n], rtol=1e-5, atol=1e-7, msg=n)

    rows = ["| mode | stored (s / step) | edges checkpointed, on (s / step) | selective, convolutions kept (s / step) |",
            "|---|---|---|---|"]
    for mode in ("lth", "full"):
        steps = {}
        for kind, ckpt in kinds.items():
            torch.manual_seed(1)
            steps[kind] = stepper(net, LeanSearchSkips(net.skip_channels, net.up_channels, checkpoint_edges=ckpt),
                                  mode, x, y, False)
        times = {k: [] for k in steps}
        for rep in range(a.reps + 2):                    # two of warm-up; the three kinds alternately
            for kind, step in steps.items():
                t = time.perf_counter()
                run(kind, step)
                if rep >= 2:
                    times[kind].append(time.perf_counter() - t)
        rows.append(f"| {mode} | " + " | ".join(f"{statistics.median(times[k]):.3f}" for k in kinds) + " |")
        print(rows[-1], flush=True)

    net32 = UNet("base", 1, 4, "ref", width=32)
    skips = LeanSearchSkips(net32.skip_channels, net32.up_channels)
    size = (a.count_size, a.count_size)
    plain = search_memory(net32, skips, a.count_batch, 1, size, torch.bfloat16)
    with selective(through_hooks=True):
        sel = search_memory(net32, skips, a.count_batch, 1, size, torch.bfloat16)
    count = ["| cell level | stored (GiB) | selective, convolutions kept (GiB) | edges checkpointed, on (GiB) |",
             "|---|---|---|---|"]
    for lv, (p_, s_) in enumerate(zip(plain["levels"], sel["levels"])):
        count.append(f"| {lv} | {p_['stored'] / GIB:.1f} | {s_['checkpointed'] / GIB:.1f} | "
                     f"{p_['checkpointed'] / GIB:.1f} |")
    print("\n".join(rows + [""] + count))
    if a.record:
        record("Selective activation checkpointing of the edges, tried (bench_selective_checkpoint.py)",
               f"Machine: {machine()}, {a.threads} thread(s). The lean step of a frozen base U-Net (width {a.width}) "
               f"with its search cells, all 98 ops, batch {a.batch}, {a.size}x{a.size}, SegLoss, float32; the median "
               f"of {a.reps} steps after two of warm-up, the three kinds timed alternately from the same weights. "
               "Selective: every checkpointed region of `on` with torch's selective-checkpoint policy keeping the "
               "convolutions' outputs (the same gradients, checked). Then what each keeps per cell level, counted "
               f"(common/memory.py, meta device), base width 32, batch {a.count_batch}, "
               f"{a.count_size}x{a.count_size}, bf16.\n\n" + "\n".join(rows) + "\n\n" + "\n".join(count) + "\n")


if __name__ == "__main__":
    main()
