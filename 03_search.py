r"""Stage II (03, the search): search the IAC genotype in a frozen U-Net, `--mode full` or `--mode lth` (Sec. 3, 5).

In:  RUN_I/ckpt_best.pt from 02_pretrain.py, slices.h5 and splits.json.
Out: RUN/genotype.json, RUN/theta0.pt (cell weights before any update, full width),
     RUN/trajectory.jsonl (per epoch: op weights α, edge weights β, capped edge weights w',
     importance, active ops, JS divergence and threshold τ per edge, ops pruned, losses, seconds),
     RUN/log.jsonl, RUN/ckpt_last.pt, RUN/args.json, RUN/done.json (last, when the genotype is
     written; the backbone run must have one).

    python 03_search.py --backbone runs/ref/ckpt_best.pt --data D/slices.h5 --splits D/splits.json \
        --mode lth --out runs/search_lth

full: 200 epochs of first-order bilevel search; per step one Adam step on α, β with a
      val_search batch (after warm-up), then one SGD step on the cell weights with a
      train_search batch; discretised at the end (Eq. 12, top-2 edges per node).
lth:  single-level search on the whole training set (one forward and backward, both
      optimizers step); after each epoch the JS test (Eq. 20) prunes ops on stable
      edges (Eq. 21); stops when every edge has one op, then keeps 2 edges per node.
      The first test after warm-up prunes nothing and sets the initial threshold
      τ0 = κ · median edge JS (κ: --tau0_rel; --tau0 gives an absolute τ0 instead).
Both: backbone frozen in eval mode, an IAC in every skip level with one shared α, β;
      15 warm-up epochs train only the cell weights; SGD with cosine power annealing.
"""
import argparse
import os
import time

import torch
from tqdm import tqdm

from common.checkpoints import (load_frozen_backbone, resume_search, save_checkpoint, save_theta0, weights_hash,
                                search_checkpoint)
from common.data import SliceDataset, read_meta
from common.engine import (EpochTimer, check_finite, make_loader, resume_iterator, setup_run, step_saver, stop_early,
                           to_device)
from common.iac import EDGES, OPS, init_from_theta0, make_theta0, write_genotype
from common.lean_cell import LeanSearchSkips
from common.losses import SegLoss
from common.memory import GIB, LABELS, choose_plan, describe, gpu_budget, plan_for_run, search_memory
from common.lth import all_edges_single
from common.runs import add_unfinished_flag, check_stop, cli, mark_done, require_done, write_args
from common.search import (add_search_flags, arch_optimizer, cosine_power_lr, end_of_epoch,
                           expected_stop, keep_top2_edges, lth_state, resolve_threshold, search_step, search_summary,
                           trajectory_record, weight_optimizer)
from common.utils import (HelpFormatter, JsonlLog, add_run_flags, autocast, epoch_generator, peak_gpu_mib, pick_device,
                          precision, read_jsonl)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--backbone", required=True, help="ckpt_best.pt of 02_pretrain.py with --skip ref (required)")
    p.add_argument("--data", required=True, help="slices.h5 from 01_preprocess.py (required)")
    p.add_argument("--splits", required=True, help="splits.json from 01_preprocess.py (required)")
    p.add_argument("--mode", choices=["full", "lth"], default="lth",
                   help="full = the original bilevel search (IAC); lth = the lottery-ticket search that prunes ops "
                        "by the JS test and stops early (IAC-LTH)")
    p.add_argument("--batch_size", type=int, default=128, help="slices per batch (the paper's)")
    p.add_argument("--cell_channels", type=int, default=None,
                   help="channels inside each cell (C) (default: the skip's channels at each level)")
    add_search_flags(p)                             # every search hyperparameter: common/search.py
    add_run_flags(p)
    add_unfinished_flag(p)
    p.add_argument("--dry_run", action="store_true",
                   help="print the step's memory estimate on this device (per cell level, stored and checkpointed, "
                        "and the --checkpoint_edges plan) and whether it fits; writes nothing, exits 1 if it does "
                        "not fit")
    return resolve_threshold(p.parse_args(argv))


