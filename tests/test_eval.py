"""Stage III (04, the cell) and evaluation (05): train the found cell, θ0 reset, resume, evaluation, statistics,
analysis, NIfTI."""
import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from common.analysis import (arch_epochs, backbone_mean, cosine_matrix, fisher_combined, first_entry_epochs, format_p,
                             genotype_masks, hamming_similarity_matrix, hierarchical_bootstrap, holm, paired_comparison,
                             topk_masks)
from common.iac import EDGES, OPS, edge_weights, op_weights, write_genotype
from common.data import read_meta
from common.metrics import region_metrics
from common.utils import InputError
from conftest import data_args
from test_iac import GENO


@pytest.fixture(scope="module")
def lth_search(tmp_path_factory, scripts, acdc, backbone):
    out = str(tmp_path_factory.mktemp("lth"))
    s = scripts["03_search"]
    s.main(s.get_args(["--backbone", os.path.join(backbone, "ckpt_best.pt"), *data_args(acdc), "--mode", "lth",
                       "--epochs", "30", "--warmup", "1", "--tau0", "0.05", "--gamma", "1.5", "--batch_size", "32",
                       "--out", out]))
    return out


def finetune_args(acdc, backbone, search, out, *extra):
    return ["--backbone", os.path.join(backbone, "ckpt_best.pt"), "--genotype", os.path.join(search, "genotype.json"),
            *data_args(acdc), "--batch_size", "16", "--out", out, *extra]


def test_theta0_really_loaded(tmp_path, scripts, acdc, backbone, lth_search):
    f = scripts["04_finetune"]
    args = f.get_args(finetune_args(acdc, backbone, lth_search, str(tmp_path / "x")))
    model = f.build_model(args, read_meta(args.data))
    assert args.init == "theta0"                            # the default for an LTH genotype
    theta0 = torch.load(os.path.join(lth_search, "theta0.pt"), weights_only=True)["state"]
    for k, v in model.skips.state_dict().items():
        assert torch.equal(v, theta0[k]), k
    fresh = f.build_model(f.get_args(finetune_args(acdc, backbone, lth_search, str(tmp_path / "y"), "--init", "fresh")),
                          read_meta(args.data))
    k = next(k for k in fresh.skips.state_dict() if k.endswith("weight"))
    assert not torch.equal(fresh.skips.state_dict()[k], theta0[k])


