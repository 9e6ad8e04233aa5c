r"""Stage I (02, the U-Net): train a 2-D U-Net backbone with a given skip type (paper Sec. 6.3).

In:  slices.h5 and splits.json from 01_preprocess.py.
Out: RUN/args.json, RUN/log.jsonl (one line per epoch), RUN/ckpt_last.pt, RUN/ckpt_best.pt
     (best validation patient-level mean foreground Dice). Checkpoints hold model,
     optimizer, epoch, args and the model config, and are written atomically.

    python 02_pretrain.py --data D/slices.h5 --splits D/splits.json --encoder resnet50 --out runs/ref_resnet50

Adam lr 1e-3, batch 128, 200 epochs, loss CE + soft Dice (Eq. 22-24), no augmentation.
`--resume` continues from RUN/ckpt_last.pt; on CPU with the same seed it ends with the
same weights as a run that was never stopped. `--resume auto` starts when there is no checkpoint;
RUN/done.json is written last, once the run is finished (common/runs.py).
"""
import argparse
import math

import torch

from common.backbones import ENCODERS, UNet
from common.checkpoints import resume_training
from common.data import SliceDataset
from common.engine import add_fit_flags, fit, setup_run
from common.losses import SegLoss
from common.runs import cli, mark_done, write_args
from common.skips import SKIP_TYPES
from common.utils import HelpFormatter, add_run_flags


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--data", required=True, help="slices.h5 from 01_preprocess.py (required)")
    p.add_argument("--splits", required=True, help="splits.json from 01_preprocess.py (required)")
    p.add_argument("--encoder", choices=ENCODERS, default="base",
                   help="U-Net encoder: base (a plain convolutional encoder) or a torchvision network")
    p.add_argument("--skip", choices=SKIP_TYPES, default="ref",
                   help="skip connections: ref = plain (identity) skips, the backbone stage II searches in; att = "
                        "attention gates; nested = UNet++ nested skips; resatt = residual attention")
    p.add_argument("--width", type=int, default=32,
                   help="channels of the base encoder's first level and of the decoder's finest level")
    p.add_argument("--encoder_weights", default=None,
                   help="a local torchvision state dict (e.g. ImageNet) to start the encoder from (default: none, "
                        "random initial weights)")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (the paper's)")
    p.add_argument("--batch_size", type=int, default=128, help="slices per batch (the paper's)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the paper's)")
    add_run_flags(p)
    add_fit_flags(p)
    return p.parse_args(argv)


def build_model(args, meta):
    return UNet(args.encoder, meta["shape"][1], len(meta["class_names"]) + 1, args.skip, args.width,
                args.encoder_weights)


def trainable_parameters(model):
    return model.parameters()


def main(args):
    device, amp, channels_last, meta, splits, last = setup_run(args, "run")

    model = build_model(args, meta).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=args.lr)
    start_epoch, best, position = 0, (-math.inf, -1), None
    if args.resume:
        start_epoch, best, position = resume_training(last, "pretrain", model, optimizer, device)
        print(f"resuming from epoch {start_epoch}" + (f", after step {position['done']}" if position else "")
              + f" (best Dice {best[0]:.4f} at epoch {best[1]})")
    write_args(args)

    train_set = SliceDataset(args.data, splits["train"], meta=meta)
    print(f"{args.encoder} U-Net, {args.skip} skips, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(train_set)} training slices, device {device}")
    if fit(args, model, optimizer, SegLoss(), train_set, meta, splits, device, amp, channels_last, "pretrain",
           start_epoch, best, position):
        mark_done(args.out, "02_pretrain", epochs=args.epochs)


if __name__ == "__main__":
    cli(main, get_args)
