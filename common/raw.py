"""Readers for the raw layouts of ACDC, BraTS 2021/2023, KiTS 21/23, AMOS22 and nnU-Net v2.

`list_cases(dataset, raw_dir, modality)` finds every labelled case and returns a
`DatasetInfo` (class names, label map raw value -> consecutive index, modality names,
cases). `load_case(case, info)` reads one case, validates it (SPEC §6, issue 2) and
returns canonical (RAS) arrays plus what is needed to put slices back into the
original geometry. Every problem raises `DataError` naming the case and file.
"""
import glob
import os
import re
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from common.utils import InputError, read_json

RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


# --------------------------------------------------------------------------- how each data set is scored
# Regions by the class names of DatasetInfo (our consecutive indices 1..K), the rule for a region empty in
# both prediction and truth (NaN: left out of means, nnU-Net's rule; 1: BraTS's rule), and the NSD
# tolerance in mm (our default; set --nsd_tolerance to match a given leaderboard). A data set without an
# entry (nnunet, amos) is scored per class.
REGIONS = {
    "acdc": {"RV": ["RV"], "MYO": ["MYO"], "LV": ["LV"]},
    "brats": {"WT": ["NCR", "ED", "ET"], "TC": ["NCR", "ET"], "ET": ["ET"]},         # 2021 and 2023 labels alike
    "kits": {"kidney+masses": ["kidney", "tumor", "cyst"], "masses": ["tumor", "cyst"], "tumor": ["tumor"]},
}
BOTH_EMPTY = {"brats": 1.0}
NSD_TOLERANCE_MM = {"acdc": 1.0, "brats": 1.0, "kits": 1.0, "amos": 1.0, "nnunet": 1.0}


def regions_of(dataset, class_names):
    """{region: [label indices]} a data set is scored on; one region per class where none are defined."""
    table = REGIONS.get(dataset) or {c: [c] for c in class_names}
    missing = sorted({c for names in table.values() for c in names} - set(class_names))
    if missing:
        raise InputError(f"{dataset}: classes {missing} of its scoring regions are not among {class_names}")
    return {r: [class_names.index(c) + 1 for c in names] for r, names in table.items()}


class DataError(InputError):
    """Bad raw input: the message names the case, the file and what to do."""


@dataclass
class Case:
    case_id: str          # evaluation unit (one 3-D volume)
    patient_id: str       # split unit (both ACDC frames of a patient share it)
    images: list          # one path per modality / channel
    label: str
    modality: str         # "mri" or "ct": chooses the normalisation scheme


@dataclass
class DatasetInfo:
    dataset: str
    modalities: list
    class_names: list                 # foreground classes, index 1..K
    label_map: dict                   # raw label value -> consecutive index
    cases: list = field(default_factory=list)


def _check_unique(cases, raw_dir):
    seen = {}
    for c in cases:
        if c.case_id in seen:
            raise DataError(f"duplicate case id {c.case_id!r} in {raw_dir}: {seen[c.case_id]} and "
                            f"{c.images[0]}; remove one copy")
        seen[c.case_id] = c.images[0]


def _acdc(raw_dir):
    dirs = sorted(d for d in glob.glob(os.path.join(raw_dir, "**", "patient[0-9][0-9][0-9]"), recursive=True)
                  if os.path.isdir(d))
    cases = []
    for d in dirs:
        pid = os.path.basename(d)
        gts = sorted(glob.glob(os.path.join(d, f"{pid}_frame[0-9][0-9]_gt.nii.gz")))
        if not gts:
            raise DataError(f"ACDC patient {pid}: no {pid}_frameYY_gt.nii.gz in {d}")
        for gt in gts:
            frame = re.search(r"_frame(\d\d)_gt", gt).group(1)
            img = os.path.join(d, f"{pid}_frame{frame}.nii.gz")
            cases.append(Case(f"{pid}_frame{frame}", pid, [img], gt, "mri"))
    return DatasetInfo("acdc", ["cine-MRI"], ["RV", "MYO", "LV"], {0: 0, 1: 1, 2: 2, 3: 3}, cases)


