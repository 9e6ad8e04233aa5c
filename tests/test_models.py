"""Stage I (02, the U-Net): encoders, skip modules, loss, patient-level Dice, pre-training, resume, bad checkpoints."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.backbones import ENCODERS, UNet
from common.losses import SegLoss, soft_dice_loss
from common.metrics import dice_from_counts, mean_foreground, patient_dice
from common.skips import SKIP_TYPES
from common.utils import InputError
from conftest import data_args


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("in_ch", [1, 4])
def test_encoder_forward_backward(encoder, in_ch):
    torch.manual_seed(0)
    model = UNet(encoder, in_ch, 3, "ref", width=8)
    x = torch.randn(2, in_ch, 64, 64)
    y = model(x)
    assert y.shape == (2, 3, 64, 64)
    y.mean().backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    assert len(model.skip_channels) == 4


@pytest.mark.parametrize("skip", SKIP_TYPES)
def test_skip_modules_keep_shapes(skip):
    model = UNet("base", 1, 2, skip, width=8)
    feats = model.encoder(torch.randn(2, 1, 64, 64))
    prepared = model.skips.prepare(feats)
    for lvl, (cs, cu) in enumerate(zip(model.skip_channels, model.up_channels)):
        skip_t = prepared[lvl]
        assert skip_t.shape == feats[lvl].shape
        up = torch.randn(2, cu, *skip_t.shape[-2:])
        assert model.skips(lvl, skip_t, up).shape == skip_t.shape
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)


@pytest.mark.parametrize("encoder", ["base", "resnet50"])
def test_frozen_decoder_keeps_only_relu_masks(encoder, monkeypatch):
    """common/frozen.py: with the backbone frozen, the decoder blocks, final_up and the head run with a backward that
    keeps one bool mask per ReLU: the same logits, bit for bit, and the same gradients of every skip weight and of the
    input in float64 as autograd's own backward (which keeps every convolution's and BatchNorm's input)."""
    import common.backbones as backbones
    from common.frozen import frozen_apply, supported
    from common.iac import IACSearchSkips
    torch.manual_seed(0)
    net = UNet(encoder, 1, 3, "ref", width=4).double()
    with torch.no_grad():                                  # pre-trained-like BN statistics and affine weights
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.normal_()
            bn.bias.normal_()
    net.freeze_backbone()
    net.train()
    skips = IACSearchSkips(net.skip_channels, net.up_channels).double()
    x = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    runs = {}
    for plain in (True, False):
        s = IACSearchSkips(net.skip_channels, net.up_channels).double()
        s.load_state_dict(skips.state_dict())
        net.set_skips(s)
        with monkeypatch.context() as m:
            if plain:
                m.setattr(backbones, "frozen_apply", lambda module, t: module(t))
            out = net(x)
        (out.square().mean() + out[:, 1].mean()).backward()
        runs[plain] = out.detach(), {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}
    assert torch.equal(runs[True][0], runs[False][0]) and len(runs[True][1]) > 100
    for n, g in runs[True][1].items():
        torch.testing.assert_close(runs[False][1][n], g, rtol=1e-12, atol=1e-15, msg=n)
    block = net.decoder[0]                                 # what the backward keeps: one bool mask per ReLU
    t = torch.randn(2, block[0].in_channels, 16, 16, dtype=torch.float64, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: kept.append(v) or v, lambda v: v):
        y = frozen_apply(block, t)
    assert [v.dtype for v in kept] == [torch.bool, torch.bool] and [v.shape for v in kept] == [y.shape] * 2
    g = torch.randn_like(y)
    want = torch.autograd.grad(block(t), t, g)[0]
    torch.testing.assert_close(torch.autograd.grad(y, t, g)[0], want, rtol=1e-12, atol=1e-15)
    assert supported(net.head) and not supported(net.skips)           # trainable: autograd's own backward
    net.train(True)
    net.backbone_frozen = False
    net.train()
    assert not supported(block)                            # a block in training mode (stage 02) runs as it is


def test_encoder_weights_from_local_file(tmp_path):
    import torchvision
    m = torchvision.models.mobilenet_v3_large(weights=None)
    path = str(tmp_path / "w.pt")
    torch.save(m.state_dict(), path)
    model = UNet("mobilenet_v3_large", 1, 2, encoder_weights=path)
    first = model.encoder.stages[0][0]
    torch.testing.assert_close(first.weight, m.features[0][0].weight.mean(1, keepdim=True) * 3)


def test_soft_dice_hand_computed():
    # 1 image, 2 classes, 2 pixels; probabilities p1 = [0.8, 0.4], ground truth class 1 at pixel 0 only
    p1 = torch.tensor([0.8, 0.4])
    logits = torch.stack([torch.log(1 - p1), torch.log(p1)]).reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    s = 1e-5
    expected = 1 - (2 * 0.8 + s) / (0.8 + 0.4 + 1 + s)
    assert abs(soft_dice_loss(logits, target).item() - expected) < 1e-6
    ce = F.cross_entropy(logits, target).item()
    assert abs(SegLoss()(logits, target).item() - (ce + expected)) < 1e-6


def test_patient_dice_differs_from_slice_mean_and_nan_convention():
    gt = np.zeros((2, 4, 4), np.uint8)
    pred = np.zeros_like(gt)
    gt[0, :2, :2] = 1          # slice 0: 4 voxels, predicted perfectly
    pred[0, :2, :2] = 1
    gt[1, 0, 0] = 1            # slice 1: 1 voxel, missed, plus one false positive
    pred[1, 3, 3] = 1
    d = patient_dice(pred, gt, 3)
    assert abs(d[0] - 2 * 4 / (2 * 4 + 1 + 1)) < 1e-12             # 0.8, not mean(1.0, 0.0) = 0.5
    assert np.isnan(d[1])                                           # class 2 absent from both
    assert abs(mean_foreground(d) - 0.8) < 1e-12
    assert np.isnan(dice_from_counts([0], [0], [0])[0])


