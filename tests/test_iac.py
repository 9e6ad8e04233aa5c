"""Stage II (03, the search): every equation against hand-computed values, pruning, genotypes, both searches, resume."""
import json
import os

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from common.iac import (EDGES, OPS, IACSearchSkips, IACSkips, cap_edge_weights, edge_weights, init_from_theta0,
                        make_theta0, op_weights, read_genotype, top2_incoming, validate_genotype, write_genotype)
from common.search import TAU0_REL, settings_from_env
from common.lth import LTHState, all_edges_single, importance_distribution, js_divergence, ops_to_prune
from common.data import load_splits, read_meta
from common.utils import InputError
from conftest import data_args, small_phantom_and_backbone

GENO = {"edges": [["sep_conv_3x3", 0, 2], ["skip_connect", 1, 2], ["dil_conv_5x5", 0, 3], ["max_pool_3x3", 2, 3],
                  ["avg_pool_3x3", 1, 4], ["sep_conv_5x5", 3, 4], ["dil_conv_3x3", 2, 5], ["skip_connect", 4, 5]],
        "concat": [2, 3, 4, 5]}


def test_cap_not_triggered():
    w = torch.tensor([0.5, 0.3, 0.2])
    assert torch.equal(cap_edge_weights(w), w)


def test_cap_triggered():
    w = torch.tensor([0.1, 0.7, 0.2])
    torch.testing.assert_close(cap_edge_weights(w), torch.tensor([0.5 * 0.1 / 0.3, 0.5, 0.5 * 0.2 / 0.3]))
    assert abs(cap_edge_weights(w).sum().item() - 1) < 1e-6


def test_cap_two_edge_node_and_eq5():
    beta = torch.zeros(14)
    beta[0], beta[1] = 2.0, -1.0                         # node 2 has edges 0, 1
    w = edge_weights(beta, torch.ones(14, dtype=torch.bool), "tanh")
    z = torch.tanh(torch.tensor([2.0, -1.0]))
    soft = torch.softmax(z - z.max(), 0)                   # Eq. (5): (0.855, 0.145)
    assert soft[0] > 0.5
    torch.testing.assert_close(w[:2], torch.tensor([0.5, 0.5]))   # capped: the other edge gets all of 0.5
    torch.testing.assert_close(w[2:5], torch.full((3,), 1 / 3))   # node 3: uniform, no cap


def test_op_weights_masked_softmax():
    alpha = torch.zeros(14, 7)
    mask = torch.ones(14, 7, dtype=torch.bool)
    mask[0, :5] = False
    p = op_weights(alpha, mask)
    torch.testing.assert_close(p[0], torch.tensor([0, 0, 0, 0, 0, 0.5, 0.5]))
    torch.testing.assert_close(p[1], torch.full((7,), 1 / 7))


def test_js_against_scipy():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(7), size=5), rng.dirichlet(np.ones(7), size=5)
    ours = js_divergence(torch.tensor(p), torch.tensor(q), eps=0).numpy()
    ref = np.array([jensenshannon(a, b) ** 2 for a, b in zip(p, q)])       # natural log
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-14)


def test_importance_distribution_uniform_when_zero():
    I = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    torch.testing.assert_close(importance_distribution(I, eps=0), torch.tensor([[0.5, 0.5], [0.25, 0.75]]))


def test_outlier_pruning():
    I = torch.tensor([0.20, 0.21, 0.19, 0.20, 0.20, 0.01, 0.02])
    # μ = 0.147, σ = 0.0807 -> μ - σ = 0.066: ops 5 and 6 are outliers
    assert ops_to_prune(I, torch.ones(7, dtype=torch.bool), 1.0) == [5, 6]


def test_fallback_pruning():
    I = torch.tensor([0.10, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16])     # evenly spread: no value below μ − 1.6σ
    assert ops_to_prune(I, torch.ones(7, dtype=torch.bool), 1.6) == [0]


