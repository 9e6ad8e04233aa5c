"""IAC / IAC-LTH inside nnU-Net: the trainer plugin end to end on an ACDC-layout phantom converted to nnU-Net's raw
format by scripts/convert_to_nnunet.py (CPU), implanted into models a user already has: stock nnUNetTrainer models
of nnU-Net's default plans (PlainConvUNet) and of the ResEnc M preset (ResidualEncoderUNet), and, in 3-D, the
default backbone nnUNetTrainerIACRef."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

nnunetv2 = pytest.importorskip("nnunetv2", reason="requirements-nnunet.txt is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
GENO = {"edges": [["sep_conv_3x3", 0, 2], ["skip_connect", 1, 2], ["dil_conv_5x5", 0, 3], ["max_pool_3x3", 2, 3],
                  ["avg_pool_3x3", 1, 4], ["sep_conv_5x5", 3, 4], ["dil_conv_3x3", 2, 5], ["skip_connect", 4, 5]],
        "concat": [2, 3, 4, 5]}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """This file's in-process tests on one torch thread, as under `make test`'s two workers (conftest.py), also when
    the file runs alone: its subprocesses take the other core, and two threads on a busy core are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


class _PassThrough(torch.nn.Module):
    """A skip module that hands every skip through unchanged: IACUNet is then the plain nnU-Net U-Net."""
    def forward(self, level, skip, up):
        return skip


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_iac_unet_is_resenc_unet_with_pass_through_skips(deep_supervision, dims):
    """ResidualEncoderUNet (nnU-Net's ResEnc M/L/XL presets) has PlainConvUNet's decoder: IACUNet with pass-through
    skips gives its output exactly; a U-Net of another class is refused."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet, ResidualUNet
    from nnunet_iac.iac_trainers import IACUNet, net_dims
    conv, norm = {2: (torch.nn.Conv2d, torch.nn.InstanceNorm2d), 3: (torch.nn.Conv3d, torch.nn.InstanceNorm3d)}[dims]
    kw = dict(input_channels=1, n_stages=4, features_per_stage=[8, 16, 32, 64], conv_op=conv, kernel_sizes=3,
              strides=[1, 2, 2, 2], n_blocks_per_stage=[1, 2, 2, 2], num_classes=3, n_conv_per_stage_decoder=1,
              conv_bias=True, norm_op=norm, norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
              deep_supervision=deep_supervision)
    torch.manual_seed(0)
    net = ResidualEncoderUNet(**kw).eval()
    model = IACUNet(net, _PassThrough()).eval()
    assert net_dims(net) == dims and model.skip_channels == [8, 16, 32]
    x = torch.randn(2, 1, *(16,) * dims)
    with torch.no_grad():
        out, ref = model(x), net(x)
    for o, r in zip(*((out, ref) if deep_supervision else ([out], [ref]))):
        assert torch.equal(o, r)
    if dims == 2 and not deep_supervision:
        with pytest.raises(RuntimeError, match="the plans build a ResidualUNet; IAC cells go into nnU-Net's "
                                               "PlainConvUNet and ResidualEncoderUNet"):
            IACUNet(ResidualUNet(**kw), _PassThrough())


def _env(tmp):
    """nnU-Net's variables for the phantom; one torch thread per run (the suite runs two workers on 2 cores;
    nnunet_iac's trainers take OMP_NUM_THREADS, where nnUNetv2_train alone takes every core)."""
    env = dict(os.environ, nnUNet_raw=str(tmp / "raw"), nnUNet_preprocessed=str(tmp / "pre"),
               nnUNet_results=str(tmp / "res"), nnUNet_extTrainer=os.path.join(ROOT, "nnunet_iac"),
               nnUNet_compile="f", nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", IAC_EPOCHS="1", IAC_ITERS="2",
               IAC_VAL_ITERS="1", IAC_FINAL_VALIDATION="0", OMP_NUM_THREADS="1")
    for name in ("IAC_BACKBONE", "IAC_GENOTYPE", "IAC_THETA0", "IAC_BATCH", "IAC_ALLOW_OTHER_BACKBONE", "IAC_SEED"):
        env.pop(name, None)
    return env


