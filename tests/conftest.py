"""Shared fixtures: one tiny ACDC phantom, preprocessed once, and a 2-epoch backbone."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # common/ is installed: `pip install -e .`
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)   # `make test` runs two workers
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from _common import load_script  # noqa: E402  (one loader of scripts by path, for tests and benchmarks)


@pytest.fixture(scope="session")
def scripts():
    return {n: load_script(n) for n in ("01_preprocess", "02_pretrain", "03_search", "04_finetune", "05_evaluate")}


@pytest.fixture(scope="session")
def acdc(tmp_path_factory, scripts):
    """(raw dir, data dir with slices.h5 / splits.json) for 8 ACDC phantom patients at 64x64."""
    base = tmp_path_factory.mktemp("acdc")
    raw, out = str(base / "raw"), str(base / "data")
    pre = scripts["01_preprocess"]
    pre.main(pre.get_args(["--make_phantom", raw, "--layout", "acdc", "--patients", "8", "--seed", "1"]))
    pre.main(pre.get_args(["--dataset", "acdc", "--raw", raw, "--out", out, "--crop", "64", "64", "--processes", "2"]))
    return raw, out


@pytest.fixture(scope="session")
def backbone(tmp_path_factory, scripts, acdc):
    """A base U-Net (width 8) trained for 2 epochs on the phantom."""
    out = str(tmp_path_factory.mktemp("ref"))
    m = scripts["02_pretrain"]
    m.main(m.get_args(data_args(acdc) + ["--width", "8", "--epochs", "2", "--batch_size", "16", "--out", out]))
    return out


@pytest.fixture(scope="session", autouse=True)
def onednn_at_start():
    """Whether oneDNN was on when the session began (before any module-scoped fixture ran a stage)."""
    return torch.backends.mkldnn.enabled


@pytest.fixture(autouse=True)
def keep_onednn_setting(onednn_at_start):
    """A stage run on the CPU with --amp on --channels_last on may switch oneDNN off for its process
    (common/utils.cpu_conv_guard), and the tests run stages in one process (module fixtures too): every test
    starts and ends with the session's setting."""
    torch.backends.mkldnn.enabled = onednn_at_start
    yield
    torch.backends.mkldnn.enabled = onednn_at_start


def small_phantom_and_backbone(base, scripts, patients, seed, epochs, extra=()):
    """`patients` ACDC phantom patients at 32x32 (crop 32) under `base`, preprocessed, and a base U-Net of width 8
    trained `epochs` epochs (with `extra` flags): ((raw dir, data dir), the U-Net's run folder)."""
    pre, pt = scripts["01_preprocess"], scripts["02_pretrain"]
    pre.main(pre.get_args(["--make_phantom", str(base / "raw"), "--layout", "acdc", "--patients", str(patients),
                           "--phantom_size", "32", "--seed", str(seed)]))
    pre.main(pre.get_args(["--dataset", "acdc", "--raw", str(base / "raw"), "--out", str(base / "data"),
                           "--crop", "32", "32", "--processes", "1"]))
    acdc = (str(base / "raw"), str(base / "data"))
    pt.main(pt.get_args(data_args(acdc) + ["--width", "8", "--epochs", str(epochs), "--batch_size", "16",
                                           "--out", str(base / "ref"), *extra]))
    return acdc, str(base / "ref")


def data_args(acdc):
    return ["--data", os.path.join(acdc[1], "slices.h5"), "--splits", os.path.join(acdc[1], "splits.json")]
