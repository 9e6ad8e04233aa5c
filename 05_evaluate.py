"""Evaluate trained models at patient level and reproduce the paper's tables and figures.

In:  slices.h5, splits.json, runs of 02_pretrain.py / 04_finetune.py (`--run NAME=DIR`,
     repeatable; the same NAME for several backbones or seeds), searches of 03_search.py
     (`--search NAME=DIR`) for the search-cost table and the dynamics analysis.
Out: OUT/per_patient.csv (method, backbone, seed, patient, region, metric, value): Dice, HD95 (mm)
     and NSD of every region the data set is scored on (BraTS WT/TC/ET, KiTS kidney+masses /
     masses / tumour, ACDC RV/MYO/LV, else per class), on whole volumes in each case's original
     geometry against its original label file (common/metrics.py states the conventions),
     OUT/summary.csv|md (per region and the mean over regions, mean ± std over seeds, per metric),
     OUT/paired.csv|md (ΔDice of the case's mean Dice vs the reference: mean, 95% bootstrap CI, Wilcoxon p,
     Fisher-combined p across backbones; Tables 1-3), OUT/search_cost.csv|md (Tables 4-5),
     OUT/inference_cost.csv|md (parameters, MACs per slice, seconds per case of every run),
     OUT/dynamics/ (cosine / top-k Hamming similarity, first-entry epochs; CSV and PNG,
     like Figs 3-7), OUT/overlay.png, and with --save_nifti DIR predictions as NIfTI in
     each case's original geometry with the data set's own label values.

    python 05_evaluate.py --data D/slices.h5 --splits D/splits.json --run ref=runs/ref \
        --run iac=runs/iac --run iac_lth=runs/iac_lth --search full=runs/search_full \
        --search lth=runs/search_lth --out runs/eval
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

from common.analysis import (FIRST_ENTRY_COLUMNS, arch_epochs, backbone_mean, cosine_matrix, fisher_combined,
                             first_entry_epochs, format_p, genotype_masks, hamming_similarity_matrix, importance_tensor,
                             paired_comparison, topk_masks)
from common.checkpoints import check_same_data, load_checkpoint, load_genotype, model_from_checkpoint
from common.data import iter_cases, load_splits, original_label, read_meta, slices_to_nifti, slices_to_volume
from common.engine import predict_stack
from common.metrics import case_metrics
from common.raw import BOTH_EMPTY, NSD_TOLERANCE_MM, regions_of
from common.runs import (add_unfinished_flag, cli, install_stop_signals, mark_done, mark_unfinished,
                         require_done)
from common.utils import (InputError, add_device_flags, atomic_to_csv, atomic_write_json, pick_device, read_jsonl,
                          require_file, run_metadata)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="slices.h5 (needed with --run)")
    p.add_argument("--splits", default=None, help="splits.json (needed with --run)")
    p.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="a trained run (repeatable)")
    p.add_argument("--nnunet_pred", action="append", default=[], metavar="NAME[@SEED]=DIR",
                   help="a folder of nnUNetv2_predict outputs (repeatable)")
    p.add_argument("--nnunet_gt", default=None, help="labelsTr of the nnU-Net raw data set (dataset.json one up)")
    p.add_argument("--reference", default=None, help="method the others are compared with (default: first --run)")
    p.add_argument("--compare", action="append", default=[], metavar="A:B",
                   help="also compare method B against A (repeatable); iac:iac_lth gives Tables 2-3's IAC -> IAC-LTH")
    p.add_argument("--alternative", choices=["two-sided", "greater"], default="two-sided",
                   help="Wilcoxon (and so Fisher) alternative; greater: the claim is a gain over the other method")
    p.add_argument("--search", action="append", default=[], metavar="NAME=DIR", help="a search run (repeatable)")
    p.add_argument("--rows", action="append", default=[], metavar="CSV",
                   help="per_patient.csv of an earlier (e.g. per-run, --rows_only) evaluation: tables without models "
                        "(repeatable; its inference_cost.csv beside it is taken too)")
    p.add_argument("--rows_only", action="store_true",
                   help="score the --run/--nnunet_pred inputs into OUT/per_patient.csv (+ inference_cost.csv), stop: "
                        "one scoring job per run, tables later from --rows")
    add_unfinished_flag(p)
    p.add_argument("--split", default="test", choices=["test", "val"], help="cases to evaluate")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--save_nifti", default=None, metavar="DIR", help="write predictions as NIfTI under DIR/NAME/")
    p.add_argument("--nsd_tolerance", type=float, default=None,
                   help="NSD tolerance in mm (default: the data set's, common/raw.py NSD_TOLERANCE_MM)")
    p.add_argument("--n_boot", type=int, default=9999, help="bootstrap resamples")
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
                                       f"{v:{floatfmt}}" if isinstance(v, float) else str(v)
                                       for c, v in zip(cols, r)) + " |")
    return "\n".join(lines) + "\n"


def scoring(args, dataset, class_names):
    """Regions, NSD tolerance (mm) and the both-empty rule of a data set."""
    tol = args.nsd_tolerance if args.nsd_tolerance is not None else NSD_TOLERANCE_MM.get(dataset, 1.0)
    return regions_of(dataset, class_names), tol, BOTH_EMPTY.get(dataset, np.nan)


def metric_rows(key, patient, pred, gt, spacing, score):
    regions, tol, both_empty = score
    return [{"method": key[0], "backbone": key[1], "seed": key[2], "patient": patient, "region": region,
             "metric": metric, "value": float(v)} for region, metric, v in case_metrics(pred, gt, spacing, regions, tol,
                                                                                          both_empty)]


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
        amp, cl = args.amp and device.type == "cuda", args.channels_last and device.type == "cuda"
        t0 = time.perf_counter()
        preds[name, backbone, seed] = {case: predict_stack(model, images, device, amp, cl)
                                       for case, images, _ in iter_cases(args.data, cases, meta, f"predict {name}")}
        seconds = time.perf_counter() - t0
        info.append((name, d, backbone, seed))
        cost.append({"method": name, "backbone": backbone, "seed": seed, **inference_cost(model, meta, device),
                     "seconds_per_case": seconds / len(cases), "device": str(device)})
    score = scoring(args, meta["dataset"], meta["class_names"])
    rows = []
    for case in cases:                                       # whole volumes, original geometry and label file
        gt, spacing = original_label(meta, case)
        for key, pr in preds.items():
            rows += metric_rows(key, case, slices_to_volume(pr[case], meta, case), gt, spacing, score)
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
    rows = []
    for name, d in parse_pairs(args.nnunet_pred, "--nnunet_pred"):
        name, _, seed = name.partition("@")
        files = sorted(f for f in os.listdir(d) if f.endswith(".nii.gz")) if os.path.isdir(d) else []
        if not files:
            raise InputError(f"--nnunet_pred {name}={d}: no .nii.gz predictions there")
        for fn in files:
            gt_path = os.path.join(args.nnunet_gt, fn)
            if not os.path.isfile(gt_path):
                raise InputError(f"prediction {fn} in {d} has no label {gt_path}")
            gt_img = nib.load(gt_path)
            pred, gt = np.asarray(nib.load(os.path.join(d, fn)).dataobj), np.asarray(gt_img.dataobj)
            if pred.shape != gt.shape:
                raise InputError(f"{fn}: prediction {pred.shape} and label {gt.shape} differ in shape")
            rows += metric_rows((name, "nnunet_2d", int(seed or 0)), fn[:-len(".nii.gz")], pred, gt,
                                tuple(float(z) for z in gt_img.header.get_zooms()[:3]), score)
        print(f"{name:>12s}  nnU-Net 2d seed {seed or 0}: {len(files)} cases")
    return pd.DataFrame(rows), names


def case_means(df):
    """One value per case and run: the mean over the regions (NaN regions left out)."""
    return df.groupby(["method", "backbone", "seed", "patient"], sort=False)["value"].mean().reset_index()


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


def paired_table(case_mean, pairs, n_boot, alternative="two-sided"):
    """ΔDice of `method` vs `vs` for every (vs, method) pair and backbone (case Dice averaged over seeds);
    Fisher's combination of the Wilcoxon p across backbones; with several backbones, their mean ΔDice
    (Table 1) with a paired bootstrap CI over patients."""
    per = case_mean.groupby(["method", "backbone", "patient"], sort=False)["value"].mean().unstack("patient")
    rows = []
    for vs, method in pairs:
        pair, deltas = [], []
        for backbone in dict.fromkeys(b for m, b in per.index if m == method):
            if (vs, backbone) not in per.index:
                continue
            ref, vals = per.loc[(vs, backbone)], per.loc[(method, backbone)]
            r = paired_comparison(ref.values, vals[ref.index].values, n_resamples=n_boot, alternative=alternative)
            pair.append({"method": method, "vs": vs, "backbone": backbone, **r})
            deltas.append(vals[ref.index].values - ref.values)
        fisher = fisher_combined([r["wilcoxon_p"] for r in pair])
        rows += [{**r, "fisher_p": fisher} for r in pair]
        if len(deltas) > 1 and len({len(d) for d in deltas}) == 1:
            rows.append({"method": method, "vs": vs, "backbone": f"mean over {len(deltas)} backbones",
                         **backbone_mean(np.stack(deltas), n_resamples=n_boot), "wilcoxon_p": float("nan"),
                         "fisher_p": fisher})
    return pd.DataFrame(rows)


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
        frames.append(df.astype({"patient": str}))
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
        cases = load_splits(args.splits, meta)[args.split]
        if not cases:
            raise InputError(f"the {args.split} split of {args.splits} is empty; nothing to evaluate")
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
        df.to_csv(os.path.join(args.out, "per_patient.csv"), index=False)
        summary, case_mean = summarise(df)
        summary.to_csv(os.path.join(args.out, "summary.csv"), index=False)
        reference = args.reference or names[0]
        pairs = [(reference, m) for m in dict.fromkeys(case_mean["method"]) if m != reference]
        for item in args.compare:
            a, sep, b = item.partition(":")
            if not sep or not {a, b} <= set(case_mean["method"]):
                raise InputError(f"--compare {item}: give A:B with two evaluated methods "
                                 f"({', '.join(dict.fromkeys(case_mean['method']))})")
            pairs.append((a, b))
        paired = paired_table(case_mean, pairs, args.n_boot, args.alternative)
        paired.to_csv(os.path.join(args.out, "paired.csv"), index=False)
        titles = {"dice": "Dice", "hd95": "HD95 (mm, lower is better)", "nsd": "NSD (normalised surface Dice)"}
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            for metric, t in summary.groupby("metric", sort=False):
                f.write(f"## Patient-level {titles[metric]} on {n_cases} {args.split} cases ({dataset}), whole "
                        "volumes\n\n" + to_markdown(t.drop(columns="metric").dropna(axis=1, how="all")) + "\n")
        with open(os.path.join(args.out, "paired.md"), "w") as f:
            f.write(f"## ΔDice (case mean over regions) of method vs `vs` (reference {reference}): mean, 95% paired "
                    f"bootstrap CI, Wilcoxon p ({args.alternative}), Fisher p across backbones; the mean over "
                    "backbones has a bootstrap CI over patients\n\n")
            f.write(to_markdown(paired) if not paired.empty else "no paired comparison\n")
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
