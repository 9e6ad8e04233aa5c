r"""Evaluation (05): score trained models at patient level and reproduce the paper's tables and figures.

In:  slices.h5, splits.json, runs of 02_pretrain.py / 04_finetune.py (`--run NAME=DIR`,
     repeatable; the same NAME for several backbones or seeds), searches of 03_search.py
     (`--search NAME=DIR`) for the search-cost table and the dynamics analysis, nnUNetv2_predict output folders
     (`--nnunet_pred NAME=DIR`; their backbone is named from the folder's plans.json, e.g. nnunet_2d:PlainConvUNet or
     nnunet_2d:ResidualEncoderUNet, and kept out of the mean over backbones).
Out: OUT/per_patient.csv (method, backbone, seed, patient, patient_id, region, metric, value; `patient` is the
     case, one volume, and `patient_id` the person it belongs to: ACDC's ED and ES frames share one): Dice, HD95 (mm)
     and NSD of every region the data set is scored on (BraTS WT/TC/ET, KiTS kidney+masses /
     masses / tumour, ACDC RV/MYO/LV, else per class), on whole volumes in each case's original
     geometry against its original label file (common/metrics.py states the conventions),
     OUT/summary.csv|md (per region and the mean over regions, mean ± std over seeds, per metric),
     OUT/paired.csv|md (ΔDice of the case's mean Dice vs the reference and the --compare / --primary pairs; Tables
     1-3), OUT/paired_seeds.csv (each seed's ΔDice), OUT/paired_by_seed.csv (ΔDice of every seed and paired unit,
     to re-analyse), OUT/search_cost.csv|md (Tables 4-5),
     OUT/inference_cost.csv|md (parameters, MACs per slice, seconds per case of every run),
     OUT/dynamics/ (cosine / top-k Hamming similarity, first-entry epochs; CSV and PNG,
     like Figs 3-7), OUT/overlay.png, and with --save_nifti DIR predictions as NIfTI in
     each case's original geometry with the data set's own label values.

    python 05_evaluate.py --data D/slices.h5 --splits D/splits.json --run ref=runs/ref \
        --run iac=runs/iac --run iac_lth=runs/iac_lth --search full=runs/search_full \
        --search lth=runs/search_lth --out runs/eval

Paired comparisons (paper Sec. 6.4), one row of paired.csv per pair and backbone; every number of a row is
computed on ONE set of (seed, unit) pairs:
  seeds, seeds_used, seeds_left_out
                 the seeds both methods have (a seed only one method has is left out, and named), and their ids.
  unit, n        the paired unit (--paired_unit): by default the patient, whose cases' ΔDice are averaged first
                 (ACDC's two frames are one unit; the patient of each case comes from slices.h5, or from the
                 "patients" of dataset.json for --nnunet_pred), or the case; n units, those every used seed scored
                 for both methods.
  mean_delta, ci_low, ci_high, wilcoxon_p
                 with each method's Dice averaged over the used seeds first: 95% paired bootstrap CI and Wilcoxon
                 signed-rank p over the units. Both are conditional on the trained models (the seeds run).
  fisher_p       on the "mean over N backbones" row: Fisher's combination of the backbones' Wilcoxon p on the row's
                 seeds and units (the paper's Table 1; it assumes independent p-values, and backbones scored on the
                 same patients are not: anti-conservative).
  combined_p     on the "mean over N backbones" row: sign-flip permutation test over units of the mean ΔDice over
                 backbones and seeds (holds when backbones share patients); nnU-Net rows are not in that mean.
  family, holm_p primary: the paper's two claims (--primary; IAC vs ref, IAC-LTH vs IAC), exploratory: every other
                 pair; holm_p is the row's test (Wilcoxon, or combined_p) adjusted by Holm within its family.
  seed_deltas    each used seed's mean ΔDice over the row's units (its CI and p in paired_seeds.csv).
  hier_ci_low, hier_ci_high
                 95% CI including seed-to-seed variation: a two-way bootstrap that resamples seeds and units
                 (the same drawn units under every drawn seed: seeds and patients are crossed; with one seed,
                 the patient bootstrap).
  verdict        a call at the family-wise level the table states (0.05): gain / loss only where holm_p < 0.05 AND
                 hier_ci excludes zero on that side, over at least 6 units (fewer: "too few units"); else "no clear
                 difference" (not evidence of equivalence: the CI's ends are the largest loss and gain the data
                 allow). With --alternative greater only a gain is called.
"""
import argparse
import json
import os
import time

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode

from common.analysis import (ALPHA, FIRST_ENTRY_COLUMNS, MIN_UNITS, arch_epochs, backbone_mean, cosine_matrix,
                             fisher_combined, first_entry_epochs, format_p, genotype_masks, hamming_similarity_matrix,
                             hierarchical_bootstrap, holm, importance_tensor, paired_comparison, sign_flip_p,
                             topk_masks, verdict, wilcoxon_p)
from common.checkpoints import (check_same_data, load_checkpoint, load_genotype, model_from_checkpoint,
                                nnunet_network_class)
from common.data import iter_cases, load_splits, original_label, read_meta, slices_to_nifti, slices_to_volume
from common.engine import predict_stack
from common.metrics import case_metrics
from common.raw import BOTH_EMPTY, NSD_TOLERANCE_MM, regions_of
from common.runs import (add_unfinished_flag, cli, install_stop_signals, mark_done, mark_unfinished,
                         require_done)
from common.utils import (HelpFormatter, InputError, add_device_flags, atomic_to_csv, atomic_write_json, pick_device,
                          precision, read_json, read_jsonl, require_file, run_metadata)