def _run(cmd, env, **kw):
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _train_cmd(trainer, config="2d", plans="nnUNetPlans"):
    return [f"{BIN}/nnUNetv2_train", "501", config, "0", "-tr", trainer, "-p", plans, "-device", "cpu"]


def _train(trainer, env, config="2d", plans="nnUNetPlans"):
    return _run(_train_cmd(trainer, config, plans), env)


def _refused(cmd, env, *named):
    """A run refused when its trainer is made: non-zero exit, and the last line of its output (stdout and stderr
    together, no data-loader worker after it) is the one-line error, naming `named`. Returns the output."""
    r = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = r.stdout.rstrip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("RuntimeError: "), r.stdout[-3000:]
    for name in named:
        assert str(name) in last, (name, last)
    return r.stdout


def _fold(tmp, trainer, config="2d", plans="nnUNetPlans"):
    return tmp / "res" / "Dataset501_Phantom" / f"{trainer}__{plans}__{config}" / "fold_0"


def _predict(tmp, raw, name, trainer, env, config="2d", plans="nnUNetPlans"):
    """nnUNetv2_predict of the phantom's cases, in one process (-npp 0 -nps 0: no worker processes to start)."""
    out = tmp / f"pred_{name}"
    _run([f"{BIN}/nnUNetv2_predict", "-i", str(raw / "imagesTr"), "-o", str(out), "-d", "501", "-c", config, "-f", "0",
          "-tr", trainer, "-p", plans, "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0"], env)
    return out


def _evaluate(tmp, raw, name, *preds, config="2d"):
    """05 (in this process: it needs no nnU-Net variable) on nnU-Net prediction folders, (method, folder) pairs:
    its per_patient.csv as a table."""
    import pandas as pd
    from conftest import load_script
    e = load_script("05_evaluate")
    args = [a for m, d in preds for a in ("--nnunet_pred", f"{m}={d}")]
    e.main(e.get_args([*args, "--nnunet_gt", str(raw / "labelsTr"), "--nnunet_configuration", config,
                       "--out", str(tmp / name), "--n_boot", "99"]))
    return pd.read_csv(tmp / name / "per_patient.csv")


# A model as a user has it: nnU-Net's own trainer through nnU-Net's own API, a few iterations, no final validation.
STOCK = """
import sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
plans, config, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = get_trainer_from_args("501", config, 0, "nnUNetTrainer", plans, device=torch.device("cpu"))
t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch = 1, 2, 1
if batch:     # nnUNetTrainer has no IAC_BATCH: its configuration's batch (the trainer's copy of the plans')
    t.configuration_manager.configuration["batch_size"] = batch
t.run_training()
"""


def _stock(tmp, env, plans="nnUNetPlans", batch=0):
    """checkpoint_final.pth of a stock nnUNetTrainer (2d, fold 0) of `plans`."""
    from nnunet_iac.iac_trainers import load_nnunet_checkpoint
    _run([sys.executable, "-c", STOCK, plans, "2d", str(batch)], env)
    ckpt = _fold(tmp, "nnUNetTrainer", plans=plans) / "checkpoint_final.pth"
    assert load_nnunet_checkpoint(ckpt)["trainer_name"] == "nnUNetTrainer"
    return ckpt


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
    _run([f"{BIN}/nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "2d", "3d_fullres", "-np", "1", "-npfp", "1",
          "--verify_dataset_integrity"], _env(tmp))               # (-npfp: nnU-Net's 8 processes cost ~12 s here)
    return tmp, raw


@pytest.fixture(scope="module")
def stock_2d(planned):
    """A stock nnU-Net 2d model of the default plans (nnUNetTrainer, nnUNetPlans)."""
    return _stock(planned[0], _env(planned[0]))


