"""The 3-D supernet (LeanSearchSkips(dims=3)) per U-Net level: activation memory kept for the backward pass and
step time, with all 98 ops and with one op per edge (where IAC-LTH ends; edge e keeps op e mod 7), edges stored
or checkpointed.

Activation memory is counted device-independently: the bytes of the distinct tensors autograd saves during
the forward (saved-tensor hooks), at a small patch on the CPU, then scaled by voxels to nnU-Net 3d_fullres's
typical patch (128^3, batch 2): activations grow linearly with voxels. On CUDA the peak allocated memory at
the small patch is measured as well."""
import argparse
import time

import torch

from _common import machine, one_op_per_edge, record
from common.lean_cell import LeanSearchSkips

CHANNELS = (32, 64, 128, 256, 320)                     # nnU-Net 3d_fullres features per stage (levels 0-4)


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves while fn() runs (parameters excluded), and fn()'s value."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def one_level(C, size, batch, pruned, ckpt, device, reps):
    torch.manual_seed(0)
    s = LeanSearchSkips([C], [C], dims=3, checkpoint_edges=ckpt).to(device)
    if pruned:                                         # edge e keeps op e mod 7: every kind of op stays
        one_op_per_edge(s)
    x = torch.randn(batch, C, size, size, size, device=device)
    up = torch.randn(batch, C, size, size, size, device=device)

    def step():
        s.prepare(None)
        return s(0, x, up).square().mean()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    nbytes, loss = saved_bytes(step)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    t = time.perf_counter()
    for _ in range(reps):
        step().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return nbytes, (time.perf_counter() - t) / reps, peak


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--patch", type=int, default=32, help="cubic patch measured (level l: patch / 2^l)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--target", type=int, nargs=2, default=[128, 2], metavar=("PATCH", "BATCH"),
                   help="patch and batch the memory is scaled to (nnU-Net 3d_fullres: 128^3, batch 2)")
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = (a.target[0] / a.patch) ** 3 * a.target[1] / a.batch
    body = (f"Machine: {machine()}\n\nOne 3-D search cell per level (C = nnU-Net's features at that level, partial "
            f"channels K = 4), input patch {a.patch}^3 / 2^level, batch {a.batch}, forward + backward of the cell "
            f"alone. Saved activations are scaled x{scale:,.0f} to a {a.target[0]}^3 patch at batch {a.target[1]}."
            "\n\n| level | C | size | ops | edges | saved activations (MB) | scaled (GB) | step (ms) |"
            + (" peak CUDA MiB |" if device.type == "cuda" else "") + "\n|---|---|---|---|---|---|---|---|"
            + ("---|" if device.type == "cuda" else "") + "\n")
    for level in range(a.levels):
        C, size = CHANNELS[level], a.patch // 2 ** level
        for pruned in (False, True):
            for ckpt in (False, True):
                nbytes, sec, peak = one_level(C, size, a.batch, pruned, ckpt, device, a.reps)
                body += (f"| {level} | {C} | {size}^3 | {14 if pruned else 98} | "
                         f"{'checkpointed' if ckpt else 'stored'} | {nbytes / 1e6:,.1f} | "
                         f"{nbytes * scale / 1e9:,.1f} | {sec * 1000:,.0f} |"
                         + (f" {peak:,.0f} |" if peak is not None else "") + "\n")
                print(body.splitlines()[-1], flush=True)
    record("3-D supernet per level (bench_3d.py)", body)


if __name__ == "__main__":
    main()
