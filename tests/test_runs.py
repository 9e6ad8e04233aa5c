"""Requeue-safe runs: done.json, --resume auto, unfinished inputs refused, SIGUSR1 -> exit 75 and an exact
continuation, run metadata."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.runs import REQUEUE_EXIT, cli
from common.utils import InputError, default_workers
from conftest import ROOT, data_args

TINY = ["--width", "8", "--batch_size", "16", "--seed", "5", "--device", "cpu"]


def test_done_json_resume_auto_and_unfinished_inputs(tmp_path, scripts, acdc, capsys):
    m, s = scripts["02_pretrain"], scripts["03_search"]
    part, full = str(tmp_path / "part"), str(tmp_path / "full")
    m.main(m.get_args(data_args(acdc) + TINY + ["--epochs", "2", "--stop_after", "1", "--out", part]))
    assert not os.path.exists(os.path.join(part, "done.json"))        # --stop_after: unfinished
    search = ["--backbone", os.path.join(part, "ckpt_best.pt"), *data_args(acdc), "--epochs", "2", "--warmup", "1",
              "--batch_size", "16", "--device", "cpu", "--out", str(tmp_path / "s")]
    with pytest.raises(InputError, match="unfinished .*--resume auto, or pass --allow_unfinished"):
        s.main(s.get_args(search))
    m.main(m.get_args(data_args(acdc) + TINY + ["--epochs", "2", "--resume", "auto", "--out", part]))
    assert json.load(open(os.path.join(part, "done.json")))["stage"] == "02_pretrain"
    cli(m.main, m.get_args, data_args(acdc) + TINY + ["--epochs", "2", "--resume", "auto", "--out", part])
    assert "finished (done.json, 2 epochs); nothing to do" in capsys.readouterr().out
    m.main(m.get_args(data_args(acdc) + TINY + ["--epochs", "2", "--overwrite", "--stop_after", "1", "--out", part]))
    assert not os.path.exists(os.path.join(part, "done.json"))        # starting over: unfinished until it ends
    m.main(m.get_args(data_args(acdc) + TINY + ["--epochs", "1", "--resume", "auto", "--out", full]))   # a start
    meta = json.load(open(os.path.join(full, "args.json")))
    assert meta["args"]["resume"] is False and meta["host"] and "cuda" in meta["versions"]
    assert "git_commit" in meta["versions"] and "slurm" in meta
    m.main(m.get_args(data_args(acdc) + TINY + ["--epochs", "2", "--resume", "--out", full]))       # one more epoch
    assert json.load(open(os.path.join(full, "done.json")))["epochs"] == 2
    assert len(open(os.path.join(full, "log.jsonl")).readlines()) == 2


def test_resume_with_other_code_is_said_and_recorded(tmp_path, scripts, acdc, capsys):
    """args.json keeps the commits a run was made with; a resume with another one warns loudly."""
    m, out = scripts["02_pretrain"], str(tmp_path / "r")
    m.main(m.get_args(data_args(acdc) + TINY + ["--epochs", "1", "--out", out]))
    path = os.path.join(out, "args.json")
    meta = json.load(open(path))
    now = meta["versions"]["git_commit"]
    assert meta["commits"] == [now]
    meta["commits"] = ["0123abc"]                                   # as if started by an older checkout
    json.dump(meta, open(path, "w"))
    capsys.readouterr()
    m.main(m.get_args(data_args(acdc) + TINY + ["--epochs", "2", "--resume", "auto", "--out", out]))
    assert "mixes two versions of the code" in capsys.readouterr().err
    assert json.load(open(path))["commits"] == ["0123abc", now]


def test_workers_default():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_workers(cpu, {}) == 0 and default_workers(cpu, {"SLURM_CPUS_PER_TASK": "9"}) == 8
    assert 0 <= default_workers(gpu, {}) <= 8


def test_sigusr1_stops_with_75_and_resume_auto_continues_exactly(tmp_path, acdc):
    """A stage told to stop (SIGUSR1, SLURM's warning before a time limit) leaves with exit 75, keeps the last
    finished epoch, and the same command line ends with the weights of an unbroken run."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cmd = [sys.executable, os.path.join(ROOT, "02_pretrain.py"), *data_args(acdc), *TINY, "--epochs", "4",
           "--resume", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd + ["--out", a], check=True, capture_output=True, env=env)
    p = subprocess.Popen(cmd + ["--out", b], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = os.path.join(b, "log.jsonl")
    t0 = time.time()
    while not (os.path.exists(log) and open(log).read().count("\n") >= 1) and time.time() - t0 < 120:
        time.sleep(0.02)
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the run ended before the signal arrived")
    assert p.returncode == REQUEUE_EXIT, err
    assert "stopped by SIGUSR1" in err and "--resume auto" in err
    assert not os.path.exists(os.path.join(b, "done.json"))
    r = subprocess.run(cmd + ["--out", b], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "resuming from epoch" in r.stdout
    sa = torch.load(os.path.join(a, "ckpt_last.pt"), weights_only=True)
    sb = torch.load(os.path.join(b, "ckpt_last.pt"), weights_only=True)
    assert sa["epoch"] == sb["epoch"] == 3
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert os.path.exists(os.path.join(b, "done.json"))


def test_val_every_and_local_data(tmp_path, scripts, acdc, monkeypatch):
    """--val_every 2: validation (and the best checkpoint) on epochs 2 and 3 (the last) only; --local_data copies
    slices.h5 once to $TMPDIR and reads it from there, args.json keeps both paths."""
    m = scripts["02_pretrain"]
    local = tmp_path / "node_local"
    local.mkdir()
    monkeypatch.setenv("TMPDIR", str(local))
    out = str(tmp_path / "run")
    m.main(m.get_args(data_args(acdc) + TINY + ["--epochs", "3", "--val_every", "2", "--local_data", "--out", out]))
    log = [json.loads(ln) for ln in open(os.path.join(out, "log.jsonl"))]
    assert [r["val_dice"] is None for r in log] == [True, False, False]
    assert torch.load(os.path.join(out, "ckpt_best.pt"), weights_only=True)["epoch"] in (1, 2)
    copies = list(local.iterdir())
    assert len(copies) == 1 and copies[0].name.endswith("slices.h5")
    args = json.load(open(os.path.join(out, "args.json")))["args"]
    assert args["data"] == str(copies[0]) and args["data_original"] == data_args(acdc)[1]
    with pytest.raises(InputError, match="--local_data"):
        m.main(m.get_args(data_args(acdc) + TINY + ["--epochs", "1", "--local_data", str(tmp_path / "nope"),
                                                   "--out", str(tmp_path / "run2")]))


def stop_at_call(n):
    """A check_stop that raises Preempted at its n-th call (a stop signal in the middle of an epoch)."""
    from common.runs import Preempted
    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] == n:
            raise Preempted("SIGUSR1")
    return check


@pytest.mark.parametrize("stage", ["02_pretrain", "03_search full", "03_search lth"])
def test_ckpt_every_steps_resumes_inside_an_epoch_bit_exact(tmp_path, scripts, acdc, backbone, monkeypatch, stage):
    """--ckpt_every_steps N: stopped in the middle of an epoch, the resume continues at the last saved step (not
    at the epoch's start) and ends with the weights of an unbroken run, on the CPU."""
    from common.runs import Preempted
    name, mode = (stage.split() + [None])[:2]
    m = scripts[name]
    if name == "02_pretrain":
        flags = [*data_args(acdc), *TINY, "--batch_size", "4", "--epochs", "2"]
        target = importlib.import_module("common.engine")                 # where train_epoch finds check_stop
    else:
        flags = ["--backbone", os.path.join(backbone, "ckpt_best.pt"), *data_args(acdc), "--mode", mode,
                 "--batch_size", "8", "--epochs", "2", "--warmup", "1", "--device", "cpu", "--seed", "3"]
        target = m
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    m.main(m.get_args(flags + ["--out", a]))                              # unbroken, 2 epochs
    with monkeypatch.context() as mp:
        calls = {"n": 0}
        mp.setattr(target, "check_stop", lambda: calls.__setitem__("n", calls["n"] + 1))
        m.main(m.get_args(flags + ["--out", str(tmp_path / "count"), "--stop_after", "1"]))
        n_batches = calls["n"]                                            # the steps of one epoch
        assert n_batches >= 4
        stop = n_batches + n_batches // 2 + 2                             # a stop in the middle of the 2nd epoch
        mp.setattr(target, "check_stop", stop_at_call(stop))
        with pytest.raises(Preempted):
            m.main(m.get_args(flags + ["--ckpt_every_steps", "2", "--out", b]))
    ck = torch.load(os.path.join(b, "ckpt_last.pt"), weights_only=True)
    assert ck["epoch"] == 0 and ck["position"]["done"] == 2 * ((stop - n_batches - 1) // 2)   # the last even step
    m.main(m.get_args(flags + ["--ckpt_every_steps", "2", "--resume", "auto", "--out", b]))
    sa = torch.load(os.path.join(a, "ckpt_last.pt"), weights_only=True)
    sb = torch.load(os.path.join(b, "ckpt_last.pt"), weights_only=True)
    key = "model" if name == "02_pretrain" else "skips"
    assert sa["epoch"] == sb["epoch"] == 1 and "position" not in sb
    for k in sa[key]:
        assert torch.equal(sa[key][k], sb[key][k]), k
    la = [json.loads(ln) for ln in open(os.path.join(a, "log.jsonl"))]
    lb = [json.loads(ln) for ln in open(os.path.join(b, "log.jsonl"))]
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]


SHUTS_DOWN = """import sys, tempfile
from common.runs import install_stop_signals, mark_done
install_stop_signals()
if sys.argv[1] == "done":
    mark_done(tempfile.mkdtemp(), "test")
print("ready", flush=True)
"""


def test_a_finished_stage_is_not_killed_by_a_late_stop_signal():
    """SLURM's warning can come while a finished stage exits: Python restores a handled signal's default action as it
    shuts down, and USR2 then kills it (exit -12, a finished run read as stopped; seen on the real-SLURM test). After
    done.json the stop signals are ignored: exit 0 however many arrive. (Without done.json: killed, as before.)"""
    rcs = {}
    for mode in ("running", "done"):
        rcs[mode] = []
        for _ in range(3):
            p = subprocess.Popen([sys.executable, "-c", SHUTS_DOWN, mode], stdout=subprocess.PIPE, text=True)
            p.stdout.readline()
            while p.poll() is None:                      # a signal after every instruction of its shutdown
                try:
                    os.kill(p.pid, signal.SIGUSR2)
                except ProcessLookupError:
                    break
            rcs[mode].append(p.wait())
    assert rcs["done"] == [0, 0, 0] and -signal.SIGUSR2 in rcs["running"], rcs


DONE_THEN_CHILDREN = """import multiprocessing, signal, subprocess, sys, tempfile
from common.runs import install_stop_signals, mark_done
install_stop_signals()
mark_done(tempfile.mkdtemp(), "test")
assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
pool = "import multiprocessing as m\\nwith m.get_context('fork').Pool(2) as p: print(p.map(abs, [-1, -2]))"
print("program", subprocess.run([sys.executable, "-c", pool], timeout=60).returncode, flush=True)
with multiprocessing.get_context("spawn").Pool(2) as pool:        # __exit__: terminate(), TERM to its workers
    assert pool.map(abs, [-1, -2]) == [1, 2]
p = subprocess.Popen(["sleep", "60"])
p.terminate()
print("sleep", p.wait(timeout=30), flush=True)
"""


def test_a_finished_stage_still_ends_the_programs_it_starts():
    """done.json must not make the programs a stage starts afterwards deaf to TERM: an ignored signal is inherited
    through exec, and a pool's terminate() then waited forever on its workers (nnU-Net's planning pool, started by
    a test after a stage had run inside pytest, hung a CI run so; its validation pool would have too). The stop
    signals are ignored only from the stage's exit on. (A child forked without exec keeps the stage's own handler,
    which sets the stop flag: a data loader worker outlives SLURM's warning, as it always did.)"""
    p = subprocess.Popen([sys.executable, "-c", DONE_THEN_CHILDREN], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        out = p.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out = p.communicate()[0]
        pytest.fail(f"a pool's workers (or a child) did not end on TERM after done.json:\n{out}")
    assert p.returncode == 0 and "program 0" in out and f"sleep {-signal.SIGTERM}" in out, out