PRIMARY = ("ref:iac", "iac:iac_lth")          # the paper's claims: IAC vs the plain skip, IAC-LTH vs IAC


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--data", default=None, help="slices.h5 from 01_preprocess.py (needed with --run)")
    p.add_argument("--splits", default=None, help="splits.json from 01_preprocess.py (needed with --run)")
    p.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                   help="a trained run of 02_pretrain.py or 04_finetune.py under the method name NAME; the same NAME "
                        "for several backbones or seeds (repeatable)")
    p.add_argument("--nnunet_pred", action="append", default=[], metavar="NAME[@SEED]=DIR",
                   help="a folder of nnUNetv2_predict outputs, scored as method NAME (of seed SEED) (repeatable)")
    p.add_argument("--nnunet_configuration", default="2d", metavar="CONF",
                   help="the nnU-Net configuration the --nnunet_pred folders were predicted with (2d, 3d_fullres, "
                        "...): their backbone is named nnunet_CONF:NETWORK, the network class that configuration "
                        "of the folder's plans.json builds (e.g. nnunet_2d:ResidualEncoderUNet)")
    p.add_argument("--nnunet_tag", default=None, metavar="TAG",
                   help="a word added to the configuration in the backbone name, nnunet_2d_TAG:PlainConvUNet (e.g. the "
                        "augmentation regime, noda); default: none")
    p.add_argument("--nnunet_gt", default=None,
                   help="labelsTr (or labelsTs) of the nnU-Net raw data set, dataset.json one folder up (needed with "
                        "--nnunet_pred)")
    p.add_argument("--reference", default=None,
                   help="the method the others are compared with (default: the method of the first input)")
    p.add_argument("--compare", action="append", default=[], metavar="A:B",
                   help="also compare method B against A (repeatable); iac:iac_lth gives Tables 2-3's IAC -> IAC-LTH")
    p.add_argument("--primary", nargs="*", default=None, metavar="A:B",
                   help="the comparisons (B against A, as --compare; added when missing) that are the paper's claims; "
                        "every other one is exploratory; --primary with no pair: all exploratory (default: "
                        f"{' '.join(PRIMARY)}, those whose methods were evaluated)")
    p.add_argument("--paired_unit", choices=["patient", "case"], default="patient",
                   help="unit of the paired statistics: patient (the ΔDice of a patient's cases, e.g. ACDC's ED and "
                        "ES frames, averaged first) or case (every volume its own unit)")
    p.add_argument("--alternative", choices=["two-sided", "greater"], default="two-sided",
                   help="alternative hypothesis of the Wilcoxon test (and so of Fisher's combination): two-sided, "
                        "or greater = the claim is a gain over the other method")
    p.add_argument("--search", action="append", default=[], metavar="NAME=DIR",
                   help="a search run of 03_search.py under the name NAME (full, lth), for the search-cost table and "
                        "the dynamics figures (repeatable)")
    p.add_argument("--rows", action="append", default=[], metavar="CSV",
                   help="per_patient.csv of an earlier (e.g. per-run, --rows_only) evaluation: tables without models "
                        "(repeatable; its inference_cost.csv beside it is taken too)")
    p.add_argument("--rows_only", action="store_true",
                   help="score the --run/--nnunet_pred inputs into OUT/per_patient.csv (+ inference_cost.csv), stop: "
                        "one scoring job per run, tables later from --rows")
    add_unfinished_flag(p)
    p.add_argument("--subset", default="test", choices=["test", "val"],
                   help="which cases of splits.json to evaluate: the test or the val cases (01_preprocess.py's "
                        "--split is how patients were divided, a different thing)")
    p.add_argument("--out", required=True, help="output folder for the tables and figures (required)")
    p.add_argument("--save_nifti", default=None, metavar="DIR",
                   help="also write the predictions as NIfTI label maps under DIR/NAME/ (default: off)")
    p.add_argument("--nsd_tolerance", type=float, default=None,
                   help="tolerance of the normalised surface Dice (NSD) in mm (default: the data set's in "
                        "common/raw.py NSD_TOLERANCE_MM, today 1 mm for every data set)")
    p.add_argument("--n_boot", type=int, default=9999, help="bootstrap resamples of every bootstrap CI")
    p.add_argument("--boot_seed", type=int, default=0,
                   help="random seed of the bootstrap resampling (fixed, so the same inputs give the same tables)")
    add_device_flags(p)
    return p.parse_args(argv)


def parse_pairs(items, flag):
    out = []
    for it in items:
        if "=" not in it:
            raise InputError(f"{flag} {it!r} must be NAME=DIR")
        name, d = it.split("=", 1)
        out.append((name, d))
    return out


def to_markdown(df, floatfmt=".4f"):
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(format_p(v) if c.endswith("_p") and isinstance(v, float) else
                                       "" if pd.isna(v) else f"{v:{floatfmt}}" if isinstance(v, float) else str(v)
                                       for c, v in zip(cols, r)) + " |")
    return "\n".join(lines) + "\n"


def scoring(args, dataset, class_names):
    """Regions, NSD tolerance (mm) and the both-empty rule of a data set."""
    tol = args.nsd_tolerance if args.nsd_tolerance is not None else NSD_TOLERANCE_MM.get(dataset, 1.0)
    return regions_of(dataset, class_names), tol, BOTH_EMPTY.get(dataset, np.nan)


def metric_rows(key, case, patient_id, pred, gt, spacing, score):
    """per_patient.csv rows of one case: `patient` is the case (the column's old name), `patient_id` its patient."""
    regions, tol, both_empty = score
    return [{"method": key[0], "backbone": key[1], "seed": key[2], "patient": case, "patient_id": patient_id,
             "region": region, "metric": metric, "value": float(v)}
            for region, metric, v in case_metrics(pred, gt, spacing, regions, tol, both_empty)]