def test_pretrain_resume_equals_unbroken(tmp_path, scripts, acdc):
    m = scripts["02_pretrain"]
    # bit-equality is the CPU promise: on CUDA the convolution backward is not deterministic (seen on an H200)
    common = data_args(acdc) + ["--width", "8", "--batch_size", "16", "--seed", "3", "--device", "cpu"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    m.main(m.get_args(common + ["--epochs", "3", "--out", a]))
    m.main(m.get_args(common + ["--epochs", "3", "--out", b, "--stop_after", "2"]))
    m.main(m.get_args(common + ["--epochs", "3", "--out", b, "--resume"]))
    sa = torch.load(os.path.join(a, "ckpt_last.pt"), weights_only=True)
    sb = torch.load(os.path.join(b, "ckpt_last.pt"), weights_only=True)
    assert sa["epoch"] == sb["epoch"] == 2
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert len(open(os.path.join(b, "log.jsonl")).readlines()) == 3
    with pytest.raises(InputError, match="already holds a run"):
        m.main(m.get_args(common + ["--epochs", "3", "--out", a]))


def test_bad_checkpoints_refused(tmp_path, scripts, acdc, backbone):
    s = scripts["03_search"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"state_dict": {}}, foreign)
    for path, msg in ((str(bad), "corrupt"), (foreign, "not a pretrain checkpoint")):
        with pytest.raises(InputError, match=msg):
            s.main(s.get_args(["--backbone", path, *data_args(acdc), "--out", str(tmp_path / "o")]))


def test_nan_loss_stops_and_keeps_checkpoints(tmp_path, scripts, acdc, monkeypatch):
    m = scripts["02_pretrain"]
    out = str(tmp_path / "nan")
    common = data_args(acdc) + ["--width", "8", "--batch_size", "16", "--out", out]
    m.main(m.get_args(common + ["--epochs", "1"]))
    before = torch.load(os.path.join(out, "ckpt_last.pt"), weights_only=True)
    from common.utils import NonFiniteLoss
    monkeypatch.setattr(m, "SegLoss", lambda: (lambda logits, target: logits.mean() * float("nan")))
    with pytest.raises(NonFiniteLoss, match="last good"):
        m.main(m.get_args(common + ["--epochs", "2", "--resume"]))
    after = torch.load(os.path.join(out, "ckpt_last.pt"), weights_only=True)
    assert after["epoch"] == before["epoch"] == 0


# --------------------------------------------------------------------------- surface metrics
def _blob(rng, shape):
    """A random smooth 3-D shape (thresholded noise), never empty."""
    from scipy import ndimage
    m = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > 0.05
    m[tuple(s // 2 for s in shape)] = True
    return m


@pytest.mark.parametrize("seed", range(4))
def test_hd95_and_nsd_equal_monai(seed):
    monai_metrics = pytest.importorskip("monai.metrics", reason="requirements-test.txt is not installed")
    from common.metrics import region_metrics
    rng = np.random.default_rng(seed)
    shape = (24, 20, 12)
    spacing = [(1.0, 1.0, 1.0), (0.7, 0.9, 3.0), (1.5, 0.6, 5.0), (0.8, 0.8, 1.2)][seed]
    pred, gt = _blob(rng, shape), _blob(rng, shape)
    ours = region_metrics(pred, gt, spacing, tolerance=2.0)
    p, g = (torch.from_numpy(m[None, None].astype(np.float32)) for m in (pred, gt))
    hd = monai_metrics.compute_hausdorff_distance(p, g, include_background=True, percentile=95,
                                                  spacing=list(spacing)).item()
    nsd = monai_metrics.compute_surface_dice(p, g, class_thresholds=[2.0], include_background=True,
                                             spacing=list(spacing)).item()
    assert ours["hd95"] == pytest.approx(hd, rel=1e-5) and ours["nsd"] == pytest.approx(nsd, rel=1e-6)
    assert ours["dice"] == pytest.approx(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))


def test_surface_metric_conventions():
    from common.metrics import case_metrics, region_metrics
    empty, full = np.zeros((4, 5, 6), bool), np.zeros((4, 5, 6), bool)
    full[1:3, 1:3, 1:3] = True
    r = region_metrics(empty, empty, (1, 1, 1), 1.0)
    assert all(np.isnan(r[m]) for m in ("dice", "hd95", "nsd"))               # left out of means
    assert region_metrics(empty, empty, (1, 1, 1), 1.0, both_empty=1.0) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    r = region_metrics(full, empty, (1, 2, 3), 1.0)
    assert r["dice"] == 0 and r["nsd"] == 0 and r["hd95"] == pytest.approx(np.sqrt(4 ** 2 + 10 ** 2 + 18 ** 2))
    assert region_metrics(full, full, (1, 2, 3), 0.0) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    shifted = np.roll(full, 1, axis=2)                                         # one 3-mm voxel along z
    r = region_metrics(shifted, full, (1, 2, 3), 2.9)
    assert r["hd95"] == pytest.approx(3.0) and r["nsd"] < 1
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[full] = 2
    rows = dict(((reg, m), v) for reg, m, v in case_metrics(lab, lab, (1, 1, 1), {"a": [1], "ab": [1, 2]}, 1.0))
    assert np.isnan(rows["a", "dice"]) and rows["ab", "dice"] == 1.0
    with pytest.raises(ValueError, match="do not match"):
        region_metrics(full, full[:3], (1, 1, 1), 1.0)
