r"""Stage III (04, the cell): train the found cell (or a baseline skip) in the frozen backbone (paper Sec. 6.3).

In:  RUN_I/ckpt_best.pt (02_pretrain.py), RUN_II/genotype.json and theta0.pt (03_search.py),
     slices.h5 and splits.json.
Out: RUN/args.json, RUN/log.jsonl (one line per epoch), RUN/ckpt_last.pt, RUN/ckpt_best.pt
     (best validation patient-level mean foreground Dice). Checkpoints hold model,
     optimizer, epoch, args and the model config, and are written atomically.

    python 04_finetune.py --genotype runs/search_lth/genotype.json \
        --data D/slices.h5 --splits D/splits.json --out runs/iac_lth

The discrete cell at full width sits in every skip level of the backbone it was searched in (the paper's "U-Net
that was used during search": genotype.json records its path and weights hash; --backbone defaults to it and
another one is refused unless --allow_other_backbone); the backbone is frozen and only the cell is trained
(Adam lr 1e-3, batch 128, 200 epochs, the stage I loss). `--init fresh` (IAC) draws new weights, `--init
theta0` (IAC-LTH) resets the cell to the weights it had before the search; the default follows the genotype's search mode (docs/method.md §5).
`--skip att|resatt` trains a baseline skip module into the same frozen backbone instead.
`--resume` continues from RUN/ckpt_last.pt; on CPU with the same seed it ends with the
same weights as a run that was never stopped. `--resume auto` starts when there is no checkpoint;
RUN/done.json is written last, once the run is finished (common/runs.py).
"""
import argparse
import math
import os

import torch

from common.checkpoints import (cell_config, check_searched_backbone, load_frozen_backbone, load_genotype,
                                load_theta0_into, resume_training, weights_hash)
