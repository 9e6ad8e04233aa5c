"""examples/monai_basicunet.py and examples/smp_unet.py on a tiny task with copies of iac.py and lth.py only,
iac.probe_levels, and lth.end_of_epoch."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import lth
from common.iac import EDGES, OPS, IACSearchSkips, IACSkips, probe_levels, read_genotype, validate_genotype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "monai_basicunet.py")
SMP_EXAMPLE = os.path.join(ROOT, "examples", "smp_unet.py")
# run a script as `python SCRIPT ARGS` would (its folder first on sys.path), then write every loaded module's
# file, even when the script fails
RUNNER = """import json, os, runpy, sys
script, modules = sys.argv[1], sys.argv[2]
sys.argv, sys.path[0] = [script] + sys.argv[3:], os.path.dirname(os.path.abspath(script))
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(modules, "w") as f:
        json.dump({n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}, f)
"""
TINY_RUN = ["--n_train", "32", "--n_test", "16", "--batch_size", "16", "--pretrain_epochs", "8", "--search_epochs",
            "30", "--warmup", "2", "--gamma", "1.5", "--finetune_epochs", "25"]
TINY = ["--features", "8", "8", "16", "16", "32", "8", *TINY_RUN]


def run_example(cwd, script, args, modules):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", RUNNER, script, str(modules), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def run_copied(tmp_path, example, args, library):
    """Run `example` copied beside copies of iac.py and lth.py into a folder outside the repository; check that it
    used those copies and `library`, and that nothing else of the project was imported. Returns (run, summary)."""
    ex = tmp_path / "ex"
    ex.mkdir()
    for src in (example, os.path.join(ROOT, "common", "iac.py"), os.path.join(ROOT, "common", "lth.py")):
        shutil.copy(src, ex)
    out, modules = tmp_path / "out", tmp_path / "modules.json"
    r = run_example(tmp_path, str(ex / os.path.basename(example)), args + ["--out", str(out)], modules)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    loaded = json.loads(modules.read_text())
    assert os.path.realpath(loaded["iac"]) == os.path.realpath(ex / "iac.py")
    assert os.path.realpath(loaded["lth"]) == os.path.realpath(ex / "lth.py")
    assert library in loaded
    project = sorted(n for n in loaded if n.split(".")[0] in ("common", "nnunet_iac"))
    venv = os.path.realpath(sys.prefix) + os.sep                         # the libraries may live in ROOT/.venv
    files = {n: os.path.realpath(f) for n, f in loaded.items() if f and os.path.isabs(f)}
    inside = sorted(n for n, f in files.items() if f.startswith(ROOT + os.sep) and not f.startswith(venv))
    assert project == [] and inside == [], (project, inside)

    s = json.loads((out / "summary.json").read_text())
    validate_genotype(s["genotype"])                                     # 2 inputs per node, known ops
    g = read_genotype(str(out / "genotype.json"))
    assert g["edges"] == s["genotype"]["edges"] and g["search"]["mode"] == "lth"
    assert g["search"]["geometry"] == {"skip_channels": s["skip_channels"], "up_channels": s["up_channels"],
                                       "cell_channels": None}
    assert s["search"]["stopped_early"] and s["search"]["epochs_run"] < s["search"]["epochs_cap"]
    assert s["search"]["lth"]["tau0"] > 0 and s["search"]["lth"]["js_support"] == "common"
    assert s["dice_cells"] > s["dice_chance"] + 0.2, s                   # stage III learnt the task
    assert s["dice_cells"] > s["dice_theta0"] + 0.2, s                   # ... from the cells at θ0
    assert s["pred_shape"] == [s["input_shape"][0], *s["input_shape"][2:]]   # one (H, W) mask per input
    assert "stopped: one op per edge" in r.stdout and "stage III epoch 25/25" in r.stdout
    return r, s


def test_monai_example_with_copied_files_only(tmp_path):
    """The chain (stage I, LTH search to its stop rule, θ0 reset, stage III, prediction) with the example,
    iac.py and lth.py copied into a folder outside the repository: nothing else of the project is imported."""
    pytest.importorskip("monai")
    _, s = run_copied(tmp_path, EXAMPLE, TINY, "monai")
    assert s["skip_channels"] == [8, 8, 16, 16] and s["up_channels"] == [8, 8, 8, 16]   # UpCat halves 16 -> 8


def test_smp_example_with_copied_files_only(tmp_path):
    """The same chain in segmentation_models_pytorch's Unet (mobilenet_v2, depth 3, no weights downloaded): two
    skips, level 0 at H/2 (the full-resolution block has none); the channels read by iac.probe_levels, with the
    up-sampled tensor first in smp's concatenation and 16 / 16 channels at level 0."""
    pytest.importorskip("segmentation_models_pytorch")
    _, s = run_copied(tmp_path, SMP_EXAMPLE, TINY_RUN, "segmentation_models_pytorch")
    assert s["skip_channels"] == [16, 24] and s["up_channels"] == [16, 32]   # decoder_channels[0], encoder's last
    assert s["level_sizes"] == [[16, 16], [8, 8]]                         # of a 32 x 32 input: finest first


