r"""Predict: segment new images with a trained run (stage I baselines and stage III IAC cells alike).

In:  --run RUN, a finished run of 02_pretrain.py or 04_finetune.py (its ckpt_best.pt); --input, a NIfTI
     file or a folder of cases holding the modalities the run was trained on, named as in the raw layout
     of its data set (ACDC patientXXX_frameYY, BraTS CASE_t1 ..., KiTS case_XXXXX/imaging, AMOS amos_XXXX)
     or as nnU-Net's CASE_0000.nii.gz, CASE_0001.nii.gz, ... (a one-modality run also takes any name);
     the slices.h5 the run was trained on (found through RUN/args.json, or --data), whose recorded
     preprocessing is repeated exactly: orientation to canonical RAS, the optional in-plane --spacing, the
     normalisation (MRI: z-score over non-zero voxels; CT: clip and z-score with the training statistics),
     the centred crop / pad.
Out: OUT/CASE.nii.gz for each case: labels in the data set's own values, in the case's original shape and
     affine (crop, resampling and reorientation undone; voxels outside the crop are background): for a
     test case, exactly what 05_evaluate.py --save_nifti writes. OUT/predict.json: flags, run, data, the
     input files of each case, the cases that failed and the files skipped, each with its reason.

    python predict.py --run runs/acdc/iac_lth --input /data/new_scans --out runs/acdc/predictions

Which file is which case: the channels of a case sit in one folder (CASE_0000, CASE_0001, ... or the
layout's names). With one modality, names without a _0000 beside them are cases of their own:
A/liver_0012.nii.gz and B/liver_0013.nii.gz are liver_0012 and liver_0013, and a folder where nothing is
named in a layout takes every file but labels as a case. Every other NIfTI file is skipped and listed (one
line here, all of them in predict.json "skipped" with the reason): label files (labelsTr/, _gt, _seg,
segmentation), 4-D series (_4d), names of no layout. Two files that would give one case id (x_0001.nii.gz
beside x_0001_0000.nii.gz with one modality, A/x.nii.gz and B/x.nii.gz) stop the run naming both.

A case with bad input (a modality missing or extra, a 4-D volume, NaN voxels, an unreadable or truncated
file, a channel whose shape, spacing, origin or direction differs from the first channel's) gets one line
`error: case ...` and no output file (each file is written to a temporary name, then renamed; an earlier
run's OUT/CASE.nii.gz of it is removed, and the line says so); the other cases still finish, and the exit
code is 1 when any case failed. An existing OUT/CASE.nii.gz of a case that succeeds is replaced.
"""
import argparse
import os
import re
import sys

from tqdm import tqdm

from common.checkpoints import check_same_data, load_checkpoint, model_from_checkpoint
from common.data import process_case, read_meta, slices_to_nifti
from common.engine import predict_stack
from common.raw import Case, DataError, amos_modality, channel_files, image_cases
from common.runs import add_unfinished_flag, cli, require_done
from common.utils import (HelpFormatter, InputError, add_device_flags, atomic_write_json, pick_device, precision,
                          read_json, run_metadata)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--run", required=True,
                   help="run folder of 02_pretrain.py or 04_finetune.py (with ckpt_best.pt) (required)")
    p.add_argument("--input", required=True,
                   help="a NIfTI file, or a folder of cases (searched recursively) (required)")
    p.add_argument("--out", required=True, help="output folder for the CASE.nii.gz label maps (required)")
    p.add_argument("--data", default=None,
                   help="the slices.h5 the run was trained on (default: the one RUN/args.json names)")
    p.add_argument("--modality", choices=["ct", "mri"], default=None,
                   help="the modality of the input scans, which picks their normalisation; needed only for a run "
                        "trained on CT and MRI scans together (01_preprocess.py --modality all; amos_XXXX ids say it "
                        "themselves) (default: the training data's one modality)")
    add_unfinished_flag(p)
    add_device_flags(p)
    return p.parse_args(argv)


def training_data(args, ckpt):
    """The slices.h5 the run was trained on: --data, else the one RUN/args.json names (its node-local copy's
    original where --local_data was used)."""
    if args.data:
        return args.data
    path = os.path.join(args.run, "args.json")
    recorded = read_json(path, "--run")["args"] if os.path.isfile(path) else ckpt["args"]
    data = recorded.get("data_original") or recorded.get("data")
    if not data or not os.path.isfile(data):
        raise InputError(f"--run {args.run} was trained on {data} (RUN/args.json), which is not there; give --data "
                         "with the slices.h5 it was trained on (its preprocessing is what new images get)")
    return data