def test_nnunet_pipeline(planned, stock_2d):
    """A model the user already has (stock nnUNetTrainer) -> both searches on it (IAC_BACKBONE) -> the IAC-LTH cell,
    in the backbone its genotype names (no IAC_BACKBONE; another backbone refused, or taken with
    IAC_ALLOW_OTHER_BACKBONE=1 and recorded) -> predictions of the stock model and of the cell -> 05."""
    from common.checkpoints import weights_hash
    from nnunet_iac.iac_trainers import load_nnunet_checkpoint
    tmp_path, raw = planned
    env = _env(tmp_path)
    ref = load_nnunet_checkpoint(stock_2d)["network_weights"]
    searched_on = {"backbone": os.path.abspath(stock_2d), "backbone_sha256": weights_hash(ref),
                   "backbone_trainer": "nnUNetTrainer", "network": "PlainConvUNet", "plans": "nnUNetPlans",
                   "configuration": "2d", "seed": 0}

    search_env = dict(env, IAC_BACKBONE=str(stock_2d), IAC_WARMUP="1", IAC_TAU0="10", IAC_GAMMA="1.1", IAC_SEED="0",
                      IAC_AMP="on", IAC_CHECKPOINT_EDGES="on")          # the path a CUDA run takes, on the CPU
    for trainer, epochs in (("nnUNetTrainerIACSearchLTH", "9"), ("nnUNetTrainerIACSearchFull", "3")):
        _train(trainer, dict(search_env, IAC_EPOCHS=epochs))
        d = _fold(tmp_path, trainer)
        log = "".join(open(f).read() for f in d.glob("training_log*.txt"))
        assert "bf16 autocast on (IAC_AMP), checkpointed per level: [True, True" in log
        assert f"on the backbone {searched_on['backbone']} (IAC_BACKBONE; nnUNetTrainer, PlainConvUNet" in log
        g = json.load(open(d / "genotype.json"))
        assert (d / "theta0.pt").is_file() and len(g["edges"]) == 8
        assert {k: g["search"][k] for k in searched_on} == searched_on
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
    assert "PlainConvUNet" in torch.load(lth_dir / "theta0.pt", weights_only=True)["backbone"]
    full_log = "".join(open(f).read() for f in _fold(tmp_path, "nnUNetTrainerIACSearchFull").glob("training_log*.txt"))
    fold0 = json.load(open(tmp_path / "pre" / "Dataset501_Phantom" / "splits_final.json"))[0]
    patient = json.load(open(raw / "dataset.json"))["patients"]
    assert {patient[c] for c in fold0["train"]}.isdisjoint(patient[c] for c in fold0["val"])   # the converter's folds
    assert len(fold0["train"]) == 4           # 2 patients, 2 frames each: a patient per half, the frames together
    assert "full search: 2 train_search, 2 val_search cases" in full_log

    cell_env = dict(env, IAC_GENOTYPE=str(lth_dir / "genotype.json"))   # no IAC_BACKBONE: the genotype's
    other = tmp_path / "other_backbone.pth"                              # the stock model, one weight changed
    ckpt = torch.load(stock_2d, weights_only=False)
    name = next(iter(ckpt["network_weights"]))
    ckpt["network_weights"][name] = ckpt["network_weights"][name] + 1e-3
    torch.save(ckpt, other)
    _refused(_train_cmd("nnUNetTrainerIACLTH"), dict(cell_env, IAC_BACKBONE=str(other)),
             f"searched on {searched_on['backbone']}", f"train it in {other}", searched_on["backbone_sha256"])
    # IAC_ALLOW_OTHER_BACKBONE=1: a deliberate transfer starts and is recorded (the NoDA twin, its own folder);
    # a stop signal ends it at its first step: exit 75 after the data loaders are shut
    transfer = _fold(tmp_path, "nnUNetTrainerIACLTHNoDA")
    with open(tmp_path / "transfer.log", "w") as log:
        proc = subprocess.Popen(_train_cmd("nnUNetTrainerIACLTHNoDA"), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(cell_env, IAC_BACKBONE=str(other), IAC_ALLOW_OTHER_BACKBONE="1",
                                         IAC_EPOCHS="50"))
        t0 = time.time()
        while not (transfer / "iac_cell.json").exists() and proc.poll() is None and time.time() - t0 < 300:
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=120)
    out = (tmp_path / "transfer.log").read_text()
    assert rc == 75, out[-3000:]
    assert out.rstrip().splitlines()[-1].endswith("stopped by SIGUSR1: `nnUNetv2_train ... --c` continues from the "
                                                  "start (no epoch saved yet) (exit 75: requeue)")
    record = json.load(open(transfer / "iac_cell.json"))
    assert record["backbone"] == str(other) and "transferred: searched on" in record["backbone_how"]

    _train("nnUNetTrainerIACLTH", cell_env)
    cell = _fold(tmp_path, "nnUNetTrainerIACLTH")
    record = json.load(open(cell / "iac_cell.json"))
    assert {k: record[k] for k in ("backbone", "backbone_sha256", "backbone_trainer", "network")} == \
        {k: searched_on[k] for k in ("backbone", "backbone_sha256", "backbone_trainer", "network")}
    assert record["backbone_how"] == "the backbone the genotype was searched on" and record["init"] == "theta0"
    ck = load_nnunet_checkpoint(cell / "checkpoint_final.pth")["network_weights"]
    for k, v in ref.items():                                      # the backbone is unchanged by cell training
        assert torch.equal(ck[f"net.{k}"], v), k
    assert any(k.startswith("skips.") for k in ck)

    preds = (("stock", _predict(tmp_path, raw, "stock", "nnUNetTrainer", env)),
             ("iac_lth", _predict(tmp_path, raw, "iac_lth", "nnUNetTrainerIACLTH", cell_env)))
    df = _evaluate(tmp_path, raw, "eval", *preds)
    assert set(df["method"]) == {"stock", "iac_lth"} and df["patient"].nunique() == 6
    assert set(df["backbone"]) == {"nnunet_2d:PlainConvUNet"}
    dice = df[df["metric"] == "dice"]["value"].dropna()
    assert len(dice) and np.isfinite(dice).all() and set(df["metric"]) == {"dice", "hd95", "nsd"}


