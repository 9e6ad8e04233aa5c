"""What a new user meets: one-line errors for wrong paths in every stage, the crop rule, devices, flag
spellings, the LTH's ETA, and the checkpoint / slices.h5 formats kept in one place each."""
import json
import os
import subprocess
import sys

import h5py
import pytest
import torch

from common.checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from common.data import CASE_STRINGS, CASE_TABLES, FILE_ATTRS, read_meta
from common.iac import EDGES, OPS
from common.search import expected_stop
from common.runs import cli
from common.utils import InputError, pick_device
from conftest import ROOT, data_args
from test_iac import GENO


def one_line_error(capsys, scripts, stage, argv):
    """Run a stage through cli() as the command line does; returns its stderr, checked to be one error line."""
    m = scripts[stage]
    with pytest.raises(SystemExit) as exit_:
        cli(m.main, m.get_args, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and err[-1].startswith("error: ") and "Traceback" not in "".join(err), err
    return err[-1]


def test_wrong_paths_are_one_line_errors(tmp_path, capsys, scripts, acdc, backbone):
    data, splits = data_args(acdc)[1], data_args(acdc)[3]
    ckpt = os.path.join(backbone, "ckpt_best.pt")
    nope = str(tmp_path / "nope")
    cases = [
        ("01_preprocess", ["--dataset", "acdc", "--raw", nope, "--out", str(tmp_path / "o1")], nope),
        ("02_pretrain", ["--data", nope, "--splits", splits, "--out", str(tmp_path / "o2")], "--data " + nope),
        ("02_pretrain", ["--data", data, "--splits", nope, "--out", str(tmp_path / "o2")], "--splits " + nope),
        ("02_pretrain", ["--data", data, "--splits", splits, "--encoder_weights", nope, "--out", str(tmp_path / "o2"),
                         "--encoder", "resnet50"], "--encoder_weights " + nope),
        ("02_pretrain", ["--data", data, "--splits", splits, "--out", str(tmp_path / "o2b"), "--resume"],
         "no ckpt_last.pt"),
        ("03_search", ["--backbone", nope, "--data", data, "--splits", splits, "--out", str(tmp_path / "o3")],
         "--backbone " + nope),
        ("03_search", ["--backbone", ckpt, "--data", data, "--splits", splits, "--out", str(tmp_path / "o3"),
                       "--device", "tpu"], "--device tpu"),
        ("04_finetune", ["--backbone", ckpt, "--genotype", nope, "--data", data, "--splits", splits,
                         "--out", str(tmp_path / "o4")], "--genotype " + nope),
        ("05_evaluate", ["--data", data, "--splits", splits, "--run", f"r={nope}", "--out", str(tmp_path / "o5")],
         nope),
        ("05_evaluate", ["--search", f"s={nope}", "--out", str(tmp_path / "o5")], nope),
    ]
    for stage, argv, named in cases:
        assert named in one_line_error(capsys, scripts, stage, argv), (stage, argv)
    bad_theta0 = tmp_path / "g"
    bad_theta0.mkdir()
    json.dump({**GENO, "search": {"mode": "lth"}}, open(bad_theta0 / "genotype.json", "w"))
    msg = one_line_error(capsys, scripts, "04_finetune", ["--backbone", ckpt, "--genotype",
                                                          str(bad_theta0 / "genotype.json"), "--theta0", ckpt,
                                                          *data_args(acdc), "--out", str(tmp_path / "o6")])
    assert "--theta0" in msg and "not a theta0 checkpoint" in msg


def test_command_line_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "02_pretrain.py", "--data", str(tmp_path / "x.h5"), "--splits",
                        str(tmp_path / "s.json"), "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: --data {tmp_path / 'x.h5'}: no such file (the slices.h5 "
                                             "of 01_preprocess.py)"]


def test_crop_must_be_a_multiple_of_32(tmp_path, capsys, scripts, acdc):
    msg = one_line_error(capsys, scripts, "01_preprocess", ["--dataset", "acdc", "--raw", acdc[0], "--out",
                                                            str(tmp_path / "o"), "--crop", "48", "100"])
    assert "multiples of 32" in msg and "--crop 64 128" in msg
    assert not os.path.exists(tmp_path / "o")                       # refused before anything is written