from common.data import SliceDataset
from common.engine import add_fit_flags, fit, setup_run
from common.iac import CELL_OUTPUTS, IACSkips
from common.losses import SegLoss
from common.skips import build_skips
from common.runs import add_unfinished_flag, cli, mark_done, require_done, write_args
from common.utils import HelpFormatter, InputError, add_run_flags, require_file


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--backbone", default=None,
                   help="ckpt_best.pt of 02_pretrain.py with --skip ref: the frozen backbone (default with --skip iac: "
                        "the one the genotype was searched on, as genotype.json records it; needed with att / resatt)")
    p.add_argument("--allow_other_backbone", action="store_true",
                   help="train the cell in a backbone whose weights differ from the one it was searched on (a "
                        "deliberate transfer; without it such a backbone is refused; recorded in args.json)")
    p.add_argument("--genotype", default=None, help="genotype.json of 03_search.py (needed with --skip iac)")
    p.add_argument("--theta0", default=None,
                   help="theta0.pt of 03_search.py: the cell weights before the search (default: the theta0.pt "
                        "beside the genotype)")
    p.add_argument("--init", choices=["fresh", "theta0"], default=None,
                   help="the cell's initial weights: fresh = newly drawn (IAC), theta0 = reset to the weights it had "
                        "before the search (IAC-LTH) (default: fresh for a --mode full genotype, theta0 for a "
                        "--mode lth one)")
    p.add_argument("--skip", choices=["iac", "att", "resatt"], default="iac",
                   help="skip module to train in the frozen backbone: iac = the searched cell of --genotype; att, "
                        "resatt = a baseline (attention gate, residual attention)")
    p.add_argument("--cell_output", choices=CELL_OUTPUTS, default="replace",
                   help="how the cell enters the frozen decoder: replace = the cell's output conv takes the identity "
                        "skip's place (paper Eq. 1); residual = skip + that conv, started at zero (after a reset to "
                        "the pre-search weights θ0 too), so the frozen decoder first sees its own skip tensor (this "
                        "project's option)")
    p.add_argument("--data", required=True, help="slices.h5 from 01_preprocess.py (required)")
    p.add_argument("--splits", required=True, help="splits.json from 01_preprocess.py (required)")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (the paper's)")
    p.add_argument("--batch_size", type=int, default=128, help="slices per batch (the paper's)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the paper's)")
    add_run_flags(p)
    add_fit_flags(p)
    add_unfinished_flag(p)
    return p.parse_args(argv)


def build_model(args, meta):
    """Frozen backbone + the cell of the genotype (or a baseline skip) in every skip level. The cell's backbone is
    the one it was searched on (genotype.json records its path and weights hash): another is refused unless
    --allow_other_backbone."""
    genotype = None
    if args.skip == "iac":
        if not args.genotype:
            raise InputError("--genotype is required with --skip iac")
        genotype = load_genotype(require_file(args.genotype, "--genotype", "the genotype.json of 03_search.py"))
        args.backbone = args.backbone or genotype.get("search", {}).get("backbone")
    if not args.backbone:
        raise InputError("--backbone is required (" + ("the genotype does not record the backbone it was searched on"
                                                       if genotype else f"--skip {args.skip}") + ")")
    model, ckpt = load_frozen_backbone(args.backbone, meta)
    args.backbone_sha256 = weights_hash(ckpt["model"])                # recorded in args.json
    if args.skip != "iac":
        model.set_skips(build_skips(args.skip, model.skip_channels, model.up_channels, None))
        model.config = {**model.config, "skip": args.skip}
        return model
    args.backbone_note = check_searched_backbone(genotype, args.backbone, args.backbone_sha256,
                                                 args.allow_other_backbone)
    geometry = genotype.get("search", {}).get("geometry", {})
    if geometry and (geometry["skip_channels"] != model.skip_channels or geometry["up_channels"] != model.up_channels):
        raise InputError(f"{args.genotype} was searched on another backbone (skip channels "
                         f"{geometry['skip_channels']}, this one has {model.skip_channels})")
    cell_channels = geometry.get("cell_channels")
    args.init = args.init or ("theta0" if genotype.get("search", {}).get("mode") == "lth" else "fresh")
    skips = IACSkips(genotype, model.skip_channels, model.up_channels, cell_channels, output=args.cell_output)
    if args.init == "theta0":                    # IAC-LTH: reset the found cell to its weights at search start
        load_theta0_into(skips, args.theta0 or os.path.join(os.path.dirname(args.genotype), "theta0.pt"))
        # (a residual cell's output conv stays at zero: init_from_theta0 starts it at the identity skip)
    model.set_skips(skips)
    model.config = {**model.config, **cell_config(genotype, cell_channels, args.cell_output)}
    return model


def trainable_parameters(model):
    return model.skips.parameters()


def main(args):
    device, amp, channels_last, meta, splits, last = setup_run(args, "run")

    model = build_model(args, meta).to(device)
    for path, flag in ((args.backbone, "--backbone"), (args.genotype, "--genotype")):
        if path:
            require_done(path, flag, args.allow_unfinished)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=args.lr)
    start_epoch, best, position = 0, (-math.inf, -1), None
    if args.resume:
        start_epoch, best, position = resume_training(last, "finetune", model, optimizer, device)
        print(f"resuming from epoch {start_epoch}" + (f", after step {position['done']}" if position else "")
              + f" (best Dice {best[0]:.4f} at epoch {best[1]})")
    write_args(args)

    train_set = SliceDataset(args.data, splits["train"], meta=meta)
    note = getattr(args, "backbone_note", "")
    print(f"backbone {args.backbone} (weights sha256 {args.backbone_sha256})" + (f"; {note}" if note else ""))
    print(f"frozen {model.config['encoder']} U-Net, training {args.skip} skips ({args.init or 'fresh'} init, "
          f"{sum(p.numel() for p in trainable_parameters(model)):,} parameters), {len(train_set)} training slices, "
          f"device {device}")
    if fit(args, model, optimizer, SegLoss(), train_set, meta, splits, device, amp, channels_last, "finetune",
           start_epoch, best, position):
        mark_done(args.out, "04_finetune", epochs=args.epochs)


if __name__ == "__main__":
    cli(main, get_args)