def test_resenc_backbone(planned, stock_2d):
    """nnU-Net's ResEnc M preset (nnUNetPlannerResEncM -> nnUNetResEncUNetMPlans, a ResidualEncoderUNet): a stock
    model of those plans -> LTH search on it -> IAC-LTH cell -> prediction -> 05, all with `-p`; a backbone of other
    plans is refused naming the `-p` it needs; the plans' batch (36 on this phantom) is noted, IAC_BATCH sets 2."""
    from nnunet_iac.iac_trainers import load_nnunet_checkpoint
    tmp_path, raw = planned
    env, plans = _env(tmp_path), "nnUNetResEncUNetMPlans"
    _run([f"{BIN}/nnUNetv2_plan_experiment", "-d", "501", "-pl", "nnUNetPlannerResEncM"], env)
    _run([f"{BIN}/nnUNetv2_preprocess", "-d", "501", "-plans_name", plans, "-c", "2d", "-np", "1"], env)
    planned_batch = json.load(open(tmp_path / "pre" / "Dataset501_Phantom" / f"{plans}.json")
                              )["configurations"]["2d"]["batch_size"]
    assert planned_batch > 16
    out = _refused(_train_cmd("nnUNetTrainerIACSearchLTH", plans=plans), dict(env, IAC_BACKBONE=str(stock_2d)),
                   "trained with plans 'nnUNetPlans'", f"uses '{plans}'", "give `-p nnUNetPlans`")
    assert f"note: the plans ask for batch {planned_batch}, slow on the CPU; IAC_BATCH=N sets another" in out

    stock = _stock(tmp_path, env, plans, batch=2)
    ref = load_nnunet_checkpoint(stock)["network_weights"]
    small = dict(env, IAC_BATCH="2")
    _train("nnUNetTrainerIACSearchLTH", dict(small, IAC_BACKBONE=str(stock), IAC_EPOCHS="3", IAC_WARMUP="1",
                                             IAC_TAU0="10"), plans=plans)
    lth = _fold(tmp_path, "nnUNetTrainerIACSearchLTH", plans=plans)
    assert f"batch 2 (IAC_BATCH; the plans ask for {planned_batch})" in \
        "".join(open(f).read() for f in lth.glob("training_log*.txt"))
    g = json.load(open(lth / "genotype.json"))["search"]
    assert (g["network"], g["plans"], g["backbone"]) == ("ResidualEncoderUNet", plans, os.path.abspath(stock))
    searched = load_nnunet_checkpoint(lth / "checkpoint_final.pth")["network_weights"]
    for k, v in ref.items():                                      # the backbone is unchanged by the search
        assert torch.equal(searched[f"net.{k}"], v), k
    cell_env = dict(small, IAC_GENOTYPE=str(lth / "genotype.json"))
    _train("nnUNetTrainerIACLTH", cell_env, plans=plans)
    record = json.load(open(_fold(tmp_path, "nnUNetTrainerIACLTH", plans=plans) / "iac_cell.json"))
    assert (record["network"], record["backbone_sha256"]) == ("ResidualEncoderUNet", g["backbone_sha256"])
    pred = _predict(tmp_path, raw, "resenc", "nnUNetTrainerIACLTH", cell_env, plans=plans)
    df = _evaluate(tmp_path, raw, "eval_resenc", ("iac_lth", pred))
    assert set(df["backbone"]) == {"nnunet_2d:ResidualEncoderUNet"} and df["patient"].nunique() == 6


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
    """Each wrong input stops with one line saying what is wrong and what to give: genotype, backbone file,
    configuration, plans (`-p`), a backbone other than the genotype's (IAC_ALLOW_OTHER_BACKBONE=1 takes it,
    recorded), a network the plans do not build."""
    from common.checkpoints import weights_hash
    from nnunet_iac.iac_trainers import Backbone, IACUNet, find_backbone, load_reference, nnUNetTrainerIAC
    for name in ("IAC_GENOTYPE", "IAC_BACKBONE", "IAC_ALLOW_OTHER_BACKBONE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="IAC_GENOTYPE is not set"):
        nnUNetTrainerIAC.build_network_architecture(None, _CM(), 1, 3, True)
    bad = tmp_path / "g.json"
    bad.write_text(json.dumps(dict(GENO, search={"geometry": {"skip_channels": [1, 2, 3]}})))
    monkeypatch.setenv("IAC_GENOTYPE", str(bad))
    with pytest.raises(RuntimeError, match="searched on skips with channels"):
        nnUNetTrainerIAC.build_network_architecture(None, _CM(), 1, 3, True)

    net = plain_unet(False)
    state = net.state_dict()
    plans = {"plans_name": "nnUNetPlans", "configurations": {"2d": {"architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet"}}}}

    class _Trainer:
        configuration_name, fold, dataset_json = "2d", 0, {}
        plans_manager = type("P", (), {"plans_name": "nnUNetPlans", "dataset_name": "Dataset501_Phantom",
                                       "plans": plans})

    def checkpoint(name, configuration="2d", plans_name="nnUNetPlans"):
        path = tmp_path / name
        torch.save({"network_weights": state, "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": configuration, "plans": dict(plans, plans_name=plans_name)}}, path)
        return str(path)
    with pytest.raises(RuntimeError, match=r"backbone .*foreign.pth \(IAC_BACKBONE\) is not a 2d nnU-Net checkpoint "
                                           r"\(found configuration '3d_fullres'\)"):
        Backbone(checkpoint("foreign.pth", "3d_fullres"), _Trainer(), "IAC_BACKBONE")
    with pytest.raises(RuntimeError, match=r"was trained with plans 'nnUNetResEncUNetMPlans', this run uses "
                                           r"'nnUNetPlans': give `-p nnUNetResEncUNetMPlans`"):
        Backbone(checkpoint("resenc.pth", plans_name="nnUNetResEncUNetMPlans"), _Trainer(), "IAC_BACKBONE")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pth .* cannot be read as an nnU-Net checkpoint"):
        Backbone(str(tmp_path / "junk.pth"), _Trainer(), "IAC_BACKBONE")

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))       # no backbone anywhere
    searched = {"backbone": str(tmp_path / "gone.pth"), "backbone_sha256": weights_hash(state)}
    with pytest.raises(RuntimeError, match=r"no backbone: IAC_BACKBONE is not set, the genotype's backbone .*gone.pth "
                                           r"is not there and there is no .*nnUNetTrainerIACRef__nnUNetPlans__2d/"
                                           r"fold_0/checkpoint_final.pth: set IAC_BACKBONE"):
        find_backbone(_Trainer(), {"search": searched})
    monkeypatch.setenv("IAC_BACKBONE", checkpoint("mine.pth"))
    bb = find_backbone(_Trainer())                                   # a search: any model of these plans
    assert (bb.sha256, bb.trainer_name, bb.network, bb.how) == (weights_hash(state), "nnUNetTrainer", "PlainConvUNet",
                                                                "IAC_BACKBONE")
    assert find_backbone(_Trainer(), {"search": searched}).how == "IAC_BACKBONE"     # the same weights: taken
    other = dict(searched, backbone_sha256="0123456789abcdef")
    with pytest.raises(RuntimeError, match=r"searched on .*gone.pth \(weights sha256 0123456789abcdef\), this run "
                                           r"would train it in .*mine.pth \(sha256 [0-9a-f]{16}\)"):
        find_backbone(_Trainer(), {"search": other})
    monkeypatch.setenv("IAC_ALLOW_OTHER_BACKBONE", "1")
    assert "transferred: searched on" in find_backbone(_Trainer(), {"search": other}).how
    assert "not checked" in find_backbone(_Trainer(), {"search": {}}).how      # a genotype of an older search

    trainer = _Trainer()
    trainer.network = IACUNet(plain_unet(False), _PassThrough())
    load_reference(trainer, bb)
    assert trainer.network.backbone_frozen and not any(p.requires_grad for p in trainer.network.net.parameters())
    bb.state = {k: v for k, v in state.items() if "seg_layers" not in k}
    with pytest.raises(RuntimeError, match="mine.pth does not fit the network of these plans"):
        load_reference(trainer, bb)


