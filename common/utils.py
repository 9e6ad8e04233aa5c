"""Run-folder plumbing shared by the stages: errors, --help, devices, seeding, atomic files, logs.

No global state: every function takes what it needs. Checkpoints live in common/checkpoints.py.
"""
import argparse
import copy
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch


class InputError(ValueError):
    """Bad input from the user (a path, a file, a flag, a value): the message names it and says what
    to do; a stage run from the command line prints it as one line `error: ...` and exits 1."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the stage stops and keeps its last good checkpoints."""


def require_file(path, flag, hint):
    """Refuse a missing input file with one line naming the flag, the path and where it comes from."""
    if not path or not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file ({hint})")
    return path


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every script's --help: the module docstring as written (usage examples keep their lines and backslashes) and
    "(default: X)" after each option's help, X as it is typed (`--crop 256 256` shows "(default: 256 256)"). A flag
    whose default is None or an empty list says in its own words what leaving it out does, so no "(default: None)";
    on/off switches (store_true) show no "(default: False)". Help lines never break at a hyphen or inside a word, so
    values (two-sided) and paths print whole."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0 or (isinstance(action.default, (list, tuple))
                                                           and not action.default):
            return action.help
        return super()._get_help_string(action)

    def _expand_help(self, action):
        if isinstance(action.default, (list, tuple)) and action.default:
            action = copy.copy(action)
            action.default = " ".join(map(str, action.default))
        return super()._expand_help(action)

    def _split_lines(self, text, width):
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False,
                             break_long_words=False)


SWITCH = ("auto", "on", "off")


def add_device_flags(p):
    """--device and the precision switches --amp and --channels_last: auto (on with CUDA, off on the CPU), on (also on
    the CPU: torch's CPU autocast has CUDA's bf16 dtype rules, so a CPU run takes the path a GPU run takes), off.
    Each takes its value (`--amp` alone, which meant "on with CUDA" before the switches had three values, is an
    error rather than a silent change); --no-amp, --no-channels_last (--no-channels-last) are `off`."""
    p.add_argument("--device", default="auto",
                   help="where to run: auto (CUDA when a GPU is usable, else the CPU; it says which), cpu, cuda or "
                        "cuda:N")
    p.add_argument("--amp", default="auto", choices=SWITCH,
                   help="bfloat16 mixed precision (torch autocast): auto = on with CUDA, off on the CPU; on = also on "
                        "the CPU; off = float32 throughout")
    p.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="the same as --amp off")
    p.add_argument("--channels_last", "--channels-last", dest="channels_last", default="auto", choices=SWITCH,
                   help="store images and activations channels-last (torch.channels_last memory format, faster "
                        "convolutions on GPUs): auto = on with CUDA, off on the CPU; on = also on the CPU")
    p.add_argument("--no-channels_last", "--no-channels-last", dest="channels_last", action="store_const",
                   const="off", help="the same as --channels_last off")


def switch_on(value, device):
    """An --amp / --channels_last value for `device`: auto is on with CUDA only. (True / False: args.json of runs
    from before the switches had three values, read as auto / off.)"""
    if isinstance(value, bool):
        value = "auto" if value else "off"
    return value == "on" or (value == "auto" and device.type == "cuda")


def precision(args, device, say=print):
    """(bf16 autocast on, channels_last on) for this run on `device` (and cpu_conv_guard for a CPU run with both)."""
    amp, channels_last = switch_on(args.amp, device), switch_on(args.channels_last, device)
    cpu_conv_guard(device, amp, channels_last, say)
    return amp, channels_last


def dilated_depthwise_bf16_ok():
    """Whether this torch's CPU kernels give finite weight gradients for a bf16 channels_last depthwise convolution
    with dilation 2 (the DilConv op). torch 2.14.1's oneDNN kernel does not at some shapes (4 x 2 channels x 32 x 32:
    NaN; benchmarks/RESULTS.md, "The GPU path on the CPU"); torch's native kernel does."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 1, 3, 3, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 2, 32, 32, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w.requires_grad_()
    torch.nn.functional.conv2d(x, w, None, 1, 2, 2, 2).float().square().sum().backward()
    return bool(torch.isfinite(w.grad).all())


def cpu_conv_guard(device, amp, channels_last, say=print):
    """A CPU run with bf16 autocast and channels_last (the GPU path on the CPU): where torch's oneDNN kernel breaks the
    DilConv weight gradients (dilated_depthwise_bf16_ok), oneDNN is switched off for this process, saying so; the
    run then takes torch's native CPU kernels, which are sound. Nothing changes anywhere else."""
    if device.type == "cpu" and amp and channels_last and torch.backends.mkldnn.enabled and \
            not dilated_depthwise_bf16_ok():
        torch.backends.mkldnn.enabled = False
        say(f"warning: torch {torch.__version__}'s oneDNN CPU kernel gives NaN weight gradients for bf16 "
            "channels_last dilated depthwise convolutions; oneDNN is off for this CPU run (--amp on --channels_last on)")