def test_devices(capsys):
    assert pick_device("cpu").type == "cpu"
    auto = pick_device("auto")
    said = capsys.readouterr().out
    assert said.startswith(f"device: {auto.type}") and ("because" in said or "chosen by --device auto" in said)
    with pytest.raises(InputError, match="not a device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda: .*use --device cpu or auto"):
            pick_device("cuda")
    else:
        with pytest.raises(InputError, match="only .* CUDA GPU"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


def test_precision_switches_auto_on_off(scripts, acdc):
    """--amp / --channels_last: auto (on with CUDA only), on (the CPU too: the GPU path), off; the bare flag is on,
    the --no- spellings are off; args.json of older runs (True / False) reads as auto / off."""
    from common.utils import precision, switch_on
    m = scripts["02_pretrain"]
    base = data_args(acdc) + ["--out", "x"]
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    a = m.get_args(base)
    assert (a.amp, a.channels_last) == ("auto", "auto")
    assert precision(a, cpu) == (False, False) and switch_on(a.amp, gpu) and switch_on(a.channels_last, gpu)
    assert precision(m.get_args(base + ["--amp", "on", "--channels_last", "on"]), cpu) == (True, True)
    assert precision(m.get_args(base + ["--amp", "--channels-last"]), cpu) == (True, True)
    for flag in ("--no-channels-last", "--no-channels_last", "--channels_last=off"):
        assert not switch_on(m.get_args(base + [flag]).channels_last, gpu)
    assert m.get_args(base + ["--no-channels-last", "--channels_last"]).channels_last == "on"
    assert not switch_on(m.get_args(base + ["--no-amp"]).amp, gpu) and not switch_on(False, gpu)
    assert switch_on(True, gpu) and not switch_on(True, cpu)
    with pytest.raises(SystemExit):
        m.get_args(base + ["--amp", "maybe"])
    assert scripts["05_evaluate"].get_args(["--out", "x", "--no-channels-last"]).channels_last == "off"


def test_lth_eta_from_the_pruning_rate():
    full, cap = len(EDGES) * len(OPS), 200
    assert expected_stop([full] * 16, cap) == cap                    # nothing pruned yet: the cap
    # pruning began at epoch 17 (index 16): 18 ops in 2 epochs -> 9 per epoch; 80 - 14 = 66 left -> 8 more epochs
    assert expected_stop([full] * 16 + [90, 80], cap) == 18 + 8
    assert expected_stop([full] * 16 + [97], 20) == 20               # capped
    assert expected_stop([full, len(EDGES)], cap) == 2               # one op per edge: this is the last epoch


def test_checkpoint_kinds_and_legacy_genotype(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        save_checkpoint({"kind": "other"}, str(tmp_path / "x.pt"))
    from common.backbones import UNet
    from common.checkpoints import cell_config
    from common.iac import IACSkips
    model = UNet("base", 1, 3, "ref", width=8)
    model.set_skips(IACSkips(GENO, model.skip_channels, model.up_channels))
    cfg = {**model.config, **cell_config(GENO, None)}
    assert cfg["genotype"] == {"edges": GENO["edges"], "concat": [2, 3, 4, 5]}
    for genotype in (cfg["genotype"], GENO["edges"]):               # the dict, and the edges list of older files
        path = str(tmp_path / "ft.pt")
        save_checkpoint({"kind": "finetune", "config": {**cfg, "genotype": genotype}, "model": model.state_dict()},
                        path)
        rebuilt = model_from_checkpoint(load_checkpoint(path, "finetune"))
        x = torch.randn(1, 1, 32, 32)
        model.eval()
        rebuilt.eval()
        torch.testing.assert_close(rebuilt(x), model(x))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_slices_h5_schema(acdc):
    path = os.path.join(acdc[1], "slices.h5")
    meta = read_meta(path)
    with h5py.File(path) as f:
        assert set(f.attrs) == set(FILE_ATTRS)
        assert set(f["cases"]) == set(CASE_STRINGS) | set(CASE_TABLES)
    n = len(meta["cases"]["case_id"])
    assert all(len(meta["cases"][k]) == n for k in CASE_STRINGS + CASE_TABLES)
    assert json.loads(meta["cases"]["source"][0])[-1].endswith("_gt.nii.gz")
