"""Loop plumbing shared by the training stages: run setup, loaders, one training epoch, patient-level
validation, the stage I / III epoch loop (`fit`) and ETAs. Checkpoint files: common/checkpoints.py."""
import math
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.checkpoints import save_checkpoint, training_checkpoint
from common.data import collate, iter_cases, load_splits, read_meta
from common.metrics import CaseDice, mean_foreground
from common.runs import check_stop, install_stop_signals, mark_unfinished, resolve_resume
from common.utils import (InputError, JsonlLog, NonFiniteLoss, autocast, copy_to_local, default_workers,
                          epoch_generator, peak_gpu_mib, pick_device, precision, seed_everything)


def setup_run(args, what):
    """The opening every training stage shares: device, seeding, precision flags, data and run folder.

    Returns device, amp, channels_last, meta, splits and RUN/ckpt_last.pt; refuses to start over a
    run folder that already holds `what` unless --resume or --overwrite."""
    meta = read_meta(args.data)                                    # bad paths fail before anything else
    splits = load_splits(args.splits, meta)
    device = pick_device(args.device)
    if args.workers is None:
        args.workers = default_workers(device)
    if args.local_data:                                            # node-local copy; args.json keeps both paths
        args.data_original, args.data = args.data, copy_to_local(args.data, args.local_data)
    seed_everything(args.seed, args.deterministic)
    amp, channels_last = precision(args, device)
    last = os.path.join(args.out, "ckpt_last.pt")
    args.resume = resolve_resume(args, last)
    install_stop_signals()
    if os.path.exists(last) and not (args.resume or args.overwrite):
        raise InputError(f"{args.out} already holds a {what}; pass --resume to continue or --overwrite")
    if args.resume and not os.path.exists(last):
        raise InputError(f"--resume: {args.out} holds no ckpt_last.pt to continue from; drop --resume to start")
    os.makedirs(args.out, exist_ok=True)
    mark_unfinished(args.out)
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


