"""Your own U-Net: IAC-LTH cells implanted into MONAI's BasicUNet, with only copies of iac.py and lth.py.

In:  nothing; a synthetic 2-D task is drawn (bright disks on noise, --size x --size, one channel).
Out: printed per stage; with --out DIR also DIR/genotype.json (iac.write_genotype) and DIR/summary.json
     (Dice of each stage, the genotype, the search's epochs and JS settings, the predicted mask's shape).

    python examples/monai_basicunet.py      # ~2 min on one CPU core: the search stops at epoch 37 of 60;
                                            # held-out Dice 0.96 (backbone), 0.73 (cells at θ0), 0.96 (stage III)

The chain of the paper on a third-party U-Net:
  stage I    train BasicUNet (2-D) alone, then freeze it (eval mode, no gradients);
  stage II   an IAC search cell in each of its 4 skip connections (one α, β for all), LTH search: --warmup
             epochs train only the cell weights, then single level (one forward and backward, both optimizers
             step); after each epoch the JS test prunes ops on stable edges (lth.end_of_epoch; τ0 is
             calibrated at the first test with a previous p and a positive median JS, which prunes nothing);
             stop when every edge has one op; each node keeps its top-2 incoming edges (derive_genotype);
  stage III  the found cell at full width, reset to θ0 (its weights before the search), trained with the
             backbone frozen; then a prediction on held-out images and their Dice.

Where the cells go. BasicUNet's decoder is four UpCat blocks; `upcat_k(x, x_e)` up-samples the coarser
output x with a transposed conv to x_0 (padded to x_e's size) and runs `convs(cat([x_e, x_0]))`. A
forward-pre-hook on `upcat_k.convs` splits that concatenation into skip = x_e and up = x_0 and puts
cat([cell(skip, up), up]) in its place: the frozen decoder gets a tensor of the shape it was trained on.

Contracts (iac.py and lth.py say the same in their docstrings):
- level 0 is the finest skip the decoder has: level k-1 is upcat_k, so upcat_1 (full resolution here) is
  level 0 and upcat_4 level 3. skips(level, ...) is called from the coarsest level to level 0, once each per
  forward. UpCat concatenates the skip first, cat([x_e, x_0]); the hook splits in that order and hands the
  cell (skip, up) (examples/smp_unet.py: smp puts the up-sampled tensor first).
- skip_channels[level]: channels of the encoder tensor x_e (features[k-1] for upcat_k); up_channels[level]:
  channels of the up-sampled tensor x_0 given to the cell, not of the coarser output x: UpCat's transposed
  conv halves them (features[k] // 2) except in upcat_1 (halves=False: features[1]). With the default
  features (16, 16, 32, 32, 64, 16): skip (16, 16, 32, 32), up (16, 16, 16, 32). Both tensors have the
  same spatial size (UpCat pads x_0 to x_e's); the cells raise a ValueError naming the level otherwise.
- a prune removes the op's module: the weight optimizer is built again after an epoch that pruned,
  otherwise it keeps stepping the removed weights.
- modes: `unet.eval()` freezes the backbone; the cells must train. ImplantedUNet keeps the cells beside the
  backbone, not inside it, and its train() puts the backbone back in eval mode; had the cells been
  attached to the unet, unet.eval() would put them in eval mode too (call skips.train() after it).

iac.py and lth.py import only torch. This file imports them as top-level modules: from its own folder
when you copied them beside it, else from this repository's common/ (added to the end of sys.path);
nothing else of the project is imported.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.nets import BasicUNet
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
if not all(os.path.exists(os.path.join(HERE, f)) for f in ("iac.py", "lth.py")):
    sys.path.append(os.path.join(HERE, os.pardir, "common"))      # this repository's copies, as plain modules
import iac  # noqa: E402
import lth  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="image side in pixels (a multiple of 16) (default: 32)")
    p.add_argument("--n_train", type=int, default=128, help="training images (default: 128)")
    p.add_argument("--n_test", type=int, default=64, help="held-out images to predict (default: 64)")
    p.add_argument("--features", type=int, nargs=6, default=(16, 16, 32, 32, 64, 16), metavar="W",
                   help="BasicUNet features: 5 encoder widths and the last decoder width; the first four must be "
                        "multiples of --pc_k (default: 16 16 32 32 64 16)")
    p.add_argument("--batch_size", type=int, default=32, help="batch size of every stage (default: 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of stages I and III (default: 1e-3)")
    p.add_argument("--pretrain_epochs", type=int, default=20, help="stage I epochs (default: 20)")
    p.add_argument("--search_epochs", type=int, default=60,
                   help="cap on the search epochs; the LTH search stops earlier when every edge has one op "
                        "(default: 60; paper: 200)")
    p.add_argument("--warmup", type=int, default=5,
                   help="search epochs training only the cell weights, α and β fixed (default: 5; paper: 15)")
    p.add_argument("--lr_w", type=float, default=0.01, help="SGD learning rate of the cell weights (default: 0.01)")
    p.add_argument("--lr_w_min", type=float, default=1e-4,
                   help="final learning rate of the cell weights, cosine power annealing (default: 1e-4)")
    p.add_argument("--lr_power", type=float, default=2.0, help="power p of cosine power annealing (default: 2)")
    p.add_argument("--lr_arch", type=float, default=1e-3, help="Adam learning rate of α and β (default: 1e-3)")
    p.add_argument("--pc_k", type=int, default=4, help="partial channels: 1/K of a cell's channels go "
                   "through the mixed ops in the search (K, Eq. 4) (default: 4)")
    p.add_argument("--tau0_rel", type=float, default=0.2, help="JS threshold at the calibration test as a "
                   "fraction of the median edge JS (κ; τ0 = κ · median JS) (default: 0.2)")
    p.add_argument("--gamma", type=float, default=1.1,
                   help="growth of an unstable edge's threshold per epoch (γ, τ ← γ τ) (default: 1.1)")
    p.add_argument("--k_std", type=float, default=1.0,
                   help="prune the ops of a stable edge below mean - k·std of its importance (k, Eq. 21) (default: 1)")
    p.add_argument("--js_support", choices=lth.JS_SUPPORTS, default="common",
                   help="JS over the ops active in both epochs (common) or over all 7 (all) (default: common)")
    p.add_argument("--finetune_epochs", type=int, default=20, help="stage III epochs (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every initialisation (default: 0)")
    p.add_argument("--out", default=None, help="folder for genotype.json and summary.json (default: none)")
    args = p.parse_args(argv)
    if args.size % 16:
        p.error(f"--size {args.size}: BasicUNet pools four times; give a multiple of 16")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup}: give 0 or more epochs")
    return args


def make_disks(n, size, gen):
    """n images (n, 1, size, size) float: one disk of intensity 1 (radius size/8 to size/4) on N(0, 0.5²)
    noise; labels (n, 1, size, size) long, 1 inside the disk."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = size / 8 + torch.rand(n, 1, 1, generator=gen) * size / 8
    cy, cx = (r + torch.rand(n, 1, 1, generator=gen) * (size - 2 * r) for _ in range(2))
    label = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2).long()              # (n, H, W)
    image = label.float() + 0.5 * torch.randn(n, size, size, generator=gen)
    return image[:, None], label[:, None]