def search_epoch(args, model, skips, loss_fn, w_opt, a_opt, loaders, epoch, device, amp, cl, position=None,
                 on_step=None):
    """One epoch of `full` (bilevel, first order) or `lth` (single level) search; returns mean losses.
    `position`: a mid-epoch checkpoint's place to continue from; `on_step(done, sums)` after every step."""
    arch_on = epoch >= args.warmup
    model.train()
    sums = dict(position["sums"]) if position else {"train_loss": 0.0, "val_loss": 0.0, "n": 0}
    skip = position["done"] if position else 0

    def loss_of(batch):
        x, y = to_device(*batch, device, cl)
        with autocast(device, amp):
            return loss_fn(model(x), y)

    val_iter = iter(loaders["val"]) if args.mode == "full" else None

    def next_val_batch():                                      # val_search cycles under train_search
        nonlocal val_iter
        try:
            return next(val_iter)
        except StopIteration:
            val_iter = iter(loaders["val"])
            return next(val_iter)

    train_iter = resume_iterator(loaders["train"], position,                 # a mid-epoch resume: the batches
                                 next_val_batch if args.mode == "full" and arch_on else None)   # already used
    bar = tqdm(train_iter, desc=f"search {epoch + 1}", leave=False, unit="batch", disable=None,
               total=len(loaders["train"]), initial=skip)
    for step, batch in enumerate(bar, start=skip):
        check_stop()                                           # a stop signal (common/runs.py): leave before this step
        value, val = search_step(args.mode, arch_on, skips, w_opt, a_opt, loss_of, batch, next_val_batch)
        check_finite(value, epoch, step)
        b = len(batch[0])
        sums["train_loss"] += value * b
        sums["val_loss"] += (val or 0.0) * b
        sums["n"] += b
        bar.set_postfix(loss=f"{value:.4f}")
        if on_step:
            on_step(step + 1, sums)
    return {k: sums[k] / max(sums["n"], 1) for k in ("train_loss", "val_loss")}


def search_skips(args, model):
    """The supernet of this search on the CPU, every level stored (the memory plan sets checkpointing per level)."""
    return LeanSearchSkips(model.skip_channels, model.up_channels, args.cell_channels, args.pc_k, args.beta_fn,
                           output=args.cell_output, lean=args.lean_step == "on")


def dry_run(args):
    """--dry_run: the memory plan of this search at its batch and crop on this device, before anything is written."""
    meta, device = read_meta(args.data), pick_device(args.device)
    model, _ = load_frozen_backbone(args.backbone, meta)
    skips = search_skips(args, model)
    amp, _ = precision(args, device)
    est = search_memory(model, skips, args.batch_size, model.config["in_channels"], meta["crop"],
                        torch.bfloat16 if amp else torch.float32)
    budget = gpu_budget(device)
    plan, _, fits = choose_plan(args.checkpoint_edges, est, budget)
    print("\n".join(describe(est, plan, budget)))
    if budget is None:
        print(f"(device {device}: no GPU memory to compare with; run --dry_run on the GPU machine for the verdict)")
        return
    print("fits" if fits else f"does not fit in {budget / GIB:.1f} GiB: lower --batch_size, use --checkpoint_edges "
          "auto (or on / cell / fine), or a smaller --cell_channels")
    if not fits:
        raise SystemExit(1)