def rng_state():
    """The RNG state a mid-epoch checkpoint keeps (CPU, and CUDA where there is one)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """rng_state() back. The states must be CPU byte tensors: a checkpoint resumed on CUDA is loaded with
    map_location=cuda, which moves them to the GPU (set_rng_state then fails), so they are brought back here."""
    torch.set_rng_state(state["cpu"].to("cpu", torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in state["cuda"]])


def resume_iterator(loader, position, each=None):
    """The epoch's loader (same order: the same per-epoch generator), its first `position["done"]` batches
    skipped (read, not trained on; `each()` after every skipped one, e.g. the full search's val batch) and the
    RNG as the mid-epoch checkpoint left it."""
    it = iter(loader)
    for _ in range(position["done"] if position else 0):
        next(it)
        if each:
            each()
    if position:
        set_rng_state(position["rng"])
    return it


def step_saver(every, n_steps, save):
    """--ckpt_every_steps: a callback(step, sums) that saves a mid-epoch position every `every` steps (not after
    the last step of the epoch, whose end-of-epoch checkpoint follows), or None."""
    if not every:
        return None

    def on_step(done, sums):
        if done % every == 0 and done < n_steps:
            save({"done": done, "sums": dict(sums), "rng": rng_state()})
    return on_step


def train_epoch(model, loader, loss_fn, optimizer, device, amp, channels_last, epoch, desc="train", position=None,
                on_step=None):
    """One pass over `loader`; returns the mean loss. `position`: a mid-epoch checkpoint's place to continue
    from; `on_step(done, sums)` after every step (step_saver)."""
    model.train()
    sums = dict(position["sums"]) if position else {"total": 0.0, "n": 0}
    skip = position["done"] if position else 0
    bar = tqdm(resume_iterator(loader, position), desc=f"{desc} {epoch}", leave=False, unit="batch",
               disable=None, total=len(loader), initial=skip)
    for step, (x, y) in enumerate(bar, start=skip):
        check_stop()                                         # a stop signal (common/runs.py): leave before this step
        x, y = to_device(x, y, device, channels_last)
        with autocast(device, amp):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        check_finite(value, epoch, step)
        sums["total"] += value * len(x)
        sums["n"] += len(x)
        bar.set_postfix(loss=f"{value:.4f}")
        if on_step:
            on_step(step + 1, sums)
    return sums["total"] / max(sums["n"], 1)


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


def evaluate_cases(model, h5_path, case_ids, num_classes, device, amp=False, channels_last=False, meta=None,
                   desc="validate"):
    """Patient-level Dice for each case on its slice stack -> ({case: dice (K-1,)}, mean foreground Dice)."""
    per_case = {}
    for case, images, labels in iter_cases(h5_path, case_ids, meta, desc):
        acc = CaseDice(num_classes)
        acc.update(predict_stack(model, images, device, amp, channels_last), labels)
        per_case[case] = acc.dice()
    means = [mean_foreground(d) for d in per_case.values()]
    score = float(np.nanmean(means)) if np.any(~np.isnan(means)) else float("nan")
    return per_case, score


class EpochTimer:
    """ETA from the mean epoch time so far, to the last epoch (`end`: the expected one when it is known
    to come before the cap, as in an LTH search)."""

    def __init__(self, total_epochs, start_epoch):
        self.total, self.start, self.t0 = total_epochs, start_epoch, time.time()

    def eta(self, epoch, end=None):
        done = epoch - self.start + 1
        per = (time.time() - self.t0) / max(done, 1)
        left = per * ((end or self.total) - epoch - 1)
        return f"{int(left // 60)}m{int(left % 60):02d}s"


def add_fit_flags(p):
    """Flags of the epoch loop of stages I and III."""
    p.add_argument("--val_every", type=int, default=1, metavar="N",
                   help="validate (patient-level Dice on the val cases, which picks ckpt_best.pt) every N epochs and "
                        "after the last")


def fit(args, model, optimizer, loss_fn, train_set, meta, splits, device, amp, channels_last, kind, start_epoch, best,
        position=None):
    """Stages I and III: train `args.epochs` epochs; after each, patient-level mean foreground Dice on the val
    cases, RUN/ckpt_last.pt, RUN/ckpt_best.pt (best Dice so far) and a line of RUN/log.jsonl; with
    --ckpt_every_steps also RUN/ckpt_last.pt inside the epoch (`position`: where a resume continues). Returns
    False when --stop_after ended it early."""
    last, best_path = os.path.join(args.out, "ckpt_last.pt"), os.path.join(args.out, "ckpt_best.pt")
    log = JsonlLog(os.path.join(args.out, "log.jsonl"), resume_epoch=start_epoch - 1 if args.resume else None)
    timer = EpochTimer(args.epochs, start_epoch)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        torch.manual_seed(args.seed * 1000 + epoch)          # per-epoch seeding: exact resume
        loader = make_loader(train_set, args.batch_size, True, epoch_generator(args.seed, epoch), args.workers, device)
        save = (lambda pos, e=epoch: save_checkpoint({**training_checkpoint(kind, model, optimizer, e - 1, args, best,
                                                                            meta), "position": pos}, last))
        on_step = step_saver(args.ckpt_every_steps, len(loader), save)
        train_loss = train_epoch(model, loader, loss_fn, optimizer, device, amp, channels_last, epoch,
                                 position=position if epoch == start_epoch else None, on_step=on_step)
        validate = (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs     # --val_every N, and the last
        val_dice = None
        if validate:
            _, val_dice = evaluate_cases(model, args.data, splits["val"], model.config["num_classes"], device, amp,
                                         channels_last, meta=meta)
        improved = validate and (val_dice > best[0] or best[1] < 0)
        if improved:
            best = (val_dice, epoch)
        state = training_checkpoint(kind, model, optimizer, epoch, args, best, meta)
        if improved:                                     # best before last: a kill between the two leaves a
            save_checkpoint(state, best_path)            # last that redoes this epoch, never one that names a
        save_checkpoint(state, last)                     # best epoch whose checkpoint is not on disk
        seconds = time.time() - t0
        log.write({"epoch": epoch, "train_loss": train_loss, "val_dice": val_dice, "best_dice": best[0],
                   "best_epoch": best[1], "seconds": seconds, "peak_gpu_mib": peak_gpu_mib(device)})
        shown = "  -   " if val_dice is None else f"{val_dice:.4f}"
        print(f"epoch {epoch + 1}/{args.epochs}  loss {train_loss:.4f}  val Dice {shown}  "
              f"(best {best[0]:.4f} @ {best[1] + 1})  {seconds:.1f}s  ETA {timer.eta(epoch)}", flush=True)
        if stop_early(args, epoch, start_epoch):
            return False
    print(f"done: best validation Dice {best[0]:.4f} at epoch {best[1] + 1}; {best_path}")
    return True


def stop_early(args, epoch, start_epoch):
    """--stop_after N: leave after N epochs of this invocation (a job time limit); --resume continues."""
    if args.stop_after and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < args.epochs:
        print(f"stopping after {args.stop_after} epochs as asked; continue with --resume")
        return True
    return False
