"""Slices in HDF5: preprocessing transforms, the slices.h5 file (its one writer and reader), the
PyTorch Dataset, and the way back to NIfTI.

`slices.h5` (docs/method.md §7), written by `write_slices` (01_preprocess.py), read by `read_meta`:
    images        (N, C, H, W) float32, one chunk per slice
    labels        (N, H, W) uint8, one chunk per slice
    slice_case    (N,) int32  index into the case tables below
    slice_index   (N,) int32  slice position along the canonical z axis
    cases/        CASE_STRINGS: case_id, patient_id, modality, source (JSON list of the raw files);
                  CASE_TABLES: first_slice, n_slices, orig_shape (3), orig_affine (4x4),
                  canonical_shape (3), work_shape (2: in-plane shape after optional resampling),
                  crop_start (2, negative = padding), fg_voxels / fg_lost (foreground voxels of the
                  resampled volume / of those, outside the crop; older files lack both)
    attrs         FILE_ATTRS, each JSON: dataset, modalities, class_names, normalisation, crop, spacing,
                  label_values (the data set's own label value of each index 0..K; older files lack it)
The slices of a case are contiguous; `meta` (from read_meta) is read once per stage and passed on.
"""
import json
import os
from collections import Counter

from tqdm import tqdm

import h5py
import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset, default_collate

from common.raw import from_canonical, load_case
from common.utils import InputError, read_json, require_file

FILE_ATTRS = ("dataset", "modalities", "class_names", "normalisation", "crop", "spacing", "label_values")
CASE_STRINGS = ("case_id", "patient_id", "modality", "source")
CASE_TABLES = ("first_slice", "n_slices", "orig_shape", "orig_affine", "canonical_shape", "work_shape", "crop_start",
               "fg_voxels", "fg_lost")


# --------------------------------------------------------------------------- transforms
def zscore_nonzero(x):
    """MRI normalisation (docs/method.md §6): z-score over the non-zero voxels; zeros stay zero."""
    mask = x != 0
    if not mask.any():
        return x.astype(np.float32)
    v = x[mask]
    out = np.zeros_like(x, dtype=np.float32)
    out[mask] = (v - v.mean()) / max(float(v.std()), 1e-8)
    return out


def ct_normalise(x, stats):
    """CT normalisation (nnU-Net scheme): clip to foreground percentiles, z-score."""
    x = np.clip(x, stats["p00_5"], stats["p99_5"])
    return ((x - stats["mean"]) / max(stats["std"], 1e-8)).astype(np.float32)


def ct_statistics(samples):
    v = np.concatenate(samples).astype(np.float64)
    if v.size == 0:
        raise InputError("no foreground voxels in the training CT cases; cannot compute CT statistics "
                         "(are the labels empty?)")
    lo, hi = np.percentile(v, [0.5, 99.5])
    v = np.clip(v, lo, hi)
    return {"p00_5": float(lo), "p99_5": float(hi), "mean": float(v.mean()), "std": float(v.std())}


def resample_inplane(vol, shape_xy, order):
    """Resample the first two axes of a (X, Y, ...) array to `shape_xy` exactly."""
    zoom = [shape_xy[0] / vol.shape[0], shape_xy[1] / vol.shape[1]] + [1.0] * (vol.ndim - 2)
    return ndimage.zoom(vol, zoom, order=order, mode="nearest", grid_mode=True)


