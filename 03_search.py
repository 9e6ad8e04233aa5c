"""Stage II: search the IAC genotype in a frozen U-Net, `--mode full` or `--mode lth` (Sec. 3, 5).

In:  RUN_I/ckpt_best.pt from 02_pretrain.py, slices.h5 and splits.json.
Out: RUN/genotype.json, RUN/theta0.pt (cell weights before any update, full width),
     RUN/trajectory.jsonl (per epoch: α, β, w', importance, active ops, JS and τ per
     edge, ops pruned, losses, seconds), RUN/log.jsonl, RUN/ckpt_last.pt, RUN/args.json.

    python 03_search.py --backbone runs/ref/ckpt_best.pt --data D/slices.h5 --splits D/splits.json \
        --mode lth --out runs/search_lth

full: 200 epochs of first-order bilevel search; per step one Adam step on α, β with a
      val_search batch (after warm-up), then one SGD step on the cell weights with a
      train_search batch; discretised at the end (Eq. 12, top-2 edges per node).
lth:  single-level search on the whole training set (one forward and backward, both
      optimizers step); after each epoch the JS test (Eq. 20) prunes ops on stable
      edges (Eq. 21); stops when every edge has one op, then keeps 2 edges per node.
Both: backbone frozen in eval mode, an IAC in every skip level with one shared α, β;
      15 warm-up epochs train only the cell weights; SGD with cosine power annealing.
"""
import argparse
import os
import sys
import time

import torch

from common.data import SliceDataset
from common.engine import (EpochTimer, NonFiniteLoss, check_finite, load_frozen_backbone, make_loader, setup_run,
                           to_device)
from common.iac import EDGES, OPS, IACSearchSkips, init_from_theta0, make_theta0, write_genotype
from common.losses import SegLoss
from common.lth import LTHState
from common.search import (arch_optimizer, arch_step, cosine_power_lr, end_of_epoch, keep_top2_edges,
                           trajectory_record, weight_optimizer)
from common.utils import (JsonlLog, add_run_flags, atomic_torch_save, atomic_write_json, autocast, epoch_generator,
                          load_checkpoint, run_metadata)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, help="ckpt_best.pt of 02_pretrain.py (ref skips)")
    p.add_argument("--data", required=True, help="slices.h5")
    p.add_argument("--splits", required=True, help="splits.json")
    p.add_argument("--mode", choices=["full", "lth"], default="lth", help="original bilevel search or IAC-LTH")
    p.add_argument("--epochs", type=int, default=200, help="search epochs (full) or the cap (lth)")
    p.add_argument("--warmup", type=int, default=15, help="epochs training only the cell weights")
    p.add_argument("--batch_size", type=int, default=128, help="batch size (paper: 128)")
    p.add_argument("--lr_w", type=float, default=0.01, help="SGD lr of the cell weights (paper: 0.01)")
    p.add_argument("--lr_w_min", type=float, default=1e-4, help="final lr of cosine power annealing (chosen)")
    p.add_argument("--lr_power", type=float, default=2.0, help="power p of cosine power annealing (chosen)")
    p.add_argument("--lr_arch", type=float, default=1e-3, help="Adam lr of α, β (paper: 1e-3)")
    p.add_argument("--arch_betas", type=float, nargs=2, default=[0.5, 0.999], help="Adam betas of α, β (PC-DARTS)")
    p.add_argument("--arch_weight_decay", type=float, default=1e-3, help="Adam weight decay of α, β (PC-DARTS)")
    p.add_argument("--pc_k", type=int, default=4, help="partial-channel K, Eq. (4) (PC-DARTS: 4)")
    p.add_argument("--beta_fn", choices=["tanh", "identity"], default="tanh", help="monotonic f of Eq. (5) (chosen)")
    p.add_argument("--cell_channels", type=int, default=None, help="cell width C; default: the skip's channels")
    p.add_argument("--tau0", type=float, default=1e-3, help="initial JS threshold per edge (chosen)")
    p.add_argument("--gamma", type=float, default=1.1, help="threshold growth factor γ (chosen)")
    p.add_argument("--k_std", type=float, default=1.0, help="outlier rule μ − kσ, Eq. (21) (chosen)")
    p.add_argument("--js_eps", type=float, default=1e-8, help="ε of Eq. (19)-(20)")
    add_run_flags(p)
    return p.parse_args(argv)