def evaluate_runs(args, meta, cases, device):
    """Predict the cases with every run, then score each case once its original label is read (once).
    Returns the metric rows, the predictions, the runs and their inference cost."""
    preds, info, cost = {}, [], []
    for name, d in parse_pairs(args.run, "--run"):
        path = os.path.join(d, "ckpt_best.pt")
        ckpt = load_checkpoint(path, ("pretrain", "finetune"), flag=f"--run {name}={d}:")
        check_same_data(ckpt, meta, path)
        model = model_from_checkpoint(ckpt).to(device)
        backbone, seed = ckpt["config"]["encoder"], ckpt["args"]["seed"]
        amp, cl = precision(args, device)
        t0 = time.perf_counter()
        preds[name, backbone, seed] = {case: predict_stack(model, images, device, amp, cl)
                                       for case, images, _ in iter_cases(args.data, cases, meta, f"predict {name}")}
        seconds = time.perf_counter() - t0
        info.append((name, d, backbone, seed))
        cost.append({"method": name, "backbone": backbone, "seed": seed, **inference_cost(model, meta, device),
                     "seconds_per_case": seconds / len(cases), "device": str(device)})
    score = scoring(args, meta["dataset"], meta["class_names"])
    patient_of = meta["cases"].get("patient_id", meta["cases"]["case_id"])
    rows = []
    for case in cases:                                       # whole volumes, original geometry and label file
        gt, spacing = original_label(meta, case)
        pid = patient_of[meta["case_index"][case]]
        for key, pr in preds.items():
            rows += metric_rows(key, case, pid, slices_to_volume(pr[case], meta, case), gt, spacing, score)
    df = pd.DataFrame(rows)
    dice = case_means(df[df["metric"] == "dice"]).groupby(["method", "backbone", "seed"])["value"].mean()
    for name, _, backbone, seed in info:
        print(f"{name:>12s}  {backbone:<20s} seed {seed}: mean Dice {dice[name, backbone, seed]:.4f} "
              f"over {', '.join(score[0])} on {len(cases)} cases")
    return df, preds, info, pd.DataFrame(cost)


@torch.no_grad()
def inference_cost(model, meta, device):
    """What a model costs at inference (the paper's open point): parameters (all, and of the skip modules)
    and multiply-accumulates per slice (torch's FlopCounterMode: FLOPs / 2, convolutions and matmuls)."""
    _, C, H, W = meta["shape"]
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, C, H, W, device=device))
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "skip_parameters": sum(p.numel() for p in model.skips.parameters()),
            "GMACs_per_slice": counter.get_total_flops() / 2e9}


def nnunet_backbone(d, args):
    """The backbone of an nnU-Net prediction folder, nnunet_CONFIGURATION[_TAG]:NETWORK, from the plans.json that
    nnUNetv2_predict writes beside the predictions (the model's plans: PlainConvUNet for nnU-Net's default plans,
    ResidualEncoderUNet for the ResEnc presets), and how it was named (for the log)."""
    conf = args.nnunet_configuration
    label = f"nnunet_{conf}" + (f"_{args.nnunet_tag}" if args.nnunet_tag else "")
    path = os.path.join(d, "plans.json")
    if not os.path.isfile(path):
        return label, f"{conf}, network not named (no plans.json: not written by nnUNetv2_predict)"
    plans = read_json(path, "--nnunet_pred plans")
    if conf not in plans.get("configurations", {}):
        raise InputError(f"--nnunet_pred {d}: its plans.json ({plans.get('plans_name', '?')}) has no configuration "
                         f"{conf!r} (it has {', '.join(plans.get('configurations', {})) or 'none'}): give the one the "
                         "folder was predicted with as --nnunet_configuration")
    network = nnunet_network_class(plans, conf)
    return f"{label}:{network}", f"{conf} {network}, plans {plans.get('plans_name', '?')}"


def evaluate_nnunet(args):
    """Every metric of nnU-Net prediction folders against the raw labels (whole volumes)."""
    if not args.nnunet_gt:
        raise InputError("--nnunet_pred needs --nnunet_gt (the labelsTr folder of the raw data set)")
    ds_json = os.path.join(os.path.dirname(os.path.abspath(args.nnunet_gt)), "dataset.json")
    if not os.path.isfile(ds_json):
        raise InputError(f"--nnunet_gt {args.nnunet_gt}: no dataset.json beside it ({ds_json})")
    ds = json.load(open(ds_json))
    names = [n for n, v in sorted(ds["labels"].items(), key=lambda kv: kv[1]) if v != 0]
    score = scoring(args, ds.get("source", "nnunet"), names)          # the converter records the data set
    patient_of = ds.get("patients", {})        # case -> patient (convert_to_nnunet.py); absent: each case its own
    rows = []
    for name, d in parse_pairs(args.nnunet_pred, "--nnunet_pred"):
        name, _, seed = name.partition("@")
        files = sorted(f for f in os.listdir(d) if f.endswith(".nii.gz")) if os.path.isdir(d) else []
        if not files:
            raise InputError(f"--nnunet_pred {name}={d}: no .nii.gz predictions there")
        backbone, named = nnunet_backbone(d, args)
        for fn in files:
            gt_path = os.path.join(args.nnunet_gt, fn)
            if not os.path.isfile(gt_path):
                raise InputError(f"prediction {fn} in {d} has no label {gt_path}")
            gt_img = nib.load(gt_path)
            pred, gt = np.asarray(nib.load(os.path.join(d, fn)).dataobj), np.asarray(gt_img.dataobj)
            if pred.shape != gt.shape:
                raise InputError(f"{fn}: prediction {pred.shape} and label {gt.shape} differ in shape")
            case = fn[:-len(".nii.gz")]
            rows += metric_rows((name, backbone, int(seed or 0)), case, patient_of.get(case, case), pred, gt,
                                tuple(float(z) for z in gt_img.header.get_zooms()[:3]), score)
        print(f"{name:>12s}  nnU-Net {named}, seed {seed or 0}: {len(files)} cases as backbone {backbone}")
    return pd.DataFrame(rows), names


def case_means(df):
    """One value per case and run: the mean over the regions (NaN regions left out); keeps the case's patient_id."""
    keys = ["method", "backbone", "seed", "patient"] + (["patient_id"] if "patient_id" in df else [])
    return df.groupby(keys, sort=False)["value"].mean().reset_index()


