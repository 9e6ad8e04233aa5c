"""GPU figures at the paper's scale (batch 128, 256x256, width 32): the supernet step of both searches and the
stage-I step per precision (fp32 / bf16 autocast) and memory format (NCHW / channels_last), cuDNN autotuning,
peak GPU memory, what pruning to one op per edge saves, and real epochs of 02 / 03 on a 256x256 phantom.
Needs a CUDA GPU; writes the 'GPU' sections of RESULTS.md."""
import argparse
import json
import os
import shutil
import tempfile
import time

import torch

from _common import machine, one_op_per_edge, record, run
from common.backbones import ENCODERS, UNet
from common.data import SliceDataset, load_splits
from common.lean_cell import LeanSearchSkips
from common.losses import SegLoss
from common.search import arch_optimizer, search_step, weight_optimizer
from common.utils import autocast

DEVICE = torch.device("cuda")


def step_time(encoder, what, amp=True, cl=True, batch=128, size=256, width=32, reps=3, pruned=False, ckpt=False,
              warmup=2):
    """Seconds per optimizer step and peak GPU memory (MiB). what: 'lth' (single-level supernet step),
    'full' (bilevel: α/β step on a val batch, then the weight step) or 'stage1' (the ref U-Net trained whole)."""
    dev = DEVICE
    torch.cuda.empty_cache()
    model = UNet(encoder, 1, 4, "ref", width=width).to(dev)
    if what == "stage1":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        model.freeze_backbone()
        skips = LeanSearchSkips(model.skip_channels, model.up_channels, checkpoint_edges=ckpt)
        if pruned:
            one_op_per_edge(skips)
        model.set_skips(skips.to(dev))
        w_opt, a_opt = weight_optimizer(skips, 0.025), arch_optimizer(skips, 3e-4, (0.5, 0.999), 1e-3)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    x = torch.randn(batch, 1, size, size, device=dev)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    y = torch.randint(0, 4, (batch, size, size), device=dev)
    loss_fn = SegLoss()

    def loss_of(_batch):
        with autocast(dev, amp):
            return loss_fn(model(x), y)

    def step():
        if what == "stage1":
            opt.zero_grad(set_to_none=True)
            loss_of(None).backward()
            opt.step()
        else:
            search_step(what, True, skips, w_opt, a_opt, loss_of, None, lambda: None)

    try:
        for _ in range(warmup):                                        # warm-up (and cuDNN autotuning)
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps, torch.cuda.max_memory_allocated() / 2**20
    except torch.cuda.OutOfMemoryError:
        return float("nan"), float("inf")


def fmt(s, mem):
    return ("OOM", "OOM") if mem == float("inf") else (f"{s * 1000:,.0f}", f"{mem:,.0f}")


def precision_table(encoders):
    body = ("| encoder | precision | memory format | cuDNN autotune | LTH step (ms) | full step (ms) | "
            "stage-I step (ms) | peak GPU MiB (LTH / full / stage I) |\n|---|---|---|---|---|---|---|---|\n")
    for enc in encoders:
        for amp, cl, bench in ((False, False, False), (True, False, False), (False, True, False), (True, True, False),
                               (True, True, True)):
            torch.backends.cudnn.benchmark = bench
            r = [fmt(*step_time(enc, w, amp, cl)) for w in ("lth", "full", "stage1")]
            body += (f"| {enc} | {'bf16 autocast' if amp else 'fp32'} | {'channels_last' if cl else 'NCHW'} | "
                     f"{'on' if bench else 'off'} | {r[0][0]} | {r[1][0]} | {r[2][0]} | "
                     f"{r[0][1]} / {r[1][1]} / {r[2][1]} |\n")
            print(body.splitlines()[-1], flush=True)
    torch.backends.cudnn.benchmark = False
    return body


def pruning_table():
    body = ("| encoder | LTH step, 98 ops (ms) | LTH step, 14 ops (ms) | peak MiB 98 / 14 ops | "
            "stage-I step (ms) |\n|---|---|---|---|---|\n")
    for enc in ENCODERS:
        a, b, c = step_time(enc, "lth"), step_time(enc, "lth", pruned=True), step_time(enc, "stage1")
        body += (f"| {enc} | {fmt(*a)[0]} | {fmt(*b)[0]} | {fmt(*a)[1]} / {fmt(*b)[1]} | {fmt(*c)[0]} |\n")
        print(body.splitlines()[-1], flush=True)
    return body


