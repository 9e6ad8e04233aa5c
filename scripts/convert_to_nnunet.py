"""Convert a raw data set (ACDC, BraTS, KiTS, AMOS layouts) to the nnU-Net v2 raw format.

    python scripts/convert_to_nnunet.py --dataset acdc --raw /data/ACDC/database \
        --out $nnUNet_raw/Dataset501_ACDC

Every case is read and validated exactly as 01_preprocess.py does (clear errors naming the
case); images are copied as CASE_000C.nii.gz, labels remapped to consecutive integers, and
dataset.json written with the class names. Files go to a temporary folder renamed at the end.
"""
import argparse
import json
import os
import shutil

import nibabel as nib
import numpy as np
from tqdm import tqdm

from common.raw import list_cases, load_case
from common.utils import InputError, cli


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["acdc", "brats", "kits", "amos"], help="raw layout")
    p.add_argument("--raw", required=True, help="raw data folder")
    p.add_argument("--out", required=True, help="nnU-Net raw dataset folder, e.g. $nnUNet_raw/Dataset501_ACDC")
    p.add_argument("--modality", choices=["ct", "mri"], default="ct", help="AMOS: which scans (nnU-Net needs one)")
    return p.parse_args(argv)


def main(args):
    if os.path.exists(args.out):
        raise InputError(f"{args.out} exists; remove it first")
    info = list_cases(args.dataset, args.raw, args.modality)
    mods = {c.modality for c in info.cases}
    tmp = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "imagesTr"))
    os.makedirs(os.path.join(tmp, "labelsTr"))
    lut = np.zeros(max(info.label_map) + 1, dtype=np.uint8)
    for raw_value, idx in info.label_map.items():
        lut[raw_value] = idx
    for case in tqdm(info.cases, desc="converting", unit="case"):
        load_case(case, info)                                        # the same validation as stage 01
        for c, path in enumerate(case.images):
            shutil.copyfile(path, os.path.join(tmp, "imagesTr", f"{case.case_id}_{c:04d}.nii.gz"))
        lab = nib.load(case.label)
        data = lut[np.asarray(lab.dataobj).astype(np.int64)]
        nib.save(nib.Nifti1Image(data, lab.affine, lab.header), os.path.join(tmp, "labelsTr", f"{case.case_id}.nii.gz"))
    channel = "CT" if mods == {"ct"} else None
    meta = {"channel_names": {str(i): channel or m for i, m in enumerate(info.modalities)},
            "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(info.class_names)}},
            "numTraining": len(info.cases), "file_ending": ".nii.gz", "source": info.dataset}
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, args.out)
    print(f"{len(info.cases)} cases written to {args.out}")


if __name__ == "__main__":
    cli(main, get_args)
