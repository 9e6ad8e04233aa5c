"""The path every CUDA run takes by default, run on the CPU: bf16 autocast (--amp on) and channels_last
(--channels_last on) through 02 -> 03 (lth and full, each with --checkpoint_edges on, cell and fine, the lean step) ->
04 -> 05 on a tiny phantom. torch's CPU autocast has CUDA's dtype rules, so what breaks there breaks here (on the
main of 2026-12-05, 03 stopped at its first step: fp32 BatchNorm statistics updated from bf16)."""
import json
import os

import pandas as pd
import pytest
import torch

from common.checkpoints import load_checkpoint
from common.iac import read_genotype
from conftest import data_args, small_phantom_and_backbone

GPU_PATH = ["--amp", "on", "--channels_last", "on"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, scripts):
    """6 ACDC phantom patients at 32x32 and a base U-Net (width 8) trained 2 epochs on the GPU path."""
    base = tmp_path_factory.mktemp("gpu_path")
    acdc, ref = small_phantom_and_backbone(base, scripts, 6, 3, 2, GPU_PATH)
    return acdc, ref, base


@pytest.mark.parametrize("mode", ["lth", "full"])
def test_search_on_the_gpu_path_in_every_checkpoint_mode(tiny, scripts, mode, capsys):
    """03 with the CUDA defaults on the CPU (lean step, bf16 autocast, channels_last) reaches a genotype with every
    --checkpoint_edges mode; the LTH search prunes under autocast (an absolute τ0 above every JS: every edge is
    stable at every test) and keeps its BatchNorm statistics in float32."""
    acdc, ref, base = tiny
    s = scripts["03_search"]
    for ckpt in ("on", "cell", "fine"):
        out = str(base / f"{mode}_{ckpt}")
        extra = ["--tau0", "1"] if mode == "lth" else []
        s.main(s.get_args(["--backbone", os.path.join(ref, "ckpt_best.pt"), *data_args(acdc), "--mode", mode,
                           "--epochs", "2", "--warmup", "1", "--batch_size", "16", "--checkpoint_edges", ckpt,
                           "--out", out, *GPU_PATH, *extra]))
        g = read_genotype(os.path.join(out, "genotype.json"))
        assert len(g["edges"]) == 8
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in log)
        ckpt_last = load_checkpoint(os.path.join(out, "ckpt_last.pt"), "search")
        stats = [v for k, v in ckpt_last["skips"].items() if "running" in k]
        assert stats and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in stats)
        if mode == "lth":
            assert sum(r["n_pruned"] for r in log) > 0 and log[-1]["active_ops"] < log[0]["active_ops"]
    assert "checkpointing per cell level: 0 whole cell (op by op)" in capsys.readouterr().out


def test_finetune_and_evaluate_on_the_gpu_path(tiny, scripts):
    """04 (the LTH cell from θ0) and 05 with --amp on --channels_last on: a finished run, scores for every test
    case."""
    acdc, ref, base = tiny
    s, f, e = scripts["03_search"], scripts["04_finetune"], scripts["05_evaluate"]
    search = str(base / "lth_for_04")
    s.main(s.get_args(["--backbone", os.path.join(ref, "ckpt_best.pt"), *data_args(acdc), "--mode", "lth",
                       "--epochs", "2", "--warmup", "1", "--batch_size", "16", "--tau0", "1", "--out", search,
                       *GPU_PATH]))
    cell = str(base / "iac_lth")
    f.main(f.get_args(["--backbone", os.path.join(ref, "ckpt_best.pt"), *data_args(acdc),
                       "--genotype", os.path.join(search, "genotype.json"), "--theta0", os.path.join(search, "theta0.pt"),
                       "--epochs", "1", "--batch_size", "16", "--out", cell, *GPU_PATH]))
    assert os.path.isfile(os.path.join(cell, "done.json"))
    out = str(base / "eval")
    e.main(e.get_args([*data_args(acdc), "--run", f"ref={ref}", "--run", f"iac_lth={cell}", "--out", out,
                       "--n_boot", "99", *GPU_PATH]))
    df = pd.read_csv(os.path.join(out, "per_patient.csv"))
    splits = json.load(open(os.path.join(acdc[1], "splits.json")))
    dice = df[df["metric"] == "dice"]
    assert set(dice["patient"]) == set(splits["test"]) and set(dice["method"]) == {"ref", "iac_lth"}
    assert dice["value"].notna().any()
