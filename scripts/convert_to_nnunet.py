r"""Convert a raw data set (ACDC, BraTS, KiTS, AMOS layouts) to the nnU-Net v2 raw format.

    python scripts/convert_to_nnunet.py --dataset acdc --raw /data/ACDC/database \
        --out $nnUNet_raw/Dataset501_ACDC

Every case is read and validated exactly as 01_preprocess.py does (clear errors naming the
case); images are copied as CASE_000C.nii.gz, labels remapped to consecutive integers, and
dataset.json written with the class names. Files go to a temporary folder renamed at the end.

With `--splits D/splits.json` (01_preprocess.py's), the nnU-Net track uses exactly the slice
track's patients: the test patients go to imagesTs/labelsTs, and splits_final.json (fold 0 =
our train / val division) is written beside dataset.json and, when $nnUNet_preprocessed is set,
into $nnUNet_preprocessed/NAME/ where nnU-Net reads it (run plan_and_preprocess first or after:
it keeps the file). Train fold 0 (`nnUNetv2_train D 2d 0`), predict imagesTs, and give
05_evaluate.py `--nnunet_gt .../labelsTs` beside `--run`: both tracks land in one table.

Without `--splits`, where a patient has several cases (ACDC: the ED and ES frames), splits_final.json holds
nnU-Net's five folds drawn over patients instead of cases (seeded as nnU-Net's own, 12345), so that no fold
trains on one frame of a patient and validates on the other; nnU-Net's default split draws cases.

Which cases are one patient: the layout's own (ACDC's frames, BraTS 2023 time points), `--subjects` (as in
01_preprocess.py: a .json / .csv mapping or a regular expression), or, with `--splits`, the `patient_of`
that 01_preprocess.py recorded there. dataset.json's "patients" ({case: patient}) keeps it for nnunet_iac's
search halves and for 01_preprocess.py --dataset nnunet on the converted folder.
"""
import argparse
import json
import os
import shutil

import nibabel as nib
import numpy as np
from tqdm import tqdm

from common.data import check_partition, load_splits
from common.raw import apply_subjects, check_subjects, list_cases, load_case, read_subjects, repeated_scans
from common.runs import cli
from common.utils import HelpFormatter, InputError, atomic_write_json


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--dataset", required=True, choices=["acdc", "brats", "kits", "amos"],
                   help="layout of the raw folder (required)")
    p.add_argument("--raw", required=True, help="raw data folder (required)")
    p.add_argument("--out", required=True,
                   help="nnU-Net raw dataset folder to write, e.g. $nnUNet_raw/Dataset501_ACDC; must not exist "
                        "(required)")
    p.add_argument("--modality", choices=["ct", "mri"], default="ct",
                   help="AMOS only: which scans to convert (an nnU-Net data set has one modality)")
    p.add_argument("--splits", default=None,
                   help="splits.json of 01_preprocess.py: its test patients go to imagesTs/labelsTs and its "
                        "train/val division to splits_final.json (fold 0) (default: none, every case to imagesTr; "
                        "five folds drawn over patients where a patient has several cases, else nnU-Net's own)")
    p.add_argument("--subjects", default=None, metavar="FILE|REGEX",
                   help="which cases belong to one subject, as 01_preprocess.py --subjects: a .json {case: subject} or "
                        ".csv (columns case, subject) file, or a regular expression whose first group is the subject "
                        "(default: the patients recorded in --splits, else the layout's)")
    return p.parse_args(argv)