@pytest.mark.parametrize("example, library, flag", [(EXAMPLE, "monai", ["--warmup", "0"]),
                                                     (EXAMPLE, "monai", ["--lr_arch", "0"]),
                                                     (SMP_EXAMPLE, "segmentation_models_pytorch", ["--warmup", "0"])],
                         ids=["monai-warmup0", "monai-lr_arch0", "smp-warmup0"])
def test_examples_say_when_tau0_is_not_calibrated(tmp_path, example, library, flag):
    """--warmup 0: the test of epoch 0 records p, that of epoch 1 calibrates τ0. --lr_arch 0: α never moves, the
    median JS stays 0, τ0 is never calibrated and nothing is pruned. The examples print 'τ0 not calibrated yet'
    and finish (they used to format τ0 = None and end in a TypeError)."""
    pytest.importorskip(library)
    few = ["--n_train", "8", "--n_test", "4", "--batch_size", "8", "--pretrain_epochs", "1", "--search_epochs", "3",
           "--finetune_epochs", "1", "--warmup", "1"]
    out = tmp_path / "out"
    r = run_example(tmp_path, example, few + flag + ["--out", str(out)], tmp_path / "modules.json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = {ln.split()[2]: ln for ln in r.stdout.splitlines() if ln.startswith("search epoch ")}
    tau0 = json.loads((out / "summary.json").read_text())["search"]["lth"]["tau0"]
    if flag[0] == "--warmup":
        assert "τ0 not calibrated yet" in lines["1/3"] and "(warm-up)" not in lines["1/3"]
        assert f"τ0 {tau0:.2e}" in lines["2/3"] and tau0 > 0 and "pruned 0" in lines["2/3"]
    else:
        assert "(warm-up)" in lines["1/3"] and "τ0" not in lines["1/3"]
        assert all("τ0 not calibrated yet" in lines[e] and "pruned 0" in lines[e] for e in ("2/3", "3/3"))
        assert tau0 is None and "cap reached" in r.stdout


@pytest.mark.parametrize("example, library, n_flags", [(EXAMPLE, "monai", 21),
                                                       (SMP_EXAMPLE, "segmentation_models_pytorch", 23)],
                         ids=["monai", "smp"])
def test_examples_from_the_repository_help(tmp_path, example, library, n_flags):
    """Run where it lies, an example imports iac and lth from common/ as top-level modules (never `common.*`);
    --help shows every flag's default."""
    pytest.importorskip(library)
    modules = tmp_path / "modules.json"
    r = run_example(ROOT, example, ["--help"], modules)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = json.loads(modules.read_text())
    assert os.path.realpath(loaded["iac"]) == os.path.realpath(os.path.join(ROOT, "common", "iac.py"))
    assert os.path.realpath(loaded["lth"]) == os.path.realpath(os.path.join(ROOT, "common", "lth.py"))
    assert not [n for n in loaded if n.split(".")[0] in ("common", "nnunet_iac")]
    assert "level 0 is the finest skip" in r.stdout
    options = r.stdout[r.stdout.index("options:"):].split("\n  --")[1:]       # after -h: one entry per flag
    assert len(options) == n_flags and all("(default: " in " ".join(o.split()) for o in options), options


GENO = {"edges": [["sep_conv_3x3", 0, 2], ["skip_connect", 1, 2], ["dil_conv_5x5", 0, 3], ["max_pool_3x3", 2, 3],
                  ["avg_pool_3x3", 1, 4], ["sep_conv_5x5", 3, 4], ["dil_conv_3x3", 2, 5], ["skip_connect", 4, 5]],
        "concat": [2, 3, 4, 5]}


def moved(alpha, scale, edges, gen):
    """α with a random move of size `scale` on `edges`."""
    a = alpha.clone()
    a[edges] += scale * torch.randn(len(edges), len(OPS), generator=gen, dtype=a.dtype)
    return a


def test_end_of_epoch_calibrates_prunes_and_stops():
    """lth.end_of_epoch: nothing before the last warm-up epoch, which only records p; the next test sets τ0 and
    prunes nothing; then stable edges lose their ops (modules gone), unstable ones grow τ by γ; it stops when every
    edge has one op. An optimizer built before a prune still holds the removed weights (rebuild it)."""
    torch.manual_seed(0)
    skips = IACSearchSkips([4], [4])
    state = lth.LTHState(len(EDGES), tau0_rel=0.5, gamma=2.0)
    gen = torch.Generator().manual_seed(0)
    for epoch in (0, 1):                                                 # warm-up of 3: nothing happens
        info = lth.end_of_epoch(skips, state, epoch, warmup=3)
        assert info["js"] is None and state.prev is None and info["pruned"] == [] and not info["stopped"]
    info = lth.end_of_epoch(skips, state, 2, warmup=3)                   # last warm-up epoch: records p
    assert info["js"] is None and state.prev is not None and state.tau is None
    with torch.no_grad():
        skips.alpha.copy_(moved(skips.alpha, 1e-2, list(range(len(EDGES))), gen))
    info = lth.end_of_epoch(skips, state, 3, warmup=3)                   # first after warm-up: τ0, no prune
    assert info["pruned"] == [] and state.tau0 == pytest.approx(0.5 * float(info["js"].median()))
    assert int(skips.op_mask.sum()) == len(EDGES) * len(OPS)

    w_opt = torch.optim.SGD(skips.weight_parameters(), lr=0.01)
    stable, unstable = list(range(7)), list(range(7, len(EDGES)))
    with torch.no_grad():                                                # edges 0-6 still, 7-13 move a lot
        skips.alpha.copy_(moved(skips.alpha, 1.0, unstable, gen))
    tau = state.tau.clone()
    I = skips.importance()
    info = lth.end_of_epoch(skips, state, 4, warmup=3)
    assert sorted({e for e, _ in info["pruned"]}) == stable
    for e, o in info["pruned"]:
        assert OPS[o] not in skips.cells[0].edges[str(e)].ops and not skips.op_mask[e, o]
        assert I[e, o] < I[e][skips.op_mask[e]].max()                     # never the edge's best op
    assert torch.allclose(state.tau[unstable], 2.0 * tau[unstable]) and torch.equal(state.tau[stable], tau[stable])
    held = {id(p) for g in w_opt.param_groups for p in g["params"]}
    assert len(held) > len({id(p) for p in skips.weight_parameters()})  # the old optimizer keeps pruned weights

    for epoch in range(5, 5 + len(OPS)):                                 # α still: every edge stable, ≥ 1 op each
        info = lth.end_of_epoch(skips, state, epoch, warmup=3)
        if info["stopped"]:
            break
    assert info["stopped"] and lth.all_edges_single(skips.op_mask)
    validate_genotype(skips.derive_genotype())


def test_the_projects_search_loop_uses_the_copyable_helper():
    """common/search.py's end_of_epoch: lth mode is lth.end_of_epoch itself (one copy of the JS test, prune and
    stop, tested above by hand); full mode records the importance and never prunes or stops."""
    search = pytest.importorskip("common.search")
    torch.manual_seed(1)
    a = IACSearchSkips([4, 8], [8, 4])
    b = copy.deepcopy(a)
    sa, sb = (lth.LTHState(len(EDGES), tau0=1.0, gamma=1.1) for _ in range(2))   # every edge stable at every test
    calls = []
    real = search.lth_end_of_epoch
    search.lth_end_of_epoch = lambda *args: calls.append(args) or real(*args)
    try:
        pruned = [search.end_of_epoch(a, sa, "lth", epoch, 2)["pruned"] for epoch in range(4)]
    finally:
        search.lth_end_of_epoch = real
    assert real is lth.end_of_epoch
    assert [c[2] for c in calls] == [0, 1, 2, 3] and all(c[0] is a and c[1] is sa for c in calls)
    assert pruned[0] == pruned[1] == [] and pruned[2] and int(a.op_mask.sum()) < len(EDGES) * len(OPS)
    for epoch in range(40):
        ib = search.end_of_epoch(b, sb, "full", epoch, 2)
        assert ib["pruned"] == [] and not ib["stopped"] and ib["js"] is None
    assert bool(b.op_mask.all()) and torch.equal(ib["importance"], b.importance())


class ToyUNet(nn.Module):
    """Two skip levels, 4 channels at full resolution (level 0) and 8 at H/2, each as many as the up-sampled tensor
    beside it; `skip_first` picks the concatenation order (smp puts the up-sampled tensor first)."""

    def __init__(self, skip_first):
        super().__init__()
        self.skip_first = skip_first
        self.enc0, self.enc1 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.bottom = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.fuse1, self.fuse0 = nn.Conv2d(16, 4, 1), nn.Conv2d(8, 2, 1)

    def cat(self, skip, up):
        return torch.cat([skip, up] if self.skip_first else [up, skip], dim=1)

    def forward(self, x):
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        d1 = self.fuse1(self.cat(e1, F.interpolate(self.bottom(e1), scale_factor=2)))
        return self.fuse0(self.cat(e0, F.interpolate(d1, scale_factor=2)))


@pytest.mark.parametrize("skip_first", [True, False])
def test_probe_levels_finds_the_skip_end_even_with_equal_channels(skip_first):
    """iac.probe_levels: per level the skip and up channels, the size and the order, from one dry forward in eval
    mode (no BatchNorm statistics change, the mode and the hooks are restored). With equal channels a swapped
    split passes the cells' channel check; only the probe tells which end is the encoder's tensor."""
    torch.manual_seed(0)
    net = ToyUNet(skip_first).train()
    stats = net.bottom[1].running_mean.clone()
    levels = probe_levels(net, torch.randn(2, 1, 16, 16), [net.fuse0, net.fuse1], [net.enc0, net.enc1])
    assert levels == [{"skip": 4, "up": 4, "size": (16, 16), "skip_first": skip_first},
                      {"skip": 8, "up": 8, "size": (8, 8), "skip_first": skip_first}]
    assert net.training and torch.equal(net.bottom[1].running_mean, stats)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())

    skips = IACSearchSkips([4, 8], [4, 8])
    skips.prepare(None)
    skip, up = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    assert skips(0, up, skip).shape == skips(0, skip, up).shape             # a swap the cells cannot see


