"""Readers for the raw layouts of ACDC, BraTS 2021/2023, KiTS 21/23, AMOS22 and nnU-Net v2.

`list_cases(dataset, raw_dir, modality)` finds every labelled case and returns a
`DatasetInfo` (class names, label map raw value -> consecutive index, modality names,
cases). `load_case(case, info)` reads one case, validates it (docs/method.md §6, issue 2) and
returns canonical (RAS) arrays plus what is needed to put slices back into the
original geometry. Every problem raises `DataError` naming the case and file.

Cases of one subject (time points, sessions, ACDC's ED / ES frames) share a `patient_id`, the unit every
split draws: the layouts that name it set it (ACDC: the patient folder; BraTS 2023: BraTS-GLI-XXXXX of
BraTS-GLI-XXXXX-YYY, YYY the time point), an nnU-Net data set takes it from dataset.json's "patients"
({case_id: subject_id}), and `read_subjects` reads a user's mapping (01_preprocess.py --subjects).
`repeated_scans` warns when case ids look like several scans of one subject and nothing says so.

`image_cases(path, dataset, modalities)` finds unlabelled cases to predict (predict.py): the training
layout's image names or nnU-Net's CASE_0000.nii.gz, and says why it skips each other NIfTI file; two files that
give one case id are refused. Every channel and label of a case must lie on its first channel's voxel grid
(`check_same_grid`: shape, spacing, origin, direction), else the case is refused.
"""
import glob
import os
import re
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import pandas as pd

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
    label: str | None     # None: a case to predict, without a label file
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
        pid = cid if dirs21 else cid.rsplit("-", 1)[0]       # BraTS-GLI-XXXXX-YYY: YYY is the time point
        images = [os.path.join(d, f"{cid}{sep}{m}.nii.gz") for m in mods]
        cases.append(Case(cid, pid, images, os.path.join(d, f"{cid}{sep}seg.nii.gz"), "mri"))
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


def amos_modality(case_id):
    """AMOS22: ids above 500 are MRI scans, the others CT."""
    return "mri" if int(case_id.split("_")[1]) > 500 else "ct"


def _amos(raw_dir, modality):
    meta = _read_dataset_json(raw_dir)
    labels = {int(k): v for k, v in meta.get("labels", {}).items()}
    if not labels:
        raise DataError(f"{raw_dir}/dataset.json has no 'labels' entry")
    cases = []
    for split in ("Tr", "Va"):
        for lab in sorted(glob.glob(os.path.join(raw_dir, f"labels{split}", "amos_*.nii.gz"))):
            cid = os.path.basename(lab)[:-len(".nii.gz")]
            mod = amos_modality(cid)
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
    if "patients" in meta:                   # {case_id: subject_id}, as scripts/convert_to_nnunet.py writes it
        apply_subjects(cases, check_subjects(meta["patients"], [c.case_id for c in cases],
                                             f"{raw_dir}/dataset.json 'patients'"))
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


# A channel or label is on the first channel's grid when the shapes are equal and every entry of the two 4x4 affines
# agrees within GRID_ATOL + GRID_RTOL * |entry| (np.allclose): the origin to 1e-3 mm + 0.01%, each spacing x direction
# entry to 1e-3 + 0.01%. Float32 header rounding passes; a mirrored, rotated, shifted or resampled grid does not.
# nnU-Net (its image readers, verify_dataset_integrity) compares the same four (shape, spacing, origin, direction)
# with np.allclose's tighter defaults (rtol 1e-5, atol 1e-8) but refuses only shape and spacing and warns on origin
# and direction; we refuse all four, with a tolerance loose enough for headers written by different tools.
GRID_RTOL, GRID_ATOL = 1e-4, 1e-3
AXES = "xyz"                                   # the voxel array's axes i, j, k


def _direction_change(ref_dirs, dirs):
    """How the voxel axes of `dirs` (3x3, unit columns) lie in those of `ref_dirs`, in words."""
    m = ref_dirs.T @ dirs
    if np.allclose(np.abs(m), np.eye(3), atol=GRID_ATOL):
        flipped = [AXES[i] for i in range(3) if m[i, i] < 0]
        return f"mirrored {' and '.join(flipped)} ax{'is' if len(flipped) == 1 else 'es'}"
    if np.linalg.det(m) > 0:
        return f"rotated by {np.degrees(np.arccos(np.clip((np.trace(m) - 1) / 2, -1, 1))):.3g}°"
    order = np.abs(m).argmax(axis=0)
    if np.allclose(np.abs(m), np.eye(3)[:, order], atol=GRID_ATOL):
        return f"axes swapped: {' '.join(AXES)} -> {' '.join(AXES[i] for i in order)}"
    return "mirrored and rotated"