def test_loaders_shut_quietly(monkeypatch):
    """Leaving early (a stop signal, IAC_STOP_AFTER) shuts nnU-Net's data loaders; a loader's results thread that
    fails on a batch in flight then (its worker is gone) prints no traceback after the stop; other threads do."""
    import threading
    from nnunet_iac.iac_trainers import nnUNetTrainerIACRef
    reported = []
    monkeypatch.setattr(threading, "excepthook", lambda a: reported.append((a.thread.name, str(a.exc_value))))

    def fail():
        raise FileNotFoundError("the batch's shared memory went with its worker")

    class _Loader:
        def __init__(self, name):
            self.name = name

        def _finish(self):
            t = threading.Thread(target=fail, name=self.name)
            t.start()
            t.join()
    trainer = object.__new__(nnUNetTrainerIACRef)
    trainer.dataloader_train, trainer.dataloader_val = _Loader("Thread-1 (results_loop)"), _Loader("Thread-2 (other)")
    trainer._finish_loaders()
    assert reported == [("Thread-2 (other)", "the batch's shared memory went with its worker")]
    _Loader("Thread-3 (results_loop)")._finish()                  # outside the shutdown: reported as ever
    assert [name for name, _ in reported] == ["Thread-2 (other)", "Thread-3 (results_loop)"]


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
    """3-D cells in 3d_fullres: reference (nnUNetTrainerIACRef, the default backbone) -> LTH search -> IAC-LTH cell
    (θ0) -> predict -> 05 scores it."""
    from nnunet_iac.iac_trainers import load_nnunet_checkpoint
    tmp_path, raw = planned
    env = dict(_env(tmp_path), IAC_BATCH="1")                  # the plans' patch, one per batch (theirs: 2)
    _train("nnUNetTrainerIACRef", env, "3d_fullres")
    search_env = dict(env, IAC_EPOCHS="3", IAC_ITERS="1", IAC_WARMUP="1", IAC_TAU0="10", IAC_AMP="on")   # bf16, CPU
    _train("nnUNetTrainerIACSearchLTH", dict(search_env, IAC_STOP_AFTER="2"), "3d_fullres")   # a time limit
    lth = _fold(tmp_path, "nnUNetTrainerIACSearchLTH", "3d_fullres")
    assert not (lth / "genotype.json").exists() and (lth / "checkpoint_latest.pth").exists()
    before = [json.loads(ln) for ln in open(lth / "trajectory.jsonl")]
    theta0_bytes = (lth / "theta0.pt").read_bytes()
    assert len(before) == 2 and sum(map(sum, before[-1]["op_mask"])) < 98        # pruned before the stop
    _run(_train_cmd("nnUNetTrainerIACSearchLTH", "3d_fullres") + ["--c"], search_env)
    log = "".join(open(f).read() for f in lth.glob("training_log*.txt"))
    assert "continuing the search at epoch 3" in log and "bf16 autocast on (IAC_AMP)" in log
    assert (lth / "theta0.pt").read_bytes() == theta0_bytes                      # θ0: the weights at search start
    g = json.load(open(lth / "genotype.json"))
    assert g["search"]["encoder"] == "nnunet_3d_fold0" and len(g["edges"]) == 8
    ref = _fold(tmp_path, "nnUNetTrainerIACRef", "3d_fullres") / "checkpoint_final.pth"
    assert (g["search"]["backbone"], g["search"]["backbone_trainer"]) == (os.path.abspath(ref), "nnUNetTrainerIACRef")
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
    assert json.load(open(cell / "iac_cell.json"))["backbone"] == os.path.abspath(ref)
    pred = _predict(tmp_path, raw, "3d", "nnUNetTrainerIACLTH", cell_env, "3d_fullres")
    df = _evaluate(tmp_path, raw, "eval_3d", ("iac_lth_3d", pred), config="3d_fullres")
    assert set(df["method"]) == {"iac_lth_3d"} and df["patient"].nunique() == 6
    assert set(df["backbone"]) == {"nnunet_3d_fullres:PlainConvUNet"}


def test_a_backbone_trained_on_other_preprocessing_is_named(planned):
    """Two data sets planned alike share a plans name (nnUNetPlans) but not their spacing, CT statistics or labels:
    a backbone trained on another one's preprocessing is refused with what differs (its weights would load)."""
    import copy
    from nnunet_iac.iac_trainers import preprocessing_differences
    tmp_path, raw = planned
    plans = json.load(open(tmp_path / "pre" / "Dataset501_Phantom" / "nnUNetPlans.json"))
    labels = json.load(open(raw / "dataset.json"))
    assert preprocessing_differences(plans, plans, "2d", labels, labels) == []
    other = copy.deepcopy(plans)
    other["configurations"]["2d"]["spacing"] = [9.0, 9.0]
    swapped = dict(labels, labels={k: (3 - v if v else 0) for k, v in labels["labels"].items()})
    diffs = preprocessing_differences(other, plans, "2d", swapped, labels)
    assert len(diffs) == 2 and diffs[0].startswith("spacing [9.0, 9.0] vs") and diffs[1].startswith("labels"), diffs
    assert preprocessing_differences(plans, plans, "3d_lowres", labels, labels) == \
        ["the checkpoint's plans have no configuration 3d_lowres"]