def test_finetune_resume_and_frozen_backbone(tmp_path, scripts, acdc, backbone, lth_search):
    f = scripts["04_finetune"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    f.main(f.get_args(finetune_args(acdc, backbone, lth_search, a, "--epochs", "3")))
    f.main(f.get_args(finetune_args(acdc, backbone, lth_search, b, "--epochs", "3", "--stop_after", "1")))
    f.main(f.get_args(finetune_args(acdc, backbone, lth_search, b, "--epochs", "3", "--resume")))
    sa = torch.load(os.path.join(a, "ckpt_last.pt"), weights_only=True)["model"]
    sb = torch.load(os.path.join(b, "ckpt_last.pt"), weights_only=True)["model"]
    bb = torch.load(os.path.join(backbone, "ckpt_best.pt"), weights_only=True)["model"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
        if not k.startswith("skips."):
            assert torch.equal(sa[k], bb[k]), k               # backbone untouched by stage III


def test_the_cell_trains_in_the_backbone_it_was_searched_in(tmp_path, scripts, acdc, backbone, lth_search):
    """genotype.json records the backbone's path and weights hash; 04 takes that backbone by default, accepts a copy
    with the same weights, and refuses one with other weights (another seed's, one more step) naming both, unless
    --allow_other_backbone, which args.json records."""
    f = scripts["04_finetune"]
    meta = read_meta(data_args(acdc)[1])
    searched = json.load(open(os.path.join(lth_search, "genotype.json")))["search"]
    ckpt_path = os.path.join(backbone, "ckpt_best.pt")
    assert searched["backbone"] == os.path.abspath(ckpt_path) and len(searched["backbone_sha256"]) == 16
    args = f.get_args(["--genotype", os.path.join(lth_search, "genotype.json"), *data_args(acdc), "--out",
                       str(tmp_path / "a")])
    f.build_model(args, meta)
    assert args.backbone == searched["backbone"] and args.backbone_sha256 == searched["backbone_sha256"]
    ckpt = torch.load(ckpt_path, weights_only=True)
    torch.save(ckpt, tmp_path / "copy.pt")                                       # the same weights elsewhere
    f.build_model(f.get_args(finetune_args(acdc, backbone, lth_search, str(tmp_path / "b"))[2:] +
                             ["--backbone", str(tmp_path / "copy.pt")]), meta)
    k = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and not k.startswith("skips."))
    ckpt["model"][k] = ckpt["model"][k] + 1e-3                                   # another backbone, same shapes
    torch.save(ckpt, tmp_path / "other.pt")
    other = finetune_args(acdc, backbone, lth_search, str(tmp_path / "c"))[2:] + ["--backbone", str(tmp_path / "other.pt")]
    with pytest.raises(InputError, match=f"searched on {searched['backbone']}.*other.pt has other weights"):
        f.build_model(f.get_args(other), meta)
    args = f.get_args(other + ["--allow_other_backbone"])
    f.build_model(args, meta)
    assert "transferred: searched on" in args.backbone_note and args.allow_other_backbone


def test_evaluate_end_to_end(tmp_path, scripts, acdc, backbone, lth_search):
    f, e = scripts["04_finetune"], scripts["05_evaluate"]
    iac, att = str(tmp_path / "iac"), str(tmp_path / "att")
    f.main(f.get_args(finetune_args(acdc, backbone, lth_search, iac, "--epochs", "1")))
    f.main(f.get_args(["--backbone", os.path.join(backbone, "ckpt_best.pt"), "--skip", "att", *data_args(acdc),
                       "--epochs", "1", "--batch_size", "16", "--out", att]))
    out, nii = str(tmp_path / "eval"), str(tmp_path / "nii")
    e.main(e.get_args([*data_args(acdc), "--run", f"ref={backbone}", "--run", f"iac_lth={iac}", "--run", f"att={att}",
                       "--search", f"lth={lth_search}", "--out", out, "--save_nifti", nii, "--n_boot", "199"]))
    df = pd.read_csv(os.path.join(out, "per_patient.csv"))
    assert list(df.columns) == ["method", "backbone", "seed", "patient", "patient_id", "region", "metric", "value"]
    assert set(df["region"]) == {"RV", "MYO", "LV"} and set(df["metric"]) == {"dice", "hd95", "nsd"}
    splits = json.load(open(os.path.join(acdc[1], "splits.json")))
    assert set(df["patient"]) == set(splits["test"]) and set(df["method"]) == {"ref", "iac_lth", "att"}
    assert set(df["patient_id"]) == set(splits["patients"]["test"]) and len(splits["test"]) > df["patient_id"].nunique()
    paired = pd.read_csv(os.path.join(out, "paired.csv"))
    assert set(paired["method"]) == {"iac_lth", "att"}
    assert (paired["unit"] == "patient").all() and (paired["n"] == len(splits["patients"]["test"])).all()
    assert (paired["family"] == "exploratory").all() and (paired["seeds"] == 1).all()   # no `iac` run: no primary pair
    units = pd.read_csv(os.path.join(out, "paired_by_seed.csv"))
    assert set(units["unit_id"]) == set(splits["patients"]["test"]) and (units["cases"] == 2).all()   # ED + ES
    for name in ("summary.md", "paired.md", "search_cost.md", "overlay.png", "dynamics/lth_dynamics.png",
                 "dynamics/lth_fig4.png", "dynamics/lth_fig7.png", "dynamics/lth_first_entry.csv",
                 "dynamics/lth_hamming_genotype.csv"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    case = splits["test"][0]
    pred = nib.load(os.path.join(nii, "ref_base_seed0", f"{case}.nii.gz"))
    pid = case.split("_frame")[0]
    src = nib.load([os.path.join(r, fn) for r, _, fs in os.walk(acdc[0]) for fn in fs if fn == f"{case}_gt.nii.gz"][0])
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine) and pid in case
    # the scores are those of the whole volume in its original geometry against the original label file
    spacing = nib.affines.voxel_sizes(src.affine)
    p, g = np.asarray(pred.dataobj), np.asarray(src.dataobj)
    for region, label in (("RV", 1), ("MYO", 2), ("LV", 3)):
        want = region_metrics(p == label, g == label, spacing, tolerance=1.0)
        got = df[(df["method"] == "ref") & (df["patient"] == case) & (df["region"] == region)]
        for metric, v in want.items():
            assert got[got["metric"] == metric]["value"].item() == pytest.approx(v, nan_ok=True), (region, metric)
    cost = pd.read_csv(os.path.join(out, "inference_cost.csv")).set_index("method")
    assert cost.loc["ref", "skip_parameters"] == 0 < cost.loc["iac_lth", "skip_parameters"]
    assert cost.loc["iac_lth", "GMACs_per_slice"] > cost.loc["ref", "GMACs_per_slice"] > 0
    assert (cost["seconds_per_case"] > 0).all()
    summary = open(os.path.join(out, "summary.md")).read()
    assert "Dice" in summary and "HD95" in summary and "NSD" in summary


def test_evaluate_rejects_bad_inputs(tmp_path, scripts, acdc, backbone):
    e = scripts["05_evaluate"]
    splits = json.load(open(os.path.join(acdc[1], "splits.json")))
    empty = str(tmp_path / "splits.json")
    json.dump({**splits, "test": []}, open(empty, "w"))
    with pytest.raises(InputError, match="empty"):
        e.main(e.get_args(["--data", data_args(acdc)[1], "--splits", empty, "--run", f"r={backbone}",
                           "--out", str(tmp_path / "o")]))
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    write_genotype(str(lonely / "genotype.json"), GENO, {"mode": "lth", "epochs_run": 1, "seconds": 1.0,
                                                         "encoder": "base", "dataset": "acdc"})
    with pytest.raises(InputError, match="unfinished"):                 # no done.json: not a finished search
        e.main(e.get_args([*data_args(acdc), "--search", f"x={lonely}", "--out", str(tmp_path / "o")]))
    with pytest.raises(InputError, match="no trajectory"):
        e.main(e.get_args([*data_args(acdc), "--search", f"x={lonely}", "--out", str(tmp_path / "o"),
                           "--allow_unfinished"]))


def test_statistics_equal_scipy():
    rng = np.random.default_rng(1)
    ref = rng.uniform(0.7, 0.9, 30)
    other = ref + rng.normal(0.01, 0.02, 30)
    r = paired_comparison(ref, other, n_resamples=999, seed=0)
    assert abs(r["mean_delta"] - np.mean(other - ref)) < 1e-12
    assert abs(r["wilcoxon_p"] - stats.wilcoxon(other, ref).pvalue) < 1e-12
    ci = stats.bootstrap((ref, other), lambda a, b, axis=-1: np.mean(b - a, axis=axis), paired=True, n_resamples=999,
                         method="percentile", rng=np.random.default_rng(0)).confidence_interval
    assert (r["ci_low"], r["ci_high"]) == (ci.low, ci.high)
    assert abs(fisher_combined([0.01, 0.2, 0.5]) - stats.combine_pvalues([0.01, 0.2, 0.5], method="fisher").pvalue) < 1e-12
    one_sided = paired_comparison(ref, other, n_resamples=99, alternative="greater")["wilcoxon_p"]
    assert one_sided == pytest.approx(stats.wilcoxon(other, ref, alternative="greater").pvalue)
    assert format_p(3e-7) == "< 1e-4" and format_p(0.01234) == "0.0123" and format_p(float("nan")) == ""


def test_mean_over_backbones_and_extra_pairs(scripts):
    rng = np.random.default_rng(2)
    deltas = rng.normal(0.01, 0.02, (3, 12))
    r = backbone_mean(deltas, n_resamples=999, seed=0)
    assert r["mean_delta"] == pytest.approx(deltas.mean()) and r["ci_low"] < deltas.mean() < r["ci_high"]
    # the same patient resampled on every backbone: a bootstrap over the per-patient mean over backbones
    ci = stats.bootstrap((deltas.mean(0),), np.mean, n_resamples=999, method="percentile",
                         rng=np.random.default_rng(0)).confidence_interval
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high))
    rows = [{"method": m, "backbone": b, "seed": 0, "patient": f"p{i}", "value": 0.8 + 0.01 * k + 0.001 * i}
            for k, m in enumerate(("ref", "iac", "iac_lth")) for b in ("base", "vgg16") for i in range(6)]
    table, _, _ = scripts["05_evaluate"].paired_table(pd.DataFrame(rows), [("ref", "iac"), ("ref", "iac_lth"),
                                                                           ("iac", "iac_lth")], 99)
    mean_rows = table[table["backbone"] == "mean over 2 backbones"]
    assert len(table) == 9 and len(mean_rows) == 3
    got = table[(table["vs"] == "iac") & (table["backbone"] == "base")]["mean_delta"].item()
    assert got == pytest.approx(0.01)