def grid_differences(shape, affine, ref_shape, ref_affine):
    """What differs between two voxel grids beyond the tolerance (GRID_RTOL, GRID_ATOL), in words; [] when none."""
    out = [] if tuple(shape) == tuple(ref_shape) else [f"shape {tuple(shape)} vs {tuple(ref_shape)}"]
    if np.allclose(affine, ref_affine, rtol=GRID_RTOL, atol=GRID_ATOL):
        return out
    spacing, ref_spacing = nib.affines.voxel_sizes(affine), nib.affines.voxel_sizes(ref_affine)
    dirs, ref_dirs = affine[:3, :3] / spacing, ref_affine[:3, :3] / ref_spacing
    shift = float(np.linalg.norm(affine[:3, 3] - ref_affine[:3, 3]))
    if not np.allclose(spacing, ref_spacing, rtol=GRID_RTOL, atol=GRID_ATOL):
        out.append(f"spacing {tuple(round(float(v), 4) for v in spacing)} vs "
                   f"{tuple(round(float(v), 4) for v in ref_spacing)}")
    if not np.allclose(dirs, ref_dirs, rtol=GRID_RTOL, atol=GRID_ATOL):
        out.append(f"direction differs ({_direction_change(ref_dirs, dirs)})")
    if not np.allclose(affine[:3, 3], ref_affine[:3, 3], rtol=GRID_RTOL, atol=GRID_ATOL):
        out.append(f"origin differs by {shift:.1f} mm" if shift >= 0.1 else f"origin differs by {shift:.2g} mm")
    return out or [f"affine differs by up to {np.abs(affine - ref_affine).max():.2g}"]


def check_same_grid(case_id, path, shape, affine, ref_path, ref_shape, ref_affine):
    """A channel or label file of a case on the voxel grid of its first channel (`ref_path`): shape, spacing, origin
    and direction within GRID_RTOL / GRID_ATOL; else DataError in one line naming the case, both files, what
    differs and what to do."""
    diffs = grid_differences(shape, affine, ref_shape, ref_affine)
    if diffs:
        raise DataError(f"case {case_id}: {path} is not on the voxel grid of {ref_path}: {'; '.join(diffs)}. Stacked "
                        "as they are, their voxels would not match: resample / reorient it onto that grid (nearest "
                        "neighbour for a label), or leave the case out")


def load_images(case):
    """Read and validate the image files of one case (one per modality) -> (x, y, z, C) float32, the first
    file's affine and shape. A missing or unreadable file, a 4-D volume, NaN / inf voxels or a channel not on
    the first channel's voxel grid (check_same_grid) raise DataError naming the case."""
    images, ref_affine, ref_shape = [], None, None
    for path in case.images:
        data, affine = _load_nifti(path, case.case_id)
        if ref_shape is None:
            ref_shape, ref_affine = data.shape, affine
        check_same_grid(case.case_id, path, data.shape, affine, case.images[0], ref_shape, ref_affine)
        data = np.asarray(data, dtype=np.float32)
        if not np.all(np.isfinite(data)):
            raise DataError(f"case {case.case_id}: {path} contains NaN or inf voxels; fix or exclude the case")
        images.append(data)
    return np.stack(images, axis=-1), ref_affine, ref_shape              # (x, y, z, C)


def load_label(case, info, ref_shape, ref_affine):
    """Read and validate the label file of one case -> (x, y, z) uint8 in our consecutive indices; it must lie on
    the grid of the case's first image (check_same_grid)."""
    label, lab_affine = _load_nifti(case.label, case.case_id)
    check_same_grid(case.case_id, case.label, label.shape, lab_affine, case.images[0], ref_shape, ref_affine)
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
    return lut[label.astype(np.int64)]


