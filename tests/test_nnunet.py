"""IAC / IAC-LTH inside nnU-Net: the trainer plugin end to end on an ACDC-layout phantom converted to nnU-Net's raw
format by scripts/convert_to_nnunet.py (CPU)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

nnunetv2 = pytest.importorskip("nnunetv2", reason="requirements-nnunet.txt is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
GENO = {"edges": [["sep_conv_3x3", 0, 2], ["skip_connect", 1, 2], ["dil_conv_5x5", 0, 3], ["max_pool_3x3", 2, 3],
                  ["avg_pool_3x3", 1, 4], ["sep_conv_5x5", 3, 4], ["dil_conv_3x3", 2, 5], ["skip_connect", 4, 5]],
        "concat": [2, 3, 4, 5]}


def plain_unet(deep_supervision, dims=2):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    conv, norm = {2: (torch.nn.Conv2d, torch.nn.InstanceNorm2d), 3: (torch.nn.Conv3d, torch.nn.InstanceNorm3d)}[dims]
    return PlainConvUNet(1, 4, [8, 16, 32, 64], conv, 3, [1, 2, 2, 2], 2, 3, 2, conv_bias=True,
                         norm_op=norm, norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=deep_supervision)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("deep_supervision", [True, False])
@pytest.mark.parametrize("search", [True, False])
def test_iac_unet_keeps_skip_shapes(deep_supervision, search, dims):
    from nnunet_iac.iac_trainers import IACUNet, net_dims
    from common.iac import IACSearchSkips, IACSkips
    net = plain_unet(deep_supervision, dims)
    assert net_dims(net) == dims
    ch = list(net.encoder.output_channels[:-1])
    skips = IACSearchSkips(ch, ch, dims=dims) if search else IACSkips(GENO, ch, ch, dims=dims)
    model = IACUNet(net, skips)
    seen = []
    orig = skips.forward
    skips.forward = lambda level, skip, up: seen.append((level, skip.shape, up.shape, orig(level, skip, up).shape)) \
        or orig(level, skip, up)
    x = torch.randn(2, 1, *(16,) * dims)
    out, ref = model(x), net(x)
    assert sorted(s[0] for s in seen) == [0, 1, 2]
    for level, skip_shape, up_shape, out_shape in seen:
        assert skip_shape == up_shape == out_shape                # the cell keeps every skip's shape
    if deep_supervision:
        assert [o.shape for o in out] == [r.shape for r in ref]
    else:
        assert out.shape == ref.shape == (2, 3, *(16,) * dims)


def _env(tmp):
    env = dict(os.environ, nnUNet_raw=str(tmp / "raw"), nnUNet_preprocessed=str(tmp / "pre"),
               nnUNet_results=str(tmp / "res"), nnUNet_extTrainer=os.path.join(ROOT, "nnunet_iac"),
               nnUNet_compile="f", nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", IAC_EPOCHS="2", IAC_ITERS="2",
               IAC_VAL_ITERS="1", IAC_FINAL_VALIDATION="0", OMP_NUM_THREADS="2")
    return env


def _run(cmd, env, **kw):
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _train(trainer, env, config="2d"):
    return _run([f"{BIN}/nnUNetv2_train", "501", config, "0", "-tr", trainer, "-device", "cpu"], env)


def _fold(tmp, trainer, config="2d"):
    return tmp / "res" / "Dataset501_Phantom" / f"{trainer}__nnUNetPlans__{config}" / "fold_0"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """An ACDC-layout phantom (3 patients, their ED and ES frames: 6 cases) converted by scripts/convert_to_nnunet.py
    (its folds drawn over patients), planned and preprocessed once for 2d and 3d_fullres, as a user does with ACDC."""
    from common.phantom import write_phantom
    tmp = tmp_path_factory.mktemp("nnunet")
    raw = tmp / "raw" / "Dataset501_Phantom"
    write_phantom(str(tmp / "acdc"), "acdc", 3, seed=0, size=32)
    _run([sys.executable, "scripts/convert_to_nnunet.py", "--dataset", "acdc", "--raw", str(tmp / "acdc"), "--out",
          str(raw)], _env(tmp))
    _run([f"{BIN}/nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "2d", "3d_fullres", "-np", "1",
          "--verify_dataset_integrity"], _env(tmp))
    return tmp, raw


def test_nnunet_pipeline(planned):
    tmp_path, raw = planned
    env = _env(tmp_path)
    _train("nnUNetTrainerIACRef", env)
    ref_ckpt = _fold(tmp_path, "nnUNetTrainerIACRef") / "checkpoint_final.pth"
    from nnunet_iac.iac_trainers import load_nnunet_checkpoint
    ref = load_nnunet_checkpoint(ref_ckpt)["network_weights"]

    search_env = dict(env, IAC_EPOCHS="9", IAC_WARMUP="1", IAC_TAU0="10", IAC_GAMMA="1.1",
                      IAC_AMP="on", IAC_CHECKPOINT_EDGES="on")          # the path a CUDA run takes, on the CPU
    for trainer in ("nnUNetTrainerIACSearchLTH", "nnUNetTrainerIACSearchFull"):
        _train(trainer, search_env)
        d = _fold(tmp_path, trainer)
        log = "".join(open(f).read() for f in d.glob("training_log*.txt"))
        assert "bf16 autocast on (IAC_AMP), checkpointed per level: [True, True" in log
        g = json.load(open(d / "genotype.json"))
        assert (d / "theta0.pt").is_file() and len(g["edges"]) == 8
        traj = [json.loads(ln) for ln in open(d / "trajectory.jsonl")]
        assert len(traj) == g["search"]["epochs_run"]
        searched = load_nnunet_checkpoint(d / "checkpoint_final.pth")["network_weights"]
        for k, v in ref.items():                                  # the backbone is unchanged by the search
            assert torch.equal(searched[f"net.{k}"], v), k
    lth_dir = _fold(tmp_path, "nnUNetTrainerIACSearchLTH")
    lth_search = json.load(open(lth_dir / "genotype.json"))["search"]
    assert lth_search["stopped_early"] and lth_search["epochs_run"] < 9      # τ0 = 10: a prune every epoch
    assert lth_search["lth"] == {"tau0_rel": None, "tau0": 10.0, "gamma": 1.1, "k_std": 1.0, "eps": 1e-8,
                                 "js_support": "common"}
    assert lth_search["settings"]["epochs"] == 9 and lth_search["settings"]["edge_rule"] == "w"
    full_log = "".join(open(f).read() for f in _fold(tmp_path, "nnUNetTrainerIACSearchFull").glob("training_log*.txt"))
    fold0 = json.load(open(tmp_path / "pre" / "Dataset501_Phantom" / "splits_final.json"))[0]
    patient = json.load(open(raw / "dataset.json"))["patients"]
    assert {patient[c] for c in fold0["train"]}.isdisjoint(patient[c] for c in fold0["val"])   # the converter's folds
    assert len(fold0["train"]) == 4           # 2 patients, 2 frames each: a patient per half, the frames together
    assert "full search: 2 train_search, 2 val_search cases" in full_log

    cell_env = dict(env, IAC_GENOTYPE=str(lth_dir / "genotype.json"))
    _train("nnUNetTrainerIACLTH", cell_env)
    ck = load_nnunet_checkpoint(_fold(tmp_path, "nnUNetTrainerIACLTH") / "checkpoint_final.pth")["network_weights"]
    for k, v in ref.items():                                      # the backbone is unchanged by cell training
        assert torch.equal(ck[f"net.{k}"], v), k
    assert any(k.startswith("skips.") for k in ck)

    out = {}
    for name, trainer, e in (("ref", "nnUNetTrainerIACRef", env), ("iac_lth", "nnUNetTrainerIACLTH", cell_env)):
        out[name] = tmp_path / f"pred_{name}"
        _run([f"{BIN}/nnUNetv2_predict", "-i", str(raw / "imagesTr"), "-o", str(out[name]), "-d", "501", "-c", "2d",
              "-f", "0", "-tr", trainer, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], e)
    ev = tmp_path / "eval"
    _run([sys.executable, "05_evaluate.py", "--nnunet_pred", f"ref={out['ref']}", "--nnunet_pred",
          f"iac_lth={out['iac_lth']}", "--nnunet_gt", str(raw / "labelsTr"), "--out", str(ev), "--n_boot", "99"], env)
    import pandas as pd
    df = pd.read_csv(ev / "per_patient.csv")
    assert set(df["method"]) == {"ref", "iac_lth"} and df["patient"].nunique() == 6
    dice = df[df["metric"] == "dice"]["value"].dropna()
    assert len(dice) and np.isfinite(dice).all() and set(df["metric"]) == {"dice", "hd95", "nsd"}


class _CM:
    """The configuration-manager fields build_network_architecture reads (a 4-stage 2-D PlainConvUNet)."""
    network_arch_class_name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    network_arch_init_kwargs = {"n_stages": 4, "features_per_stage": [8, 16, 32, 64],
                                "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": 3, "strides": [1, 2, 2, 2],
                                "n_conv_per_stage": 2, "n_conv_per_stage_decoder": 2, "conv_bias": True,
                                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                                "norm_op_kwargs": {"affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": None}
    network_arch_init_kwargs_req_import = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def test_clear_errors(tmp_path, monkeypatch):
    from nnunet_iac.iac_trainers import nnUNetTrainerIAC, load_reference
    monkeypatch.delenv("IAC_GENOTYPE", raising=False)
    with pytest.raises(RuntimeError, match="IAC_GENOTYPE is not set"):
        nnUNetTrainerIAC.build_network_architecture(None, _CM(), 1, 3, True)
    bad = tmp_path / "g.json"
    bad.write_text(json.dumps(dict(GENO, search={"geometry": {"skip_channels": [1, 2, 3]}})))
    monkeypatch.setenv("IAC_GENOTYPE", str(bad))
    with pytest.raises(RuntimeError, match="searched on skips with channels"):
        nnUNetTrainerIAC.build_network_architecture(None, _CM(), 1, 3, True)
    foreign = tmp_path / "foreign.pth"
    torch.save({"network_weights": {}, "init_args": {"configuration": "3d_fullres"}}, foreign)

    class _Trainer:
        configuration_name = "2d"
    with pytest.raises(RuntimeError, match="is not a 2d nnU-Net checkpoint"):
        load_reference(_Trainer(), str(foreign))


def test_search_halves():
    from nnunet_iac.iac_trainers import search_halves
    tr, va = search_halves([f"c{i}" for i in range(7)])
    assert len(tr) == 4 and len(va) == 3 and not set(tr) & set(va) and sorted(tr + va) == [f"c{i}" for i in range(7)]
    assert (tr, va) == search_halves([f"c{i}" for i in reversed(range(7))])     # seeded, order-free
    with pytest.raises(RuntimeError, match="at least 2"):
        search_halves(["c0"])
    frames = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 9) for f in (1, 12)]       # ACDC: 2 frames each
    patients = {k: k.split("_")[0] for k in frames}
    tr, va = search_halves(frames, patients=patients)
    assert sorted(tr + va) == sorted(frames) and len(tr) == len(va) == 8
    assert not {patients[k] for k in tr} & {patients[k] for k in va}            # no patient in both halves
    with pytest.raises(RuntimeError, match="at least 2 training patients"):
        search_halves(frames[:2], patients=patients)


def test_noda_variants_and_missing_nnunet_variables(monkeypatch):
    from nnunet_iac import iac_trainers
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA
    for name in ("nnUNetTrainerIACRef", "nnUNetTrainerIACSearchLTH", "nnUNetTrainerIACSearchFull", "nnUNetTrainerIAC",
                 "nnUNetTrainerIACLTH"):
        noda = getattr(iac_trainers, name + "NoDA")
        assert issubclass(noda, getattr(iac_trainers, name)) and issubclass(noda, nnUNetTrainerNoDA)
        assert noda.get_training_transforms is nnUNetTrainerNoDA.get_training_transforms
        assert noda.configure_rotation_dummyDA_mirroring_and_inital_patch_size is \
            nnUNetTrainerNoDA.configure_rotation_dummyDA_mirroring_and_inital_patch_size
    monkeypatch.delenv("nnUNet_results", raising=False)
    monkeypatch.setenv("nnUNet_preprocessed", "/nonexistent")
    with pytest.raises(RuntimeError, match="nnUNet_results is not set"):
        iac_trainers.nnUNetTrainerIACRef.__init__(object.__new__(iac_trainers.nnUNetTrainerIACRef), {}, "2d", 0, {},
                                                  torch.device("cpu"))


def test_nnunet_3d_chain(planned):
    """3-D cells in 3d_fullres: reference -> LTH search -> IAC-LTH cell (θ0) -> predict -> 05 scores it."""
    from nnunet_iac.iac_trainers import load_nnunet_checkpoint
    tmp_path, raw = planned
    env = _env(tmp_path)
    _train("nnUNetTrainerIACRef", env, "3d_fullres")
    search_env = dict(env, IAC_EPOCHS="6", IAC_WARMUP="1", IAC_TAU0="10", IAC_AMP="on")   # bf16 on the CPU
    _train("nnUNetTrainerIACSearchLTH", dict(search_env, IAC_STOP_AFTER="2"), "3d_fullres")   # a time limit
    lth = _fold(tmp_path, "nnUNetTrainerIACSearchLTH", "3d_fullres")
    assert not (lth / "genotype.json").exists() and (lth / "checkpoint_latest.pth").exists()
    before = [json.loads(ln) for ln in open(lth / "trajectory.jsonl")]
    theta0_bytes = (lth / "theta0.pt").read_bytes()
    assert len(before) == 2 and sum(map(sum, before[-1]["op_mask"])) < 98        # pruned before the stop
    _run([f"{BIN}/nnUNetv2_train", "501", "3d_fullres", "0", "-tr", "nnUNetTrainerIACSearchLTH", "-device", "cpu",
          "--c"], search_env)
    log = "".join(open(f).read() for f in lth.glob("training_log*.txt"))
    assert "continuing the search at epoch 3" in log and "bf16 autocast on (IAC_AMP)" in log
    assert (lth / "theta0.pt").read_bytes() == theta0_bytes                      # θ0: the weights at search start
    g = json.load(open(lth / "genotype.json"))
    assert g["search"]["encoder"] == "nnunet_3d" and len(g["edges"]) == 8
    theta0 = torch.load(lth / "theta0.pt", weights_only=True)["state"]
    assert next(v for k, v in theta0.items() if k.endswith("sep_conv_3x3.1.weight")).dim() == 5   # 3-D kernels
    traj = [json.loads(ln) for ln in open(lth / "trajectory.jsonl")]
    assert traj[:2] == before and len(traj) == g["search"]["epochs_run"]
    masks = [torch.tensor(t["op_mask"]) for t in traj]
    assert all(bool((b <= a).all()) for a, b in zip(masks, masks[1:]))         # pruned ops stayed pruned
    cell_env = dict(env, IAC_GENOTYPE=str(lth / "genotype.json"))
    _train("nnUNetTrainerIACLTH", cell_env, "3d_fullres")
    cell = _fold(tmp_path, "nnUNetTrainerIACLTH", "3d_fullres")
    assert any(k.startswith("skips.") for k in load_nnunet_checkpoint(cell / "checkpoint_final.pth")["network_weights"])
    pred = tmp_path / "pred_3d"
    _run([f"{BIN}/nnUNetv2_predict", "-i", str(raw / "imagesTr"), "-o", str(pred), "-d", "501", "-c", "3d_fullres",
          "-f", "0", "-tr", "nnUNetTrainerIACLTH", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
         cell_env)
    ev = tmp_path / "eval_3d"
    _run([sys.executable, "05_evaluate.py", "--nnunet_pred", f"iac_lth_3d={pred}", "--nnunet_gt", str(raw / "labelsTr"),
          "--out", str(ev), "--n_boot", "99"], env)
    import pandas as pd
    df = pd.read_csv(ev / "per_patient.csv")
    assert set(df["method"]) == {"iac_lth_3d"} and df["patient"].nunique() == 6