def decoder_levels(unet):
    """BasicUNet's UpCat blocks by skip level, level 0 the finest (full resolution)."""
    return [unet.upcat_1, unet.upcat_2, unet.upcat_3, unet.upcat_4]


def cell_channels(unet, features):
    """(skip_channels, up_channels) per level: x_e of upcat_k has features[k-1] channels, its up-sampled x_0
    features[k] // 2 (the transposed conv halves them), upcat_1 features[1] (halves=False)."""
    skip = [features[0], features[1], features[2], features[3]]
    up = [features[1], features[2] // 2, features[3] // 2, features[4] // 2]
    for level, upcat in enumerate(decoder_levels(unet)):                     # what UpCat will concatenate
        got = upcat.convs.conv_0.conv.in_channels
        if got != skip[level] + up[level]:
            raise ValueError(f"upcat_{level + 1} concatenates {got} channels, not skip {skip[level]} + up "
                             f"{up[level]}: this MONAI's BasicUNet is laid out differently")
    return skip, up


class ImplantedUNet(nn.Module):
    """A frozen BasicUNet whose skip connections pass through `skips` (iac.IACSearchSkips or iac.IACSkips;
    assign `.skips` to swap them). In train mode only the cells train: the backbone stays in eval mode."""

    def __init__(self, unet, skips, skip_channels):
        super().__init__()
        self.unet, self.skips, self.skip_channels = unet.requires_grad_(False), skips, skip_channels
        for level, upcat in enumerate(decoder_levels(unet)):
            upcat.convs.register_forward_pre_hook(self._hook(level))

    def _hook(self, level):
        def through_cell(module, args):
            (x,) = args                                                      # cat([x_e, x_0]): (B, C_s + C_u, H, W)
            skip, up = x[:, :self.skip_channels[level]], x[:, self.skip_channels[level]:]
            return (torch.cat([self.skips(level, skip, up), up], dim=1),)    # the cell takes the skip's place
        return through_cell

    def train(self, mode=True):
        super().train(mode)
        self.unet.eval()                                                     # frozen backbone; cells: `mode`
        return self

    def forward(self, x):
        return self.unet(self.skips.prepare(x))                              # α, β -> weights once per forward


def cosine_power_lr(epoch, epochs, lr_max, lr_min, power):
    """Cosine power annealing (sharpDARTS): c = (1 + cos(π e / E)) / 2, q = p^(c+1) rescaled to [0, 1]."""
    c = (1 + math.cos(math.pi * epoch / max(epochs, 1))) / 2
    q = c if power == 1 else (power ** (c + 1) - power) / (power ** 2 - power)
    return lr_min + q * (lr_max - lr_min)


def train_epoch(net, loader, loss_fn, step):
    """One epoch; `step()` after each backward. Returns the mean loss."""
    net.train()
    total, n = 0.0, 0
    for x, y in loader:
        loss = loss_fn(net(x), y)
        loss.backward()
        step()
        total, n = total + loss.item() * len(x), n + len(x)
    return total / max(n, 1)


def fit(net, params, loader, loss_fn, epochs, lr, name):
    """Stage I or III: Adam on `params` for `epochs`."""
    opt = torch.optim.Adam(params, lr=lr)

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)
    for epoch in range(epochs):
        loss = train_epoch(net, loader, loss_fn, step)
        print(f"{name} epoch {epoch + 1}/{epochs}  loss {loss:.4f}", flush=True)


