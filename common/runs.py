"""A run folder's life, made safe for schedulers that stop and requeue jobs (SLURM, grid.py).

    done.json      written atomically as a stage's very last act; a run without it is unfinished
                   (stopped by --stop_after, a time limit, a crash); stage II (03), stage III (04) and
                   evaluation (05) refuse it as input unless --allow_unfinished
    --resume auto  continue when RUN/ckpt_last.pt is there, start otherwise, do nothing when RUN/done.json
                   is there: the same command line is right on the first start and on every requeue
    SIGUSR1/SIGUSR2/SIGTERM  (SLURM's warning before a time limit: submitit asks for USR2 and SLURM sends it
                   to every process of the job step, this stage included; preemption, scancel, `scontrol
                   requeue`: TERM) end the stage at the next step with exit code REQUEUE_EXIT; the checkpoint of
                   the last finished epoch (written atomically after every epoch) is where --resume auto
                   continues: at most one epoch is redone. IAC_STOP_SIGNALS=USR1,HUP,... replaces the list
                   (a scheduler configured with another signal)
"""
import atexit
import json
import os
import signal
import sys
import time

from common.utils import InputError, NonFiniteLoss, atomic_write_json, run_metadata

DONE = "done.json"
REQUEUE_EXIT = 75                       # EX_TEMPFAIL: "try again"; grid.py and its SLURM jobs requeue on it


class AlreadyDone(Exception):
    """--resume auto / --resume on a finished run: nothing to do (exit code 0)."""


class Preempted(Exception):
    """A stop signal arrived; the stage leaves with REQUEUE_EXIT."""


STOP_SIGNALS = ("USR1", "USR2", "TERM")
_signal = {"name": None}


def _on_signal(signum, _frame):
    _signal["name"] = _signal["name"] or signal.Signals(signum).name          # the first one says who stopped it


def stop_signals(env=None):
    """The signals that stop a stage: USR1, USR2, TERM and submitit's $SUBMITIT_PREEMPT_SIGNAL, or the list in
    $IAC_STOP_SIGNALS (names, SIG optional)."""
    env = env if env is not None else os.environ
    names = env.get("IAC_STOP_SIGNALS") or ",".join((*STOP_SIGNALS, env.get("SUBMITIT_PREEMPT_SIGNAL", "")))
    out = []
    for name in filter(None, (n.strip().upper() for n in names.split(","))):
        try:
            sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
            if sig not in out:
                out.append(sig)
        except KeyError:
            raise InputError(f"IAC_STOP_SIGNALS={names}: {name} is not a signal name (e.g. USR1,USR2,TERM)") from None
    return out


def _stop_now(signum, _frame):
    print(f"stopped by {signal.Signals(signum).name}: nothing of this stage is kept (its outputs are written "
          f"atomically); the same command runs it again (exit code {REQUEUE_EXIT}: requeue)", file=sys.stderr,
          flush=True)
    os._exit(REQUEUE_EXIT)


def install_stop_signals(immediate=False, also=()):
    """The stop signals only set a flag; check_stop() raises at the next step boundary, so no checkpoint or log
    line is cut in half by a stop (a SIGKILL still can: JSONL readers drop a truncated last line). immediate (a
    stage without checkpoints: 01, 05): leave at once with REQUEUE_EXIT. also: more signals that stop this process
    the same way (scripts/nnunet_job.py: Ctrl-C's INT, a closed terminal's HUP).

    Then the stop signals are unblocked: grid.py starts every stage with them blocked (block_stop_signals), so
    one that arrives while Python and torch are still importing waits, pending, until here instead of killing
    the stage (a signal's default action) before it could stop cleanly."""
    _signal["name"] = None
    sigs = stop_signals()
    for sig in (*sigs, *also):
        signal.signal(sig, _stop_now if immediate else _on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


def block_stop_signals():
    """Popen(preexec_fn=...) of a stage: the stop signals start blocked (the mask survives exec); the stage's
    install_stop_signals() unblocks them once it can handle them, and one sent meanwhile is delivered then."""
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals())


def check_stop():
    if _signal["name"]:
        raise Preempted(_signal["name"])


def cli(main, get_args, argv=None):
    """Run a stage's main(get_args(argv)); bad input (InputError: genotype files are checked into it by
    common/checkpoints.py) or a diverged loss ends it with one line `error: ...` on stderr and exit code 1, not a
    traceback; a stop signal with REQUEUE_EXIT."""
    try:
        main(get_args(argv))
    except (InputError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except AlreadyDone as e:
        print(e)
    except Preempted as e:
        print(f"stopped by {e}: the last finished epoch is checkpointed; the same command with --resume auto "
              f"continues from it (exit code {REQUEUE_EXIT}: requeue)", file=sys.stderr)
        sys.exit(REQUEUE_EXIT)


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
    """The very last act of a stage: RUN/done.json (atomic) with what it finished; from then on a stop signal can
    no longer turn its exit into a kill (ignore_stop_signals_at_exit)."""
    atomic_write_json(os.path.join(folder, DONE), {"stage": stage, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                   **summary})
    ignore_stop_signals_at_exit()


def ignore_stop_signals_at_exit():
    """A stage whose work is done must not be killed while it exits: Python gives a handled signal back its default
    action (to end the process) as it shuts down, so SLURM's warning arriving then made a finished run read as
    stopped by a signal (exit -12) instead of exit 0. The stop signals are ignored from the interpreter's exit on
    (atexit runs before the handlers are reset), not at once: an ignored signal stays ignored in every process
    started afterwards, and a multiprocessing pool's workers, which terminate() stops with TERM, would then never
    end (nnU-Net's validation and planning pools hung so). Until the exit, a signal only sets the stop flag."""
    if not _signal.get("at_exit"):
        _signal["at_exit"] = True
        atexit.register(_ignore_stop_signals)


def _ignore_stop_signals():
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)


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


def write_args(args):
    """RUN/args.json (common.utils.run_metadata). On a resume, the commits the run was made with are kept in
    `commits`, and a resume with another commit than the last (a requeued job after a `git pull`, a dirty tree)
    is said loudly: the run then mixes two versions of the code."""
    path = os.path.join(args.out, "args.json")
    meta = run_metadata(args)
    now = meta["versions"].get("git_commit")
    old = {}
    if getattr(args, "resume", False) and os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError):
            old = {}
    commits = old.get("commits") or ([old["versions"].get("git_commit")] if old.get("versions") else [])
    if commits and commits[-1] != now:
        print(f"WARNING: {args.out} was started with commit {commits[-1]} and is resumed with {now}: this run "
              "mixes two versions of the code (args.json lists them under 'commits'); start it over with "
              "--overwrite for a clean result", file=sys.stderr, flush=True)
    meta["commits"] = commits if commits and commits[-1] == now else commits + [now]
    atomic_write_json(path, meta)
    return meta