def test_patient_is_the_paired_unit(scripts):
    """Two frames of a patient are one unit: their ΔDice are averaged first, over the cases both methods have."""
    cases = {("P1", "P1_f1"): (0.80, 0.84), ("P1", "P1_f2"): (0.80, 0.80), ("P2", "P2_f1"): (0.80, 0.79),
             ("P2", "P2_f2"): (0.80, 0.83), ("P3", "P3_f1"): (0.80, 0.82), ("P3", "P3_f2"): (0.70, float("nan"))}
    rows = [{"method": m, "backbone": "base", "seed": 0, "patient": case, "patient_id": pid, "value": v[k]}
            for k, m in enumerate(("ref", "iac")) for (pid, case), v in cases.items()]
    table, seeds, units = scripts["05_evaluate"].paired_table(pd.DataFrame(rows), [("ref", "iac")], 999)
    r = table.iloc[0]
    # P1: (0.04 + 0.00) / 2, P2: (-0.01 + 0.03) / 2, P3: 0.02 (its second frame has no iac Dice)
    assert (r["unit"], r["n"]) == ("patient", 3) and r["mean_delta"] == pytest.approx((0.02 + 0.01 + 0.02) / 3)
    assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon([0.02, 0.01, 0.02]).pvalue)
    assert units["unit_id"].tolist() == ["P1", "P2", "P3"] and units["cases"].tolist() == [2, 2, 1]
    assert units["delta_dice"].tolist() == pytest.approx([0.02, 0.01, 0.02])
    assert seeds["mean_delta"].tolist() == pytest.approx([r["mean_delta"]])
    by_case, _, _ = scripts["05_evaluate"].paired_table(pd.DataFrame(rows), [("ref", "iac")], 999, unit="case")
    assert (by_case["unit"].item(), by_case["n"].item()) == ("case", 5)
    assert by_case["mean_delta"].item() == pytest.approx((0.04 + 0 - 0.01 + 0.03 + 0.02) / 5)