@torch.no_grad()
def predict(net, images):
    """Label maps (N, H, W) of images (N, 1, H, W)."""
    net.eval()
    return net(images).argmax(dim=1)


def dice(pred, label):
    """Foreground Dice over all images together, 2TP / (2TP + FP + FN) (monai.metrics.compute_dice)."""
    onehot = (lambda m: F.one_hot(m.reshape(1, -1), 2).permute(0, 2, 1))     # (1, 2, N·H·W)
    return float(compute_dice(onehot(pred), onehot(label), include_background=False))


def tau0_note(state, calibrated_before, arch_on):
    """τ0 at the test that calibrated it; 'not calibrated yet' after a warm-up while no test had a previous p and
    a positive median JS (lth.LTHState)."""
    if state.tau0 is not None:
        return "" if calibrated_before else f"  τ0 {state.tau0:.2e}"
    return "  τ0 not calibrated yet" if arch_on else ""


def search(args, net, loader, loss_fn):
    """Stage II, IAC-LTH, on the search cells `net.skips`. Returns (genotype, search info)."""
    skips = net.skips
    state = lth.LTHState(len(iac.EDGES), tau0_rel=args.tau0_rel, gamma=args.gamma, k_std=args.k_std,
                         js_support=args.js_support)
    a_opt = torch.optim.Adam(skips.arch_parameters(), lr=args.lr_arch, betas=(0.5, 0.999), weight_decay=1e-3)
    w_opt = torch.optim.SGD(skips.weight_parameters(), lr=args.lr_w)
    t0, epoch, info = time.time(), -1, {"stopped": False}
    for epoch in range(args.search_epochs):
        lr = cosine_power_lr(epoch, args.search_epochs, args.lr_w, args.lr_w_min, args.lr_power)
        for g in w_opt.param_groups:
            g["lr"] = lr
        arch_on = epoch >= args.warmup

        def step():                                                          # single level: both step
            w_opt.step()
            if arch_on:
                a_opt.step()
            w_opt.zero_grad(set_to_none=True)
            a_opt.zero_grad(set_to_none=True)
        loss = train_epoch(net, loader, loss_fn, step)
        calibrated = state.tau0 is not None
        info = lth.end_of_epoch(skips, state, epoch, args.warmup)            # JS test, prune, stop rule
        if info["pruned"]:                                                   # the removed ops' weights leave it
            w_opt = torch.optim.SGD(skips.weight_parameters(), lr=lr)
        print(f"search epoch {epoch + 1}/{args.search_epochs}  loss {loss:.4f}  active ops "
              f"{int(skips.op_mask.sum())}/{skips.op_mask.numel()}  pruned {len(info['pruned'])}"
              + ("  (warm-up)" if not arch_on else "") + tau0_note(state, calibrated, arch_on), flush=True)
        if info["stopped"]:
            break
    genotype = skips.derive_genotype()                                       # argmax op; top-2 edges per node
    return genotype, {"mode": "lth", "epochs_run": epoch + 1, "epochs_cap": args.search_epochs,
                      "stopped_early": info["stopped"], "seconds": time.time() - t0, "lth": state.settings()}


