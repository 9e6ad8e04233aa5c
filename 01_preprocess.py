r"""Preprocessing (01): raw NIfTI data set -> slices.h5 + splits.json, the input of every later stage.

In:  a raw folder in the layout of ACDC, BraTS 2021/2023, KiTS 21/23, AMOS22 or nnU-Net v2.
Out: OUT/slices.h5 (normalised, centre-cropped axial slices of every case, with the
     geometry to put predictions back into the original NIfTI space), OUT/splits.json
     (patient-wise train/val/test: 60/20/20 at random, ACDC's own test patients with
     --split official, or yours with --split_file; and the train_search/val_search halves;
     patient_of: each case's patient), OUT/crop_report.json (foreground voxels the crop
     drops, per case and in total; a warning above 0.5%), OUT/args.json.

    python 01_preprocess.py --dataset acdc --raw /data/ACDC/database --out runs/acdc/data
    python 01_preprocess.py --dataset nnunet --raw raw/Dataset777_Mine --out runs/mine/data --subjects '^(sub-\d+)_'
    python 01_preprocess.py --make_phantom runs/phantom_raw --layout acdc --patients 20

Patients: every split draws patients, never single scans. ACDC's frames share their patient folder and a
BraTS 2023 case BraTS-GLI-XXXXX-YYY its BraTS-GLI-XXXXX; elsewhere each case is its own patient unless
--subjects (or "patients": {case: subject} in an nnU-Net dataset.json) says which cases belong to one
subject. Case ids that look like repeated scans (sub-01_ses-1, sub-01_ses-2) without it get a warning.

Both writes go to a temporary name and are renamed at the end, so an interrupted or
failed run leaves nothing half-written. Bad input stops with a message naming the case, and no
slices.h5 is written: a channel or label whose shape, spacing, origin or direction differs from the
case's first channel (mirrored, shifted, resampled) is bad input too (common/raw.py, check_same_grid).
"""
import argparse
import contextlib
import glob
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm import tqdm

from common.data import COMPRESSIONS, check_partition, ct_statistics, foreground_sample_job, process_case_job, write_slices
from common.phantom import LAYOUTS, write_phantom
from common.raw import DataError, apply_subjects, list_cases, read_subjects, repeated_scans
from common.runs import cli, install_stop_signals, mark_done, mark_unfinished
from common.utils import HelpFormatter, InputError, atomic_write_json, read_json, run_metadata

STRIDE = 32                                  # the U-Nets' total down-sampling: crops must be multiples of it


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--dataset", choices=["acdc", "brats", "kits", "amos", "nnunet"],
                   help="layout of the raw folder (nnunet: any nnU-Net v2 raw data set) (needed unless --make_phantom)")
    p.add_argument("--raw", help="raw data folder (needed unless --make_phantom)")
    p.add_argument("--out", help="output folder for slices.h5 and splits.json (needed unless --make_phantom)")
    p.add_argument("--crop", type=int, nargs=2, default=[256, 256], metavar=("H", "W"),
                   help=f"centred in-plane crop in voxels (padded when the slice is smaller); multiples of {STRIDE}")
    p.add_argument("--spacing", type=float, nargs=2, default=None, metavar=("SX", "SY"),
                   help="resample in-plane to this spacing (mm) before cropping (default: off, the scans' own spacing)")
    p.add_argument("--modality", choices=["ct", "mri", "all"], default="ct",
                   help="AMOS only: which scans to use (CT, MRI, or both)")
    p.add_argument("--fractions", type=float, nargs=3, default=[0.6, 0.2, 0.2], metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of the patients in the train, val and test splits (--split random)")
    p.add_argument("--split", choices=["random", "official"], default="random",
                   help="how the patients are split: random = patient-wise by --fractions; official = the data set's "
                        "own test patients (ACDC testing/), train/val from the rest")
    p.add_argument("--split_file", default=None,
                   help="JSON with lists train / val / test of patient ids (every patient once); overrides --split "
                        "(default: none, --split decides)")
    p.add_argument("--subjects", default=None, metavar="FILE|REGEX",
                   help="which cases belong to one subject (several scans of one patient), so that a subject's cases "
                        "stay in one split: a .json {case: subject} or .csv (columns case, subject) file, or a "
                        "regular expression whose first group, searched in the case id, is the subject "
                        "(e.g. '^(sub-\\d+)_'); overrides the layout's own patients (default: the layout's)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of this script: the patient-wise split, the voxels sampled for the CT "
                        "statistics, and the --make_phantom data")
    p.add_argument("--processes", type=int, default=max(1, min(8, (os.cpu_count() or 2))),
                   help="processes that read and slice volumes in parallel, one volume each (0: all in this "
                        "process) (default: %(default)s here: the CPUs, at most 8)")
    p.add_argument("--workers", dest="processes", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)                      # the old name of --processes, still taken
    p.add_argument("--compression", choices=COMPRESSIONS, default="none",
                   help="HDF5 compression of the slices (lzf: fast; gzip: smallest); none reads fastest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing slices.h5 / splits.json (without it, they are kept and 01 stops)")
    p.add_argument("--make_phantom", metavar="DIR",
                   help="write a synthetic (phantom) raw data set to DIR for trying the pipeline, and exit (default: "
                        "off, preprocess --raw)")
    p.add_argument("--layout", choices=LAYOUTS, default="acdc", help="--make_phantom: raw layout of the phantom")
    p.add_argument("--patients", type=int, default=20, help="--make_phantom: number of phantom patients")
    p.add_argument("--phantom_size", type=int, default=64, help="--make_phantom: typical in-plane size (voxels)")
    return p.parse_args(argv)


def split_patients(patient_ids, fractions, seed, test=None):
    """Patient-wise train/val/test split plus the train_search/val_search halves. `test`: patients that
    are the test set already (an official split); the others go to train/val in the ratio of the first
    two fractions."""
    rng = np.random.default_rng(seed)
    pids = sorted(set(patient_ids) - set(test or ()))
    rng.shuffle(pids)
    n = len(pids)
    if n < 3 - (1 if test else 0):
        raise DataError(f"only {n} patient(s); at least 3 are needed for a train/val/test split")
    if test:
        n_val, n_test = max(1, int(round(fractions[1] / (fractions[0] + fractions[1]) * n))), 0
    else:
        n_val, n_test = max(1, int(round(fractions[1] * n))), max(1, int(round(fractions[2] * n)))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"{n} patients leave no training patient with fractions {fractions}")
    parts = {"train": pids[:n_train], "val": pids[n_train:n_train + n_val],
             "test": sorted(test) if test else pids[n_train + n_val:]}
    return {k: sorted(v) for k, v in {**parts, **search_halves(parts["train"], rng)}.items()}