def test_hierarchical_bootstrap_one_seed_is_the_patient_bootstrap(scripts):
    rng = np.random.default_rng(3)
    ref = rng.uniform(0.7, 0.9, 15)
    other = ref + rng.normal(0.01, 0.02, 15)
    h = hierarchical_bootstrap((other - ref)[None], n_resamples=999, seed=4)
    r = paired_comparison(ref, other, n_resamples=999, seed=4)                  # scipy.stats.bootstrap, paired
    assert (h["seeds"], h["n"]) == (1, 15) and h["mean_delta"] == pytest.approx(r["mean_delta"])
    assert (h["ci_low"], h["ci_high"]) == pytest.approx((r["ci_low"], r["ci_high"]), rel=1e-12)
    rows = [{"method": m, "backbone": "base", "seed": 7, "patient": f"c{i}", "patient_id": f"p{i}", "value": v[i]}
            for m, v in (("ref", ref), ("iac", other)) for i in range(15)]
    table, _, _ = scripts["05_evaluate"].paired_table(pd.DataFrame(rows), [("ref", "iac")], 999)
    t = table.iloc[0]
    assert t["seeds"] == 1 and (t["hier_ci_low"], t["hier_ci_high"]) == pytest.approx((t["ci_low"], t["ci_high"]))
    r0 = paired_comparison(ref, other, n_resamples=999, seed=0)                 # 05's --boot_seed 0
    assert (t["ci_low"], t["ci_high"]) == pytest.approx((r0["ci_low"], r0["ci_high"]))