def write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(args):
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = make_disks(args.n_train, args.size, gen)
    x_test, y_test = make_disks(args.n_test, args.size, gen)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)                    # CE + soft Dice

    unet = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=args.features)
    fit(unet, unet.parameters(), loader, loss_fn, args.pretrain_epochs, args.lr, "stage I")
    dice_backbone = dice(predict(unet, x_test), y_test[:, 0])
    unet.eval().requires_grad_(False)                                        # frozen from here on
    skip_ch, up_ch = cell_channels(unet, args.features)
    print(f"stage I Dice {dice_backbone:.3f}; cells: skip channels {skip_ch}, up channels {up_ch} (level 0 finest)")

    theta0 = iac.make_theta0(skip_ch, up_ch)                                 # θ0: before any update
    skips = iac.IACSearchSkips(skip_ch, up_ch, pc_k=args.pc_k)
    iac.init_from_theta0(skips, theta0)                                      # partial-channel ops = slices of θ0
    net = ImplantedUNet(unet, skips, skip_ch)
    genotype, info = search(args, net, loader, loss_fn)
    info["geometry"] = {"skip_channels": skip_ch, "up_channels": up_ch, "cell_channels": None}
    print(f"genotype after {info['epochs_run']} search epochs ({info['seconds']:.0f} s, "
          f"{'stopped: one op per edge' if info['stopped_early'] else 'cap reached'}): "
          + ", ".join(f"{op}({s}->{d})" for op, s, d in genotype["edges"]))

    cells = iac.IACSkips(genotype, skip_ch, up_ch)                           # full width, affine BN
    iac.init_from_theta0(cells, theta0)                                      # IAC-LTH: reset to θ0
    net.skips = cells                                                        # the hooks now call these
    dice_theta0 = dice(predict(net, x_test), y_test[:, 0])
    fit(net, cells.parameters(), loader, loss_fn, args.finetune_epochs, args.lr, "stage III")
    pred = predict(net, x_test)                                              # (N, H, W)
    dice_cells = dice(pred, y_test[:, 0])
    chance = dice(torch.ones_like(pred), y_test[:, 0])                       # every pixel foreground
    print(f"held-out Dice: stage I backbone {dice_backbone:.3f}, cells at θ0 {dice_theta0:.3f}, stage III cells "
          f"{dice_cells:.3f} (chance, all foreground: {chance:.3f}); predicted masks {tuple(pred.shape)}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        iac.write_genotype(os.path.join(args.out, "genotype.json"), genotype, info)
        write_json(os.path.join(args.out, "summary.json"), {
            "dice_backbone": dice_backbone, "dice_theta0": dice_theta0, "dice_cells": dice_cells,
            "dice_chance": chance, "genotype": genotype, "search": info, "input_shape": list(x_test.shape),
            "pred_shape": list(pred.shape), "skip_channels": skip_ch, "up_channels": up_ch})


if __name__ == "__main__":
    main(get_args())