def _brats(raw_dir):
    dirs21 = sorted(glob.glob(os.path.join(raw_dir, "**", "BraTS2021_[0-9]*"), recursive=True))
    dirs23 = sorted(glob.glob(os.path.join(raw_dir, "**", "BraTS-*-[0-9]*-[0-9]*"), recursive=True))
    dirs21 = [d for d in dirs21 if os.path.isdir(d)]
    dirs23 = [d for d in dirs23 if os.path.isdir(d)]
    if dirs21 and dirs23:
        raise DataError(f"{raw_dir} mixes BraTS 2021 (BraTS2021_XXXXX) and 2023 (BraTS-GLI-XXXXX-YYY) "
                        "folders; preprocess them separately")
    if dirs21:
        mods, sep, label_map = ["t1", "t1ce", "t2", "flair"], "_", {0: 0, 1: 1, 2: 2, 4: 3}
    else:
        mods, sep, label_map = ["t1n", "t1c", "t2w", "t2f"], "-", {0: 0, 1: 1, 2: 2, 3: 3}
    cases = []
    for d in dirs21 or dirs23:
        cid = os.path.basename(d)
        images = [os.path.join(d, f"{cid}{sep}{m}.nii.gz") for m in mods]
        cases.append(Case(cid, cid, images, os.path.join(d, f"{cid}{sep}seg.nii.gz"), "mri"))
    return DatasetInfo("brats", mods, ["NCR", "ED", "ET"], label_map, cases)


def _kits(raw_dir):
    dirs = sorted(d for d in glob.glob(os.path.join(raw_dir, "**", "case_[0-9][0-9][0-9][0-9][0-9]"),
                                       recursive=True) if os.path.isdir(d))
    cases = [Case(os.path.basename(d), os.path.basename(d), [os.path.join(d, "imaging.nii.gz")],
                  os.path.join(d, "segmentation.nii.gz"), "ct") for d in dirs]
    return DatasetInfo("kits", ["CT"], ["kidney", "tumor", "cyst"], {0: 0, 1: 1, 2: 2, 3: 3}, cases)


def _read_dataset_json(raw_dir):
    path = os.path.join(raw_dir, "dataset.json")
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing; the AMOS / nnU-Net raw layout needs it")
    return read_json(path, "the raw data set's dataset.json")


def _amos(raw_dir, modality):
    meta = _read_dataset_json(raw_dir)
    labels = {int(k): v for k, v in meta.get("labels", {}).items()}
    if not labels:
        raise DataError(f"{raw_dir}/dataset.json has no 'labels' entry")
    cases = []
    for split in ("Tr", "Va"):
        for lab in sorted(glob.glob(os.path.join(raw_dir, f"labels{split}", "amos_*.nii.gz"))):
            cid = os.path.basename(lab)[:-len(".nii.gz")]
            mod = "mri" if int(cid.split("_")[1]) > 500 else "ct"
            if modality in ("ct", "mri") and mod != modality:
                continue
            cases.append(Case(cid, cid, [os.path.join(raw_dir, f"images{split}", f"{cid}.nii.gz")], lab, mod))
    names = [labels[k] for k in sorted(labels) if k != 0]
    return DatasetInfo("amos", ["CT" if modality == "ct" else "MRI" if modality == "mri" else "CT/MRI"],
                       names, {k: i for i, k in enumerate(sorted(labels))}, cases)


def _nnunet(raw_dir):
    meta = _read_dataset_json(raw_dir)
    channels = meta.get("channel_names") or meta.get("modality")
    labels = meta.get("labels")
    if not channels or not labels:
        raise DataError(f"{raw_dir}/dataset.json needs 'channel_names' and 'labels'")
    if any(not isinstance(v, int) for v in labels.values()):
        raise DataError(f"{raw_dir}/dataset.json uses region-based labels; only integer labels are supported")
    ending = meta.get("file_ending", ".nii.gz")
    by_value = {v: k for k, v in labels.items()}
    n_ch = len(channels)
    chan_names = [channels[str(i)] for i in range(n_ch)]
    cases = []
    for lab in sorted(glob.glob(os.path.join(raw_dir, "labelsTr", f"*{ending}"))):
        cid = os.path.basename(lab)[:-len(ending)]
        imgs = [os.path.join(raw_dir, "imagesTr", f"{cid}_{c:04d}{ending}") for c in range(n_ch)]
        mod = "ct" if chan_names[0].upper() == "CT" else "mri"
        cases.append(Case(cid, cid, imgs, lab, mod))
    values = sorted(by_value)
    return DatasetInfo("nnunet", chan_names, [by_value[v] for v in values if v != 0],
                       {v: i for i, v in enumerate(values)}, cases)