def main(args):
    if args.dry_run:
        return dry_run(args)
    device, amp, cl, meta, splits, last = setup_run(args, "search")

    model, bb = load_frozen_backbone(args.backbone, meta)
    require_done(args.backbone, "--backbone", args.allow_unfinished)
    model = model.to(device)
    geometry = {"skip_channels": model.skip_channels, "up_channels": model.up_channels,
                "cell_channels": args.cell_channels}
    theta0 = make_theta0(**geometry)                                   # θ0 before any update
    skips = search_skips(args, model)
    init_from_theta0(skips, theta0)                                    # partial-channel ops = slices of θ0
    plan, lines = plan_for_run(args.checkpoint_edges, device, model, skips, args.batch_size, meta["crop"], amp)
    skips.set_checkpointing(plan)                                      # --checkpoint_edges: per level
    print("\n".join(lines + ["checkpointing per cell level: " + ", ".join(
        f"{lv} {LABELS[m]}" for lv, m in enumerate(plan))]))
    model.set_skips(skips.to(device))
    if cl:
        model = model.to(memory_format=torch.channels_last)
    w_opt = weight_optimizer(skips, args.lr_w)
    a_opt = arch_optimizer(skips, args.lr_arch, args.arch_betas, args.arch_weight_decay)
    lth = lth_state(args)
    start_epoch, seconds, position = 0, 0.0, None
    if args.resume:
        start_epoch, seconds, position = resume_search(last, skips, a_opt, lth, args, geometry, device)
        w_opt = weight_optimizer(skips, args.lr_w)                     # over the ops still active
        print(f"resuming at epoch {start_epoch + 1}" + (f", after step {position['done']}" if position else "")
              + f"; {int(skips.op_mask.sum())} ops active")
    else:
        save_theta0(os.path.join(args.out, "theta0.pt"), theta0, geometry, bb["config"])
    write_args(args)
    resume_epoch = start_epoch - 1 if args.resume else None
    log = JsonlLog(os.path.join(args.out, "log.jsonl"), resume_epoch)
    traj = JsonlLog(os.path.join(args.out, "trajectory.jsonl"), resume_epoch)
    active_ops = [r["active_ops"] for r in read_jsonl(log.path)]      # for the LTH's ETA

    if args.mode == "full":
        sets = {"train": SliceDataset(args.data, splits["train_search"], meta=meta),
                "val": SliceDataset(args.data, splits["val_search"], meta=meta)}
    else:
        sets = {"train": SliceDataset(args.data, splits["train"], meta=meta)}
    loss_fn = SegLoss()
    timer = EpochTimer(args.epochs, start_epoch)
    print(f"{args.mode} search on a frozen {bb['config']['encoder']} U-Net, {len(sets['train'])} slices/epoch, "
          f"{sum(p.numel() for p in skips.weight_parameters()):,} cell weights, device {device}")
    # an LTH search killed after its stop epoch, before genotype.json: the checkpoint of that epoch already has
    # one op per edge; derive the genotype from it, without another epoch of β that could change the top-2 edges
    epoch, stopped = start_epoch - 1, bool(args.resume and args.mode == "lth" and all_edges_single(skips.op_mask))
    if stopped:
        print(f"the search had stopped at epoch {start_epoch} (one op per edge); deriving its genotype")
    for epoch in range(start_epoch, args.epochs if not stopped else start_epoch):
        resumed = position if epoch == start_epoch else None
        t0 = time.time() - (resumed["sums"]["seconds"] if resumed else 0.0)       # the epoch's time before a stop
        lr = cosine_power_lr(epoch, args.epochs, args.lr_w, args.lr_w_min, args.lr_power)
        for g in w_opt.param_groups:
            g["lr"] = lr
        torch.manual_seed(args.seed * 1000 + epoch)                   # per-epoch seeding: exact resume
        loaders = {k: make_loader(ds, args.batch_size, True, epoch_generator(args.seed + 7 * i, epoch), args.workers,
                                  device) for i, (k, ds) in enumerate(sets.items())}
        def save(pos, e=epoch, t=t0):                                 # --ckpt_every_steps: a mid-epoch checkpoint
            pos["sums"]["seconds"] = time.time() - t
            save_checkpoint({**search_checkpoint(skips, a_opt, lth, e - 1, seconds, args, geometry), "position": pos},
                            last)
        on_step = step_saver(args.ckpt_every_steps, len(loaders["train"]), save)
        losses = search_epoch(args, model, skips, loss_fn, w_opt, a_opt, loaders, epoch, device, amp, cl, resumed,
                              on_step)
        info = end_of_epoch(skips, lth, args.mode, epoch, args.warmup)
        pruned, stopped = info["pruned"], info["stopped"]
        if pruned:                                                    # pruned weights leave the optimizer
            w_opt = weight_optimizer(skips, lr)
        epoch_s = time.time() - t0
        seconds += epoch_s
        traj.write(trajectory_record(skips, info, epoch, losses, lr, epoch_s, lth if args.mode == "lth" else None))
        active = int(skips.op_mask.sum())
        log.write({"epoch": epoch, **losses, "active_ops": active, "n_pruned": len(pruned), "lr_w": lr,
                   "seconds": epoch_s, "peak_gpu_mib": peak_gpu_mib(device)})
        save_checkpoint(search_checkpoint(skips, a_opt, lth, epoch, seconds, args, geometry), last)
        active_ops.append(active)
        end = expected_stop(active_ops, args.epochs) if args.mode == "lth" else args.epochs
        note = "" if args.mode == "full" else (" (at most: nothing pruned yet)" if active == len(EDGES) * len(OPS)
                                               else f" (expected stop at epoch {end}, from the pruning rate)")
        eta = f"ETA {timer.eta(epoch, end)}{note}"
        print(f"epoch {epoch + 1}/{args.epochs} [{args.mode}]  loss {losses['train_loss']:.4f}  active ops "
              f"{active}/{len(EDGES) * len(OPS)}  pruned {len(pruned)}  {epoch_s:.1f}s  {eta}"
              + ("  (warm-up)" if epoch < args.warmup else ""), flush=True)
        if stopped or stop_early(args, epoch, start_epoch):
            break
    if not stopped and epoch + 1 < args.epochs:                       # --stop_after: no genotype yet
        return

    if stopped:
        keep_top2_edges(skips, args.edge_rule)                        # Sec. 5.5: 2 incoming edges per node
    genotype = skips.derive_genotype(args.edge_rule)                  # Eq. (12), Sec. 3.4
    write_genotype(os.path.join(args.out, "genotype.json"), genotype,
                   search_summary(args.mode, args, lth, epoch + 1, stopped, seconds,
                                  backbone=os.path.abspath(args.backbone), backbone_sha256=weights_hash(bb["model"]),
                                  encoder=bb["config"]["encoder"],
                                  dataset=meta["dataset"], seed=args.seed, geometry=geometry))
    print(f"genotype after {epoch + 1} epochs ({seconds / 60:.1f} min): "
          + ", ".join(f"{op}({s}->{d})" for op, s, d in genotype["edges"]))
    mark_done(args.out, "03_search", epochs=args.epochs, epochs_run=epoch + 1, stopped=stopped)


if __name__ == "__main__":
    cli(main, get_args)