def search_halves(train, rng):
    """train_search / val_search: the training patients in two halves (Sec. 2.1, the full search)."""
    half = sorted(train)
    rng.shuffle(half)
    k = max(1, len(half) // 2) if len(half) > 1 else 1
    return {"train_search": sorted(half[:k]), "val_search": sorted(half[k:]) or sorted(half[:k])}


def given_split(path, patient_ids, seed):
    """--split_file: JSON {"train": [...], "val": [...], "test": [...]} of patient ids, every patient found
    exactly once; the train_search/val_search halves are drawn from its training patients."""
    given = read_json(path, "--split_file")
    if not isinstance(given, dict) or any(not isinstance(given.get(k), list) for k in ("train", "val", "test")):
        raise InputError(f"--split_file {path}: needs lists 'train', 'val' and 'test' of patient ids")
    check_partition("--split_file", path, {k: given[k] for k in ("train", "val", "test")}, patient_ids, "patients")
    if not (given["train"] and given["val"] and given["test"]):
        raise InputError(f"--split_file {path}: train, val and test each need at least one patient")
    parts = {k: sorted(str(p) for p in given[k]) for k in ("train", "val", "test")}
    return {**parts, **search_halves(parts["train"], np.random.default_rng(seed))}


def official_test_patients(info):
    """--split official: the data set's own test patients (ACDC: the testing/ folder of the release)."""
    if info.dataset != "acdc":
        raise InputError(f"--split official is defined for ACDC only (its testing/ folder), not {info.dataset}; "
                         "give --split_file instead")
    test = sorted({c.patient_id for c in info.cases if f"{os.sep}testing{os.sep}" in os.path.abspath(c.label)})
    if not test:
        raise InputError("--split official: no ACDC patients under a testing/ folder in --raw")
    return test


def crop_report(args, case_ids, tables, warn_above=0.005):
    """Foreground the crop drops, per case and in total: printed, warned above 0.5%, kept in OUT/crop_report.json.
    `tables`: the case tables write_slices wrote."""
    lost = {cid: (int(lo), int(n)) for cid, lo, n in zip(case_ids, tables["fg_lost"], tables["fg_voxels"])}
    total_lost, total = sum(lo for lo, _ in lost.values()), sum(n for _, n in lost.values())
    bad = {cid: lo / n for cid, (lo, n) in lost.items() if n and lo / n > warn_above}
    for cid, frac in sorted(bad.items(), key=lambda kv: -kv[1])[:10]:
        print(f"warning: case {cid}: the crop drops {frac:.1%} of its foreground voxels")
    share = total_lost / max(total, 1)
    print(f"crop {args.crop[0]}x{args.crop[1]}: {share:.2%} of all foreground voxels fall outside it"
          + (f" ({len(bad)} cases above {warn_above:.1%}; see the README on --crop / --spacing)" if bad else ""))
    atomic_write_json(os.path.join(args.out, "crop_report.json"),
                      {"crop": list(args.crop), "spacing": args.spacing, "foreground_lost_fraction": share,
                       "cases_above_warning": len(bad), "warning_above": warn_above,
                       "per_case": {cid: {"foreground_voxels": n, "lost": lo} for cid, (lo, n) in lost.items()}})


class InProcess:
    """--processes 0: the volumes one after another in this process (ProcessPoolExecutor's map, without a pool)."""
    map = staticmethod(map)


def remove_stale_tmp(out_h5):
    """A killed 01 leaves slices.h5.tmpPID behind (hundreds of GB for BraTS): remove those whose writer is gone."""
    for tmp in glob.glob(glob.escape(out_h5) + ".tmp*"):
        pid = tmp.rsplit(".tmp", 1)[1]
        if pid.isdigit() and pid_alive(int(pid)):
            continue
        print(f"removing {tmp}, left by an earlier run that did not finish")
        os.remove(tmp)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(args):
    if args.make_phantom:
        write_phantom(args.make_phantom, args.layout, args.patients, seed=args.seed, size=args.phantom_size)
        print(f"phantom ({args.layout}, {args.patients} patients) written to {args.make_phantom}")
        return
    if not (args.dataset and args.raw and args.out):
        raise InputError("--dataset, --raw and --out are required (or --make_phantom DIR)")
    if any(c <= 0 or c % STRIDE for c in args.crop):
        up = [max(STRIDE, -(-c // STRIDE) * STRIDE) for c in args.crop]
        raise InputError(f"--crop {args.crop[0]} {args.crop[1]}: both sides must be positive multiples of {STRIDE} "
                         f"(the U-Net's down-sampling); try --crop {up[0]} {up[1]}")
    if args.processes < 0:
        raise InputError(f"--processes {args.processes}: give 0 (in this process) or more")
    out_h5, out_splits = os.path.join(args.out, "slices.h5"), os.path.join(args.out, "splits.json")
    if not args.overwrite and (os.path.exists(out_h5) or os.path.exists(out_splits)):
        raise InputError(f"{args.out} already holds slices.h5/splits.json; pass --overwrite to replace")
    os.makedirs(args.out, exist_ok=True)
    mark_unfinished(args.out)
    install_stop_signals(immediate=True)         # no checkpoints: a stop leaves at once, exit 75
    remove_stale_tmp(out_h5)

    info = list_cases(args.dataset, args.raw, args.modality)
    if args.subjects:
        apply_subjects(info.cases, read_subjects(args.subjects, [c.case_id for c in info.cases]))
    elif warning := repeated_scans(info.cases):
        print(f"warning: {warning}")
    pids = [c.patient_id for c in info.cases]
    if args.split_file:
        parts = given_split(args.split_file, pids, args.seed)
    else:
        test = official_test_patients(info) if args.split == "official" else None
        parts = split_patients(pids, args.fractions, args.seed, test)
    print(f"{info.dataset}: {len(info.cases)} cases of {len(set(c.patient_id for c in info.cases))} patients; "
          + ", ".join(f"{k} {len(v)}" for k, v in parts.items()) + " patients")
    train_p = set(parts["train"])
    ct_stats = None
    with ProcessPoolExecutor(args.processes) if args.processes else contextlib.nullcontext(InProcess()) as pool:
        ct_train = [c for c in info.cases if c.modality == "ct" and c.patient_id in train_p]
        if ct_train:  # CT statistics come from training patients only (docs/method.md §6)
            jobs = [(c, info, args.seed + i) for i, c in enumerate(ct_train)]
            samples = list(tqdm(pool.map(foreground_sample_job, jobs), total=len(jobs), desc="CT statistics", unit="vol"))
            ct_stats = ct_statistics(samples)
        attrs = {"dataset": info.dataset, "modalities": info.modalities, "class_names": info.class_names,
                 "normalisation": {"mri": "z-score over non-zero voxels per volume and channel",
                                   "ct": ct_stats},
                 "crop": list(args.crop), "spacing": args.spacing,
                 "label_values": [v for v, _ in sorted(info.label_map.items(), key=lambda kv: kv[1])]}
        tmp = out_h5 + f".tmp{os.getpid()}"
        try:
            jobs = [(c, info, list(args.crop), args.spacing, ct_stats) for c in info.cases]
            results = tqdm(pool.map(process_case_job, jobs), total=len(jobs), desc="slicing", unit="vol")
            tables = write_slices(tmp, info.cases, results, attrs, n_channels=len(info.cases[0].images),
                                  compression=args.compression)
            os.replace(tmp, out_h5)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    crop_report(args, [c.case_id for c in info.cases], tables)
    case_parts = {k: [c.case_id for c in info.cases if c.patient_id in set(v)] for k, v in parts.items()}
    atomic_write_json(out_splits, {"dataset": info.dataset, "seed": args.seed, "fractions": args.fractions,
                                   "split": args.split_file or args.split,
                                   "unit": "case", "patients": parts, **case_parts,
                                   "patient_of": {c.case_id: c.patient_id for c in info.cases}})
    atomic_write_json(os.path.join(args.out, "args.json"), run_metadata(args))
    mark_done(args.out, "01_preprocess", cases=len(info.cases))
    print(f"wrote {out_h5} and {out_splits}")


if __name__ == "__main__":
    cli(main, get_args)