def test_probe_levels_and_the_cells_say_what_is_wrong():
    """The contract checks: points not finest first, a point that takes no concatenation of an encoder output, a
    point never called; a swapped pair with different channels is refused by the cells, naming the swap."""
    net = ToyUNet(skip_first=False)
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="IAC level 1 is finer than level 0: give the points finest first"):
        probe_levels(net, x, [net.fuse1, net.fuse0], [net.enc0, net.enc1])
    with pytest.raises(ValueError, match=r"IAC level 0: no end of the concatenation \(2, 8, 16, 16\) is an encoder "
                                         r"output; does points\[0\] take cat\(skip, up\)\?"):
        probe_levels(net, x, [net.fuse0, net.fuse1], [net.enc1])               # enc0 (level 0's skip) not given
    with pytest.raises(ValueError, match=r"IAC level 1: points\[1\] was not called"):
        probe_levels(net, x, [net.fuse0, nn.Identity()], [net.enc0, net.enc1])
    for skips in (IACSearchSkips([8, 16], [16, 32]), IACSkips(GENO, [8, 16], [16, 32])):
        skips.prepare(None)
        with pytest.raises(ValueError, match=r"IAC level 1: skip / up have 32 / 16 channels, the cell was built for "
                                             r"16 / 32 \(skip and up may be swapped"):
            skips(1, torch.randn(2, 32, 8, 8), torch.randn(2, 16, 8, 8))