def summarise(df):
    """Per metric: mean over cases of every region and of the case mean over regions, mean ± std over seeds."""
    tables = []
    for metric, dm in df.groupby("metric", sort=False):
        per_region = dm.groupby(["method", "backbone", "seed", "region"], sort=False)["value"].mean().unstack("region")
        per_region = per_region[list(dict.fromkeys(dm["region"]))]
        per_region["mean"] = case_means(dm).groupby(["method", "backbone", "seed"], sort=False)["value"].mean()
        agg = per_region.groupby(["method", "backbone"], sort=False).agg(["mean", "std"])
        n_seeds = per_region.groupby(["method", "backbone"], sort=False).size()
        table = pd.DataFrame(index=agg.index)
        for col in per_region.columns:                 # mean ± std over seeds; the mean alone for one seed
            m, sd = agg[(col, "mean")], agg[(col, "std")]
            table[col] = [f"{a:.4f} ± {b:.4f}" if n > 1 else f"{a:.4f}" for a, b, n in zip(m, sd, n_seeds)]
        table["seeds"] = n_seeds
        tables.append(table.reset_index().assign(metric=metric))
    return pd.concat(tables, ignore_index=True), case_means(df[df["metric"] == "dice"])


def unit_dice(a, b):
    """Both methods' Dice per paired unit over the cases both have a value for.
    In: a, b: Dice per (case, unit) of the two methods. Out: (a_u, b_u, cases_u) indexed by unit, where
    b_u − a_u is the mean ΔDice of the unit's cases and cases_u how many were averaged."""
    both = pd.concat({"a": a, "b": b}, axis=1, join="inner").dropna()
    g = both.groupby(level="unit", sort=False)
    return g["a"].mean(), g["b"].mean(), g.size()


def seed_unit_matrices(A, B):
    """The (seed, unit) pairs one row of paired.csv is computed on.
    In: A, B: case_mean rows of the two methods on one backbone (index (patient, unit)). Out: (seeds, left_out,
    a, b, cases): the seeds both methods have; a note of the seeds only one has (left out); a, b: DataFrames
    (seeds x units) of each method's Dice per unit under each shared seed, NaN where a unit has no case both
    methods scored under that seed; cases: how many cases each unit averages (same shape)."""
    sa, sb = set(A["seed"]), set(B["seed"])
    seeds = sorted(sa & sb)
    only = [(m, sorted(x)) for m, x in ((A["method"].iloc[0], sa - sb), (B["method"].iloc[0], sb - sa)) if x]
    left_out = "; ".join(f"seed {', '.join(map(str, x))} (only {m})" for m, x in only)
    per = {s: unit_dice(*(X.loc[X["seed"] == s, "value"] for X in (A, B))) for s in seeds}
    units = list(dict.fromkeys(u for a_s, _, _ in per.values() for u in a_s.index))
    frame = (lambda k: pd.DataFrame({s: per[s][k] for s in seeds}, index=units, dtype=float).T)
    return seeds, left_out, frame(0), frame(1), frame(2)


