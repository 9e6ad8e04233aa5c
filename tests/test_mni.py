"""The real-MRI benchmark: warped MNI152 subjects through the real readers, and the study in miniature."""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from conftest import ROOT
from common.backbones import UNet
from common.data import read_meta
from common.iac import IACSearchSkips, IACSkips, make_theta0, init_from_theta0

import make_mni_dataset  # noqa: E402  (benchmarks/ is on sys.path: conftest.py)

GENO = {"edges": [["sep_conv_3x3", 0, 2], ["skip_connect", 1, 2], ["dil_conv_3x3", 0, 3], ["max_pool_3x3", 2, 3],
                  ["avg_pool_3x3", 1, 4], ["sep_conv_5x5", 3, 4], ["dil_conv_5x5", 2, 5], ["skip_connect", 4, 5]]}


def test_mni_subjects_pass_the_nnunet_reader_with_their_split(tmp_path, scripts):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "data")
    argv = ["--out", raw, "--subjects", "6", "--test", "2", "--val", "1", "--spacing", "6", "--slab", "24"]
    make_mni_dataset.main(make_mni_dataset.get_args(argv))
    meta = json.load(open(f"{raw}/dataset.json"))
    assert meta["labels"] == {"background": 0, "GM": 1, "WM": 2} and meta["channel_names"] == {"0": "T1"}
    img = nib.load(f"{raw}/imagesTr/mni_000_0000.nii.gz")
    lab = np.asarray(nib.load(f"{raw}/labelsTr/mni_000.nii.gz").dataobj)
    assert img.shape == lab.shape and np.allclose(img.header.get_zooms(), 6.0)
    assert set(np.unique(lab)) == {0, 1, 2} and 0.1 < (lab == 1).mean() and 0.05 < (lab == 2).mean()
    other = np.asarray(nib.load(f"{raw}/imagesTr/mni_001_0000.nii.gz").dataobj)
    assert not np.allclose(np.asarray(img.dataobj), other)                   # subjects differ
    pre = scripts["01_preprocess"]
    pre.main(pre.get_args(["--dataset", "nnunet", "--raw", raw, "--out", out, "--crop", "32", "32",
                           "--split_file", f"{raw}/split.json"]))
    m = read_meta(f"{out}/slices.h5")
    assert m["class_names"] == ["GM", "WM"]
    splits, split = json.load(open(f"{out}/splits.json")), json.load(open(f"{raw}/split.json"))
    assert {k: sorted(splits[k]) for k in ("train", "val", "test")} == split
    again = str(tmp_path / "again")                                          # the same seed, the same subjects
    make_mni_dataset.main(make_mni_dataset.get_args(["--out", again, *argv[2:]]))
    assert np.array_equal(np.asarray(nib.load(f"{again}/imagesTr/mni_003_0000.nii.gz").dataobj),
                          np.asarray(nib.load(f"{raw}/imagesTr/mni_003_0000.nii.gz").dataobj))


def test_residual_cell_starts_as_the_identity_skip():
    """--cell_output residual: at the start (fresh, after the θ0 reset, and the search's supernet loaded from θ0)
    the U-Net computes exactly what the frozen reference computes; `replace` (the paper's) does not."""
    torch.manual_seed(0)
    ref = UNet("base", 1, 3, "ref", width=4).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        y_ref = ref(x)
        for output, same in (("residual", True), ("replace", False)):
            net = UNet("base", 1, 3, "ref", width=4).eval()
            net.load_state_dict(ref.state_dict())
            skips = IACSkips(GENO, net.skip_channels, net.up_channels, output=output)
            net.set_skips(skips.eval())
            assert torch.allclose(net(x), y_ref) == same
        init_from_theta0(skips, make_theta0(net.skip_channels, net.up_channels), strict_shapes=True)
        theta0 = make_theta0(net.skip_channels, net.up_channels)
        assert theta0["cells.0.out.weight"].abs().sum() > 0                 # θ0's output conv is not zero ...
        for res in (IACSkips(GENO, net.skip_channels, net.up_channels, output="residual"),
                    IACSearchSkips(net.skip_channels, net.up_channels, output="residual")):
            init_from_theta0(res, theta0)                                   # ... a residual cell's is, after loading
            net.set_skips(res.eval())
            assert torch.allclose(net(x), y_ref)


def test_the_study_in_miniature(tmp_path):
    """bench_method.py --tiny: data, every stage-I/II/III run of two seeds, one 05 table over both seeds."""
    out = str(tmp_path / "study")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_method.py"), "--tiny", "--seeds", "0",
                        "1", "--jobs", "2", "--residual", "--search_residual", "--out", out], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(f"{out}/eval/per_patient.csv")
    methods = {"ref", "att", "nested", "ref_long", "iac", "iac_lth", "iac_theta0", "iac_lth_fresh", "iac_res",
               "iac_lth_res", "iac_sres", "iac_lth_sres"}
    assert set(df["method"]) == methods and set(df["seed"]) == {0, 1} and set(df["metric"]) == {"dice", "hd95", "nsd"}
    assert df[df["method"] == "iac"]["patient"].nunique() == 3               # the --test subjects of split.json
    paired = pd.read_csv(f"{out}/eval/paired.csv")
    assert {("iac", "iac_lth"), ("ref_long", "iac"), ("iac_lth", "iac_lth_fresh")} <= set(zip(paired["vs"],
                                                                                              paired["method"]))
    for seed in (0, 1):                                    # ref_long is ref continued: the same first epochs
        ref = [json.loads(l) for l in open(f"{out}/seed{seed}/ref/log.jsonl")]
        long = [json.loads(l) for l in open(f"{out}/seed{seed}/ref_long/log.jsonl")]
        assert len(long) == 2 * len(ref) and [r["train_loss"] for r in ref] == [r["train_loss"] for r in long[:len(ref)]]
    assert "full / LTH search time per seed" in r.stdout
    cost, runs = pd.read_csv(f"{out}/eval/search_cost.csv"), pd.read_csv(f"{out}/eval/search_runs.csv")
    assert sorted(cost["seed"]) == [0, 0, 1, 1]            # each LTH search beside its own seed's full search ...
    for _, r in cost.iterrows():
        own = runs[(runs["mode"] == "full") & (runs["seed"] == r["seed"])
                   & (runs["search"] == ("full_sres" if r["IAC-LTH search"] == "lth_sres" else "full"))]["minutes"]
        assert float(own.iloc[0]) == r["IAC minutes"]     # ... searched with the same cell output
    for seed in (0, 1):
        g = json.load(open(f"{out}/seed{seed}/search_lth_sres/genotype.json"))["search"]["settings"]
        assert g["cell_output"] == "residual"
        assert json.load(open(f"{out}/seed{seed}/iac_lth_sres/args.json"))["args"]["cell_output"] == "residual"
