"""The parts of an IAC search shared by 03_search.py and the nnU-Net search trainers (nnunet_iac/).

    SEARCH_SETTINGS                                         # the one table of defaults (flags and IAC_* vars)
    s = settings_from_env()  /  add_search_flags(parser)   # nnU-Net trainers  /  03_search.py
    w_opt, a_opt = weight_optimizer(..), arch_optimizer(..)
    lth = lth_state(s)                                      # JS test (common/lth.py) with these settings
    search_step(mode, arch_on, skips, w_opt, a_opt, loss_of, batch, next_val_batch)   # one step
    info = end_of_epoch(skips, lth, mode, epoch, warmup)   # importance, JS test, pruning, stop rule
    record = trajectory_record(skips, info, epoch, ...)    # one line of trajectory.jsonl
    keep_top2_edges(skips, edge_rule)                       # Sec. 5.5, once every edge has one op
"""
import argparse
import math
import os
from collections import namedtuple

import torch

from common.iac import CELL_OUTPUTS, EDGE_RULES, EDGES, OPS, edge_scores, top2_incoming
from common.lth import JS_SUPPORTS, LTHState, end_of_epoch as lth_end_of_epoch

Setting = namedtuple("Setting", "name type default help choices nargs", defaults=(None, None))

# κ of the self-calibrating threshold, chosen by benchmarks/bench_lth_invariance.py (RESULTS.md)
TAU0_REL = 0.2

# Every search hyperparameter, defined once: 03_search.py makes a flag of each (--name) and the
# nnU-Net search trainers read each from IAC_<NAME> (arch_betas as "0.5,0.999").
SEARCH_SETTINGS = (
    Setting("epochs", int, 200, "search epochs of --mode full, the most epochs of --mode lth (the paper's)"),
    Setting("warmup", int, 15, "warm-up epochs that train only the cell weights, the op and edge weights (α, β) "
            "staying fixed (the paper's)"),
    Setting("lr_w", float, 0.01, "learning rate of the cell weights' SGD (the paper's)"),
    Setting("lr_w_min", float, 1e-4, "last learning rate of the cell weights, reached by cosine power annealing "
            "(our choice; the paper gives none)"),
    Setting("lr_power", float, 2.0, "power of the cosine power annealing (p, sharpDARTS) (our choice; the paper "
            "gives none)"),
    Setting("lr_arch", float, 1e-3, "Adam learning rate of the op and edge weights (α, β) (the paper's)"),
    Setting("arch_betas", float, (0.5, 0.999), "Adam betas of the op and edge weights (α, β) (PC-DARTS's)", nargs=2),
    Setting("arch_weight_decay", float, 1e-3, "Adam weight decay of the op and edge weights (α, β) (PC-DARTS's)"),
    Setting("pc_k", int, 4, "partial channels: 1 in K of a cell's channels goes through the candidate ops, Eq. (4) "
            "(K, PC-DARTS's)"),
    Setting("beta_fn", str, "tanh", "monotonic function applied to the edge weights before their softmax, Eq. (5) "
            "(f; our choice, the paper leaves it open)", ("tanh", "identity")),
    Setting("tau0_rel", float, TAU0_REL, "self-calibrating JS threshold: the first JS test after warm-up prunes "
            "nothing and sets the initial threshold to this times the median edge JS (τ0 = κ · median JS, κ chosen "
            "by benchmarks/bench_lth_invariance.py; --mode lth)"),
    Setting("tau0", float, None, "an absolute initial JS threshold (τ0) instead of the self-calibrating --tau0_rel "
            "(default: off, --tau0_rel calibrates it; --mode lth)"),
    Setting("gamma", float, 1.1, "JS threshold growth per unstable test: an edge whose JS is above its threshold "
            "gets its threshold multiplied by this (γ; our choice, the paper gives none; --mode lth)"),
    Setting("k_std", float, 1.0, "pruning outlier rule: on a stable edge, ops whose importance is more than this "
            "many standard deviations below the edge's mean are pruned, Eq. (21) (k in μ − kσ; our choice; "
            "--mode lth)"),
    Setting("js_eps", float, 1e-8, "smoothing added to the importance distributions in the JS divergence, "
            "Eq. (19)-(20) (ε)"),
    Setting("js_support", str, "common", "ops the JS divergence compares: common = the ops active in both epochs, "
            "so that a prune is not read as instability; all = all 7 (--mode lth)", JS_SUPPORTS),
    Setting("checkpoint_edges", str, "auto", "activation checkpointing, to fit the search in GPU memory: on = "
            "recompute each edge's ops in the backward pass instead of storing them (same result, far less GPU "
            "memory, ~1/3 more compute); cell = the whole cell recomputed around them (less again, one more "
            "forward); fine = cell with each op of each edge recomputed on its own (the least memory; no grouped "
            "convolutions across a node's edges); off = store everything; auto = off on the CPU, on CUDA chosen per "
            "level from the step's memory estimate and the free GPU memory (03_search.py; every level's edges in "
            "the nnU-Net trainers). At the paper's batch 128 and 256x256 the supernet does not fit a 141 GB GPU "
            "without it (benchmarks/RESULTS.md)", ("auto", "on", "cell", "fine", "off")),
    Setting("lean_step", str, "on", "how the search step computes the supernet: on = regrouped by the node an edge "
            "starts from (shared pools, skip and ReLU, grouped convolutions over the edges leaving a node, one "
            "partial-channel merge per node; faster); off = edge by edge as Eq. (4), (9) are written. The same math "
            "(a test pins every gradient in float64)", ("on", "off")),
    Setting("edge_rule", str, "w", "which 2 incoming edges each node keeps at the end: w = those with the largest "
            "capped edge weights (w', the paper's Sec. 3.4); max_importance = the largest max over ops of "
            "softmax(α) times that weight (PC-DARTS's)", EDGE_RULES),
    Setting("cell_output", str, "replace", "how the supernet's cells enter the frozen decoder during the search: "
            "replace (paper Eq. 1: the output conv takes the skip's place) or residual (skip + that conv, started "
            "at zero: the search starts from the identity skip; this project's option, train the cell with "
            "04_finetune.py --cell_output residual)", CELL_OUTPUTS),
)
DEFAULTS = {s.name: s.default for s in SEARCH_SETTINGS}
# what changes a search's result besides SEARCH_SETTINGS: --resume refuses to change these
RESULT_FLAGS = tuple(s.name for s in SEARCH_SETTINGS if s.name not in ("checkpoint_edges", "lean_step")) + (
    "mode", "batch_size", "seed", "cell_channels")