def main(args):
    if os.path.exists(args.out):
        raise InputError(f"{args.out} exists; remove it first")
    info = list_cases(args.dataset, args.raw, args.modality)
    mods = {c.modality for c in info.cases}
    part = our_split(args.splits, info) if args.splits else {c.case_id: "train" for c in info.cases}
    set_patients(args, info)
    tmp = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if args.splits else ()):
        os.makedirs(os.path.join(tmp, d))
    lut = np.zeros(max(info.label_map) + 1, dtype=np.uint8)
    for raw_value, idx in info.label_map.items():
        lut[raw_value] = idx
    for case in tqdm(info.cases, desc="converting", unit="case"):
        load_case(case, info)                                        # the same validation as preprocessing (01)
        tr = "Ts" if part[case.case_id] == "test" else "Tr"
        for c, path in enumerate(case.images):
            shutil.copyfile(path, os.path.join(tmp, f"images{tr}", f"{case.case_id}_{c:04d}.nii.gz"))
        lab = nib.load(case.label)
        data = lut[np.asarray(lab.dataobj).astype(np.int64)]
        nib.save(nib.Nifti1Image(data, lab.affine, lab.header),
                 os.path.join(tmp, f"labels{tr}", f"{case.case_id}.nii.gz"))
    channel = "CT" if mods == {"ct"} else None
    meta = {"channel_names": {str(i): channel or m for i, m in enumerate(info.modalities)},
            "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(info.class_names)}},
            "numTraining": sum(v != "test" for v in part.values()), "file_ending": ".nii.gz", "source": info.dataset,
            "patients": {c.case_id: c.patient_id for c in info.cases}}    # the full search's halves, by patient
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if args.splits:                                                  # fold 0 = our train / val division
        folds = [{k: sorted(c for c, v in part.items() if v == k) for k in ("train", "val")}]
        what = "fold 0 is our train / val division"
    else:
        folds = patient_folds(meta["patients"])                      # None where every patient has one case
        what = f"{len(folds or [])} folds drawn over patients, each patient's cases on one side"
    if folds:
        atomic_write_json(os.path.join(tmp, "splits_final.json"), folds)
    pre = os.environ.get("nnUNet_preprocessed")
    if folds and pre:                                # before the rename: a finished folder has its folds in place
        dest = os.path.join(pre, os.path.basename(args.out.rstrip("/")))
        os.makedirs(dest, exist_ok=True)
        atomic_write_json(os.path.join(dest, "splits_final.json"), folds)
    os.replace(tmp, args.out)
    print(f"{len(info.cases)} cases written to {args.out}"
          + (f" ({sum(v == 'test' for v in part.values())} test cases in imagesTs/labelsTs)" if args.splits else ""))
    if folds and pre:
        print(f"{dest}/splits_final.json: {what}")
    elif folds:
        print("set nnUNet_preprocessed, or copy splits_final.json into $nnUNet_preprocessed/"
              f"{os.path.basename(args.out.rstrip('/'))}/, for nnU-Net's folds: {what}")


def patient_folds(patients, n_folds=5, seed=12345):
    """nnU-Net's cross-validation folds drawn over patients: [{"train": cases, "val": cases}] with every patient's
    cases on one side (case -> patient); None where each patient has one case (nnU-Net's own split is then the
    same kind) or there are fewer than 2 patients. Fewer patients than folds: one fold per patient."""
    ids = sorted(set(patients.values()))
    if len(ids) == len(patients) or len(ids) < 2:
        return None
    np.random.RandomState(seed).shuffle(ids)
    k = min(n_folds, len(ids))
    folds = []
    for f in range(k):
        val = set(ids[f::k])
        folds.append({"train": sorted(c for c, p in patients.items() if p not in val),
                      "val": sorted(c for c, p in patients.items() if p in val)})
    return folds


def set_patients(args, info):
    """Each case's patient: --subjects, else the patient_of of --splits (01_preprocess.py's, which its split
    was drawn with), else the layout's; a warning when case ids look like repeated scans and none said so.
    --subjects and --splits that disagree are refused: the folds would not be the split's."""
    case_ids = [c.case_id for c in info.cases]
    recorded = None
    if args.splits and "patient_of" in (splits := load_splits(args.splits)):
        recorded = check_subjects(splits["patient_of"], case_ids, f"--splits {args.splits} 'patient_of'")
    if args.subjects:
        given = read_subjects(args.subjects, case_ids)
        if recorded is not None and given != recorded:
            diff = [c for c in case_ids if given[c] != recorded[c]]
            raise InputError(f"--subjects {args.subjects} puts case(s) {diff[:3]} in other patients than --splits "
                             f"{args.splits} records; preprocess with the same --subjects, or leave it out here")
        apply_subjects(info.cases, given)
    elif recorded is not None:
        apply_subjects(info.cases, recorded)
    elif warning := repeated_scans(info.cases):
        print(f"warning: {warning}")


def our_split(path, info):
    """case id -> train / val / test from 01_preprocess.py's splits.json, checked against the cases found."""
    splits = load_splits(path)
    if splits.get("dataset") not in (None, info.dataset):
        raise InputError(f"--splits {path} is for {splits['dataset']}, these raw files are {info.dataset}")
    parts = {k: splits[k] for k in ("train", "val", "test")}
    check_partition("--splits", path, parts, [c.case_id for c in info.cases], "cases")
    return {c: k for k, ids in parts.items() for c in ids}


if __name__ == "__main__":
    cli(main, get_args)
