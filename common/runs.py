"""A run folder's life, made safe for schedulers that stop and requeue jobs (SLURM, grid.py).

    done.json      written atomically as a stage's very last act; a run without it is unfinished
                   (stopped by --stop_after, a time limit, a crash) and stages 03-05 refuse it as input
                   unless --allow_unfinished
    --resume auto  continue when RUN/ckpt_last.pt is there, start otherwise, do nothing when RUN/done.json
                   is there: the same command line is right on the first start and on every requeue
    SIGUSR1/SIGTERM  (SLURM's warning before a time limit, preemption, scancel) end the stage at the next
                   step with exit code REQUEUE_EXIT; the checkpoint of the last finished epoch (written
                   atomically after every epoch) is where --resume auto continues: at most one epoch is redone
"""
import json
import os
import signal
import time

from common.utils import InputError, atomic_write_json

DONE = "done.json"
REQUEUE_EXIT = 75                       # EX_TEMPFAIL: "try again"; grid.py and its SLURM jobs requeue on it


class AlreadyDone(Exception):
    """--resume auto / --resume on a finished run: nothing to do (exit code 0)."""


class Preempted(Exception):
    """A stop signal arrived; the stage leaves with REQUEUE_EXIT."""


_signal = {"name": None}


def _on_signal(signum, _frame):
    _signal["name"] = signal.Signals(signum).name


def install_stop_signals():
    """SIGUSR1 and SIGTERM only set a flag; check_stop() raises at the next step boundary, so no checkpoint
    or log line is ever cut in half."""
    _signal["name"] = None
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def check_stop():
    if _signal["name"]:
        raise Preempted(_signal["name"])


def resolve_resume(args, last):
    """--resume [yes|auto] -> bool. auto: continue when `last` exists, start otherwise. A run whose done.json
    says it finished these --epochs: AlreadyDone with either spelling (a requeued finished job does nothing);
    asked for more epochs, it is unfinished again until they end."""
    if args.resume and is_done(args.out):
        if read_done(args.out).get("epochs") == args.epochs:
            raise AlreadyDone(f"{args.out} is finished ({DONE}, {args.epochs} epochs); nothing to do")
        os.remove(os.path.join(args.out, DONE))
    if args.resume == "auto":
        return os.path.exists(last)
    return bool(args.resume)


def mark_unfinished(folder):
    """A stage that (re)starts writing into `folder` removes an old done.json first: until it ends, the folder
    holds an unfinished run (an --overwrite interrupted half-way must not pass for the old, finished one)."""
    path = os.path.join(folder, DONE)
    if os.path.isfile(path):
        os.remove(path)


def add_unfinished_flag(p):
    p.add_argument("--allow_unfinished", action="store_true",
                   help=f"take input runs without {DONE} (stopped early, or made before done.json existed)")


def is_done(folder):
    return os.path.isfile(os.path.join(folder, DONE))


def mark_done(folder, stage, **summary):
    """The very last act of a stage: RUN/done.json (atomic) with what it finished."""
    atomic_write_json(os.path.join(folder, DONE), {"stage": stage, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                   **summary})


def require_done(path, flag, allow_unfinished):
    """The run folder holding `path` (a file or a folder) must be finished. Returns the folder."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not allow_unfinished and not is_done(folder):
        raise InputError(f"{flag} {path}: the run {folder} is unfinished (no {DONE}: stopped by --stop_after, a "
                         "time limit or a crash, or made before done.json existed); finish it with --resume auto, "
                         "or pass --allow_unfinished to use it as it is")
    return folder


def read_done(folder):
    with open(os.path.join(folder, DONE)) as f:
        return json.load(f)