def paired_table(case_mean, pairs, n_boot, alternative="two-sided", unit="patient", primary=(), boot_seed=0):
    """ΔDice (case mean over regions) of `method` vs `vs` for every (vs, method) pair and backbone.

    In:  case_mean rows (method, backbone, seed, patient = the case, [patient_id], value); pairs [(vs, method)];
         unit "patient" (the ΔDice of a patient's cases averaged first; without patient_id each case is its own
         patient) or "case"; primary: the pairs that are the paper's claims, the others are exploratory.
    Out: (paired, seeds, units) DataFrames:
         paired: per pair and backbone, every number computed on ONE set of (seed, unit) pairs: the seeds both
                 methods have (seeds_used; seeds_left_out: those only one has) and the units every one of those
                 seeds scored for both (n). On them: mean ΔDice, 95% paired bootstrap CI and Wilcoxon p over units
                 of the Dice averaged over the seeds (conditional on the trained models); Fisher's combination across
                 backbones (the paper's, assuming independence); family and Holm's adjustment within it; each
                 seed's mean ΔDice, the two-way CI over seeds and units, and the verdict (common/analysis.verdict).
                 With several backbones of the slice track, their mean ΔDice (Table 1) over the seeds and units all
                 of them share, with a bootstrap CI over units, the two-way CI and a sign-flip permutation p over
                 units (combined_p: holds although the backbones share patients). nnU-Net rows (backbone nnunet_*,
                 Table 2) are not in that mean.
         seeds:  per pair, backbone and shared seed: n, mean ΔDice, 95% CI and Wilcoxon p over the row's units.
         units:  per pair, backbone, shared seed and unit: the number of cases averaged, the ΔDice, and whether
                 the unit is in the row (in_row: False where another shared seed lacks it)."""
    key = "patient_id" if unit == "patient" and "patient_id" in case_mean else "patient"
    cm = case_mean.assign(unit=case_mean[key].astype(str)).set_index(["patient", "unit"])
    primary = set(primary)
    rows, seed_rows, unit_rows = [], [], []
    for vs, method in pairs:
        pair, deltas = [], {}
        for backbone in dict.fromkeys(cm.loc[cm["method"] == method, "backbone"]):
            A, B = (cm[(cm["method"] == m) & (cm["backbone"] == backbone)] for m in (vs, method))
            name = {"method": method, "vs": vs, "backbone": backbone}
            family = "primary" if (vs, method) in primary else "exploratory"
            if A.empty:                     # said, not dropped: e.g. one method's folder named another backbone
                pair.append({**name, "family": family, "unit": unit, "n": 0, "seeds": 0, "seeds_used": "",
                             "seeds_left_out": f"no {vs} rows on this backbone ({method} has seed "
                                               f"{', '.join(map(str, sorted(set(B['seed']))))})"})
                continue
            seeds, left_out, a, b, cases = seed_unit_matrices(A, B)
            keep = a.columns[a.notna().all() & b.notna().all()] if seeds else a.columns[:0]   # every seed has them
            D = (b - a)[keep]                                                # (seeds, units) ΔDice
            r = paired_comparison(a[keep].mean().values, b[keep].mean().values, n_resamples=n_boot, seed=boot_seed,
                                  alternative=alternative)                   # Dice averaged over the shared seeds
            h = hierarchical_bootstrap(D.values, n_resamples=n_boot, seed=boot_seed)
            for s in seeds:
                seed_rows.append({**name, "seed": s, "unit": unit, **paired_comparison(
                    a.loc[s, keep].values, b.loc[s, keep].values, n_resamples=n_boot, seed=boot_seed,
                    alternative=alternative)})
                unit_rows += [{**name, "seed": s, "unit": unit, "unit_id": u, "cases": int(cases.loc[s, u]),
                               "delta_dice": float(b.loc[s, u] - a.loc[s, u]), "in_row": u in keep}
                              for u in a.columns if np.isfinite(b.loc[s, u] - a.loc[s, u])]
            pair.append({**name, "family": family, "unit": unit, **r, "seeds": len(seeds),
                         "seeds_used": " ".join(map(str, seeds)), "seeds_left_out": left_out,
                         "seed_deltas": " / ".join(f"{D.loc[s].mean():+.4f}" for s in seeds) if len(keep) else "",
                         "hier_ci_low": h["ci_low"], "hier_ci_high": h["ci_high"]})
            if not backbone.startswith("nnunet") and seeds and len(keep):
                deltas[backbone] = D
        rows += pair
        if len(deltas) > 1:
            rows.append({"method": method, "vs": vs, "family": pair[0]["family"], "unit": unit,
                         **backbone_mean_row(deltas, n_boot, boot_seed, alternative)})
    cols = ["method", "vs", "backbone", "family", "unit", "n", "mean_delta", "ci_low", "ci_high", "wilcoxon_p",
            "fisher_p", "combined_p", "holm_p", "seeds", "seeds_used", "seeds_left_out", "seed_deltas",
            "hier_ci_low", "hier_ci_high", "verdict"]
    paired = pd.DataFrame(rows).reindex(columns=cols)
    paired["seeds"] = paired["seeds"].astype("Int64")
    test_p = paired["wilcoxon_p"].where(paired["wilcoxon_p"].notna(), paired["combined_p"])   # each row's test
    for _, idx in paired.groupby("family").groups.items():         # Holm within each family of comparisons
        paired.loc[idx, "holm_p"] = holm(test_p.loc[idx].values)
    paired["verdict"] = [verdict(r.hier_ci_low, r.hier_ci_high, r.n, r.holm_p, alternative)
                         for r in paired.itertuples()]
    return paired, pd.DataFrame(seed_rows), pd.DataFrame(unit_rows)


def backbone_mean_row(deltas, n_boot, boot_seed, alternative):
    """Table 1's "mean over backbones" of one pair: {backbone: (seeds x units) ΔDice} -> the row's numbers, all on the
    seeds and units every backbone has: mean, bootstrap CI over units (seeds averaged), the two-way CI over seeds
    and units, the sign-flip permutation p over units (the backbones share patients), and Fisher's combination of
    each backbone's Wilcoxon p on those same seeds and units (the paper's; it assumes independent backbones)."""
    seeds = sorted(set.intersection(*(set(D.index) for D in deltas.values())))
    units = [u for u in next(iter(deltas.values())).columns if all(u in D.columns for D in deltas.values())]
    every = set.union(*(set(D.index) for D in deltas.values()))
    left_out = "; ".join(([f"seed {', '.join(map(str, sorted(every - set(seeds))))} (not on every backbone)"]
                          if every - set(seeds) else []) + ([] if units else ["no unit on every backbone"]))
    row = {"backbone": f"mean over {len(deltas)} backbones", "n": 0, "mean_delta": float("nan"), "seeds": len(seeds),
           "seeds_used": " ".join(map(str, seeds)), "seeds_left_out": left_out}
    if not (seeds and units):
        return row
    X = np.stack([D.loc[seeds, units].values for D in deltas.values()])             # (backbones, seeds, units)
    h = hierarchical_bootstrap(X.mean(0), n_resamples=n_boot, seed=boot_seed)
    wilcoxon = [wilcoxon_p(x.mean(0), alternative) for x in X]                  # each backbone on the row's pairs
    return {**row, **backbone_mean(X.mean(1), n_resamples=n_boot, seed=boot_seed), "wilcoxon_p": float("nan"),
            "fisher_p": fisher_combined(wilcoxon), "combined_p": sign_flip_p(X, n_boot, boot_seed, alternative),
            "seed_deltas": " / ".join(f"{X[:, i].mean():+.4f}" for i in range(len(seeds))),
            "hier_ci_low": h["ci_low"], "hier_ci_high": h["ci_high"]}


def method_pair(item, flag, methods):
    """A:B of --compare / --primary as (A, B): method B against A, both evaluated."""
    a, sep, b = item.partition(":")
    if not sep or not {a, b} <= set(methods):
        raise InputError(f"{flag} {item}: give A:B with two evaluated methods ({', '.join(methods)})")
    return a, b