def seeded_rows(offsets, n=12, noise=0.002, seed=0):
    """Dice rows of ref and iac over len(offsets) seeds and n patients of two frames each: iac = ref + the seed's
    offset + a little noise per case (the seeds' trained models differ, the patients barely)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.7, 0.9, (n, 2))
    rows = []
    for s, off in enumerate(offsets):
        for m, v in (("ref", base), ("iac", base + off + rng.normal(0, noise, base.shape))):
            rows += [{"method": m, "backbone": "base", "seed": s, "patient": f"p{i}_frame{f}", "patient_id": f"p{i}",
                      "value": float(v[i, f])} for i in range(n) for f in range(2)]
    return pd.DataFrame(rows)


def test_seed_spread_widens_the_hierarchical_ci(scripts):
    """Seeds whose mean ΔDice differ a lot: the seed-averaged CI is narrow and excludes 0, the CI over seeds
    and patients is wide and includes it: no gain is claimed."""
    table, seeds, units = scripts["05_evaluate"].paired_table(seeded_rows([0.03, -0.02, 0.01]), [("ref", "iac")], 999)
    t = table.iloc[0]
    assert t["seeds"] == 3 and t["n"] == 12 and len(units) == 36 and len(seeds) == 3
    assert t["ci_low"] > 0 and t["hier_ci_low"] < 0 < t["hier_ci_high"]
    assert t["hier_ci_high"] - t["hier_ci_low"] > 5 * (t["ci_high"] - t["ci_low"])
    assert t["verdict"] == "no clear difference"
    assert seeds["mean_delta"].tolist() == pytest.approx([0.03, -0.02, 0.01], abs=0.002)
    assert t["seed_deltas"] == " / ".join(f"{d:+.4f}" for d in seeds["mean_delta"])
    D = units.pivot(index="seed", columns="unit_id", values="delta_dice")[list(dict.fromkeys(units["unit_id"]))]
    h = hierarchical_bootstrap(D.values, 999)                 # paired_by_seed.csv re-analysed, in its row order
    assert (h["ci_low"], h["ci_high"]) == pytest.approx((t["hier_ci_low"], t["hier_ci_high"]))
    same, _, _ = scripts["05_evaluate"].paired_table(seeded_rows([0.01, 0.01, 0.01]), [("ref", "iac")], 999)
    assert same["verdict"].item() == "gain" and same["hier_ci_low"].item() > 0


def test_holm_on_a_known_vector():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (never below an earlier one)
    got = holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    assert got[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and np.isnan(got[4])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]).size == 0


def test_primary_and_exploratory_from_rows(tmp_path, scripts):
    """05 --rows on a hand-made per_patient.csv of 3 seeds: the paper's two claims are primary (iac:iac_lth added
    though not asked), the rest exploratory with Holm's p over their family, a gain only where the CI with seeds
    excludes 0, and the per-seed, per-patient ΔDice written for re-analysis."""
    e = scripts["05_evaluate"]
    df, noise = seeded_rows([0.03, -0.02, 0.01]), np.random.default_rng(5).normal(0, 0.002, (2, 72))
    iac, ref = df[df["method"] == "iac"], df[df["method"] == "ref"]
    df = pd.concat([df, iac.assign(method="iac_lth", value=iac["value"] + 0.02 + noise[0]),
                    ref.assign(method="att", value=ref["value"] - 0.01 + noise[1])])
    path = str(tmp_path / "per_patient.csv")
    df.assign(region="all", metric="dice")[["method", "backbone", "seed", "patient", "patient_id", "region", "metric",
                                            "value"]].to_csv(path, index=False)
    out = str(tmp_path / "eval")
    e.main(e.get_args(["--rows", path, "--reference", "ref", "--out", out, "--n_boot", "999"]))
    paired = pd.read_csv(os.path.join(out, "paired.csv")).set_index(["vs", "method"])
    assert set(paired.index) == {("ref", "iac"), ("ref", "iac_lth"), ("ref", "att"), ("iac", "iac_lth")}
    assert set(paired.loc[paired["family"] == "primary"].index) == {("ref", "iac"), ("iac", "iac_lth")}
    explore = paired[paired["family"] == "exploratory"]
    assert explore["holm_p"].tolist() == pytest.approx(holm(explore["wilcoxon_p"].values).tolist())
    primary = paired[paired["family"] == "primary"]
    assert primary["holm_p"].tolist() == pytest.approx(holm(primary["wilcoxon_p"].values).tolist())
    assert paired.loc[("ref", "iac"), "ci_low"] > 0 and paired.loc[("ref", "iac"), "verdict"] == "no clear difference"
    assert paired.loc[("iac", "iac_lth"), "verdict"] == "gain" and paired.loc[("ref", "att"), "verdict"] == "loss"
    assert (paired["unit"] == "patient").all() and (paired["n"] == 12).all() and (paired["seeds"] == 3).all()
    units = pd.read_csv(os.path.join(out, "paired_by_seed.csv"))
    assert len(units) == 4 * 3 * 12 and (units["cases"] == 2).all()
    assert len(pd.read_csv(os.path.join(out, "paired_seeds.csv"))) == 4 * 3
    md = open(os.path.join(out, "paired.md")).read()
    assert "- primary: iac vs ref (base)" in md and "no clear difference" in md and "ΔDice of each seed" in md
    assert "- exploratory: att vs ref (base)" in md and "- exploratory: iac vs ref" not in md
    e.main(e.get_args(["--rows", path, "--out", out, "--n_boot", "99", "--primary"]))
    assert (pd.read_csv(os.path.join(out, "paired.csv"))["family"] == "exploratory").all()
    with pytest.raises(InputError, match="--primary ref:nope"):
        e.main(e.get_args(["--rows", path, "--out", out, "--n_boot", "99", "--primary", "ref:nope"]))
    old = str(tmp_path / "old.csv")                      # written before patient_id: each case its own patient
    pd.read_csv(path).drop(columns="patient_id").to_csv(old, index=False)
    e.main(e.get_args(["--rows", old, "--out", out, "--n_boot", "99"]))
    assert (pd.read_csv(os.path.join(out, "paired.csv"))["n"] == 24).all()


def _record(epoch, alpha, beta):
    """A trajectory.jsonl record of the given α, β (nothing pruned)."""
    mask = torch.ones(14, 7, dtype=torch.bool)
    p, w = op_weights(alpha, mask), edge_weights(beta, torch.ones(14, dtype=torch.bool))
    return {"epoch": epoch, "alpha": alpha.tolist(), "beta": beta.tolist(), "w": w.tolist(),
            "importance": (p * w[:, None]).tolist(), "op_mask": mask.int().tolist()}


def test_analysis_on_hand_made_trajectory():
    """Epoch 0 is warm-up (all tied); edge 0 (0->2): sep_conv_3x3 enters top-3 at 2, top-2 at 3, top-1 at 4."""
    s3 = OPS.index("sep_conv_3x3")
    beta = torch.zeros(14)
    beta[EDGES.index((1, 3))], beta[EDGES.index((2, 3))] = 0.3, 0.2         # node 3 keeps 1->3, 2->3 by w'
    traj = [_record(0, torch.zeros(14, 7), torch.zeros(14))]
    for t, value in enumerate([-0.5, 0.35, 0.45, 0.6], start=1):
        alpha = torch.zeros(14, 7)
        alpha[:, 0] = 0.5                                   # skip_connect leads every edge
        alpha[0, :3] = torch.tensor([0.5, 0.4, 0.3])
        alpha[0, s3] = value
        traj.append(_record(t, alpha, beta))
    rows = first_entry_epochs(traj, GENO, "w")
    r = rows[0]
    assert (r["edge"], r["op"], r["top3"], r["top2"], r["top1"]) == ("0->2", "sep_conv_3x3", 2, 3, 4)
    assert r["edge_set"] == 1                               # node 2 has only two edges: right from the first arch epoch
    assert rows[2]["top3"] is None                          # dil_conv_5x5 on 0->3 is tied with 5 others, never top-3
    assert rows[3]["edge"] == "2->3" and rows[3]["edge_set"] is None     # GENO keeps 0->3, 2->3; w' says 1->3, 2->3
    assert [r["epoch"] for r in arch_epochs(traj)] == [1, 2, 3, 4]
    I = np.array([r["importance"] for r in traj])
    assert not topk_masks(I[:1], 1).any() and not topk_masks(I[:1], 3).any()   # all tied: nobody is top-k
    M = genotype_masks(traj[1:], "w")
    assert M[-1, 0, s3] and M[-1, EDGES.index((1, 3)), 0] and not M[-1, EDGES.index((0, 3))].any()
    assert M.sum(axis=(1, 2)).tolist() == [8] * 4          # 4 nodes x 2 edges x 1 op, every epoch
    C = cosine_matrix(I)
    assert np.allclose(np.diag(C), 1) and C[1, 4] < 1
    H = hamming_similarity_matrix(topk_masks(I[1:], 1))
    assert H[0, 0] == 1 and H[0, 3] == 1 - 2 / (14 * 7)        # the top-1 of edge 0 moved: 2 entries differ


def test_both_tracks_score_the_same_patients_alike(tmp_path, scripts, acdc, backbone):
    """The nnU-Net track's test set (convert_to_nnunet.py --splits) is the slice track's, and 05 scores a
    prediction folder exactly as it scores a run: the slice run's own NIfTI output, given as an nnU-Net
    prediction folder, gets the same rows in the same table."""
    from conftest import load_script
    conv, e = load_script("scripts/convert_to_nnunet"), scripts["05_evaluate"]
    nn = str(tmp_path / "Dataset501_ACDC")
    conv.main(conv.get_args(["--dataset", "acdc", "--raw", acdc[0], "--out", nn, "--splits",
                             os.path.join(acdc[1], "splits.json")]))
    first, nii = str(tmp_path / "e1"), str(tmp_path / "nii")
    e.main(e.get_args([*data_args(acdc), "--run", f"ref={backbone}", "--out", first, "--save_nifti", nii,
                       "--n_boot", "99"]))
    both = str(tmp_path / "e2")
    e.main(e.get_args([*data_args(acdc), "--run", f"ref={backbone}", "--nnunet_pred",
                       f"same={os.path.join(nii, 'ref_base_seed0')}", "--nnunet_gt", os.path.join(nn, "labelsTs"),
                       "--out", both, "--n_boot", "99"]))
    df = pd.read_csv(os.path.join(both, "per_patient.csv"))
    a, b = (df[df["method"] == m].drop(columns=["method", "backbone"]).sort_values(["patient", "region", "metric"])
            .reset_index(drop=True) for m in ("ref", "same"))
    pd.testing.assert_frame_equal(a, b)
    assert set(df["method"]) == {"ref", "same"}
    summary = pd.read_csv(os.path.join(both, "summary.csv"))
    assert set(summary["method"]) == {"ref", "same"} and set(summary["backbone"]) == {"base", "nnunet_2d"}


def test_seed_inclusive_ci_is_not_narrower_than_the_patient_ci_when_patients_dominate():
    """Seeds and patients are crossed (every seed's models score the same patients): when the spread is between
    patients, not seeds, the CI with seeds must be about as wide as the patient-only CI of the seed-averaged
    ΔDice, never much narrower (a nested bootstrap, drawing patients anew for every seed, came out ~40% narrower)."""
    rng = np.random.default_rng(0)
    patient = rng.normal(0.0, 0.01, 20)                        # patient effects shared by every seed
    d = patient[None] + rng.normal(0.0, 0.0005, (3, 20))       # tiny seed and interaction noise
    h = hierarchical_bootstrap(d, 1999, seed=1)
    p = paired_comparison(np.zeros(20), d.mean(0), 1999, seed=1)
    assert h["ci_high"] - h["ci_low"] >= 0.9 * (p["ci_high"] - p["ci_low"])


def test_no_verdict_over_too_few_units():
    """A bootstrap CI over 3 patients (the demo's test set) can exclude zero; no gain or loss is called below the
    fewest units with which a two-sided Wilcoxon test can reach p < 0.05 (6)."""
    from common.analysis import MIN_UNITS, verdict
    assert MIN_UNITS == 6 and verdict(0.005, 0.03, 3, 0.001) == "too few units (n < 6)"
    assert verdict(0.005, 0.03, 6, 0.03) == "gain" and verdict(-0.03, -0.005, 20, 0.001) == "loss"
    assert verdict(-0.01, 0.01, 20, 0.001) == "no clear difference" and verdict(float("nan"), 0.1, 20, 0.01) == ""
    assert verdict(0.005, 0.03, 20, 0.06) == "no clear difference"             # CI excludes 0, Holm p does not
    assert verdict(-0.03, -0.005, 20, 0.001, alternative="greater") == "no clear difference"


def dice_rows(deltas, method="iac", backbone="base", seed=0, ref=0.8):
    """Dice rows of ref and `method` for one backbone and seed: one case per patient, `method` = ref + delta."""
    return [{"method": m, "backbone": backbone, "seed": seed, "patient": f"c{i}", "patient_id": f"p{i}",
             "value": ref + 0.01 * i + (d if m == method else 0.0)}
            for m in ("ref", method) for i, d in enumerate(deltas)]


def test_a_row_uses_one_seed_set(tmp_path, scripts):
    """A partly finished grid: ref done for seeds 0-2, iac for seed 0. Every number of the row is on seed 0 (the
    seed both have): mean ΔDice, CI, Wilcoxon and the per-seed ΔDice agree, and the row and paired.md name the
    seeds left out. (Before, mean_delta and Wilcoxon averaged ref over its 3 seeds: −0.018 beside a +0.016 gain.)"""
    e = scripts["05_evaluate"]
    deltas = [0.012, 0.014, 0.016, 0.016, 0.018, 0.02]
    rows = dice_rows(deltas)
    for s in (1, 2):                                            # ref's other seeds: 0.05 better
        rows += [dict(r, seed=s, value=r["value"] + 0.05) for r in dice_rows(deltas) if r["method"] == "ref"]
    table, seeds, units = e.paired_table(pd.DataFrame(rows), [("ref", "iac")], 999)
    t = table.iloc[0]
    assert t["mean_delta"] == pytest.approx(np.mean(deltas)) and t["seed_deltas"] == f"{np.mean(deltas):+.4f}"
    assert (t["seeds"], t["seeds_used"], t["seeds_left_out"]) == (1, "0", "seed 1, 2 (only ref)")
    assert t["wilcoxon_p"] == pytest.approx(stats.wilcoxon(deltas).pvalue) and t["ci_low"] > 0
    assert len(seeds) == 1 and set(units["seed"]) == {0}
    path = str(tmp_path / "per_patient.csv")
    pd.DataFrame(rows).assign(region="all", metric="dice").to_csv(path, index=False)
    e.main(e.get_args(["--rows", path, "--out", str(tmp_path / "eval"), "--n_boot", "99"]))
    md = open(tmp_path / "eval" / "paired.md").read()
    assert "fewer seeds than a method has: seed 1, 2 (only ref) left out" in md, md


def test_calls_are_made_at_the_family_level(scripts):
    """Three exploratory pairs over 6 patients, every ΔDice positive: Wilcoxon p 1/32 each, Holm p 3/32 each: no
    gain is called, though every CI excludes 0 (before: three gains). One pair alone (Holm p = 1/32): a gain."""
    e = scripts["05_evaluate"]
    rows = []
    for m, off in (("a", 0.01), ("b", 0.02), ("c", 0.03)):
        rows += [r for r in dice_rows([off + 0.001 * i for i in range(6)], method=m) if r["method"] == m or m == "a"]
    table, _, _ = e.paired_table(pd.DataFrame(rows), [("ref", "a"), ("ref", "b"), ("ref", "c")], 999)
    assert table["wilcoxon_p"].tolist() == pytest.approx([1 / 32] * 3)
    assert table["holm_p"].tolist() == pytest.approx([3 / 32] * 3) and (table["hier_ci_low"] > 0).all()
    assert (table["verdict"] == "no clear difference").all(), table
    one, _, _ = e.paired_table(pd.DataFrame(rows), [("ref", "a")], 999)
    assert one["holm_p"].item() == pytest.approx(1 / 32) and one["verdict"].item() == "gain"


def test_combined_test_across_backbones_holds_with_shared_patients(scripts):
    """Three backbones scored on the same 6 patients with the same ΔDice (perfectly dependent): Fisher's
    combination treats them as 3 independent tests (p far below 1/32); the sign-flip permutation test over
    patients of the backbone mean gives the exact 2/64 of one backbone, and Holm takes that row's test from it."""
    e = scripts["05_evaluate"]
    deltas = [0.01, 0.02, 0.03, 0.015, 0.025, 0.035]
    rows = sum((dice_rows(deltas, backbone=b) for b in ("base", "vgg16", "resnet50")), [])
    rows += dice_rows([d + 0.01 for d in deltas], backbone="nnunet_2d")           # Table 2: not in the mean
    table, _, _ = e.paired_table(pd.DataFrame(rows), [("ref", "iac")], 9999)
    mean = table[table["backbone"] == "mean over 3 backbones"].iloc[0]
    assert mean["combined_p"] == pytest.approx(2 / 64) and mean["mean_delta"] == pytest.approx(np.mean(deltas))
    d = np.mean(deltas)
    ref = stats.permutation_test((np.array(deltas),), np.mean, permutation_type="samples").pvalue
    assert mean["combined_p"] == pytest.approx(ref) and d > 0
    assert mean["fisher_p"] < mean["combined_p"] / 10                        # the independence assumption
    assert np.isnan(table.loc[table["backbone"] == "nnunet_2d", "fisher_p"]).all()
    assert mean["hier_ci_low"] > 0 and mean["seeds"] == 1 and mean["n"] == 6
    assert len(table) == 5 and table["holm_p"].notna().all()


def test_nnunet_predictions_name_their_network(tmp_path, scripts):
    """05 names an nnU-Net prediction folder's backbone after the network its plans.json builds (nnUNetv2_predict
    writes the model's plans there): nnunet_CONF[_TAG]:NETWORK, "inherits_from" followed; a folder without
    plans.json keeps nnunet_CONF; a configuration the plans lack is refused naming those they have."""
    from common.checkpoints import nnunet_network_class
    e = scripts["05_evaluate"]
    gt, pred = tmp_path / "raw" / "labelsTr", tmp_path / "pred"
    gt.mkdir(parents=True)
    pred.mkdir()
    (tmp_path / "raw" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "fg": 1}}))
    lab = np.zeros((8, 8, 2), np.uint8)
    lab[2:6, 2:6] = 1
    for case in ("c1", "c2"):
        for d in (gt, pred):
            nib.save(nib.Nifti1Image(lab, np.eye(4)), str(d / f"{case}.nii.gz"))
    net = "dynamic_network_architectures.architectures.unet."
    plans = {"plans_name": "nnUNetResEncUNetMPlans", "configurations": {
        "2d": {"architecture": {"network_class_name": net + "PlainConvUNet"}},
        "3d_fullres": {"architecture": {"network_class_name": net + "ResidualEncoderUNet"}},
        "3d_lowres": {"inherits_from": "3d_fullres", "batch_size": 2},
        "3d_cascade_fullres": {"inherits_from": "3d_lowres"}}}
    assert [nnunet_network_class(plans, c) for c in plans["configurations"]] == \
        ["PlainConvUNet"] + ["ResidualEncoderUNet"] * 3
    assert nnunet_network_class({"configurations": {"2d": {"UNet_class_name": "PlainConvUNet"}}}, "2d") == \
        "PlainConvUNet"                                                     # plans of nnU-Net v2's first format
    base = ["--nnunet_pred", f"m={pred}", "--nnunet_gt", str(gt), "--out", str(tmp_path / "e")]

    def backbones(*extra):
        df, _ = e.evaluate_nnunet(e.get_args(base + list(extra)))
        return set(df["backbone"])
    assert backbones() == {"nnunet_2d"}                                      # no plans.json: the network unnamed
    (pred / "plans.json").write_text(json.dumps(plans))
    assert backbones() == {"nnunet_2d:PlainConvUNet"}
    assert backbones("--nnunet_configuration", "3d_cascade_fullres", "--nnunet_tag", "noda") == \
        {"nnunet_3d_cascade_fullres_noda:ResidualEncoderUNet"}
    with pytest.raises(InputError, match="no configuration '3d_other' .*it has 2d, 3d_fullres"):
        backbones("--nnunet_configuration", "3d_other")