def search_epoch(args, model, skips, loss_fn, w_opt, a_opt, loaders, epoch, device, amp, cl):
    """One epoch of `full` (bilevel, first order) or `lth` (single level) search; returns mean losses."""
    arch_on = epoch >= args.warmup
    model.train()
    totals = {"train_loss": 0.0, "val_loss": 0.0}
    n = 0
    val_iter = iter(loaders["val"]) if args.mode == "full" else None
    for step, batch in enumerate(loaders["train"]):
        if args.mode == "full" and arch_on:                    # (i) α, β on val_search
            try:
                xv, yv = next(val_iter)
            except StopIteration:
                val_iter = iter(loaders["val"])
                xv, yv = next(val_iter)
            xv, yv = to_device(xv, yv, device, cl)
            with autocast(device, amp):
                lv = loss_fn(model(xv), yv)
            arch_step(lv, skips, a_opt)
            totals["val_loss"] += lv.item() * len(xv)
        x, y = to_device(*batch, device, cl)                   # (ii) w on train_search / train
        w_opt.zero_grad(set_to_none=True)
        a_opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = loss_fn(model(x), y)
        loss.backward()
        w_opt.step()
        if args.mode == "lth" and arch_on:                     # single level: both step
            a_opt.step()
        value = loss.item()
        check_finite(value, epoch, step)
        totals["train_loss"] += value * len(x)
        n += len(x)
    return {k: v / max(n, 1) for k, v in totals.items()}