def test_keep_one_and_masked_ops():
    active = torch.tensor([False, True, True, False, False, False, False])
    I = torch.tensor([0.0, 0.3, 0.1, 0, 0, 0, 0])
    assert ops_to_prune(I, active, 1.0) == [2]             # fallback leaves op 1
    assert ops_to_prune(I, torch.tensor([False, True] + [False] * 5), 1.0) == []
    assert ops_to_prune(torch.tensor([0.3, 0.2]), torch.ones(2, dtype=torch.bool), -5.0) == [1]   # never both


def test_lth_state_threshold_and_prune():
    st = LTHState(2, tau0=1e-3, gamma=2.0, k_std=1.0)
    mask = torch.ones(2, 7, dtype=torch.bool)
    I0 = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.1, 0.05, 0.05], [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2]])
    js, tau, pr = st.step(I0, mask)
    assert js is None and pr == []
    I1 = I0.clone()
    I1[1] = torch.tensor([0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.45])        # edge 1 moves, edge 0 stays
    js, tau, pr = st.step(I1, mask)
    assert js[0] < 1e-12 and js[1] > 1e-3
    assert {e for e, _ in pr} == {0}                                  # only the stable edge prunes
    assert st.tau[0] == 1e-3 and st.tau[1] == 2e-3                    # τ grows where unstable


def test_calibration_test_prunes_nothing_and_sets_tau0_from_the_median():
    st = LTHState(3, tau0_rel=0.5, gamma=2.0, k_std=1.0)
    mask = torch.ones(3, 7, dtype=torch.bool)
    I0 = torch.full((3, 7), 1 / 7)
    assert st.step(I0, mask) == (None, None, [])                     # end of warm-up: remembered only
    I1 = I0.clone()
    I1[0, 0], I1[1, 0], I1[2, 0] = 0.16, 0.18, 0.24                    # three sizes of move
    js, tau, pr = st.step(I1, mask)
    assert pr == [] and tau is None                                  # the calibration test prunes nothing
    assert st.tau0 == pytest.approx(0.5 * float(js[1])) and torch.all(st.tau == st.tau0)   # κ · median
    js, tau, pr = st.step(I1, mask)                                  # nothing moved: every edge is stable
    assert torch.all(tau == st.tau0) and {e for e, _ in pr} == {0, 1, 2}
    assert st.settings() == {"tau0_rel": 0.5, "tau0": st.tau0, "gamma": 2.0, "k_std": 1.0, "eps": 1e-8,
                             "js_support": "common"}


def test_calibration_waits_while_alpha_does_not_move():
    st = LTHState(2, tau0_rel=0.1)
    mask = torch.ones(2, 7, dtype=torch.bool)
    I = torch.full((2, 7), 1 / 7)
    st.step(I, mask)
    assert st.step(I, mask)[1:] == (None, []) and st.tau is None     # JS = 0: no scale to calibrate on yet


def test_common_support_js_ignores_a_prune():
    p = torch.tensor([[0.30, 0.25, 0.15, 0.10, 0.08, 0.07, 0.05]], dtype=torch.float64)
    mask_before = torch.ones(1, 7, dtype=torch.bool)
    q = p.clone()
    q[0, 6] = 0                                                      # op 6 pruned, the others unchanged
    q = q / q.sum()
    mask_after = mask_before.clone()
    mask_after[0, 6] = False
    assert float(js_divergence(p, q, 1e-8, mask_before & mask_after)) < 1e-12
    assert float(js_divergence(p, q, 1e-8)) > 1e-2                  # `all`: the prune reads as a change
    st = LTHState(1, tau0=1e-6, js_support="common")
    st.step(p, mask_before)
    js, _, pr = st.step(q, mask_after)
    assert float(js[0]) < 1e-12 and pr                               # stable right after the prune


