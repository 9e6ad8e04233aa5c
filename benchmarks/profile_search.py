"""Profile one supernet search step (forward, backward, both optimizers) with torch.profiler.

    python benchmarks/profile_search.py [--encoder base] [--batch 16] [--size 64] [--width 8] [--mode full|lth]

Prints the operators that dominate self CPU (or CUDA) time, to find work that is not convolution.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from _common import machine
from common.backbones import ENCODERS, UNet
from common.lean_cell import LeanSearchSkips
from common.losses import SegLoss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--encoder", choices=ENCODERS, default="base")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--mode", choices=["full", "lth"], default="full")
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = UNet(a.encoder, 1, 4, "ref", width=a.width).to(device)
    model.freeze_backbone()
    skips = LeanSearchSkips(model.skip_channels, model.up_channels).to(device)
    model.set_skips(skips)
    w_opt = torch.optim.SGD(skips.weight_parameters(), lr=0.01)
    a_opt = torch.optim.Adam(skips.arch_parameters(), lr=1e-3)
    x = torch.randn(a.batch, 1, a.size, a.size, device=device)
    y = torch.randint(0, 4, (a.batch, a.size, a.size), device=device)
    loss_fn = SegLoss()

    def step():
        if a.mode == "full":
            a_opt.zero_grad()
            lv = loss_fn(model(x), y)
            grads = torch.autograd.grad(lv, skips.arch_parameters())
            for prm, g in zip(skips.arch_parameters(), grads):
                prm.grad = g
            a_opt.step()
        w_opt.zero_grad()
        a_opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        w_opt.step()
        if a.mode == "lth":
            a_opt.step()

    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{machine()}; {a.encoder}, batch {a.batch}, {a.size}x{a.size}, mode {a.mode}")
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows))


if __name__ == "__main__":
    main()