def case_modality(meta, case_id, forced):
    """The normalisation scheme of a new case: the training's when it had one, else --modality, else AMOS's
    rule on amos_XXXX ids."""
    kinds = sorted(set(meta["cases"]["modality"]))
    if forced or len(kinds) == 1:
        return forced or kinds[0]
    if meta["dataset"] == "amos" and re.fullmatch(r"amos_\d{4}", case_id):
        return amos_modality(case_id)
    raise DataError(f"case {case_id}: the run was trained on CT and MRI scans; give --modality ct or mri")


def preprocess(case, meta):
    """A new case -> process_case's slices and geometry, with the preprocessing recorded in slices.h5 (the one
    01_preprocess.py applied to the training data: same function, same crop, spacing and CT statistics)."""
    return process_case(case, None, meta["crop"], meta["spacing"], meta["normalisation"].get("ct"))


def write_nifti(img, path):
    """A Nifti1Image to a temporary name beside `path`, then renamed: never a half-written prediction."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name[:-len('.nii.gz')]}.tmp{os.getpid()}.nii.gz")   # nibabel needs the ending
    try:
        img.to_filename(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(args):
    require_done(args.run, "--run", args.allow_unfinished)
    ckpt_path = os.path.join(args.run, "ckpt_best.pt")
    ckpt = load_checkpoint(ckpt_path, ("pretrain", "finetune"), flag="--run")
    data = training_data(args, ckpt)
    meta = read_meta(data)
    check_same_data(ckpt, meta, ckpt_path)
    kinds = sorted(set(meta["cases"]["modality"]))
    if args.modality and args.modality not in kinds:
        raise InputError(f"--modality {args.modality}: the run was trained on {' and '.join(kinds)} scans only")
    modalities = meta["modalities"]
    found, skipped = image_cases(args.input, meta["dataset"], modalities)
    device = pick_device(args.device)
    amp, cl = precision(args, device)                    # as 05_evaluate.py: the same logits for the same case
    model = model_from_checkpoint(ckpt).to(device)
    os.makedirs(args.out, exist_ok=True)
    print(f"{len(found)} case(s) in {args.input}; {ckpt['kind']} run {args.run} ({ckpt['config']['encoder']}, "
          f"epoch {ckpt['epoch'] + 1}), preprocessing of {data}: crop {meta['crop']}, spacing {meta['spacing']}")
    if skipped:
        names = ", ".join(f"{os.path.basename(f)} ({why})" for f, why in list(skipped.items())[:3])
        print(f"skipped {len(skipped)} file(s) that are no image of this run's layout: {names}"
              f"{' ...' if len(skipped) > 3 else ''}; all of them in {os.path.join(args.out, 'predict.json')} "
              "\"skipped\"")
    inputs, failed, larger = {}, {}, []
    for case_id, channels in tqdm(found, desc="predict", unit="case"):
        target = os.path.join(args.out, f"{case_id}.nii.gz")
        try:
            case = Case(case_id, case_id, channel_files(case_id, channels, modalities), None,
                        case_modality(meta, case_id, args.modality))
            r = preprocess(case, meta)
            if any(int(w) > c for w, c in zip(r["work_shape"], meta["crop"])):
                larger.append(f"{case_id} {r['work_shape'].tolist()}")
            stack = predict_stack(model, r["images"], device, amp, cl)        # (Z, H, W) our label indices
            write_nifti(slices_to_nifti(stack, meta, case_id, geometry=r), target)
        except Exception as e:                           # noqa: BLE001 - this case only, the others go on
            failed[case_id] = str(e) if isinstance(e, InputError) else f"case {case_id}: {type(e).__name__}: {e}"
            if os.path.exists(target):                   # an earlier run's prediction: not beside the fresh ones
                os.remove(target)
                failed[case_id] += f" (removed {target}, an earlier run's prediction of this case)"
            tqdm.write(f"error: {failed[case_id]}", file=sys.stderr)
            continue
        inputs[case_id] = case.images
    atomic_write_json(os.path.join(args.out, "predict.json"),
                      {**run_metadata(args), "data": data, "checkpoint": {"path": ckpt_path, "kind": ckpt["kind"],
                                                                          "epoch": ckpt["epoch"]},
                       "cases": inputs, "failed": failed, "skipped": skipped})
    if larger:
        print(f"note: {len(larger)} case(s) have slices larger than the crop {meta['crop']} the run was trained with "
              f"({', '.join(larger[:3])}{' ...' if len(larger) > 3 else ''}); voxels outside the centred crop are "
              "background, as in training (01's crop_report.json)")
    print(f"{len(inputs)} of {len(found)} case(s) predicted into {args.out}")
    if failed:
        raise InputError(f"{len(failed)} of {len(found)} case(s) failed ({', '.join(list(failed)[:5])}"
                         f"{' ...' if len(failed) > 5 else ''}): see the lines above; the others are written")


if __name__ == "__main__":
    cli(main, get_args)