def test_mean_row_and_unmatched_backbones_on_the_row_pairs(tmp_path, scripts):
    """The mean over backbones is on the seeds and units every backbone has, Fisher's p included (before, it took
    each backbone's own seeds and units); backbones sharing no unit give a row that says so (before: a traceback);
    a method whose backbone the other lacks gets a row that says so (before: dropped without a word)."""
    from common.analysis import wilcoxon_p
    e = scripts["05_evaluate"]
    rng = np.random.default_rng(7)
    rows = []
    for bb, seeds, n in (("resnet50", (0, 1), 9), ("vgg16", (0, 1, 2), 10)):
        for s in seeds:
            rows += dice_rows(list(rng.normal(0.01, 0.01, n)), backbone=bb, seed=s)
    table, _, _ = e.paired_table(pd.DataFrame(rows), [("ref", "iac")], 999)
    mean = table[table["backbone"] == "mean over 2 backbones"].iloc[0]
    assert (mean["n"], mean["seeds_used"], mean["seeds_left_out"]) == (9, "0 1", "seed 2 (not on every backbone)")
    df = pd.DataFrame(rows)
    units = [f"p{i}" for i in range(9)]
    d = [(df[(df.method == "iac") & (df.backbone == bb) & (df.seed.isin([0, 1])) & (df.patient_id.isin(units))]
          .groupby("patient_id")["value"].mean() -
          df[(df.method == "ref") & (df.backbone == bb) & (df.seed.isin([0, 1])) & (df.patient_id.isin(units))]
          .groupby("patient_id")["value"].mean()).values for bb in ("resnet50", "vgg16")]
    assert mean["fisher_p"] == pytest.approx(stats.combine_pvalues([wilcoxon_p(x) for x in d]).pvalue)
    apart = pd.DataFrame(dice_rows([0.01] * 6, backbone="a") +
                         [dict(r, patient_id="q" + r["patient_id"]) for r in dice_rows([0.02] * 6, backbone="b")])
    table, _, _ = e.paired_table(apart, [("ref", "iac")], 99)
    mean = table[table["backbone"] == "mean over 2 backbones"].iloc[0]
    assert mean["n"] == 0 and mean["seeds_left_out"] == "no unit on every backbone" and mean["verdict"] == ""
    named = [r for r in dice_rows([0.01] * 6, backbone="nnunet_2d") if r["method"] == "ref"] + \
        [r for r in dice_rows([0.01] * 6, backbone="nnunet_2d:PlainConvUNet") if r["method"] == "iac"]
    path = str(tmp_path / "per_patient.csv")
    pd.DataFrame(named).assign(region="all", metric="dice").to_csv(path, index=False)
    e.main(e.get_args(["--rows", path, "--out", str(tmp_path / "eval"), "--n_boot", "99"]))
    md = open(tmp_path / "eval" / "paired.md").read()
    assert "iac vs ref (nnunet_2d:PlainConvUNet): no comparison" in md and "no ref rows on this backbone" in md, md