METAVARS = {"arch_betas": ("B1", "B2")}                  # --help: `--arch_betas B1 B2`


def add_search_flags(p):
    """A typed argparse flag for every search setting; --tau0 and --tau0_rel exclude each other."""
    group = p.add_mutually_exclusive_group()
    for s in SEARCH_SETTINGS:
        target = group if s.name in ("tau0", "tau0_rel") else p
        kw = {"nargs": s.nargs, "metavar": METAVARS.get(s.name)} if s.nargs else {}
        target.add_argument(f"--{s.name}", type=s.type, default=s.default, choices=s.choices, help=s.help, **kw)


def checkpoint_edges(setting, device):
    """--checkpoint_edges auto|on|cell|fine|off -> the nnU-Net trainers' LeanSearchSkips mode
    (auto: edges on CUDA)."""
    return setting if setting in ("cell", "fine") else setting == "on" or (setting == "auto" and device.type == "cuda")


def resolve_threshold(args):
    """An absolute --tau0 switches the self-calibration off (tau0_rel becomes None)."""
    if args.tau0 is not None:
        args.tau0_rel = None
    return args


def settings_from_env(environ=None, prefix="IAC_"):
    """The search settings from IAC_<NAME> variables (nnU-Net trainers), defaults from the table."""
    env = os.environ if environ is None else environ
    out = {}
    for s in SEARCH_SETTINGS:
        raw = env.get(prefix + s.name.upper(), "")
        if raw == "":
            out[s.name] = s.default
            continue
        try:
            value = tuple(s.type(v) for v in raw.split(",")) if s.nargs else s.type(raw)
        except ValueError:
            raise ValueError(f"{prefix}{s.name.upper()}={raw!r} is not a {s.type.__name__}"
                             + (" pair like 0.5,0.999" if s.nargs else "")) from None
        if s.choices and value not in s.choices:
            raise ValueError(f"{prefix}{s.name.upper()}={raw!r}: choose one of {', '.join(s.choices)}")
        if s.nargs and len(value) != s.nargs:
            raise ValueError(f"{prefix}{s.name.upper()}={raw!r}: give {s.nargs} comma-separated values")
        out[s.name] = value
    if env.get(prefix + "TAU0") and env.get(prefix + "TAU0_REL"):
        raise ValueError(f"set {prefix}TAU0 (absolute) or {prefix}TAU0_REL (self-calibrating), not both")
    return resolve_threshold(argparse.Namespace(**out))


def changed_settings(old, new):
    """The result-changing flags that differ between a checkpoint's args and this invocation's (a setting a
    checkpoint predates counts as its default)."""
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)
    old = {**{k: v for k, v in DEFAULTS.items() if k not in old}, **old}
    return {k: (old.get(k), new.get(k)) for k in RESULT_FLAGS if norm(old.get(k)) != norm(new.get(k))}


