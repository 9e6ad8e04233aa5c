"""The parts of an IAC search shared by 03_search.py and the nnU-Net search trainer (nnunet_iac/).

    w_opt = weight_optimizer(skips, lr)                     # SGD, no momentum, no weight decay
    a_opt = arch_optimizer(skips, lr, betas, weight_decay)  # Adam on α, β
    arch_step(loss, skips, a_opt)                           # full mode: α, β on a val_search batch
    info = end_of_epoch(skips, lth, mode, epoch, warmup)   # importance, JS test, pruning, stop rule
    record = trajectory_record(skips, info, epoch, ...)    # one line of trajectory.jsonl
    keep_top2_edges(skips)                                  # Sec. 5.5, once every edge has one op
"""
import math

import torch

from common.iac import EDGES, NODES, OPS
from common.lth import all_edges_single


def cosine_power_lr(epoch, epochs, lr_max, lr_min, power):
    """Cosine power annealing (sharpDARTS): c = (1+cos(πe/E))/2, q = p^(c+1) rescaled to [0, 1]."""
    c = (1 + math.cos(math.pi * epoch / max(epochs, 1))) / 2
    q = c if power == 1 else (power ** (c + 1) - power) / (power ** 2 - power)
    return lr_min + q * (lr_max - lr_min)


def weight_optimizer(skips, lr):
    """SGD on the cell weights; rebuilt after pruning so removed weights leave it (it has no state)."""
    return torch.optim.SGD(skips.weight_parameters(), lr=lr, momentum=0.0, weight_decay=0.0)


def arch_optimizer(skips, lr, betas, weight_decay):
    return torch.optim.Adam(skips.arch_parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def arch_step(loss, skips, a_opt):
    """One Adam step on α, β; autograd.grad computes no cell-weight gradient it would throw away."""
    for prm, g in zip(skips.arch_parameters(), torch.autograd.grad(loss, skips.arch_parameters())):
        prm.grad = g
    a_opt.step()


@torch.no_grad()
def end_of_epoch(skips, lth, mode, epoch, warmup):
    """Importance (Eq. 13/18); in lth mode the JS test (Eq. 20) and pruning (Eq. 21) from the end of
    warm-up on (α, β do not move before). Returns importance, js, tau, pruned [(e, o)], stopped."""
    I = skips.importance()
    js, tau, pruned = None, lth.tau.clone(), []
    if mode == "lth" and epoch >= warmup - 1:
        js, tau, pruned = lth.step(I, skips.op_mask)
        for e, o in pruned:
            skips.prune_op(e, o)
    stopped = mode == "lth" and all_edges_single(skips.op_mask)
    return {"importance": I, "js": js, "tau": tau, "pruned": pruned, "stopped": stopped}


@torch.no_grad()
def trajectory_record(skips, info, epoch, losses, lr, seconds):
    return {"epoch": epoch, "alpha": skips.alpha.tolist(), "beta": skips.beta.tolist(),
            "w": skips.edge_weights().tolist(), "importance": info["importance"].tolist(),
            "op_mask": skips.op_mask.int().tolist(), "js": None if info["js"] is None else info["js"].tolist(),
            "tau": info["tau"].tolist(), "pruned": [[e, OPS[o]] for e, o in info["pruned"]], **losses,
            "lr_w": lr, "seconds": seconds}


@torch.no_grad()
def keep_top2_edges(skips):
    """Sec. 5.5: each node keeps the two incoming edges with the largest w' (node 2 has exactly two)."""
    w = skips.edge_weights()
    for node in NODES:
        incoming = [e for e, (i, j) in enumerate(EDGES) if j == node and skips.edge_mask[e]]
        for e in sorted(incoming, key=lambda e: -float(w[e]))[2:]:
            skips.prune_edge(e)
