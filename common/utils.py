"""Run-folder plumbing shared by the stages: devices, seeding, atomic files, checkpoints, logs.

No global state: every function takes what it needs. `rank` arguments default to 0 so
the same calls work under torchrun later (only rank 0 writes).
"""
import argparse
import json
import os
import platform
import random
import sys
import time

import numpy as np
import torch


def add_run_flags(p):
    """The flags every training stage (02, 03, 04) shares: seed, device, precision, run folder, resume."""
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True, help="channels_last on CUDA")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from RUN/ckpt_last.pt")
    p.add_argument("--stop_after", type=int, default=None,
                   help="leave after this many epochs of this invocation (job time limits); continue with --resume")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that has checkpoints")


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for but CUDA is not available")
    return torch.device(name)


def seed_everything(seed, deterministic=False):
    """The one seeding block (CleanRL style)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def epoch_generator(seed, epoch):
    """Per-epoch RNG for shuffling: a resumed run sees the same order as an unbroken one."""
    return torch.Generator().manual_seed(seed * 100003 + epoch)


def run_metadata(args):
    return {"args": vars(args), "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                             "numpy": np.__version__, "platform": platform.platform()},
            "seed": getattr(args, "seed", None), "command": " ".join(sys.argv),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def atomic_write_json(path, obj, rank=0):
    if rank != 0:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def atomic_torch_save(obj, path, rank=0):
    if rank != 0:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kind, map_location="cpu"):
    """torch.load(weights_only=True) with a clear message for missing, corrupt or foreign files.

    `kind` is the stage that wrote it ("pretrain", "search", "finetune", "theta0") or a tuple of them."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle error, foreign format: all mean "not ours"
        raise SystemExit(f"error: cannot read checkpoint {path} ({type(e).__name__}: {e}); "
                         "it is corrupt or was not written by this project") from e
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in kinds:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path} is not a {' or '.join(kinds)} checkpoint of this project (found {found!r})")
    return ckpt


class JsonlLog:
    """Append-only JSON-lines log; on resume it drops lines past the resumed epoch."""

    def __init__(self, path, resume_epoch=None, rank=0):
        self.path, self.rank = path, rank
        if rank != 0:
            return
        if resume_epoch is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("epoch", -1) <= resume_epoch]
            with open(path, "w") as f:
                f.writelines(keep)

    def write(self, record):
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def autocast(device, enabled):
    """bf16 autocast on CUDA when enabled; a no-op context on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")