def test_threshold_settings_exclusive(scripts, acdc, backbone):
    with pytest.raises(ValueError, match="exactly one"):
        LTHState(14, tau0=1e-3, tau0_rel=0.1)
    s = scripts["03_search"]
    with pytest.raises(SystemExit):
        s.get_args(search_args(acdc, backbone, "x", "lth", "--tau0", "1e-3", "--tau0_rel", "0.1"))
    a = s.get_args(search_args(acdc, backbone, "x", "lth", "--tau0", "1e-3"))
    assert a.tau0 == 1e-3 and a.tau0_rel is None
    assert s.get_args(search_args(acdc, backbone, "x", "lth")).tau0_rel == TAU0_REL


def test_one_table_of_search_defaults(scripts, acdc, backbone):
    """03_search.py's flags and the nnU-Net trainers' IAC_* variables read the same defaults."""
    args = vars(scripts["03_search"].get_args(search_args(acdc, backbone, "x", "lth")))
    env = vars(settings_from_env({}))
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)  # nargs values: lists or tuples
    assert env and all(norm(args[k]) == norm(v) for k, v in env.items() if k != "epochs")
    assert env["epochs"] == 200                                      # the paper's search length, not nnU-Net's 1000
    e = settings_from_env({"IAC_TAU0": "1e-4", "IAC_ARCH_BETAS": "0.9,0.99", "IAC_JS_SUPPORT": "all"})
    assert e.tau0 == 1e-4 and e.tau0_rel is None and e.arch_betas == (0.9, 0.99) and e.js_support == "all"
    for bad, msg in [({"IAC_TAU0": "1", "IAC_TAU0_REL": "0.1"}, "not both"), ({"IAC_GAMMA": "x"}, "IAC_GAMMA"),
                     ({"IAC_EDGE_RULE": "best"}, "choose one of"), ({"IAC_ARCH_BETAS": "0.5"}, "2 comma")]:
        with pytest.raises(ValueError, match=msg):
            settings_from_env(bad)


def test_edge_rule_paper_and_pc_darts():
    """Node 3 (edges 0->3, 1->3, 2->3): β favours 0->3 and 1->3, α makes one op on 2->3 dominant."""
    s = IACSearchSkips([8], [16])
    e03, e13, e23 = (EDGES.index((i, 3)) for i in range(3))
    with torch.no_grad():
        s.beta[e03], s.beta[e13], s.beta[e23] = 1.0, 1.0, 0.5
        s.alpha[e23, 0] = 10.0
    by_w = {(a, b) for _, a, b in s.derive_genotype("w")["edges"] if b == 3}
    by_imp = {(a, b) for _, a, b in s.derive_genotype("max_importance")["edges"] if b == 3}
    assert by_w == {(0, 3), (1, 3)} and by_imp == {(0, 3), (2, 3)}
    assert s.edge_weights()[e23] < s.edge_weights()[e13]
    validate_genotype(s.derive_genotype("w"))
    assert top2_incoming(torch.zeros(14)) == [0, 1, 2, 3, 5, 6, 9, 10]   # ties: the lower edge index


def test_stop_rule():
    m = torch.zeros(14, 7, dtype=torch.bool)
    m[:, 0] = True
    assert all_edges_single(m)
    m[3, 4] = True
    assert not all_edges_single(m)


def test_arch_and_weight_parameters_disjoint():
    s = IACSearchSkips([8, 16], [16, 32])
    a = {id(p) for p in s.arch_parameters()}
    w = {id(p) for p in s.weight_parameters()}
    assert a and w and not (a & w)
    assert a | w == {id(p) for p in s.parameters()}