def search_summary(mode, s, lth, epochs_run, stopped, seconds, **extra):
    """genotype.json's `search` block: how the search ran, every setting, the JS test with its τ0."""
    return {"mode": mode, "epochs_run": epochs_run, "epochs_cap": s.epochs, "stopped_early": stopped,
            "seconds": seconds, "settings": {x.name: getattr(s, x.name) for x in SEARCH_SETTINGS},
            **({"lth": lth.settings()} if mode == "lth" else {}), **extra}


def lth_state(s):
    """The JS test of these settings (`tau0` absolute, or `tau0_rel` self-calibrating)."""
    return LTHState(len(EDGES), s.tau0, s.tau0_rel, s.gamma, s.k_std, s.js_eps, s.js_support)


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
    """One Adam step on α, β; autograd.grad computes no cell-weight gradient it would throw away. Returns the
    loss value: the caller keeps no reference to `loss`, so its graph (whose op-internal activations
    autograd.grad never reached, ~20 GB at batch 128, 256x256) is freed before the weight step's forward."""
    for prm, g in zip(skips.arch_parameters(), torch.autograd.grad(loss, skips.arch_parameters())):
        prm.grad = g
    a_opt.step()
    return loss.item()


def search_step(mode, arch_on, skips, w_opt, a_opt, loss_of, batch, next_val_batch=None):
    """One optimizer step of the search; `loss_of(batch)` is the loss tensor of a batch.

    full (bilevel, first order): (i) after warm-up one Adam step on α, β with a val_search batch,
    (ii) one SGD step on the cell weights with a train_search batch.
    lth (single level): one forward and backward on a training batch, then both optimizers step
    (α, β only after warm-up). Returns the (train, val or None) loss values."""
    val = None
    if mode == "full" and arch_on:                                     # (i) α, β on val_search
        val = arch_step(loss_of(next_val_batch()), skips, a_opt)
    w_opt.zero_grad(set_to_none=True)                                  # (ii) w on train_search / train
    a_opt.zero_grad(set_to_none=True)
    loss = loss_of(batch)
    loss.backward()
    w_opt.step()
    if mode == "lth" and arch_on:                                      # single level: both step
        a_opt.step()
    return loss.item(), val


@torch.no_grad()
def end_of_epoch(skips, lth, mode, epoch, warmup):
    """Importance (Eq. 13/18); in lth mode the JS test (Eq. 20) and pruning (Eq. 21) from the end of
    warm-up on (α, β do not move before; common/lth.py end_of_epoch). Returns importance, js, tau, pruned [(e, o)],
    stopped."""
    if mode == "lth":
        return lth_end_of_epoch(skips, lth, epoch, warmup)
    return {"importance": skips.importance(), "js": None, "tau": lth.tau, "pruned": [], "stopped": False}


def expected_stop(active_ops, epochs):
    """IAC-LTH's expected number of epochs, for the ETA: from the ops pruned per epoch since pruning began,
    how long until one op per edge is left (capped at `epochs`); `epochs` while nothing is pruned yet.
    `active_ops`: active op count after each epoch so far."""
    full, last = len(EDGES) * len(OPS), len(EDGES)
    first = next((i for i, n in enumerate(active_ops) if n < full), None)
    if first is None:
        return epochs
    rate = (full - active_ops[-1]) / (len(active_ops) - first)          # ops per epoch since the first prune
    return min(epochs, len(active_ops) + math.ceil((active_ops[-1] - last) / rate))


def _list(t):
    return None if t is None else t.tolist()


@torch.no_grad()
def trajectory_record(skips, info, epoch, losses, lr, seconds, lth=None):
    """One line of trajectory.jsonl; `lth` (lth mode) adds its settings with the calibrated τ0."""
    return {"epoch": epoch, "alpha": skips.alpha.tolist(), "beta": skips.beta.tolist(),
            "w": skips.edge_weights().tolist(), "importance": info["importance"].tolist(),
            "op_mask": skips.op_mask.int().tolist(), "js": _list(info["js"]), "tau": _list(info["tau"]),
            "pruned": [[e, OPS[o]] for e, o in info["pruned"]], **losses, "lr_w": lr, "seconds": seconds,
            **({"lth": lth.settings()} if lth is not None else {})}


@torch.no_grad()
def keep_top2_edges(skips, edge_rule="w"):
    """Sec. 5.5: each node keeps its two incoming edges with the largest w' (node 2 has exactly two)."""
    keep = set(top2_incoming(edge_scores(skips.op_weights(), skips.edge_weights(), edge_rule), skips.edge_mask))
    for e in range(len(EDGES)):
        if skips.edge_mask[e] and e not in keep:
            skips.prune_edge(e)