def load_case(case, info=None):
    """Read and validate one case -> dict of canonical image (X,Y,Z,C), label (X,Y,Z; None for a case without
    a label file: one to predict), geometry. `info` (the label map) is needed only with a label."""
    img, ref_affine, ref_shape = load_images(case)
    can_img, can_affine, _ = to_canonical(img, ref_affine)
    can_lab = None
    if case.label is not None:
        can_lab = np.ascontiguousarray(to_canonical(load_label(case, info, ref_shape, ref_affine), ref_affine)[0])
    return {"image": np.ascontiguousarray(can_img), "label": can_lab,
            "orig_shape": np.array(ref_shape), "orig_affine": ref_affine,
            "spacing": nib.affines.voxel_sizes(can_affine)}


# --------------------------------------------------------------------------- subjects: several cases of one patient
def check_subjects(mapping, case_ids, where):
    """A {case_id: subject_id} mapping checked to name every case of `case_ids` (extra entries, e.g. test
    cases kept elsewhere, are ignored) -> {case_id: subject_id as str} for those cases."""
    if not isinstance(mapping, dict) or not all(isinstance(v, (str, int)) for v in mapping.values()):
        raise InputError(f"{where}: needs a mapping {{case id: subject id}}")
    missing = [c for c in case_ids if c not in mapping]
    if missing:
        raise InputError(f"{where}: no subject for case(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "name the subject of every case")
    return {c: str(mapping[c]) for c in case_ids}


def read_subjects(spec, case_ids, flag="--subjects"):
    """--subjects -> {case_id: subject_id} for every case of `case_ids`. `spec` is a .json file
    {case_id: subject_id}, a .csv file with columns `case` and `subject`, or a regular expression whose first
    group, searched in each case id, is its subject (e.g. '^(sub-\\d+)_')."""
    if spec.endswith((".json", ".csv")) or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise InputError(f"{flag} {spec}: no such file (a .json or .csv mapping of case id to subject id)")
        if spec.endswith(".csv"):
            try:
                table = pd.read_csv(spec, dtype=str)
            except (OSError, ValueError) as e:
                raise InputError(f"{flag} {spec}: cannot read it as CSV ({e})") from e
            if not {"case", "subject"} <= set(table.columns):
                raise InputError(f"{flag} {spec}: needs the columns 'case' and 'subject' (found "
                                 f"{', '.join(table.columns)})")
            mapping = dict(zip(table["case"], table["subject"]))
        else:
            mapping = read_json(spec, flag)
        return check_subjects(mapping, case_ids, f"{flag} {spec}")
    try:
        pattern = re.compile(spec)
    except re.error as e:
        raise InputError(f"{flag} {spec!r}: neither a mapping file nor a regular expression ({e})") from e
    if pattern.groups < 1:
        raise InputError(f"{flag} {spec!r}: the pattern needs a group (...) around the subject id, e.g. '^(sub-\\d+)_'")
    found = {c: m.group(1) for c in case_ids if (m := pattern.search(c)) and m.group(1)}
    unmatched = [c for c in case_ids if c not in found]
    if unmatched:
        raise InputError(f"{flag} {spec!r} finds no subject in case id(s) {unmatched[:5]}"
                         f"{' ...' if len(unmatched) > 5 else ''}; every case id must match")
    return found


def apply_subjects(cases, subjects):
    """Set each case's patient_id (the split unit) to its subject."""
    for c in cases:
        c.patient_id = subjects[c.case_id]


# a trailing token that names a repeat of one subject's scan: a time point, session, visit, frame, cardiac phase,
# or a bare number after an id that ends in a digit (sub-01_2, BraTS-GLI-00000-001; not case_00001)
REPEAT_TOKEN = re.compile(r"^(?P<subject>.+?)[_\-.](?:(?:t|tp|time|timepoint|ses|session|visit|v|frame|fr|scan|"
                          r"run|fu|followup|week|day|month|year)[_\-]?\d+|ed|es|bl|baseline|pre|post)$", re.I)
REPEAT_NUMBER = re.compile(r"^(?P<subject>.*\d)[_\-.]\d+$")


def repeated_scans(cases):
    """A warning (str) when case ids look like several scans of one subject (they share a prefix and differ
    only in a trailing time point / session / frame token) that are different patients, i.e. no mapping said
    so; None otherwise. A single prefix shared by every case is plain numbering, not a subject."""
    groups = {}
    for c in cases:
        m = REPEAT_TOKEN.match(c.case_id) or REPEAT_NUMBER.match(c.case_id)
        groups.setdefault(m.group("subject") if m else c.case_id, []).append(c)
    split = {s: cs for s, cs in groups.items() if len({c.patient_id for c in cs}) > 1}
    if not split or len(groups) < 2:
        return None
    subject, cs = next(iter(split.items()))
    return (f"case ids look like repeated scans of one subject ({', '.join(c.case_id for c in cs[:3])} -> {subject}; "
            f"{len(split)} such subject(s)), but they count as different patients, so one subject's scans can land "
            "in different splits; say which cases belong together with --subjects (a regular expression whose "
            "first group is the subject, e.g. --subjects '^(sub-\\d+)_', or a .json / .csv mapping) or "
            "\"patients\": {case: subject} in an nnU-Net dataset.json")


# --------------------------------------------------------------------------- unlabelled cases to predict
NIFTI_ENDINGS = (".nii.gz", ".nii")
NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")          # nnU-Net: CASE_0000.nii.gz


def _stem(path):
    name = os.path.basename(path)
    return next(name[:-len(e)] for e in NIFTI_ENDINGS if name.endswith(e))


def _layout_name(path, dataset, modalities):
    """(case id, channel) of an image file named as in the raw layout of `dataset`, or None."""
    stem = _stem(path)
    if dataset == "acdc" and re.fullmatch(r"patient\d{3}_frame\d\d", stem):
        return stem, 0
    if dataset == "kits" and stem == "imaging":
        return os.path.basename(os.path.dirname(os.path.abspath(path))), 0
    if dataset == "amos" and re.fullmatch(r"amos_\d{4}", stem):
        return stem, 0
    if dataset == "brats":
        m = re.fullmatch(r"(.+)[_-](" + "|".join(map(re.escape, modalities)) + ")", stem)
        if m:
            return m.group(1), modalities.index(m.group(2))
    return None


LABEL_FOLDER = re.compile(r"labels(?:Tr|Ts|Va|Val)?", re.I)                  # nnU-Net's and AMOS's label folders
LABEL_NAME = re.compile(r"(?:^|[_\-.])(?:gt|seg|segmentation|labels?)$", re.I)  # _gt (ACDC), _seg (BraTS), KiTS's


def _not_an_image(path):
    """Why a NIfTI file is no image to predict whatever its name's layout (a label file, a 4-D series); None if it
    may be one."""
    folder, stem = os.path.basename(os.path.dirname(os.path.abspath(path))), _stem(path)
    if LABEL_FOLDER.fullmatch(folder):
        return f"a label file (in {folder}/)"
    if m := LABEL_NAME.search(stem):
        return f"a label file ({m.group(0)})"
    if re.search(r"[_\-]4d$", stem, re.I):
        return "a 4-D series (_4d)"
    return None


def image_cases(path, dataset, modalities):
    """Cases to predict under `path` (a NIfTI file or a folder, searched recursively) -> (cases, skipped): cases
    [(case id, {channel: [files]})] sorted by case id, skipped {file: why} for every other NIfTI file under a folder.

    Files are named as in the raw layout of `dataset` (ACDC patientXXX_frameYY, KiTS case_XXXXX/imaging, AMOS
    amos_XXXX, BraTS CASE_t1 ... / CASE-t1n ...) or as nnU-Net's CASE_0000.nii.gz (channel 0000, 0001, ... in the
    order of `modalities`), grouped into cases per folder. With one modality, the names of a folder's group without a
    _0000 are plain names: A/liver_0012.nii.gz and B/liver_0013.nii.gz are the cases liver_0012 and liver_0013. Label
    files (in labelsTr/ ..., or named _gt, _seg, segmentation), 4-D series (_4d) and names of neither kind are
    skipped. A folder where no file is named so, with one modality, takes every other NIfTI file as a case of its own.
    Two files that give one case id (x_0001.nii.gz, a plain name, beside x_0001_0000.nii.gz; A/x_0000 and B/x_0000)
    raise InputError naming both: never one of them dropped in silence. A single file takes the case it belongs to
    (its other channels beside it). Whether each case has exactly the channels of `modalities` is for
    `channel_files` to say, case by case."""
    if os.path.isfile(path):                                          # the file and its siblings
        folder, only = os.path.dirname(path) or ".", path
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    elif os.path.isdir(path):
        files, only = sorted(glob.glob(os.path.join(glob.escape(path), "**", "*.nii*"), recursive=True)), None
    else:
        raise InputError(f"--input {path}: no such file or folder")
    files = [f for f in files if f.endswith(NIFTI_ENDINGS) and os.path.isfile(f)]
    groups, skipped = {}, {}                                          # (folder, case) -> {channel: [files]}
    for f in files:
        why = _not_an_image(f)
        named = None if why else _layout_name(f, dataset, modalities)
        if named is None and not why and (m := NNUNET_CHANNEL.match(_stem(f))):
            named = m.group("case"), int(m.group("channel"))
        if named is None:
            skipped[f] = why or f"not named as an image of the {dataset} layout or as CASE_0000.nii.gz"
            continue
        groups.setdefault((os.path.dirname(f), named[0]), {}).setdefault(named[1], []).append(f)
    cases = []                                                        # [(case id, {channel: [files]})]
    for (_, case), channels in groups.items():
        if len(modalities) == 1 and 0 not in channels:                # liver_0012, liver_0013 without liver_0000
            cases += [(_stem(f), {0: [f]}) for fs in channels.values() for f in fs]
        else:
            cases.append((case, channels))
    if not cases and only is None and len(modalities) == 1:          # no file named in a layout: plain names
        plain = [f for f in files if not _not_an_image(f)]
        cases = [(_case_of_plain(f), {0: [f]}) for f in plain]
        skipped = {f: why for f, why in skipped.items() if f not in plain}
    if only is not None:
        cases = [(c, ch) for c, ch in cases if any(os.path.samefile(only, f) for fs in ch.values() for f in fs)] \
            or [(_case_of_plain(only), {0: [only]})]
        skipped = {}
    first = {}
    for case, channels in cases:                                      # one case id, one source
        f = min(f for fs in channels.values() for f in fs)
        if case in first:
            a, b = sorted((first[case], f))
            raise InputError(f"--input {path}: case id {case} comes from {a} and from {b} (both would be written "
                             f"to OUT/{case}.nii.gz); rename one so that each case has an id of its own (the channels "
                             "of one case sit in one folder)")
        first[case] = f
    if not cases:
        listed = ", ".join(f"{os.path.basename(f)} ({why})" for f, why in list(skipped.items())[:3])
        raise InputError(f"--input {path}: no images found; name them as in the training layout or as nnU-Net's "
                         f"CASE_0000.nii.gz ({len(modalities)} modalities: {', '.join(modalities)})"
                         + (f"; {len(skipped)} NIfTI file(s) skipped: {listed}{' ...' if len(skipped) > 3 else ''}"
                            if skipped else ""))
    return sorted(cases, key=lambda c: c[0]), skipped


def _case_of_plain(path):
    """The case id of a file named in no layout: its name without the ending (and without _0000)."""
    stem = _stem(path)
    m = NNUNET_CHANNEL.match(stem)
    return m.group("case") if m and m.group("channel") == "0000" else stem


def channel_files(case_id, channels, modalities):
    """{channel: [files]} of one case (image_cases) -> its files in channel order; a case without exactly
    one file per modality raises DataError naming it."""
    n = len(modalities)
    dup = {c: fs for c, fs in channels.items() if len(fs) > 1}
    if dup:
        c, fs = next(iter(dup.items()))
        raise DataError(f"case {case_id}: {len(fs)} files for channel {c} ({', '.join(fs)}); keep one")
    got = sorted(channels)
    if got != list(range(n)):
        missing, extra = sorted(set(range(n)) - set(got)), sorted(set(got) - set(range(n)))
        raise DataError(f"case {case_id}: {len(got)} image file(s) (channels {got}), the run was trained on {n} "
                        f"modalities ({', '.join(modalities)})"
                        + (f"; missing channel(s) {missing} (e.g. {case_id}_{missing[0]:04d}.nii.gz)" if missing else "")
                        + (f"; unexpected channel(s) {extra}" if extra else ""))
    return [channels[c][0] for c in range(n)]