def test_pruned_op_is_gone():
    s = IACSearchSkips([8, 16], [16, 32])
    n0 = sum(p.numel() for p in s.weight_parameters())
    s.prune_op(0, OPS.index("sep_conv_5x5"))
    assert "sep_conv_5x5" not in s.cells[0].edges["0"].ops and "sep_conv_5x5" not in s.cells[1].edges["0"].ops
    assert sum(p.numel() for p in s.weight_parameters()) < n0
    assert s.importance()[0, OPS.index("sep_conv_5x5")] == 0
    s.prune_edge(5)
    assert "5" not in s.cells[0].edges
    s.prepare(None)
    assert s(0, torch.randn(2, 8, 16, 16), torch.randn(2, 16, 16, 16)).shape == (2, 8, 16, 16)


def test_dry_run_prints_the_estimate_and_writes_nothing(tmp_path, scripts, acdc, backbone, capsys):
    s = scripts["03_search"]
    out = str(tmp_path / "dry")
    s.main(s.get_args(search_args(acdc, backbone, out, "lth", "--dry_run")))
    text = capsys.readouterr().out
    assert "backward memory estimate at batch 32" in text and "cell level 3" in text and "no GPU memory" in text
    assert not os.path.exists(out)


def test_full_step_frees_the_arch_graph_before_the_weight_forward():
    """Bilevel step: autograd.grad on α, β never reaches the ops' internal activations; they must be freed
    before the weight step's forward, not held beside it (measured on an H200: ~20 GB at batch 128)."""
    import weakref

    from common.search import arch_optimizer, search_step, weight_optimizer
    torch.manual_seed(0)
    s = IACSearchSkips([8], [16])
    w_opt, a_opt = weight_optimizer(s, 0.01), arch_optimizer(s, 1e-3, (0.5, 0.999), 1e-3)
    alive, calls = [], []

    class Box:                                             # weak-referenceable holder of a saved tensor
        def __init__(self, t):
            self.t = t

    def pack(t):
        box = Box(t.detach())                              # detached: no cycle through the node
        alive.append(weakref.ref(box))
        return box

    def loss_of(batch):
        calls.append(sum(r() is not None for r in alive))  # saved tensors still held when this forward starts
        s.prepare(None)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
            return s(0, *batch).square().mean()

    batch = (torch.randn(2, 8, 8, 8), torch.randn(2, 16, 8, 8))
    search_step("full", True, s, w_opt, a_opt, loss_of, batch, lambda: batch)
    assert len(calls) == 2 and calls[0] == 0 and len(alive) > 100
    assert calls[1] == 0, f"{calls[1]} tensors of the arch step's graph are still held during the weight forward"


def test_theta0_slices_and_full_width_reset():
    torch.manual_seed(0)
    theta0 = make_theta0([8], [16])
    s = IACSearchSkips([8], [16])
    init_from_theta0(s, theta0)
    k = "cells.0.edges.3.ops.sep_conv_3x3.2.weight"                    # 1x1 conv: (C, C, 1, 1) -> (C/4, C/4, 1, 1)
    assert torch.equal(s.state_dict()[k], theta0[k][:2, :2])
    d = IACSkips(GENO, [8], [16])
    init_from_theta0(d, theta0, strict_shapes=True)
    for name, v in d.state_dict().items():
        assert torch.equal(v, theta0[name]), name


def test_genotype_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "g.json")
    write_genotype(path, GENO, {"mode": "lth"})
    g = read_genotype(path)
    assert g["edges"] == GENO["edges"] and g["search"]["mode"] == "lth"
    bad = {
        "unknown operation 'conv_7x7'": [["conv_7x7", 0, 2]] + GENO["edges"][1:],
        "bad node indices 3->2": [["skip_connect", 3, 2]] + GENO["edges"][1:],
        "node 2 has 1": GENO["edges"][1:],
        "bad node indices 0->6": GENO["edges"] + [["skip_connect", 0, 6]],
    }
    for msg, edges in bad.items():
        with pytest.raises(ValueError, match=msg):
            validate_genotype({"edges": edges})
        with open(path, "w") as f:
            json.dump({"edges": edges, "concat": [2, 3, 4, 5]}, f)
        with pytest.raises(ValueError, match="g.json"):
            read_genotype(path)