def add_run_flags(p):
    """The flags every training stage (02, 03, 04) shares: seed, device, precision, run folder, resume."""
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the run (initial weights, batch order)")
    p.add_argument("--deterministic", action="store_true",
                   help="use torch's deterministic algorithms where it has them, for reproducible reruns on CUDA "
                        "(slower)")
    add_device_flags(p)
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes that read batches from slices.h5 (0: read in the training "
                        "process) (default: SLURM_CPUS_PER_TASK - 1 under SLURM; else 0 on the CPU, where workers "
                        "take the cores the training needs, and min(8, CPUs - 1) on CUDA)")
    p.add_argument("--local_data", nargs="?", const="$TMPDIR", default=None, metavar="DIR",
                   help="copy slices.h5 to the folder DIR once and read it from there: for a cluster's node-local "
                        "disk (--local_data alone: DIR is $TMPDIR) (default: off, read slices.h5 where it is)")
    p.add_argument("--out", required=True,
                   help="run folder: args.json, log.jsonl, checkpoints and outputs are written there (required)")
    p.add_argument("--resume", nargs="?", const="yes", default=None, choices=["yes", "auto"],
                   help="continue from RUN/ckpt_last.pt; `--resume auto` starts when there is none (the same "
                        "command for the first start and every requeue); either does nothing on a finished run "
                        "(default: off, start a new run; --resume alone is yes)")
    p.add_argument("--stop_after", type=int, default=None,
                   help="leave after this many epochs of this invocation (job time limits); continue with --resume "
                        "(default: run to the last epoch)")
    p.add_argument("--ckpt_every_steps", type=int, default=0, metavar="N",
                   help="also checkpoint every N optimizer steps inside an epoch (0: off), for epochs longer than "
                        "a job's time slice; a resume continues at that step, bit-exact on the CPU")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that has checkpoints (without it or --resume, such a folder is "
                        "refused)")


def default_workers(device, environ=None):
    env = os.environ if environ is None else environ
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(0, int(env["SLURM_CPUS_PER_TASK"]) - 1)
    return 0 if device.type == "cpu" else min(8, max(0, (os.cpu_count() or 1) - 1))


def copy_to_local(path, folder):
    """slices.h5 -> FOLDER/<its own name, made unique by its size and mtime>; copied once (to a temporary name,
    then renamed), reused by later runs on the same node. Returns the local path."""
    folder = os.path.expandvars(folder)
    if not folder or "$" in folder or not os.path.isdir(folder):
        raise InputError(f"--local_data {folder or '$TMPDIR'}: not a folder (set TMPDIR or give a folder)")
    st = os.stat(path)
    local = os.path.join(folder, f"{st.st_size}_{int(st.st_mtime)}_{os.path.basename(path)}")
    if not (os.path.isfile(local) and os.path.getsize(local) == st.st_size):
        tmp = f"{local}.tmp{os.getpid()}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, local)
        print(f"copied {path} to {local}")
    return local


def why_no_cuda():
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "no CUDA GPU is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else
                                       " (no driver, or no GPU on this machine)")


def pick_device(name, say=print):
    """--device -> torch.device. `auto` takes CUDA when a GPU is usable, else the CPU, and says which and
    why; `cuda` / `cuda:N` without that GPU is an InputError, never a silent fall-back to the CPU."""
    try:
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                              "cpu" if name == "auto" else name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: {why_no_cuda()}; use --device cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
        if name == "auto":
            say(f"device: cuda ({torch.cuda.get_device_name(index)}), chosen by --device auto")
    elif name == "auto":
        say(f"device: cpu, chosen by --device auto because {why_no_cuda()}")
    elif device.type != "cpu":
        raise InputError(f"--device {name}: this project runs on cpu or cuda")
    return device


def peak_gpu_mib(device):
    """Peak GPU memory allocated since the last call (MiB, resets the counter); None on the CPU."""
    if device.type != "cuda":
        return None
    mib = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return round(mib)


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


def git_commit():
    """The commit of this project's checkout (with '+dirty' when it has changes), or None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = (lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10))
        head = run("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_PARTITION",
              "SLURM_CPUS_PER_TASK")


def run_metadata(args):
    """args.json: every flag, versions, where and on what it ran (git commit, host, GPU, CUDA, SLURM ids)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"args": vars(args), "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                             "numpy": np.__version__, "platform": platform.platform(),
                                             "cuda": torch.version.cuda, "git_commit": git_commit()},
            "host": platform.node(), "gpu": gpu, "slurm": {k: os.environ[k] for k in SLURM_VARS if k in os.environ},
            "seed": getattr(args, "seed", None), "command": " ".join(sys.argv),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def read_json(path, what):
    """A JSON input file; an unreadable one is an InputError naming `what` (a flag or a file kind) and the path."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{what} {path}: cannot read it as JSON ({e})") from e


def atomic_to_csv(df, path):
    """A pandas table written to a temporary name, then renamed: never a half-written CSV."""
    tmp = f"{path}.tmp{os.getpid()}"
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def atomic_write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class JsonlLog:
    """Append-only JSON-lines log; on resume it drops lines past the resumed epoch."""

    def __init__(self, path, resume_epoch=None):
        self.path = path
        if resume_epoch is None:
            open(path, "w").close()
        elif os.path.exists(path):
            keep = [json.dumps(r) + "\n" for r in read_jsonl(path) if r.get("epoch", -1) <= resume_epoch]
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """The records of a JSON-lines file. A last line cut short (a stage killed inside an append) is dropped with a
    warning: the checkpoint, written atomically, is what a resume trusts. A bad line before the last is an
    InputError naming the file and line."""
    with open(path) as f:
        lines = f.read().split("\n")
    out = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if any(rest.strip() for rest in lines[i + 1:]):
                raise InputError(f"{path}: line {i + 1} is not JSON ({e}); the file is damaged") from e
            print(f"warning: {path}: its last line is cut short (a stage killed while writing it); dropped",
                  file=sys.stderr)
    return out


def autocast(device, enabled):
    """bf16 autocast on `device` (CUDA or the CPU) when enabled (see precision()); otherwise a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