def paired_markdown(paired, seeds, reference, primary, args):
    """paired.md: what the columns are, the rule of the calls, the table, each seed's ΔDice, and a reading that
    calls a gain or a loss only where the rule does, saying where a row uses fewer seeds than a method has."""
    unit = ("the patient (the ΔDice of a patient's cases averaged first)" if args.paired_unit == "patient"
            else "the case (one volume)")
    claims = ", ".join(f"{b} vs {a}" for a, b in primary) or "none"
    text = (f"## ΔDice (case mean over regions) of method vs `vs` (reference {reference}); paired unit: {unit}\n\n"
            "Every number of a row is computed on one set of (seed, unit) pairs: the seeds both methods have "
            "(seeds_used; seeds_left_out: those only one method has) and the n units every one of them scored for "
            "both. mean ΔDice, 95% paired bootstrap CI and Wilcoxon p "
            f"({args.alternative}) over units with each method's Dice averaged over those seeds (conditional on the "
            "trained models); on a mean-over-backbones row, on the seeds and units every backbone has: fisher_p, "
            "Fisher's combination of the backbones' Wilcoxon p (the paper's Table 1; it assumes independent p-values, "
            "and backbones scored on the same patients are not: anti-conservative), and combined_p, a sign-flip "
            "permutation test over units of the mean ΔDice over backbones and seeds, which holds with shared "
            "patients; holm_p: the row's test (Wilcoxon, or combined_p) "
            f"adjusted by Holm within its family (primary: {claims}; exploratory: the rest); seed_deltas: each "
            "seed's mean ΔDice; hier_ci: 95% CI over seeds and units (a two-way bootstrap: the same drawn units under "
            "every drawn seed; with one seed, the patient bootstrap).\n\n"
            f"**Calls** (verdict) are made at a family-wise error rate of {ALPHA:g} within each family: gain / loss "
            f"only where holm_p < {ALPHA:g} AND hier_ci excludes 0 on that side, over {MIN_UNITS} units or more "
            "(fewer: \"too few units\")"
            + ("; with --alternative greater only a gain is called" if args.alternative == "greater" else "")
            + ". \"No clear difference\" is not equivalence: the CI's ends bound the loss and gain the data "
            "allow.\n\n")
    if paired.empty:
        return text + "no paired comparison\n"
    text += to_markdown(paired) + "\n"
    if not seeds.empty and paired["seeds"].max() > 1:
        text += "### ΔDice of each seed (95% paired bootstrap CI and Wilcoxon p over the row's units)\n\n" + \
            to_markdown(seeds)
    said = paired[(paired["family"] == "primary") | paired["verdict"].isin(["gain", "loss"])
                  | paired["seeds_left_out"].fillna("").astype(bool)]
    lines = []
    for r in said.itertuples():
        fewer = f"; fewer seeds than a method has: {r.seeds_left_out} left out" if r.seeds_left_out else ""
        if not np.isfinite(r.mean_delta):
            lines.append(f"- {r.family}: {r.method} vs {r.vs} ({r.backbone}): no comparison: no (seed, unit) pair "
                         f"both methods have ({r.seeds_left_out or 'no unit both scored'})")
            continue
        ci = (f"95% CI with seeds [{r.hier_ci_low:+.4f}, {r.hier_ci_high:+.4f}]" if np.isfinite(r.hier_ci_low)
              else "no seed-inclusive CI")
        lines.append(f"- {r.family}: {r.method} vs {r.vs} ({r.backbone}): ΔDice {r.mean_delta:+.4f}, {ci} over "
                     f"{r.seeds} seed(s) ({r.seeds_used}) and {r.n} {r.unit}s, Holm p {format_p(r.holm_p) or 'n/a'}: "
                     f"{r.verdict or 'no claim'}{fewer}")
    return text + ("\n" + "\n".join(lines) + "\n" if lines else "")