def checkpoint_table():
    body = ("| encoder | LTH step (ms) | full step (ms) | LTH step, 14 ops (ms) | peak GPU MiB LTH / full / 14 ops |\n"
            "|---|---|---|---|---|\n")
    for enc in ENCODERS:
        r = [fmt(*step_time(enc, w, ckpt=True, pruned=p, reps=2, warmup=1))
             for w, p in (("lth", False), ("full", False), ("lth", True))]
        body += f"| {enc} | {r[0][0]} | {r[1][0]} | {r[2][0]} | {r[0][1]} / {r[1][1]} / {r[2][1]} |\n"
        print(body.splitlines()[-1], flush=True)
    return body


def epochs_table(patients, workers, size=256):
    """Real stage scripts on CUDA: a 256x256 ACDC phantom, 02 for 2 epochs, 03 lth and full for 3 epochs each."""
    tmp = tempfile.mkdtemp(prefix="bench_gpu_")
    D = f"{tmp}/data"
    run(["01_preprocess.py", "--make_phantom", f"{tmp}/raw", "--layout", "acdc", "--patients", str(patients),
         "--phantom_size", str(size), "--seed", "0"])
    run(["01_preprocess.py", "--dataset", "acdc", "--raw", f"{tmp}/raw", "--out", D, "--crop", str(size), str(size),
         "--processes", str(workers)])
    data = ["--data", f"{D}/slices.h5", "--splits", f"{D}/splits.json", "--workers", str(workers)]
    splits = load_splits(f"{D}/splits.json")
    n = {k: len(SliceDataset(f"{D}/slices.h5", splits[k])) for k in ("train", "train_search")}
    t = time.time()
    run(["02_pretrain.py", *data, "--epochs", "2", "--out", f"{tmp}/ref"])
    pre = time.time() - t
    body = ("| stage | epochs | seconds per epoch (after the first) | slices/s | peak GPU MiB | whole script (s) |\n"
            "|---|---|---|---|---|---|\n")
    log = [json.loads(ln) for ln in open(f"{tmp}/ref/log.jsonl")]
    s, mem = log[-1]["seconds"], max(r["peak_gpu_mib"] or 0 for r in log)
    body += f"| 02_pretrain (base, ref skips) | 2 | {s:.2f} | {n['train'] / s:,.0f} | {mem:,} | {pre:.1f} |\n"
    for mode in ("lth", "full"):
        t = time.time()
        run(["03_search.py", "--backbone", f"{tmp}/ref/ckpt_best.pt", *data, "--mode", mode, "--epochs", "3",
             "--warmup", "1", "--out", f"{tmp}/{mode}"])
        wall = time.time() - t
        traj = [json.loads(ln) for ln in open(f"{tmp}/{mode}/trajectory.jsonl")]
        s = sum(r["seconds"] for r in traj[1:]) / max(len(traj) - 1, 1)
        mem = max(json.loads(ln)["peak_gpu_mib"] or 0 for ln in open(f"{tmp}/{mode}/log.jsonl"))
        slices = n["train" if mode == "lth" else "train_search"]
        body += f"| 03_search --mode {mode} | 3 | {s:.2f} | {slices / s:,.0f} | {mem:,} | {wall:.1f} |\n"
    shutil.rmtree(tmp)
    return body, n["train"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--encoders", nargs="+", default=["base", "resnet50"], help="encoders of the precision table")
    p.add_argument("--patients", type=int, default=24, help="phantom patients of the epoch timing")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--skip", nargs="*", default=[], choices=["precision", "pruning", "checkpoint", "epochs"])
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    head = (f"Machine: {machine()}, CUDA {torch.version.cuda}\n\n"
            "Batch 128, 256x256, 1 channel, 4 classes, width 32 (the defaults).\n\n")
    if "precision" not in a.skip:
        record("GPU: precision and memory format (bench_gpu.py)", head + precision_table(a.encoders))
    if "pruning" not in a.skip:
        record("GPU: every encoder, bf16 + channels_last (bench_gpu.py)", head + pruning_table())
    if "checkpoint" not in a.skip:
        record("GPU: the supernet with checkpointed edges, bf16 + channels_last (bench_gpu.py)",
               head + checkpoint_table())
    if "epochs" not in a.skip:
        body, n = epochs_table(a.patients, a.workers)
        record("GPU: stage scripts on a 256x256 phantom (bench_gpu.py)",
               f"Machine: {machine()}\n\nACDC phantom, {a.patients} patients ({n} training slices), 256x256, "
               f"batch 128, {a.workers} loader workers, the scripts' defaults (bf16 autocast, channels_last, "
               "checkpointed edges).\n\n" + body)


if __name__ == "__main__":
    main()