def test_probe_levels_reads_smp_and_monai_unets():
    """The two examples' U-Nets: smp concatenates cat([up, skip]) with level 0 at H/2 (16 / 16 channels with the
    smp example's defaults), MONAI's BasicUNet cat([skip, up]) with level 0 at full resolution."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    monai_nets = pytest.importorskip("monai.networks.nets")
    x = torch.randn(2, 1, 32, 32)
    unet = smp.Unet("mobilenet_v2", encoder_depth=3, encoder_weights=None, in_channels=1, classes=2,
                    decoder_channels=(16, 16, 8))
    levels = probe_levels(unet, x, [b.attention1 for b in unet.decoder.blocks[:-1]][::-1], unet.encoder)
    assert levels == [{"skip": 16, "up": 16, "size": (16, 16), "skip_first": False},
                      {"skip": 24, "up": 32, "size": (8, 8), "skip_first": False}]
    b = monai_nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8))
    levels = probe_levels(b, x, [b.upcat_1.convs, b.upcat_2.convs, b.upcat_3.convs, b.upcat_4.convs],
                          [b.conv_0, b.down_1, b.down_2, b.down_3])
    assert [(lv["skip"], lv["up"], lv["size"][0], lv["skip_first"]) for lv in levels] == \
        [(8, 8, 32, True), (8, 8, 16, True), (16, 8, 8, True), (16, 16, 4, True)]


def test_tau0_waits_for_a_positive_median_and_warmup_0():
    """The τ0 rule (lth.py): the first test records p; a test whose median JS is 0 calibrates nothing and prunes
    nothing; the next one with a positive median calibrates (and prunes nothing). With warmup=0 the test runs from
    epoch 0; a negative warm-up is refused."""
    st = lth.LTHState(3, tau0_rel=0.5)
    mask = torch.ones(3, 7, dtype=torch.bool)
    I0 = torch.full((3, 7), 1 / 7)
    assert st.step(I0, mask) == (None, None, [])                        # records p
    js, tau, pr = st.step(I0, mask)                                      # α has not moved: median 0
    assert float(js.max()) == 0 and tau is None and pr == [] and st.tau0 is None and st.tau is None
    I1 = I0.clone()
    I1[:, 0] = torch.tensor([0.16, 0.18, 0.24])
    js, tau, pr = st.step(I1, mask)                                      # the calibration test
    assert tau is None and pr == [] and st.tau0 == pytest.approx(0.5 * float(js.median())) and st.tau0 > 0

    skips = IACSearchSkips([4], [4])
    state = lth.LTHState(len(EDGES), tau0_rel=0.5)
    info = lth.end_of_epoch(skips, state, 0, warmup=0)                   # epoch 0: records p
    assert info["js"] is None and state.prev is not None and state.tau0 is None
    info = lth.end_of_epoch(skips, state, 1, warmup=0)                   # α still: median 0, tries again
    assert float(info["js"].max()) == 0 and state.tau0 is None and info["pruned"] == []
    with torch.no_grad():
        skips.alpha.copy_(moved(skips.alpha, 1e-2, list(range(len(EDGES))), torch.Generator().manual_seed(0)))
    info = lth.end_of_epoch(skips, state, 2, warmup=0)
    assert state.tau0 == pytest.approx(0.5 * float(info["js"].median())) and info["pruned"] == []
    with pytest.raises(ValueError, match="warmup must be 0 or more epochs, not -1"):
        lth.end_of_epoch(skips, state, 3, warmup=-1)