def crop_start(shape_xy, crop):
    """Centred crop offsets; negative means padding."""
    return [(s - c) // 2 for s, c in zip(shape_xy, crop)]


def crop_or_pad(vol, start, crop, fill):
    """Take the in-plane window [start, start+crop) of a (X, Y, ...) array, padding with `fill`."""
    out = np.full(tuple(crop) + vol.shape[2:], fill, dtype=vol.dtype)
    src, dst = [], []
    for s, c, n in zip(start, crop, vol.shape[:2]):
        a, b = max(s, 0), min(s + c, n)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def uncrop(window, start, shape_xy, fill=0):
    """Inverse of `crop_or_pad` for the first two axes: place `window` back into `shape_xy`."""
    out = np.full(tuple(shape_xy) + window.shape[2:], fill, dtype=window.dtype)
    src, dst = [], []
    for s, c, n in zip(start, window.shape[:2], shape_xy):
        a, b = max(s, 0), min(s + c, n)
        dst.append(slice(a, b))
        src.append(slice(a - s, b - s))
    out[tuple(dst)] = window[tuple(src)]
    return out


# --------------------------------------------------------------------------- one case (01_preprocess.py)
def foreground_sample(case, info, n=10000, seed=0):
    """Pass 1 (CT only): a random sample of foreground intensities of one training case."""
    c = load_case(case, info)
    v = c["image"][..., 0][c["label"] > 0]
    rng = np.random.default_rng(seed)
    return v if v.size <= n else rng.choice(v, n, replace=False)


def process_case(case, info, crop, spacing, ct_stats):
    """Pass 2: one case -> normalised, resampled, cropped slices (Z, C, H, W) and geometry. The one
    preprocessing of a volume, for training (01_preprocess.py) and prediction (predict.py: a case without a
    label, `info` None; its labels / fg_voxels / fg_lost come back None)."""
    c = load_case(case, info)
    img, lab = c["image"], c["label"]                              # (X, Y, Z, C), (X, Y, Z) or None
    for ch in range(img.shape[-1]):                                # docs/method.md §6 normalisation
        img[..., ch] = ct_normalise(img[..., ch], ct_stats) if case.modality == "ct" else zscore_nonzero(img[..., ch])
    can_shape = img.shape[:3]
    work = list(can_shape[:2])
    if spacing is not None:
        work = [int(round(n * s / t)) for n, s, t in zip(can_shape[:2], c["spacing"][:2], spacing)]
        img = resample_inplane(img, work, order=1)
        lab = None if lab is None else resample_inplane(lab, work, order=0)
    start = crop_start(work, crop)
    # padding continues the background: 0 for MRI (zscore_nonzero keeps the background at 0; the minimum, far
    # below it, drew a frame around padded ACDC / BraTS slices), the lowest value for CT (air, after clipping)
    img = crop_or_pad(img, start, crop, fill=0.0 if case.modality == "mri" else float(img.min()))
    labels = fg_voxels = fg_lost = None
    if lab is not None:
        fg_voxels = int((lab > 0).sum())
        lab = crop_or_pad(lab, start, crop, fill=0)
        fg_lost = fg_voxels - int((lab > 0).sum())                 # foreground the crop leaves outside
        labels = np.ascontiguousarray(np.transpose(lab, (2, 0, 1)), dtype=np.uint8)
    anis = c["spacing"]
    warn = None
    if anis[2] < 0.8 * max(anis[:2]):
        warn = (f"case {case.case_id}: canonical z spacing {anis[2]:.2f} mm is finer than in-plane "
                f"{anis[0]:.2f}x{anis[1]:.2f} mm; check that axial slicing is what you want")
    return {"images": np.ascontiguousarray(np.transpose(img, (2, 3, 0, 1)), dtype=np.float32), "labels": labels,
            "orig_shape": c["orig_shape"], "orig_affine": c["orig_affine"], "canonical_shape": np.array(can_shape),
            "work_shape": np.array(work), "crop_start": np.array(start), "fg_voxels": fg_voxels, "fg_lost": fg_lost,
            "warn": warn}


def foreground_sample_job(args_tuple):
    case, info, seed = args_tuple
    return foreground_sample(case, info, seed=seed)


def process_case_job(args_tuple):
    return process_case(*args_tuple)


# --------------------------------------------------------------------------- the file
COMPRESSIONS = ("none", "lzf", "gzip")


def write_slices(path, cases, results, attrs, n_channels, compression="none"):
    """Stream processed cases (`results`: process_case outputs, in the order of `cases`) into `path`;
    returns the CASE_TABLES as written. One chunk per slice; `compression` (lzf, gzip) per chunk, for large
    sets (benchmarks/bench_data.py measures what it costs in read speed)."""
    if set(attrs) != set(FILE_ATTRS):
        raise ValueError(f"slices.h5 attributes must be {FILE_ATTRS}, got {sorted(attrs)}")
    H, W = attrs["crop"]
    with h5py.File(path, "w") as f:
        packed = {} if compression == "none" else {"compression": compression}
        images = f.create_dataset("images", (0, n_channels, H, W), maxshape=(None, n_channels, H, W),
                                  dtype="float32", chunks=(1, n_channels, H, W), **packed)
        labels = f.create_dataset("labels", (0, H, W), maxshape=(None, H, W), dtype="uint8", chunks=(1, H, W),
                                  **packed)
        slice_case, slice_index = [], []
        tables = {k: [] for k in CASE_TABLES}
        for i, r in enumerate(results):
            if r["warn"]:
                tqdm.write("warning: " + r["warn"])
            n0, z = images.shape[0], r["images"].shape[0]
            images.resize(n0 + z, axis=0)
            labels.resize(n0 + z, axis=0)
            images[n0:] = r["images"]
            labels[n0:] = r["labels"]
            slice_case += [i] * z
            slice_index += list(range(z))
            tables["first_slice"].append(n0)
            tables["n_slices"].append(z)
            for k in CASE_TABLES[2:]:
                tables[k].append(r[k])
        f.create_dataset("slice_case", data=np.array(slice_case, dtype=np.int32))
        f.create_dataset("slice_index", data=np.array(slice_index, dtype=np.int32))
        g = f.create_group("cases")
        strings = {"case_id": [c.case_id for c in cases], "patient_id": [c.patient_id for c in cases],
                   "modality": [c.modality for c in cases], "source": [json.dumps(c.images + [c.label]) for c in cases]}
        for k in CASE_STRINGS:
            g.create_dataset(k, data=strings[k], dtype=h5py.string_dtype())
        for k, v in tables.items():
            g.create_dataset(k, data=np.array(v))
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v)
    return tables


