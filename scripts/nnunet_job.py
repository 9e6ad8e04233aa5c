r"""One nnU-Net step of grid.py's nnU-Net track as a grid job: run its command, and make it requeue-safe.

    python scripts/nnunet_job.py --out JOB --env nnUNet_results=... [--env K=V ...] --expect FILE \
        [--train] [--predict IMAGES OUT] -- nnUNetv2_train 501 2d 0 -tr nnUNetTrainerIACRef --c

The command runs with the given environment (nnUNet_raw / _preprocessed / _results, IAC_*), its output in
JOB/grid.log (the grid runner's). It is done when it exits 0 and leaves --expect (a trained fold's
checkpoint_final.pth, a search's genotype.json, a plans file, ...): then JOB/done.json. Where --expect is there
already (a step finished before a kill took the job), nothing runs, unless --always (planning, which writes its
plans before it preprocesses).

Stopping (a SLURM time limit's warning, a preemption, the grid runner, Ctrl-C): USR1, USR2 and TERM
(common/runs.py), INT and HUP reach this process. The step never outlives it: it is killed with its process group
when this process leaves, and by the kernel when this process is killed (Linux's parent-death signal). --train: the
command is one of this project's nnU-Net trainers, which stop by themselves at the next step with exit 75 after
their last saved epoch (IAC_SAVE_EVERY=1 under the grid: at most one epoch is redone), and `--c` in the same command
continues; the signal is passed on to it (it may have come to this process alone) and its exit awaited. Any other
command (conversion, planning, prediction) is killed with its process group and runs again from the start. Either
way the job exits 75 (requeue). --predict IMAGES OUT: the command writes into OUT.partial (cleared first), renamed
to OUT once every case of IMAGES (nnU-Net's CASE_0000.nii.gz) has its prediction, so a killed prediction never
passes for a finished one.
"""
import argparse
import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.runs import (REQUEUE_EXIT, _signal, block_stop_signals, install_stop_signals, is_done,  # noqa: E402
                         mark_done)
from common.utils import HelpFormatter  # noqa: E402

STOP_WAIT_S = 60                        # a trainer stops within one step; longer, and it is killed


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--out", required=True, help="the grid job's folder (done.json, grid.log) (required)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="an environment variable (repeatable)")
    p.add_argument("--expect", required=True, help="the file the step leaves when it has finished (required)")
    p.add_argument("--always", action="store_true",
                   help="run the command even where --expect is there (a step that writes it before it ends)")
    p.add_argument("--train", action="store_true",
                   help="the command is a trainer of nnunet_iac: pass a stop signal on and await its exit 75")
    p.add_argument("--predict", nargs=2, default=None, metavar=("IMAGES", "OUT"),
                   help="the command predicts IMAGES into OUT.partial; renamed to OUT once every case is there")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    a = p.parse_args(argv)
    a.command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not a.command:
        p.error("no command after --")
    return a


def cases_of(images):
    """nnU-Net's case ids in an images folder (CASE_0000.nii.gz ...)."""
    return sorted({f[:-len("_0000.nii.gz")] for f in os.listdir(images) if f.endswith("_0000.nii.gz")})


def finish(a):
    """After exit 0: the prediction renamed into place, then the expected file checked; done.json or an error."""
    if a.predict:
        images, out = a.predict
        partial = out + ".partial"
        missing = [c for c in cases_of(images) if not os.path.isfile(os.path.join(partial, f"{c}.nii.gz"))]
        if missing:
            return f"the prediction lacks {len(missing)} case(s) of {images} ({', '.join(missing[:3])})"
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(partial, out)
    if not os.path.exists(a.expect):
        return f"the command exited 0 but {a.expect} is not there"
    mark_done(a.out, "nnunet_job", expect=a.expect, command=" ".join(a.command))
    return None


def main(a):
    os.makedirs(a.out, exist_ok=True)
    if is_done(a.out):
        print(f"{a.out} is done; nothing to do")
        return 0
    install_stop_signals(also=(signal.SIGINT, signal.SIGHUP))   # Ctrl-C on a local runner, a closed terminal
    if os.path.exists(a.expect) and not (a.predict or a.always):
        print(f"{a.expect} is there already: the step finished before this job was stopped")
        return 1 if finish(a) else 0
    if a.predict:
        shutil.rmtree(a.predict[1] + ".partial", ignore_errors=True)
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in a.env))
    print(f"nnunet_job: {' '.join(a.env)} {' '.join(a.command)}", flush=True)
    child = subprocess.Popen(a.command, env=env, start_new_session=True, preexec_fn=lambda: child_setup(a.train))
    try:
        rc = await_child(a, child)
    finally:                                         # never a step left running without its job
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    if rc != 0 and (_signal["name"] or rc == REQUEUE_EXIT):  # (a step that ended before the signal is done)
        print(f"exit {rc}: requeue (exit {REQUEUE_EXIT}); the same job continues", flush=True)
        return REQUEUE_EXIT
    if rc != 0:
        print(f"error: {a.command[0]} exited {rc}", flush=True)
        return rc if rc > 0 else 1
    why = finish(a)
    if why:
        print(f"error: {why}", flush=True)
        return 1
    return 0


def child_setup(train):
    """In the step's process before exec: it dies with this job (SIGKILL when this process goes, whatever ends it:
    Linux's parent-death signal), and a trainer starts with the stop signals blocked until it handles them."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)                    # PR_SET_PDEATHSIG
    if train:
        block_stop_signals()


def await_child(a, child):
    """Wait for the step; on a stop signal pass it on to a trainer (or kill any other step's process group)."""
    told = None
    while child.poll() is None:
        if _signal["name"] and told is None:
            told = time.time()
            if a.train:                              # (SLURM signals it too; one more changes nothing)
                print(f"stopped by {_signal['name']}: the trainer stops after its step in progress", flush=True)
                child.send_signal(signal.SIGUSR1)
            else:
                print(f"stopped by {_signal['name']}: this step runs again from its start", flush=True)
                os.killpg(child.pid, signal.SIGKILL)
        if told is not None and time.time() - told > STOP_WAIT_S:
            print(f"the trainer did not stop within {STOP_WAIT_S} s; killing it", flush=True)
            os.killpg(child.pid, signal.SIGKILL)
            told = float("inf")
        time.sleep(0.2)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(get_args()))
