"""Training and case-level evaluation loops shared by 02_pretrain.py, 03_search.py and 04_finetune.py."""
import math
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.backbones import build_unet
from common.data import collate, iter_cases, load_splits, read_meta
from common.iac import NODES, IACSkips
from common.skips import build_skips
from common.metrics import CaseDice, mean_foreground
from common.utils import autocast, load_checkpoint, pick_device, seed_everything


class NonFiniteLoss(RuntimeError):
    pass


def setup_run(args, what):
    """The opening every training stage shares: device, seeding, precision flags, data and run folder.

    Returns device, amp, channels_last, meta, splits and RUN/ckpt_last.pt; refuses to start over a
    run folder that already holds `what` unless --resume or --overwrite."""
    device = pick_device(args.device)
    seed_everything(args.seed, args.deterministic)
    amp, channels_last = args.amp and device.type == "cuda", args.channels_last and device.type == "cuda"
    meta = read_meta(args.data)
    splits = load_splits(args.splits, meta)
    os.makedirs(args.out, exist_ok=True)
    last = os.path.join(args.out, "ckpt_last.pt")
    if os.path.exists(last) and not (args.resume or args.overwrite):
        raise SystemExit(f"error: {args.out} already holds a {what}; pass --resume to continue or --overwrite")
    return device, amp, channels_last, meta, splits, last


def make_loader(dataset, batch_size, shuffle, generator=None, workers=0, device=None):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      drop_last=False, pin_memory=device is not None and device.type == "cuda", collate_fn=collate)


def to_device(x, y, device, channels_last):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True).long()          # uint8 labels become int64 on the device


def check_finite(loss, epoch, step):
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"training loss became {loss} at epoch {epoch}, step {step}; the last good "
                            "checkpoints are kept. Lower --lr or check the data for extreme values.")


def train_epoch(model, loader, loss_fn, optimizer, device, amp, channels_last, epoch, desc="train"):
    """One pass over `loader`; returns the mean loss."""
    model.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=f"{desc} {epoch}", leave=False, unit="batch", disable=None)
    for step, (x, y) in enumerate(bar):
        x, y = to_device(x, y, device, channels_last)
        with autocast(device, amp):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        check_finite(value, epoch, step)
        total += value * len(x)
        n += len(x)
        bar.set_postfix(loss=f"{value:.4f}")
    return total / max(n, 1)


@torch.no_grad()
def predict_stack(model, images, device, amp, channels_last, batch_size=64):
    """(Z, C, H, W) numpy -> (Z, H, W) uint8 argmax labels."""
    model.eval()
    out = []
    for a in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[a:a + batch_size])).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out.append(model(x).argmax(1).to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def evaluate_cases(model, h5_path, case_ids, num_classes, device, amp=False, channels_last=False, keep_pred=False):
    """Patient-level Dice for each case -> ({case: dice (K-1,)}, mean foreground Dice, predictions)."""
    per_case, preds = {}, {}
    for case, images, labels in iter_cases(h5_path, case_ids):
        pred = predict_stack(model, images, device, amp, channels_last)
        acc = CaseDice(num_classes)
        acc.update(pred, labels)
        per_case[case] = acc.dice()
        if keep_pred:
            preds[case] = pred
    means = [mean_foreground(d) for d in per_case.values()]
    score = float(np.nanmean(means)) if np.any(~np.isnan(means)) else float("nan")
    return per_case, score, preds


class EpochTimer:
    """ETA from the mean epoch time so far."""

    def __init__(self, total_epochs, start_epoch):
        self.total, self.start, self.t0 = total_epochs, start_epoch, time.time()

    def eta(self, epoch):
        done = epoch - self.start + 1
        per = (time.time() - self.t0) / max(done, 1)
        left = per * (self.total - epoch - 1)
        return f"{int(left // 60)}m{int(left % 60):02d}s"


def load_frozen_backbone(path, meta):
    """A stage I checkpoint -> its U-Net with the backbone frozen (on CPU) and the checkpoint;
    refuses a backbone trained on another data set."""
    ckpt = load_checkpoint(path, "pretrain", map_location="cpu")
    if ckpt["data"]["dataset"] != meta["dataset"] or ckpt["data"]["class_names"] != meta["class_names"]:
        raise SystemExit(f"error: {path} was trained on {ckpt['data']['dataset']} {ckpt['data']['class_names']}, "
                         f"the data is {meta['dataset']} {meta['class_names']}")
    model = build_unet(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    model.freeze_backbone()
    return model, ckpt


def model_from_checkpoint(ckpt):
    """Rebuild a trained model from a stage I (pretrain) or stage III (finetune) checkpoint."""
    cfg = ckpt["config"]
    if ckpt["kind"] == "pretrain":
        model = build_unet(cfg)
    else:
        model = build_unet({**cfg, "skip": "ref"})
        if cfg["skip"] == "iac":
            genotype = {"edges": cfg["genotype"], "concat": list(NODES)}
            model.set_skips(IACSkips(genotype, model.skip_channels, model.up_channels, cfg.get("cell_channels")))
        else:
            model.set_skips(build_skips(cfg["skip"], model.skip_channels, model.up_channels, None))
    model.load_state_dict(ckpt["model"])
    return model