def search_args(acdc, backbone, out, mode, *extra):
    return ["--backbone", os.path.join(backbone, "ckpt_best.pt"), *data_args(acdc), "--mode", mode,
            "--batch_size", "32", "--out", out, *extra]


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory, scripts):
    """The invariance benchmark's set-up: 8 ACDC phantom patients at 32x32 and a 15-epoch base U-Net."""
    return small_phantom_and_backbone(tmp_path_factory.mktemp("small"), scripts, 8, 0, 15)


def test_default_lth_stops_in_the_band_whatever_the_steps_per_epoch(tmp_path, scripts, small_phantom):
    """The paper's schedule (cap 200, warm-up 15) with the default self-calibrating JS test: with 1 and
    with 4 optimizer steps per epoch the search stops inside one band <= 15 wide within 35-65
    (epoch counts are deterministic on CPU; benchmarks/RESULTS.md has 54 and 46)."""
    s = scripts["03_search"]
    acdc, ref = small_phantom
    stops = {}
    for batch in (64, 16):
        out = str(tmp_path / f"b{batch}")
        s.main(s.get_args(search_args(acdc, ref, out, "lth", "--batch_size", str(batch))))
        g = read_genotype(os.path.join(out, "genotype.json"))["search"]
        traj = [json.loads(ln) for ln in open(os.path.join(out, "trajectory.jsonl"))]
        calib = traj[15]                                               # the first test after warm-up
        assert calib["js"] is not None and calib["pruned"] == [] and calib["tau"] is None
        lower_median = float(np.sort(calib["js"])[(len(calib["js"]) - 1) // 2])
        assert g["lth"]["tau0"] == pytest.approx(TAU0_REL * lower_median)
        assert traj[16]["tau"] == [g["lth"]["tau0"]] * 14 and g["stopped_early"]
        stops[batch] = g["epochs_run"]
    assert all(35 <= v <= 65 for v in stops.values()) and max(stops.values()) - min(stops.values()) <= 15, stops


def test_lth_search_end_to_end_and_backbone_untouched(tmp_path, scripts, acdc, backbone):
    s = scripts["03_search"]
    out = str(tmp_path / "lth")
    s.main(s.get_args(search_args(acdc, backbone, out, "lth", "--epochs", "40", "--warmup", "1", "--tau0", "0.05",
                                  "--gamma", "1.5")))
    g = read_genotype(os.path.join(out, "genotype.json"))
    assert g["search"]["mode"] == "lth" and g["search"]["stopped_early"]
    traj = [json.loads(ln) for ln in open(os.path.join(out, "trajectory.jsonl"))]
    assert len(traj) == g["search"]["epochs_run"] < 40
    assert sum(map(sum, traj[-1]["op_mask"])) == 14
    assert sum(len(t["pruned"]) for t in traj) == 98 - 14
    assert all(t["js"] is not None for t in traj[1:])
    assert g["search"]["seconds"] > 0
    # killed after the stop epoch's checkpoint, before genotype.json: the resume derives the same genotype from
    # that checkpoint, without one more epoch of β
    for f in ("genotype.json", "done.json"):
        os.remove(os.path.join(out, f))
    s.main(s.get_args(search_args(acdc, backbone, out, "lth", "--epochs", "40", "--warmup", "1", "--tau0", "0.05",
                                  "--gamma", "1.5", "--resume", "auto")))
    again = read_genotype(os.path.join(out, "genotype.json"))
    assert again["edges"] == g["edges"] and again["search"]["epochs_run"] == g["search"]["epochs_run"]
    assert len(open(os.path.join(out, "trajectory.jsonl")).readlines()) == len(traj)


@pytest.mark.parametrize("mode", ["full", "lth"])
def test_backbone_bit_identical_after_search_epochs(scripts, acdc, backbone, mode):
    """Run real search epochs (arch updates on) and compare every backbone weight and BN buffer."""
    s = scripts["03_search"]
    args = s.get_args(search_args(acdc, backbone, "unused", mode, "--warmup", "0"))
    meta = read_meta(args.data)
    from common.checkpoints import load_frozen_backbone
    model, ck = load_frozen_backbone(args.backbone, meta)
    skips = IACSearchSkips(model.skip_channels, model.up_channels)
    model.set_skips(skips)
    splits = load_splits(args.splits, meta)
    names = ("train_search", "val_search") if mode == "full" else ("train_search", "train_search")
    loaders = {k: s.make_loader(s.SliceDataset(args.data, splits[n]), 32, True) for k, n in zip(("train", "val"), names)}
    w_opt = torch.optim.SGD(skips.weight_parameters(), lr=0.01)
    a_opt = torch.optim.Adam(skips.arch_parameters(), lr=1e-3)
    alpha0 = skips.alpha.detach().clone()
    s.search_epoch(args, model, skips, s.SegLoss(), w_opt, a_opt, loaders, 0, torch.device("cpu"), False, False)
    assert not torch.equal(skips.alpha, alpha0)                      # the search did move α
    state = model.state_dict()
    for k, v in ck["model"].items():
        assert torch.equal(state[k], v), k                          # weights and running statistics


def test_full_search_and_resume_equality(tmp_path, scripts, acdc, backbone):
    s = scripts["03_search"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    s.main(s.get_args(search_args(acdc, backbone, a, "full", "--epochs", "3", "--warmup", "1")))
    s.main(s.get_args(search_args(acdc, backbone, b, "full", "--epochs", "3", "--warmup", "1", "--stop_after", "2")))
    assert not os.path.exists(os.path.join(b, "genotype.json"))
    s.main(s.get_args(search_args(acdc, backbone, b, "full", "--epochs", "3", "--warmup", "1", "--resume")))
    ga, gb = read_genotype(os.path.join(a, "genotype.json")), read_genotype(os.path.join(b, "genotype.json"))
    assert ga["edges"] == gb["edges"] and ga["search"]["epochs_run"] == 3
    ta = [json.loads(ln) for ln in open(os.path.join(a, "trajectory.jsonl"))]
    tb = [json.loads(ln) for ln in open(os.path.join(b, "trajectory.jsonl"))]
    assert [t["alpha"] for t in ta] == [t["alpha"] for t in tb]
    assert [t["beta"] for t in ta] == [t["beta"] for t in tb]


def test_lth_resume_after_pruning(tmp_path, scripts, acdc, backbone):
    s = scripts["03_search"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = ["--warmup", "1", "--tau0", "0.05", "--gamma", "1.5"]
    s.main(s.get_args(search_args(acdc, backbone, a, "lth", "--epochs", "5", *flags)))
    s.main(s.get_args(search_args(acdc, backbone, b, "lth", "--epochs", "5", "--stop_after", "3", *flags)))
    s.main(s.get_args(search_args(acdc, backbone, b, "lth", "--epochs", "5", "--resume", *flags)))
    ta = [json.loads(ln) for ln in open(os.path.join(a, "trajectory.jsonl"))]
    tb = [json.loads(ln) for ln in open(os.path.join(b, "trajectory.jsonl"))]
    assert sum(len(t["pruned"]) for t in ta[:3]) > 0                  # the interruption came after pruning
    for x, y in zip(ta, tb):
        assert x["alpha"] == y["alpha"] and x["op_mask"] == y["op_mask"] and x["pruned"] == y["pruned"]
    assert len(ta) == len(tb)
    c = str(tmp_path / "c")
    s.main(s.get_args(search_args(acdc, backbone, c, "lth", "--epochs", "5", "--stop_after", "1", *flags)))
    for changed in (["--gamma", "2.0"], ["--js_support", "all"], ["--tau0_rel", "0.1"]):   # the guard
        f = [x for x in flags if x not in ("--gamma", "1.5", "--tau0", "0.05")] + \
            (["--gamma", "1.5"] if "--gamma" not in changed else []) + \
            (["--tau0", "0.05"] if "--tau0_rel" not in changed else []) + changed
        with pytest.raises(InputError, match="other settings.*" + changed[0].lstrip("-")):
            s.main(s.get_args(search_args(acdc, backbone, c, "lth", "--epochs", "5", "--resume", *f)))


def test_cells_in_2d_and_3d_share_genotype_shapes_and_theta0_slicing():
    """dims=3: the same genotype, the same parameter names with one more kernel dimension, θ0 sliced the
    same way into the partial-channel supernet, outputs of the skip's shape; pruned 3-D ops are gone."""
    from common.iac import channel_shuffle
    geno = {"ops": list(OPS), "edges": [["sep_conv_3x3", 0, 2], ["dil_conv_5x5", 1, 2], ["max_pool_3x3", 0, 3],
                                        ["skip_connect", 2, 3], ["avg_pool_3x3", 1, 4], ["sep_conv_5x5", 3, 4],
                                        ["dil_conv_3x3", 2, 5], ["sep_conv_3x3", 4, 5]], "concat": [2, 3, 4, 5]}
    shapes = {}
    for dims in (2, 3):
        torch.manual_seed(0)
        theta0 = make_theta0([8, 16], [16, 32], dims=dims)
        s = IACSearchSkips([8, 16], [16, 32], dims=dims)
        init_from_theta0(s, theta0)
        k = "cells.0.edges.3.ops.sep_conv_3x3.1.weight"                  # depthwise: (C/4, 1, 3, 3[, 3])
        assert torch.equal(s.state_dict()[k], theta0[k][:2])
        d = IACSkips(geno, [8, 16], [16, 32], dims=dims)
        init_from_theta0(d, theta0, strict_shapes=True)
        size = (6,) * dims
        x = [torch.randn(2, 8, *size), torch.randn(2, 16, *size)]
        s.prepare(None)
        assert s(0, *x).shape == d(0, *x).shape == (2, 8, *size)
        shapes[dims] = {n: tuple(p.shape) for n, p in d.named_parameters()}
        s.prune_op(3, OPS.index("sep_conv_3x3"))
        assert "sep_conv_3x3" not in s.cells[1].edges["3"].ops
    assert shapes[2].keys() == shapes[3].keys()
    for n in shapes[2]:                                                 # 3-D kernels: one more trailing dimension
        assert shapes[3][n][:len(shapes[2][n])] == shapes[2][n] and len(shapes[3][n]) in (len(shapes[2][n]),
                                                                                         len(shapes[2][n]) + 1)
    x = torch.arange(2 * 8 * 3 * 3 * 3.0).view(2, 8, 3, 3, 3)
    y = channel_shuffle(x, 4)
    assert torch.equal(y[:, 1], x[:, 2]) and torch.equal(y[:, 2], x[:, 4])


def test_cells_say_what_is_wrong_with_their_inputs():
    """The contract a copier must keep (common/iac.py's docstring), checked with an error naming the level: the skip
    and the up-sampled tensor of the same spatial size, with the channels the cells were built for."""
    s = IACSearchSkips([8, 16], [16, 32])
    d = IACSkips(GENO, [8, 16], [16, 32])
    for skips in (s, d):
        skips.prepare(None)
        assert skips(1, torch.randn(2, 16, 8, 8), torch.randn(2, 32, 8, 8)).shape == (2, 16, 8, 8)
        with pytest.raises(ValueError, match="IAC level 0: skip .* and up .* differ in size; up-sample"):
            skips(0, torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8))
        with pytest.raises(ValueError, match="IAC level 1: skip / up have 16 / 16 channels, the cell was built "
                                             r"for 16 / 32 \(level 0 is the finest skip\)"):
            skips(1, torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8))
