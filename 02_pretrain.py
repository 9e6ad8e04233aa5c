"""Stage I: train a 2-D U-Net backbone with a given skip type (paper Sec. 6.3).

In:  slices.h5 and splits.json from 01_preprocess.py.
Out: RUN/args.json, RUN/log.jsonl (one line per epoch), RUN/ckpt_last.pt, RUN/ckpt_best.pt
     (best validation patient-level mean foreground Dice). Checkpoints hold model,
     optimizer, epoch, args and the model config, and are written atomically.

    python 02_pretrain.py --data D/slices.h5 --splits D/splits.json --encoder resnet50 --out runs/ref_resnet50

Adam lr 1e-3, batch 128, 200 epochs, loss CE + soft Dice (Eq. 22-24), no augmentation.
`--resume` continues from RUN/ckpt_last.pt; on CPU with the same seed it ends with the
same weights as a run that was never stopped.
"""
import argparse
import math
import os
import sys
import time

import torch

from common.backbones import ENCODERS, UNet
from common.data import SliceDataset
from common.engine import EpochTimer, NonFiniteLoss, evaluate_cases, make_loader, setup_run, train_epoch
from common.losses import SegLoss
from common.skips import SKIP_TYPES
from common.utils import (JsonlLog, add_run_flags, atomic_torch_save, atomic_write_json, epoch_generator,
                          load_checkpoint, run_metadata)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="slices.h5 from 01_preprocess.py")
    p.add_argument("--splits", required=True, help="splits.json from 01_preprocess.py")
    p.add_argument("--encoder", choices=ENCODERS, default="base", help="U-Net encoder")
    p.add_argument("--skip", choices=SKIP_TYPES, default="ref", help="skip-connection type")
    p.add_argument("--width", type=int, default=32, help="base encoder width and decoder base width")
    p.add_argument("--encoder_weights", default=None, help="local torchvision state dict (ImageNet); none = random init")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (paper: 200)")
    p.add_argument("--batch_size", type=int, default=128, help="batch size (paper: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: 1e-3)")
    add_run_flags(p)
    return p.parse_args(argv)


def build_model(args, meta):
    return UNet(args.encoder, meta["shape"][1], len(meta["class_names"]) + 1, args.skip, args.width,
                args.encoder_weights)


def trainable_parameters(model):
    return model.parameters()


def checkpoint(model, optimizer, epoch, args, best, meta):
    return {"kind": "pretrain", "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
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
        ckpt = load_checkpoint(last, "pretrain", map_location=device)
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
    print(f"{args.encoder} U-Net, {args.skip} skips, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(train_set)} training slices, device {device}")
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