def write_text(path, text):
    """A text file written to a temporary name, then renamed: never half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def search_tables(searches, out_dir):
    """Search cost (Tables 4-5) and the dynamics analysis of Sec. 4 for each search run."""
    os.makedirs(os.path.join(out_dir, "dynamics"), exist_ok=True)
    recs = []
    for name, d in searches:
        gpath, tpath = os.path.join(d, "genotype.json"), os.path.join(d, "trajectory.jsonl")
        if not os.path.isfile(gpath):
            raise InputError(f"--search {name}={d}: no genotype.json there (is the search finished?)")
        g = load_genotype(gpath)
        if not os.path.isfile(tpath):
            raise InputError(f"search {name}: {gpath} has no trajectory.jsonl beside it")
        traj = read_jsonl(tpath)
        s = g["search"]
        recs.append({"search": name, "mode": s["mode"], "dataset": s["dataset"], "backbone": s["encoder"],
                     "seed": s.get("seed"), "cell_output": s.get("settings", {}).get("cell_output", "replace"),
                     "epochs": s["epochs_run"], "minutes": s["seconds"] / 60})
        dynamics_figures(name, traj, g, os.path.join(out_dir, "dynamics"))
    cost = pd.DataFrame(recs)
    rows = []
    for _, r in cost[cost["mode"] == "lth"].iterrows() if not cost.empty else []:
        full = cost[(cost["mode"] == "full") & (cost["dataset"] == r["dataset"]) & (cost["backbone"] == r["backbone"])]
        # an LTH search is paired with its seed's full one, searched with the same cell output where there is one
        pair = [full[(full["seed"] == r["seed"]) & (full["cell_output"] == r["cell_output"])],
                full[full["seed"] == r["seed"]], full]
        f = next((c.iloc[0] for c in pair if len(c)), None)
        rows.append({"dataset": r["dataset"], "backbone": r["backbone"], "seed": r["seed"],
                     "IAC search": f["search"] if f is not None else None, "IAC-LTH search": r["search"],
                     "IAC epochs": int(f["epochs"]) if f is not None else None,
                     "IAC minutes": float(f["minutes"]) if f is not None else float("nan"),
                     "IAC-LTH epochs": int(r["epochs"]), "IAC-LTH minutes": float(r["minutes"]),
                     "time speed-up": float(f["minutes"] / r["minutes"]) if f is not None else float("nan")})
    return cost, pd.DataFrame(rows)


def dynamics_figures(name, traj, genotype, out_dir):
    """Sec. 4 on one search: importance curves (Fig. 3), similarity matrices (Fig. 4), similarity to
    the final epoch (Fig. 5), first-entry epochs (Fig. 6, 7). The discrete statistics use the epochs
    after warm-up only (all ops are tied during warm-up)."""
    edge_rule = genotype.get("search", {}).get("settings", {}).get("edge_rule", "max_importance")   # older: PC-DARTS
    I, epochs = importance_tensor(traj)
    arch = arch_epochs(traj)
    Ia, ep_a = importance_tensor(arch)
    cos = cosine_matrix(I)
    pd.DataFrame(cos, index=epochs, columns=epochs).to_csv(os.path.join(out_dir, f"{name}_cosine.csv"))
    ham = {f"top-{k}": hamming_similarity_matrix(topk_masks(Ia, k)) for k in (3, 2, 1)} if arch else {}
    if arch:
        ham["final discrete genotype"] = hamming_similarity_matrix(genotype_masks(arch, edge_rule))
    for k, M in ham.items():
        tag = k.replace("-", "").replace("final discrete ", "")
        pd.DataFrame(M, index=ep_a, columns=ep_a).to_csv(os.path.join(out_dir, f"{name}_hamming_{tag}.csv"))
    first = pd.DataFrame(first_entry_epochs(traj, genotype, edge_rule), columns=FIRST_ENTRY_COLUMNS)
    first.to_csv(os.path.join(out_dir, f"{name}_first_entry.csv"), index=False)

    fig = Figure(figsize=(14, 4))
    ax = fig.subplots(1, 3)
    for e in range(I.shape[1]):                                       # Fig. 3: importance per op and edge
        for o in range(I.shape[2]):
            ax[0].plot(epochs, I[:, e, o], lw=0.7)
    ax[0].set(title=f"{name}: operation importance", xlabel="epoch", ylabel="I")
    ax[1].plot(epochs, cos[:, -1], label="full vector")               # Fig. 5: similarity to the final epoch
    for k, M in ham.items():
        ax[1].plot(ep_a, M[:, -1], label=f"{k} Hamming")
    ax[1].set(title="similarity to final epoch (Fig. 5)", xlabel="epoch", ylim=(0, 1.05))
    ax[1].legend(fontsize=7)
    crit = ["top3", "top2", "top1", "edge_set"]                       # Fig. 6: first-entry epochs
    vals = [first[c].dropna().astype(float).values for c in crit]
    ax[2].boxplot([v if len(v) else [np.nan] for v in vals], tick_labels=crit)
    ax[2].set(title="epoch of first entry (Fig. 6)", ylabel="epoch")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{name}_dynamics.png"), dpi=90)

    rows = [("continuous (cosine)", cos, epochs)] + [(k, M, ep_a) for k, M in ham.items()]
    fig = Figure(figsize=(3.6 * len(rows), 3.4))                           # Fig. 4: epoch x epoch similarity
    ax = fig.subplots(1, len(rows))
    for a, (title, M, ep) in zip(np.atleast_1d(ax), rows):
        im = a.imshow(M, vmin=float(M.min()), vmax=1, origin="lower", extent=[ep[0], ep[-1], ep[0], ep[-1]])
        a.set(title=title, xlabel="epoch", ylabel="epoch")
        fig.colorbar(im, ax=a, fraction=0.046)
    fig.suptitle(f"{name}: similarity between epochs (Fig. 4; discrete rows after warm-up)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{name}_fig4.png"), dpi=90)

    fig = Figure(figsize=(7, 0.45 * len(first) + 1.5))               # Fig. 7: per edge of the final cell
    a = fig.subplots()
    y = np.arange(len(first))
    for c, marker, dy in zip(("top3", "top2", "top1"), ("o", "s", "*"), (0.2, 0.0, -0.2)):   # side by side
        a.scatter(first[c].astype(float), y + dy, marker=marker, label=f"first in {c}", s=40)
    a.set_yticks(y, [f"{r.op} ({r.edge})" for r in first.itertuples()])
    a.set(title=f"{name}: epoch each final op first enters top-3/2/1 (Fig. 7)", xlabel="epoch")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{name}_fig7.png"), dpi=90)


def overlay_figure(args, meta, cases, preds, path):
    best, best_fg = None, -1
    for case, images, labels in iter_cases(args.data, cases, meta):
        fg = (labels > 0).sum((1, 2))
        z = int(fg.argmax())
        if fg[z] > best_fg:
            best, best_fg = (case, z, images[z, 0], labels[z]), fg[z]
    case, z, img, gt = best
    keys = list(preds)
    fig = Figure(figsize=(3 * (2 + len(keys)), 3.2))
    ax = fig.subplots(1, 2 + len(keys))
    K = len(meta["class_names"])
    ax[0].imshow(img, cmap="gray")
    ax[0].set_title(f"{case} z={z}")
    for a, (title, lab) in zip(ax[1:], [("ground truth", gt)] + [(f"{k[0]} ({k[1]})", preds[k][case][z]) for k in keys]):
        a.imshow(img, cmap="gray")
        a.imshow(np.ma.masked_equal(lab, 0), cmap="tab10", vmin=1, vmax=max(K, 2), alpha=0.5, interpolation="nearest")
        a.set_title(title, fontsize=9)
    for a in ax:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def read_rows(paths):
    """Earlier evaluations' per_patient.csv (and the inference_cost.csv beside each, when there)."""
    frames, costs = [], []
    for path in paths:
        require_file(path, "--rows", "the per_patient.csv of an earlier 05_evaluate.py")
        df = pd.read_csv(path)
        missing = {"method", "backbone", "seed", "patient", "region", "metric", "value"} - set(df.columns)
        if missing:
            raise InputError(f"--rows {path}: not a per_patient.csv of 05_evaluate.py "
                             f"(no {', '.join(sorted(missing))})")
        if "patient_id" not in df:             # written before 05 kept each case's patient
            print(f"note: --rows {path} has no patient_id column; each case counts as its own patient")
            df.insert(df.columns.get_loc("patient") + 1, "patient_id", df["patient"])
        frames.append(df.astype({"patient": str, "patient_id": str}))
        cost = os.path.join(os.path.dirname(path), "inference_cost.csv")
        if os.path.isfile(cost):
            costs.append(pd.read_csv(cost))
    return frames, costs