def main(args):
    device, amp, cl, meta, splits, last = setup_run(args, "search")

    model, bb = load_frozen_backbone(args.backbone, meta)
    model = model.to(device)
    geometry = {"skip_channels": model.skip_channels, "up_channels": model.up_channels,
                "cell_channels": args.cell_channels}
    theta0 = make_theta0(**geometry)                                   # θ0 before any update
    skips = IACSearchSkips(model.skip_channels, model.up_channels, args.cell_channels, args.pc_k, args.beta_fn)
    init_from_theta0(skips, theta0)                                    # partial-channel ops = slices of θ0
    model.set_skips(skips.to(device))
    if cl:
        model = model.to(memory_format=torch.channels_last)
    w_opt = weight_optimizer(skips, args.lr_w)
    a_opt = arch_optimizer(skips, args.lr_arch, args.arch_betas, args.arch_weight_decay)
    lth = LTHState(len(EDGES), args.tau0, args.gamma, args.k_std, args.js_eps)
    start_epoch, seconds = 0, 0.0
    if args.resume:
        ck = load_checkpoint(last, "search", map_location=device)
        if ck["args"]["mode"] != args.mode or ck["geometry"] != geometry:
            raise SystemExit(f"error: {last} is a {ck['args']['mode']} search of another configuration")
        skips.apply_masks(ck["op_mask"].to(device), ck["edge_mask"].to(device))
        skips.load_state_dict(ck["skips"])
        w_opt = weight_optimizer(skips, args.lr_w)
        a_opt.load_state_dict(ck["a_opt"])
        lth.load_state_dict(ck["lth"])
        start_epoch, seconds = ck["epoch"] + 1, ck["seconds"]
        print(f"resuming at epoch {start_epoch + 1}; {int(skips.op_mask.sum())} ops active")
    else:
        atomic_torch_save({"kind": "theta0", "state": theta0, "geometry": geometry,
                           "backbone": bb["config"]}, os.path.join(args.out, "theta0.pt"))
    atomic_write_json(os.path.join(args.out, "args.json"), run_metadata(args))
    resume_epoch = start_epoch - 1 if args.resume else None
    log = JsonlLog(os.path.join(args.out, "log.jsonl"), resume_epoch)
    traj = JsonlLog(os.path.join(args.out, "trajectory.jsonl"), resume_epoch)

    if args.mode == "full":
        sets = {"train": SliceDataset(args.data, splits["train_search"]),
                "val": SliceDataset(args.data, splits["val_search"])}
    else:
        sets = {"train": SliceDataset(args.data, splits["train"])}
    loss_fn = SegLoss()
    timer = EpochTimer(args.epochs, start_epoch)
    print(f"{args.mode} search on a frozen {bb['config']['encoder']} U-Net, {len(sets['train'])} slices/epoch, "
          f"{sum(p.numel() for p in skips.weight_parameters()):,} cell weights, device {device}")
    epoch, stopped = start_epoch - 1, False
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        lr = cosine_power_lr(epoch, args.epochs, args.lr_w, args.lr_w_min, args.lr_power)
        for g in w_opt.param_groups:
            g["lr"] = lr
        torch.manual_seed(args.seed * 1000 + epoch)                   # per-epoch seeding: exact resume
        loaders = {k: make_loader(ds, args.batch_size, True, epoch_generator(args.seed + 7 * i, epoch), args.workers,
                                  device) for i, (k, ds) in enumerate(sets.items())}
        losses = search_epoch(args, model, skips, loss_fn, w_opt, a_opt, loaders, epoch, device, amp, cl)
        info = end_of_epoch(skips, lth, args.mode, epoch, args.warmup)
        pruned, stopped = info["pruned"], info["stopped"]
        if pruned:                                                    # pruned weights leave the optimizer
            w_opt = weight_optimizer(skips, lr)
        epoch_s = time.time() - t0
        seconds += epoch_s
        traj.write(trajectory_record(skips, info, epoch, losses, lr, epoch_s))
        active = int(skips.op_mask.sum())
        log.write({"epoch": epoch, **losses, "active_ops": active, "n_pruned": len(pruned), "lr_w": lr,
                   "seconds": epoch_s})
        atomic_torch_save({"kind": "search", "skips": skips.state_dict(), "op_mask": skips.op_mask.cpu(),
                           "edge_mask": skips.edge_mask.cpu(), "a_opt": a_opt.state_dict(), "lth": lth.state_dict(),
                           "epoch": epoch, "seconds": seconds, "args": vars(args), "geometry": geometry}, last)
        print(f"epoch {epoch + 1}/{args.epochs} [{args.mode}]  loss {losses['train_loss']:.4f}  active ops "
              f"{active}/{len(EDGES) * len(OPS)}  pruned {len(pruned)}  {epoch_s:.1f}s  ETA {timer.eta(epoch)}"
              + ("  (warm-up)" if epoch < args.warmup else ""), flush=True)
        if stopped:
            break
        if args.stop_after and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < args.epochs:
            print(f"stopping after {args.stop_after} epochs as asked; continue with --resume")
            return

    if stopped:
        keep_top2_edges(skips)                                        # Sec. 5.5: 2 incoming edges per node
    genotype = skips.derive_genotype()
    write_genotype(os.path.join(args.out, "genotype.json"), genotype,
                   {"mode": args.mode, "epochs_run": epoch + 1, "epochs_cap": args.epochs, "stopped_early": stopped,
                    "seconds": seconds, "backbone": os.path.abspath(args.backbone),
                    "encoder": bb["config"]["encoder"], "dataset": meta["dataset"], "seed": args.seed,
                    "geometry": geometry})
    print(f"genotype after {epoch + 1} epochs ({seconds / 60:.1f} min): "
          + ", ".join(f"{op}({s}->{d})" for op, s, d in genotype["edges"]))


if __name__ == "__main__":
    try:
        main(get_args())
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