def list_cases(dataset, raw_dir, modality="ct"):
    """All labelled cases of `dataset` under `raw_dir`, validated for presence and uniqueness."""
    if not os.path.isdir(raw_dir):
        raise DataError(f"raw folder {raw_dir} does not exist")
    readers = {"acdc": _acdc, "brats": _brats, "kits": _kits, "nnunet": _nnunet,
               "amos": lambda d: _amos(d, modality)}
    if dataset not in readers:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {sorted(readers)}")
    info = readers[dataset](raw_dir)
    if not info.cases:
        raise DataError(f"no {dataset} cases found in {raw_dir}: is this the right folder for "
                        f"--dataset {dataset}? (see the README, 'Running on the real data sets')")
    _check_unique(info.cases, raw_dir)
    for c in info.cases:
        for p in c.images + [c.label]:
            if not os.path.isfile(p):
                raise DataError(f"case {c.case_id}: missing file {p} (a modality or label file is absent)")
    return info


def _load_nifti(path, case_id):
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for truncated / corrupt files
        raise DataError(f"case {case_id}: cannot read {path} ({type(e).__name__}: {e}); "
                        "the file is truncated or not NIfTI, download it again") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"case {case_id}: {path} has shape {data.shape}; a 3-D volume is expected")
    return data, img.affine


def to_canonical(data, affine):
    """Reorient a 3-D array to the closest RAS orientation; returns data, affine, ornt."""
    ornt = nib.orientations.io_orientation(affine)
    can = nib.orientations.apply_orientation(data, ornt)
    can_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    return can, can_affine, ornt


def from_canonical(data, orig_affine):
    """Inverse of `to_canonical` for an array in the canonical grid of `orig_affine`."""
    ornt = nib.orientations.io_orientation(orig_affine)
    return nib.orientations.apply_orientation(data, nib.orientations.ornt_transform(RAS, ornt))


def load_case(case, info):
    """Read and validate one case -> dict of canonical image (X,Y,Z,C), label (X,Y,Z), geometry."""
    images, ref_affine, ref_shape = [], None, None
    for path in case.images:
        data, affine = _load_nifti(path, case.case_id)
        if ref_shape is None:
            ref_shape, ref_affine = data.shape, affine
        elif data.shape != ref_shape:
            raise DataError(f"case {case.case_id}: {path} has shape {data.shape}, {case.images[0]} has {ref_shape}")
        data = np.asarray(data, dtype=np.float32)
        if not np.all(np.isfinite(data)):
            raise DataError(f"case {case.case_id}: {path} contains NaN or inf voxels; fix or exclude the case")
        images.append(data)
    label, lab_affine = _load_nifti(case.label, case.case_id)
    if label.shape != ref_shape:
        raise DataError(f"case {case.case_id}: label {case.label} has shape {label.shape} but image "
                        f"{case.images[0]} has {ref_shape}")
    if not np.allclose(lab_affine, ref_affine, rtol=1e-4, atol=1e-3):
        raise DataError(f"case {case.case_id}: the affine of {case.label} differs from {case.images[0]} "
                        "beyond tolerance; image and label are not in the same space")
    label = np.asarray(label)
    if not np.all(np.isfinite(label)) or not np.all(label == np.round(label)):
        raise DataError(f"case {case.case_id}: {case.label} has non-integer label values")
    values = np.unique(label).astype(np.int64)
    unknown = sorted(set(values.tolist()) - set(info.label_map))
    if unknown:
        raise DataError(f"case {case.case_id}: {case.label} has label values {unknown} outside the "
                        f"{info.dataset} label set {sorted(info.label_map)}")
    lut = np.zeros(max(info.label_map) + 1, dtype=np.uint8)
    for raw, idx in info.label_map.items():
        lut[raw] = idx
    label = lut[label.astype(np.int64)]
    img = np.stack(images, axis=-1)                                   # (x, y, z, C)
    can_img, can_affine, _ = to_canonical(img, ref_affine)
    can_lab, _, _ = to_canonical(label, ref_affine)
    return {"image": np.ascontiguousarray(can_img), "label": np.ascontiguousarray(can_lab),
            "orig_shape": np.array(ref_shape), "orig_affine": ref_affine,
            "spacing": nib.affines.voxel_sizes(can_affine)}
