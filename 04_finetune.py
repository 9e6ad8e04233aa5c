"""Stage III: train the found cell (or a baseline skip) in the frozen backbone (paper Sec. 6.3).

In:  RUN_I/ckpt_best.pt (02_pretrain.py), RUN_II/genotype.json and theta0.pt (03_search.py),
     slices.h5 and splits.json.
Out: RUN/args.json, RUN/log.jsonl (one line per epoch), RUN/ckpt_last.pt, RUN/ckpt_best.pt
     (best validation patient-level mean foreground Dice). Checkpoints hold model,
     optimizer, epoch, args and the model config, and are written atomically.

    python 04_finetune.py --backbone runs/ref/ckpt_best.pt --genotype runs/search_lth/genotype.json \
        --data D/slices.h5 --splits D/splits.json --out runs/iac_lth

The discrete cell at full width sits in every skip level; the backbone is frozen and only
the cell is trained (Adam lr 1e-3, batch 128, 200 epochs, the stage I loss). `--init
fresh` (IAC) draws new weights, `--init theta0` (IAC-LTH) resets the cell to the weights
it had before the search; the default follows the genotype's search mode (SPEC §5).
`--skip att|resatt` trains a baseline skip module into the same frozen backbone instead.
`--resume` continues from RUN/ckpt_last.pt; on CPU with the same seed it ends with the
same weights as a run that was never stopped.
"""
import argparse
import math
import os
import sys
import time

import torch

from common.data import SliceDataset
from common.engine import (EpochTimer, NonFiniteLoss, evaluate_cases, load_frozen_backbone, make_loader, setup_run,
                           train_epoch)
from common.iac import IACSkips, init_from_theta0, read_genotype
from common.losses import SegLoss
from common.skips import build_skips
from common.utils import (JsonlLog, add_run_flags, atomic_torch_save, atomic_write_json, epoch_generator,
                          load_checkpoint, run_metadata)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, help="ckpt_best.pt of 02_pretrain.py (ref skips)")
    p.add_argument("--genotype", default=None, help="genotype.json of 03_search.py")
    p.add_argument("--theta0", default=None, help="theta0.pt of 03_search.py (default: beside the genotype)")
    p.add_argument("--init", choices=["fresh", "theta0"], default=None,
                   help="cell init; default: fresh for a full-mode genotype, theta0 for an lth one")
    p.add_argument("--skip", choices=["iac", "att", "resatt"], default="iac", help="skip module to train")
    p.add_argument("--data", required=True, help="slices.h5 from 01_preprocess.py")
    p.add_argument("--splits", required=True, help="splits.json from 01_preprocess.py")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (paper: 200)")
    p.add_argument("--batch_size", type=int, default=128, help="batch size (paper: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: 1e-3)")
    add_run_flags(p)
    return p.parse_args(argv)


def build_model(args, meta):
    """Frozen backbone + the cell of the genotype (or a baseline skip) in every skip level."""
    model, _ = load_frozen_backbone(args.backbone, meta)
    if args.skip != "iac":
        model.set_skips(build_skips(args.skip, model.skip_channels, model.up_channels, None))
        model.config = {**model.config, "skip": args.skip}
        return model
    if not args.genotype:
        raise SystemExit("error: --genotype is required with --skip iac")
    genotype = read_genotype(args.genotype)
    geometry = genotype["search"].get("geometry", {})
    if geometry and (geometry["skip_channels"] != model.skip_channels or geometry["up_channels"] != model.up_channels):
        raise SystemExit(f"error: {args.genotype} was searched on another backbone (skip channels "
                         f"{geometry['skip_channels']}, this one has {model.skip_channels})")
    cell_channels = geometry.get("cell_channels")
    args.init = args.init or ("theta0" if genotype["search"]["mode"] == "lth" else "fresh")
    skips = IACSkips(genotype, model.skip_channels, model.up_channels, cell_channels)
    if args.init == "theta0":                    # IAC-LTH: reset the found cell to its weights at search start
        path = args.theta0 or os.path.join(os.path.dirname(args.genotype), "theta0.pt")
        theta0 = load_checkpoint(path, "theta0")
        init_from_theta0(skips, theta0["state"], strict_shapes=True)
    model.set_skips(skips)
    model.config = {**model.config, "skip": "iac", "genotype": genotype["edges"], "cell_channels": cell_channels}
    return model


def trainable_parameters(model):
    return model.skips.parameters()


def checkpoint(model, optimizer, epoch, args, best, meta):
    return {"kind": "finetune", "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "args": vars(args), "config": model.config, "best_dice": best[0], "best_epoch": best[1],
            "data": {"dataset": meta["dataset"], "class_names": meta["class_names"], "crop": meta["crop"]}}


def main(args):
    device, amp, channels_last, meta, splits, last = setup_run(args, "run")
    best_path = os.path.join(args.out, "ckpt_best.pt")

    model = build_model(args, meta).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=args.lr)
    start_epoch, best = 0, (-math.inf, -1)
    if args.resume:
        ckpt = load_checkpoint(last, "finetune", map_location=device)
        if ckpt["config"] != model.config:
            raise SystemExit(f"error: {last} holds a {ckpt['config']} model, the flags ask for {model.config}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best = ckpt["epoch"] + 1, (ckpt["best_dice"], ckpt["best_epoch"])
        print(f"resuming from epoch {start_epoch} (best Dice {best[0]:.4f} at epoch {best[1]})")
    atomic_write_json(os.path.join(args.out, "args.json"), run_metadata(args))
    log = JsonlLog(os.path.join(args.out, "log.jsonl"), resume_epoch=start_epoch - 1 if args.resume else None)

    train_set = SliceDataset(args.data, splits["train"])
    loss_fn = SegLoss()
    timer = EpochTimer(args.epochs, start_epoch)
    print(f"frozen {model.config['encoder']} U-Net, training {args.skip} skips ({args.init or 'fresh'} init, "
          f"{sum(p.numel() for p in trainable_parameters(model)):,} parameters), {len(train_set)} training slices, "
          f"device {device}")
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        torch.manual_seed(args.seed * 1000 + epoch)          # per-epoch seeding: exact resume
        loader = make_loader(train_set, args.batch_size, True, epoch_generator(args.seed, epoch), args.workers, device)
        train_loss = train_epoch(model, loader, loss_fn, optimizer, device, amp, channels_last, epoch)
        _, val_dice, _ = evaluate_cases(model, args.data, splits["val"], model.config["num_classes"], device, amp,
                                        channels_last)
        improved = val_dice > best[0] or (best[1] < 0)
        if improved:
            best = (val_dice, epoch)
        state = checkpoint(model, optimizer, epoch, args, best, meta)
        atomic_torch_save(state, last)
        if improved:
            atomic_torch_save(state, best_path)
        seconds = time.time() - t0
        log.write({"epoch": epoch, "train_loss": train_loss, "val_dice": val_dice, "best_dice": best[0],
                   "best_epoch": best[1], "seconds": seconds})
        print(f"epoch {epoch + 1}/{args.epochs}  loss {train_loss:.4f}  val Dice {val_dice:.4f}  "
              f"(best {best[0]:.4f} @ {best[1] + 1})  {seconds:.1f}s  ETA {timer.eta(epoch)}", flush=True)
        if args.stop_after and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < args.epochs:
            print(f"stopping after {args.stop_after} epochs as asked; continue with --resume")
            return
    print(f"done: best validation Dice {best[0]:.4f} at epoch {best[1] + 1}; {best_path}")


if __name__ == "__main__":
    try:
        main(get_args())
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