def main(args):
    if not (args.run or args.search or args.nnunet_pred or args.rows):
        raise InputError("give at least one --run NAME=DIR, --nnunet_pred NAME=DIR, --rows CSV or --search NAME=DIR")
    for name, d in parse_pairs(args.run, "--run") + parse_pairs(args.search, "--search"):
        if os.path.isdir(d):
            require_done(d, f"--run/--search {name}=", args.allow_unfinished)
    meta, cases = None, []
    if args.run:
        if not (args.data and args.splits):
            raise InputError("--run needs --data slices.h5 and --splits splits.json")
        meta = read_meta(args.data)
        cases = load_splits(args.splits, meta)[args.subset]
        if not cases:
            raise InputError(f"the {args.subset} split of {args.splits} is empty; nothing to evaluate")
    device = pick_device(args.device) if args.run else None
    os.makedirs(args.out, exist_ok=True)
    mark_unfinished(args.out)
    install_stop_signals(immediate=True)         # no checkpoints: a stop leaves at once, exit 75
    atomic_write_json(os.path.join(args.out, "args.json"), run_metadata(args))
    frames, preds, names, costs = [], {}, [], []
    if args.run:
        df, preds, info, cost = evaluate_runs(args, meta, cases, device)
        frames.append(df)
        names.append(info[0][0])
        costs.append(cost)
    if args.nnunet_pred:
        df, _ = evaluate_nnunet(args)
        frames.append(df)
        names.append(df["method"].iloc[0])
    if args.rows:
        more, more_costs = read_rows(args.rows)
        frames += more
        costs += more_costs
        names += [m for f in more for m in f["method"].iloc[:1]]
    if costs:
        cost = pd.concat(costs, ignore_index=True)
        cost.to_csv(os.path.join(args.out, "inference_cost.csv"), index=False)
        with open(os.path.join(args.out, "inference_cost.md"), "w") as f:
            f.write("## Inference cost (seconds per case on the device named; MACs per slice)\n\n"
                    + to_markdown(cost))
    if args.rows_only:
        if frames:
            atomic_to_csv(pd.concat(frames, ignore_index=True), os.path.join(args.out, "per_patient.csv"))
        mark_done(args.out, "05_evaluate", rows_only=True)
        print(f"per-patient rows in {os.path.join(args.out, 'per_patient.csv')}")
        return
    if frames:
        df = pd.concat(frames, ignore_index=True)
        n_cases = df["patient"].nunique()
        dataset = meta["dataset"] if meta else "nnU-Net" if not args.rows else "rows of earlier evaluations"
        atomic_to_csv(df, os.path.join(args.out, "per_patient.csv"))
        summary, case_mean = summarise(df)
        atomic_to_csv(summary, os.path.join(args.out, "summary.csv"))
        reference = args.reference or names[0]
        methods = list(dict.fromkeys(case_mean["method"]))
        pairs = [(reference, m) for m in methods if m != reference]
        pairs += [method_pair(item, "--compare", methods) for item in args.compare]
        primary = ([method_pair(item, "--primary", methods) for item in args.primary] if args.primary is not None
                   else [p for p in map(lambda x: tuple(x.split(":")), PRIMARY) if set(p) <= set(methods)])
        pairs = list(dict.fromkeys(pairs + primary))                 # a primary pair is compared even if not asked
        paired, seeds, units = paired_table(case_mean, pairs, args.n_boot, args.alternative, args.paired_unit,
                                            primary, args.boot_seed)
        for name, table in (("paired", paired), ("paired_seeds", seeds), ("paired_by_seed", units)):
            atomic_to_csv(table, os.path.join(args.out, f"{name}.csv"))
        titles = {"dice": "Dice", "hd95": "HD95 (mm, lower is better)", "nsd": "NSD (normalised surface Dice)"}
        write_text(os.path.join(args.out, "summary.md"), "".join(
            f"## Patient-level {titles[metric]} on {n_cases} {args.subset} cases ({dataset}), whole volumes\n\n"
            + to_markdown(t.drop(columns="metric").dropna(axis=1, how="all")) + "\n"
            for metric, t in summary.groupby("metric", sort=False)))
        write_text(os.path.join(args.out, "paired.md"), paired_markdown(paired, seeds, reference, primary, args))
        print("\n" + open(os.path.join(args.out, "summary.md")).read())
        print(open(os.path.join(args.out, "paired.md")).read())
    if args.run:
        overlay_figure(args, meta, cases, preds, os.path.join(args.out, "overlay.png"))
        if args.save_nifti:
            for (name, backbone, seed), pr in preds.items():
                d = os.path.join(args.save_nifti, f"{name}_{backbone}_seed{seed}")
                os.makedirs(d, exist_ok=True)
                for case, stack in pr.items():
                    slices_to_nifti(stack, meta, case).to_filename(os.path.join(d, f"{case}.nii.gz"))
            print(f"NIfTI predictions in {args.save_nifti}")
    if args.search:
        cost, table = search_tables(parse_pairs(args.search, "--search"), args.out)
        cost.to_csv(os.path.join(args.out, "search_runs.csv"), index=False)
        table.to_csv(os.path.join(args.out, "search_cost.csv"), index=False)
        with open(os.path.join(args.out, "search_cost.md"), "w") as f:
            f.write("## Search cost (Tables 4-5)\n\n" + (to_markdown(table, ".2f") if not table.empty else
                                                         to_markdown(cost, ".2f")))
        print(open(os.path.join(args.out, "search_cost.md")).read())
        print(f"search-dynamics figures in {os.path.join(args.out, 'dynamics')}")
    mark_done(args.out, "05_evaluate")
    print(f"all outputs in {args.out}")


if __name__ == "__main__":
    cli(main, get_args)