def read_meta(path):
    """File-level attributes and the per-case tables of a slices.h5, validated."""
    require_file(path, "--data", "the slices.h5 of 01_preprocess.py")
    try:
        with h5py.File(path, "r") as f:
            for key in ("images", "labels", "slice_case", "slice_index", "cases/case_id"):
                if key not in f:
                    raise InputError(f"{path} lacks '{key}'; it was not written by 01_preprocess.py")
            meta = {k: json.loads(f.attrs[k]) for k in FILE_ATTRS if k in f.attrs}
            if "label_values" not in meta:                      # files of older versions: identity
                meta["label_values"] = list(range(len(meta["class_names"]) + 1))
            cases = {k: f["cases"][k][()] for k in f["cases"]}
            meta["shape"] = f["images"].shape
    except OSError as e:
        raise InputError(f"{path} is not a readable HDF5 file ({e}); run 01_preprocess.py again") from e
    for k in CASE_STRINGS:
        if k in cases:                                            # `source` is absent in older files
            cases[k] = [s.decode() if isinstance(s, bytes) else str(s) for s in cases[k]]
    meta["cases"] = cases
    meta["case_index"] = {c: i for i, c in enumerate(cases["case_id"])}
    return meta


def load_splits(path, meta=None):
    require_file(path, "--splits", "the splits.json of 01_preprocess.py")
    splits = read_json(path, "--splits")
    for k in ("train", "val", "test"):
        if not isinstance(splits, dict) or k not in splits:
            raise InputError(f"{path} has no '{k}' split; was it written by 01_preprocess.py?")
    if meta is not None:
        unknown = [c for k in ("train", "val", "test") for c in splits[k] if c not in meta["case_index"]]
        if unknown:
            raise InputError(f"{path} names cases not in the slice file (e.g. {unknown[:3]}); "
                             "splits.json and slices.h5 come from different preprocessing runs")
    return splits


def check_partition(flag, path, parts, found, what):
    """Every id of `found` in exactly one list of `parts` ({name: ids}); else an InputError naming the file,
    the ids and the problem."""
    listed = [str(i) for ids in parts.values() for i in ids]
    dup = sorted(i for i, n in Counter(listed).items() if n > 1)
    unknown, unlisted = sorted(set(listed) - set(found)), sorted(set(found) - set(listed))
    for problem, ids in ((f"names {what} more than once", dup), (f"names {what} not found in --raw", unknown),
                         (f"leaves out {what} found in --raw", unlisted)):
        if ids:
            raise InputError(f"{flag} {path} {problem}: {ids[:5]}{' ...' if len(ids) > 5 else ''}")


