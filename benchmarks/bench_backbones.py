"""Forward+backward time and peak memory per encoder (CPU: batch 8, 128x128; GPU: batch 128, 256x256)."""
import resource
import time

import torch

from _common import machine, record
from common.backbones import ENCODERS, UNet
from common.losses import SegLoss


def bench(encoder, device, batch, size, reps):
    model = UNet(encoder, 1, 4, "ref", width=32).to(device)
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.randint(0, 4, (batch, size, size), device=device)
    loss_fn = SegLoss()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(reps + 1):
        t = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(x), y)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.time() - t)
    mem = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return sum(times) / len(times), mem


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, size = (128, 256) if device.type == "cuda" else (8, 128)
    body = f"Machine: {machine()}; batch {batch}, {size}x{size}, 1 channel, 4 classes, width 32\n\n"
    body += "| encoder | fwd+bwd (s) | peak memory (MiB) |\n|---|---|---|\n"
    for enc in ENCODERS:
        s, mem = bench(enc, device, batch, size, 3)
        body += f"| {enc} | {s:.3f} | {mem:,.0f}{' (process max RSS)' if device.type == 'cpu' else ''} |\n"
    record(f"Backbones (bench_backbones.py, {device.type})", body)


if __name__ == "__main__":
    main()
