"""Stage 03: every equation against hand-computed values, pruning, genotypes, both searches, resume."""
import json
import os

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from common.iac import (OPS, IACSearchSkips, IACSkips, cap_edge_weights, edge_weights, init_from_theta0,
                        make_theta0, op_weights, read_genotype, validate_genotype, write_genotype)
from common.lth import LTHState, all_edges_single, importance_distribution, js_divergence, ops_to_prune
from common.data import load_splits, read_meta
from conftest import data_args

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


@pytest.mark.parametrize("mode", ["full", "lth"])
def test_backbone_bit_identical_after_search_epochs(scripts, acdc, backbone, mode):
    """Run real search epochs (arch updates on) and compare every backbone weight and BN buffer."""
    s = scripts["03_search"]
    args = s.get_args(search_args(acdc, backbone, "unused", mode, "--warmup", "0"))
    meta = read_meta(args.data)
    from common.engine import load_frozen_backbone
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