class SliceBatch(tuple):
    """(images (B, C, H, W) float32, labels (B, H, W) uint8), batched by SliceDataset.__getitems__."""


def collate(batch):
    """DataLoader collate_fn: a SliceBatch is already a batch; anything else goes to default_collate."""
    return tuple(batch) if isinstance(batch, SliceBatch) else default_collate(batch)


class SliceDataset(Dataset):
    """2-D slices of the cases `case_ids` from slices.h5: (image (C,H,W) float32, label (H,W) uint8).

    Labels stay uint8 until they reach the device (a quarter of the bytes of int64 through the
    loader); `__getitems__` returns a whole batch at once (use `collate` as the collate_fn).

    With `cache=True` (default when the selection is below `cache_bytes`) the slices are
    read once, as one contiguous run per case, and kept in memory. Otherwise each
    DataLoader worker opens the file itself on first use; `__getitems__` sorts a batch
    and reads contiguous runs with one h5py call each.
    """

    def __init__(self, path, case_ids, cache=None, cache_bytes=4 << 30, meta=None):
        self.path = path
        meta = meta or read_meta(path)
        missing = [c for c in case_ids if c not in meta["case_index"]]
        if missing:
            raise InputError(f"cases {missing[:3]} are not in {path}")
        if not case_ids:
            raise InputError(f"no cases selected from {path}: the split is empty")
        cases = meta["cases"]
        runs = []
        for c in case_ids:
            i = meta["case_index"][c]
            runs.append((int(cases["first_slice"][i]), int(cases["n_slices"][i])))
        self.index = np.concatenate([np.arange(a, a + n) for a, n in runs]).astype(np.int64)
        _, C, H, W = meta["shape"]
        nbytes = len(self.index) * (C * H * W * 4 + H * W)
        self.cache = nbytes <= cache_bytes if cache is None else cache
        self._file = None
        self._pid = None
        if self.cache:
            with h5py.File(path, "r") as f:
                self.images = np.concatenate([f["images"][a:a + n] for a, n in runs])
                self.labels = np.concatenate([f["labels"][a:a + n] for a, n in runs])

    def __len__(self):
        return len(self.index)

    def _h5(self):
        if self._file is None or self._pid != os.getpid():   # one handle per worker process
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def _read(self, rows):
        """Rows of the file (sorted, unique) -> arrays, one h5py read per contiguous run."""
        f = self._h5()
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        imgs, labs = [], []
        for run in np.split(rows, breaks):
            imgs.append(f["images"][run[0]:run[-1] + 1])
            labs.append(f["labels"][run[0]:run[-1] + 1])
        return np.concatenate(imgs), np.concatenate(labs)

    def __getitems__(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        if self.cache:
            imgs, labs = self.images[idx], self.labels[idx]
        else:
            rows = self.index[idx]
            order = np.argsort(rows, kind="stable")
            uniq, inverse = np.unique(rows[order], return_inverse=True)
            ui, ul = self._read(uniq)
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            imgs, labs = ui[inverse][back], ul[inverse][back]
        return SliceBatch((torch.from_numpy(np.ascontiguousarray(imgs)), torch.from_numpy(np.ascontiguousarray(labs))))

    def __getitem__(self, i):
        imgs, labs = self.__getitems__([i])
        return imgs[0], labs[0]

    def __getstate__(self):   # h5py handles do not pickle; each worker reopens
        state = self.__dict__.copy()
        state["_file"] = None
        return state


def iter_cases(path, case_ids, meta=None, desc=None):
    """Yield (case_id, images (Z,C,H,W) float32, labels (Z,H,W) uint8), one case at a time (a progress
    bar named `desc` when given)."""
    meta = meta or read_meta(path)
    with h5py.File(path, "r") as f:
        for c in tqdm(case_ids, desc=desc, leave=False, unit="case", disable=None if desc else True):
            i = meta["case_index"][c]
            a, n = int(meta["cases"]["first_slice"][i]), int(meta["cases"]["n_slices"][i])
            yield c, f["images"][a:a + n], f["labels"][a:a + n]


GEOMETRY = ("canonical_shape", "work_shape", "crop_start", "orig_affine")


def case_geometry(meta, case_id):
    """What the way back to a case's original voxel grid needs, as recorded in slices.h5 (or as process_case
    returns it for a case that is not there): canonical_shape, work_shape, crop_start, orig_affine."""
    i = meta["case_index"][case_id]
    return {k: meta["cases"][k][i] for k in GEOMETRY}


def slices_to_volume(stack, meta, case_id, geometry=None):
    """A (Z, H, W) label stack of `case_id` -> array in the case's original voxel grid (our indices 0..K).
    `geometry`: the case's (case_geometry keys); default, the one slices.h5 recorded for `case_id`."""
    g = geometry if geometry is not None else case_geometry(meta, case_id)
    can_shape = tuple(int(s) for s in g["canonical_shape"])
    work_shape = tuple(int(s) for s in g["work_shape"])
    if stack.shape[0] != can_shape[2]:
        raise ValueError(f"case {case_id}: {stack.shape[0]} slices given, the volume has {can_shape[2]}")
    vol = np.moveaxis(np.asarray(stack, dtype=np.uint8), 0, -1)          # (H, W, Z)
    vol = uncrop(vol, [int(s) for s in g["crop_start"]], work_shape)   # undo the crop / pad
    if work_shape != can_shape[:2]:
        vol = resample_inplane(vol, can_shape[:2], order=0)             # undo --spacing
    return from_canonical(vol, np.asarray(g["orig_affine"], dtype=np.float64))   # undo the reorientation


def raw_label_values(vol, meta):
    """Our label indices -> the data set's own label values (e.g. BraTS 2021 ET back to 4)."""
    values = np.asarray(meta["label_values"])
    return values.astype(np.uint8 if values.max() < 256 else np.uint16)[vol]


def slices_to_nifti(stack, meta, case_id, geometry=None):
    """A (Z, H, W) label stack of `case_id` -> Nifti1Image in the case's original geometry, with the
    data set's own label values. `geometry` as for slices_to_volume."""
    g = geometry if geometry is not None else case_geometry(meta, case_id)
    affine = np.asarray(g["orig_affine"], dtype=np.float64)
    vol = raw_label_values(slices_to_volume(stack, meta, case_id, g), meta)
    img = nib.Nifti1Image(np.ascontiguousarray(vol), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def original_label(meta, case_id):
    """The case's label file as 01_preprocess.py read it -> (our indices 0..K in the original grid, spacing mm).
    Refuses a file that is gone or no longer matches the geometry recorded at preprocessing."""
    i = meta["case_index"][case_id]
    if "source" not in meta["cases"]:
        raise InputError(f"case {case_id}: this slices.h5 predates the record of source files; run 01_preprocess.py "
                         "again to score in the original geometry")
    path = json.loads(meta["cases"]["source"][i])[-1]
    try:
        img = nib.load(path)
        raw = np.asarray(img.dataobj)
    except Exception as e:  # missing, truncated, not NIfTI
        raise InputError(f"case {case_id}: cannot read its label file {path} ({type(e).__name__}); the whole-volume "
                         "scores need the raw data where 01_preprocess.py found it") from e
    shape, affine = tuple(int(s) for s in meta["cases"]["orig_shape"][i]), meta["cases"]["orig_affine"][i]
    if raw.shape != shape or not np.allclose(img.affine, affine, rtol=1e-4, atol=1e-3):
        raise InputError(f"case {case_id}: {path} no longer has the shape / affine recorded at preprocessing "
                         f"({raw.shape} vs {shape}); preprocess again")
    values = np.asarray(meta["label_values"])
    lut = np.full(int(max(values.max(), raw.max())) + 1, -1, dtype=np.int64)
    lut[values] = np.arange(len(values))
    index = lut[raw.astype(np.int64)]
    if (index < 0).any():
        raise InputError(f"case {case_id}: {path} has label values outside {values.tolist()}")
    return index.astype(np.uint8), tuple(float(z) for z in nib.affines.voxel_sizes(img.affine))
