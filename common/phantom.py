"""Synthetic phantoms written in each data set's *real* raw file layout.

`write_phantom(out_dir, layout, n_patients, seed)` draws small 3-D volumes whose
segmentation is a real task (several classes with overlapping intensities, noise, a
smooth bias field, a textured background, varying in-plane sizes, spacings, slice
counts and orientations, patients where a class is absent) and writes them as NIfTI
exactly where and how the real data sets keep them (docs/method.md §6):

    acdc       training/patientXXX/{patientXXX_frameYY[_gt], patientXXX_4d}.nii.gz, Info.cfg
               (+ testing/ for the last fifth of the patients, as in the ACDC release)
    brats2021  BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz, labels 0,1,2,4
    brats2023  BraTS-GLI-XXXXX-000/BraTS-GLI-XXXXX-000-{t1n,t1c,t2w,t2f,seg}.nii.gz, labels 0-3
    kits       case_XXXXX/{imaging,segmentation}.nii.gz, slice axis first (KiTS 21/23)
    amos       imagesTr/ labelsTr/ imagesVa/ labelsVa/ dataset.json, 15 organs, ids > 500 MRI
    nnunet     imagesTr/CASE_000{c}.nii.gz, labelsTr/CASE.nii.gz, dataset.json (nnU-Net v2 raw)

Volumes are built in canonical RAS voxel space and stored in a random (or, for
KiTS, slice-axis-first) orientation with the matching affine, so a reader that does
not reorient gets different slices.
"""
import json
import os

import nibabel as nib
import numpy as np
from scipy import ndimage

LAYOUTS = ("acdc", "brats2021", "brats2023", "kits", "amos", "nnunet")

AMOS_ORGANS = ["spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver",
               "stomach", "aorta", "postcava", "pancreas", "right adrenal gland",
               "left adrenal gland", "duodenum", "bladder", "prostate/uterus"]

# stored orientations a scanner might write (axis codes of the stored array)
_ORIENTATIONS = [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("R", "P", "I"),
                 ("A", "R", "S"), ("P", "L", "S")]


def _grid(shape, spacing, rng, jitter_mm=4.0):
    """Millimetre coordinates (X, Y, Z) centred on a jittered volume centre."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    X, Y, Z = np.meshgrid(*axes, indexing="ij")
    c = rng.uniform(-jitter_mm, jitter_mm, size=3)
    return X - c[0], Y - c[1], Z - c[2] * 0.2


def _ellipsoid(X, Y, Z, centre, radii):
    return (((X - centre[0]) / radii[0]) ** 2 + ((Y - centre[1]) / radii[1]) ** 2
            + ((Z - centre[2]) / radii[2]) ** 2) <= 1.0


def _texture(shape, rng, sigma=3.0):
    t = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return t / (t.std() + 1e-8)


def _bias_field(X, Y, Z, rng, strength=0.25):
    """Smooth multiplicative bias: exp of a random low-order polynomial."""
    scale = max(np.abs(X).max(), np.abs(Y).max(), 1.0)
    a = rng.uniform(-1, 1, size=5)
    poly = (a[0] * X + a[1] * Y + 0.3 * a[2] * Z / max(np.abs(Z).max(), 1.0) * scale
            + a[3] * X * Y / scale + a[4] * (X ** 2 - Y ** 2) / scale) / scale
    return np.exp(strength * poly)


def _render(label, table, rng, noise, texture_amp):
    """Image from a label map: class-wise mean ± std (overlapping), texture, noise."""
    img = np.zeros(label.shape, dtype=np.float64)
    tex = _texture(label.shape, rng)
    for lab, (mean, std) in table.items():
        m = label == lab
        img[m] = mean + std * rng.standard_normal(int(m.sum()))
    img += texture_amp * tex + noise * rng.standard_normal(label.shape)
    return img


# --------------------------------------------------------------------------- anatomies
def _heart(rng, shape, spacing, phase):
    """ACDC short-axis stack: RV (1), MYO (2), LV cavity (3); ES frames are smaller."""
    X, Y, Z = _grid(shape, spacing, rng)
    f = 1.0 if phase == "ED" else rng.uniform(0.7, 0.85)
    r_lv = rng.uniform(14, 20) * f
    wall = rng.uniform(5, 8)
    length = shape[2] * spacing[2] * rng.uniform(0.35, 0.45)
    lv = _ellipsoid(X, Y, Z, (0, 0, 0), (r_lv, r_lv * rng.uniform(0.85, 1.1), length))
    myo = _ellipsoid(X, Y, Z, (0, 0, -wall / 2), (r_lv + wall, r_lv + wall, length + wall)) & ~lv
    rv_c = (-(r_lv + wall) * rng.uniform(0.9, 1.3), rng.uniform(-5, 5), -length * 0.15)
    rv = _ellipsoid(X, Y, Z, rv_c, (r_lv * 1.1, r_lv * 1.5, length * 0.8)) & ~lv & ~myo
    label = np.zeros(shape, np.uint8)
    if rng.random() > 0.1:          # some hearts are labelled without an RV
        label[rv] = 1
    label[myo] = 2
    label[lv] = 3
    blood = rng.uniform(0.8, 1.0)
    table = {0: (0.35, 0.25), 1: (blood * 0.9, 0.15), 2: (0.3, 0.12), 3: (blood, 0.15)}
    img = _render(label, table, rng, noise=0.12, texture_amp=0.1)
    img = np.clip(img * _bias_field(X, Y, Z, rng), 0, None) * 500.0
    return img.astype(np.float32), label, (X, Y, Z)


def _brain(rng, shape, spacing, tumour_labels):
    """Skull-stripped brain with a glioma: NCR, ED, ET (labels as the release writes them)."""
    X, Y, Z = _grid(shape, spacing, rng)
    brain = _ellipsoid(X, Y, Z, (0, 0, 0), (0.42 * shape[0] * spacing[0], 0.45 * shape[1] * spacing[1],
                                             0.45 * shape[2] * spacing[2]))
    c = rng.uniform(-12, 12, size=3) * np.array([1, 1, 0.3])
    r = rng.uniform(10, 16)
    ed = _ellipsoid(X, Y, Z, c, (r * 1.3, r * 1.1, r)) & brain
    core = _ellipsoid(X, Y, Z, c + rng.uniform(-2, 2, 3), (r * 0.6, r * 0.55, r * 0.5)) & brain
    ncr = _ellipsoid(X, Y, Z, c, (r * 0.35, r * 0.3, r * 0.3)) & brain
    ncr_l, ed_l, et_l = tumour_labels
    label = np.zeros(shape, np.uint8)
    label[ed] = ed_l
    label[core] = et_l if rng.random() > 0.15 else ncr_l    # some tumours without ET
    label[ncr] = ncr_l
    tables = {  # per modality: mean, std per stored label value
        "t1": {0: (0.6, 0.12), ncr_l: (0.35, 0.1), ed_l: (0.5, 0.12), et_l: (0.55, 0.1)},
        "t1ce": {0: (0.6, 0.12), ncr_l: (0.3, 0.1), ed_l: (0.55, 0.12), et_l: (1.0, 0.15)},
        "t2": {0: (0.5, 0.12), ncr_l: (1.0, 0.15), ed_l: (0.85, 0.15), et_l: (0.7, 0.15)},
        "flair": {0: (0.45, 0.12), ncr_l: (0.6, 0.15), ed_l: (0.95, 0.15), et_l: (0.8, 0.15)},
    }
    bias = _bias_field(X, Y, Z, rng)
    imgs = []
    for mod, table in tables.items():
        img = _render(label, table, rng, noise=0.08, texture_amp=0.08) * bias
        img[~brain] = 0.0                           # skull-stripped: background is exactly 0
        imgs.append((np.clip(img, 0, None) * 1000).astype(np.float32))
    return imgs, label, (X, Y, Z)


def _abdomen(rng, shape, spacing, organs, modality):
    """CT (HU) or MRI abdomen; `organs` is a list of (label, centre mm, radii mm, HU mean, std)."""
    X, Y, Z = _grid(shape, spacing, rng)
    body = _ellipsoid(X, Y, Z, (0, 0, 0), (0.45 * shape[0] * spacing[0], 0.38 * shape[1] * spacing[1], 1e6))
    label = np.zeros(shape, np.uint8)
    table = {0: (30.0, 30.0)}
    for lab, centre, radii, mean, std in organs:
        m = _ellipsoid(X, Y, Z, centre, radii) & body
        label[m] = lab
        table[lab] = (mean, std)
    img = _render(label, table, rng, noise=15.0, texture_amp=10.0)
    img[~body] = -1000.0 + 5 * rng.standard_normal(int((~body).sum()))
    if modality == "mri":
        img = np.clip((img + 200) * 2.0, 0, None) * _bias_field(X, Y, Z, rng)
        return img.astype(np.float32), label, (X, Y, Z)
    return np.round(img).astype(np.int16), label, (X, Y, Z)


def _kidneys(rng, shape, spacing):
    organs = []
    for side in (-1, 1):
        c = (side * rng.uniform(13, 17), rng.uniform(2, 8), rng.uniform(-3, 3))
        organs.append((1, c, (rng.uniform(6, 8), rng.uniform(9, 12), rng.uniform(12, 18)), 150.0, 25.0))
    side = rng.choice([0, 1])
    kc = organs[side][1]
    if rng.random() > 0.1:
        organs.append((2, (kc[0] + rng.uniform(-3, 3), kc[1] - 5, kc[2]), (4.5, 4.5, 5), 90.0, 30.0))
    if rng.random() > 0.5:
        oc = organs[1 - side][1]
        organs.append((3, (oc[0], oc[1] + 5, oc[2] + 3), (3.5, 3.5, 3.5), 15.0, 12.0))
    return _abdomen(rng, shape, spacing, organs, "ct")


def _amos_organs(rng, shape, spacing, modality):
    organs = []
    ang = np.linspace(0, 2 * np.pi, len(AMOS_ORGANS), endpoint=False) + rng.uniform(0, 0.3)
    for i, a in enumerate(ang):
        if rng.random() < 0.12:                     # organ absent (resected / out of view)
            continue
        rad = 32 if i % 2 else 15
        c = (rad * np.cos(a), rad * np.sin(a) * 0.8, rng.uniform(-6, 6))
        size = rng.uniform(5, 10) if i in (3, 4, 10, 11) else rng.uniform(8, 14)
        mean = 40.0 + 12.0 * (i % 6) + rng.uniform(-5, 5)   # neighbouring organs overlap
        organs.append((i + 1, c, (size, size * 0.9, size * 1.5), mean, 22.0))
    return _abdomen(rng, shape, spacing, organs, modality)


def _generic(rng, shape, spacing, n_channels):
    X, Y, Z = _grid(shape, spacing, rng)
    outer = _ellipsoid(X, Y, Z, (rng.uniform(-5, 5), 0, 0), (30, 24, 40))
    inner = _ellipsoid(X, Y, Z, (rng.uniform(-8, 8), rng.uniform(-6, 6), 0), (10, 9, 12))
    label = np.zeros(shape, np.uint8)
    label[outer] = 1
    if rng.random() > 0.15:
        label[inner] = 2
    imgs = []
    for c in range(n_channels):
        table = {0: (0.3, 0.2), 1: (0.7 - 0.2 * c, 0.2), 2: (0.55 + 0.3 * c, 0.2)}
        imgs.append((_render(label, table, rng, 0.1, 0.1) * _bias_field(X, Y, Z, rng) * 100).astype(np.float32))
    return imgs, label, (X, Y, Z)


# --------------------------------------------------------------------------- writing
def _save(arr, canonical_affine, path, axcodes):
    """Store a canonical (RAS) array in the orientation `axcodes` with the matching affine."""
    t = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                        nib.orientations.axcodes2ornt(axcodes))
    data = nib.orientations.apply_orientation(arr, t)
    affine = canonical_affine @ nib.orientations.inv_ornt_aff(t, arr.shape)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(img, path)


def _canonical_affine(spacing, rng):
    A = np.diag(list(spacing) + [1.0])
    A[:3, 3] = rng.uniform(-100, 100, size=3)
    return A


def _draw_geometry(rng, base, slices, spacing_xy, spacing_z):
    n = int(rng.integers(base - 8, base + 9))
    m = int(rng.integers(base - 8, base + 9))
    shape = (n, m, int(rng.integers(*slices)))
    sp = float(rng.uniform(*spacing_xy))
    spacing = (sp, sp, float(rng.uniform(*spacing_z)))
    return shape, spacing


def write_phantom(out_dir, layout, n_patients, seed=0, size=64):
    """Write `n_patients` phantom patients in `layout` under `out_dir`; returns out_dir.

    `size` is the typical in-plane size in voxels (each volume varies by ±8)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown phantom layout {layout!r}; choose one of {LAYOUTS}")
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    if layout == "acdc":
        n_train = n_patients - n_patients // 5
        for p in range(1, n_patients + 1):
            folder = "training" if p <= n_train else "testing"
            pid = f"patient{p:03d}"
            d = os.path.join(out_dir, folder, pid)
            shape, spacing = _draw_geometry(rng, size, (6, 11), (1.3, 1.9), (5.0, 10.0))
            A = _canonical_affine(spacing, rng)
            axc = ("R", "A", "S") if rng.random() < 0.5 else _ORIENTATIONS[int(rng.integers(len(_ORIENTATIONS)))]
            if axc[2] not in ("S", "I"):
                axc = ("R", "A", "S")               # short-axis stacks keep the slice axis last
            n_frames = int(rng.integers(20, 31))
            es = int(rng.integers(8, n_frames - 5))
            frames = []
            for fr, phase in ((1, "ED"), (es, "ES")):
                img, lab, _ = _heart(rng, shape, spacing, phase)
                _save(img, A, os.path.join(d, f"{pid}_frame{fr:02d}.nii.gz"), axc)
                _save(lab, A, os.path.join(d, f"{pid}_frame{fr:02d}_gt.nii.gz"), axc)
                frames.append(img)
            four_d = np.stack([frames[0], frames[1]] * 2, axis=-1)
            t = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                                nib.orientations.axcodes2ornt(axc))
            nib.save(nib.Nifti1Image(np.stack([nib.orientations.apply_orientation(four_d[..., i], t)
                                               for i in range(4)], -1),
                                     A @ nib.orientations.inv_ornt_aff(t, shape)),
                     os.path.join(d, f"{pid}_4d.nii.gz"))
            group = ["NOR", "MINF", "DCM", "HCM", "RV"][p % 5]
            with open(os.path.join(d, "Info.cfg"), "w") as f:
                f.write(f"ED: 1\nES: {es}\nGroup: {group}\nHeight: {rng.uniform(150, 195):.1f}\n"
                        f"NbFrame: {n_frames}\nWeight: {rng.uniform(50, 110):.1f}\n")
    elif layout in ("brats2021", "brats2023"):
        for p in range(n_patients):
            if layout == "brats2021":
                cid, mods, labels = f"BraTS2021_{p:05d}", ["t1", "t1ce", "t2", "flair"], (1, 2, 4)
                name = lambda m: f"{cid}_{m}.nii.gz"          # noqa: E731
            else:
                cid, mods, labels = f"BraTS-GLI-{p:05d}-000", ["t1n", "t1c", "t2w", "t2f"], (1, 2, 3)
                name = lambda m: f"{cid}-{m}.nii.gz"          # noqa: E731
            shape, spacing = _draw_geometry(rng, size, (10, 16), (1.0, 1.0), (1.0, 1.0))
            A = _canonical_affine(spacing, rng)
            imgs, lab, _ = _brain(rng, shape, spacing, labels)
            axc = ("L", "P", "S")                      # BraTS is stored LPS
            for m, img in zip(mods, imgs):
                _save(img, A, os.path.join(out_dir, cid, name(m)), axc)
            _save(lab, A, os.path.join(out_dir, cid, name("seg")), axc)
    elif layout == "kits":
        for p in range(n_patients):
            cid = f"case_{p:05d}"
            shape, spacing = _draw_geometry(rng, size, (8, 14), (0.7, 0.9), (2.5, 5.0))
            A = _canonical_affine(spacing, rng)
            img, lab, _ = _kidneys(rng, shape, spacing)
            axc = ("I", "P", "L")                      # KiTS 21/23: slice axis first
            _save(img, A, os.path.join(out_dir, cid, "imaging.nii.gz"), axc)
            _save(lab, A, os.path.join(out_dir, cid, "segmentation.nii.gz"), axc)
    elif layout == "amos":
        n_mri = max(1, n_patients // 4)
        ids = list(range(1, n_patients - n_mri + 1)) + list(range(501, 501 + n_mri))
        for k, i in enumerate(ids):
            modality = "mri" if i > 500 else "ct"
            split = "Va" if k % 5 == 4 else "Tr"
            shape, spacing = _draw_geometry(rng, size, (8, 14), (1.2, 1.6), (2.0, 5.0))
            A = _canonical_affine(spacing, rng)
            img, lab, _ = _amos_organs(rng, shape, spacing, modality)
            axc = _ORIENTATIONS[int(rng.integers(len(_ORIENTATIONS)))]
            _save(img, A, os.path.join(out_dir, f"images{split}", f"amos_{i:04d}.nii.gz"), axc)
            _save(lab, A, os.path.join(out_dir, f"labels{split}", f"amos_{i:04d}.nii.gz"), axc)
        meta = {"name": "AMOS", "modality": {"0": "CT"},
                "labels": {str(i): n for i, n in enumerate(["background"] + AMOS_ORGANS)},
                "numTraining": n_patients}
        with open(os.path.join(out_dir, "dataset.json"), "w") as f:
            json.dump(meta, f, indent=2)
    elif layout == "nnunet":
        for p in range(n_patients):
            cid = f"PHANTOM_{p:03d}"
            shape, spacing = _draw_geometry(rng, size, (8, 12), (0.8, 1.2), (2.0, 3.0))
            A = _canonical_affine(spacing, rng)
            imgs, lab, _ = _generic(rng, shape, spacing, 2)
            axc = _ORIENTATIONS[int(rng.integers(len(_ORIENTATIONS)))]
            for c, img in enumerate(imgs):
                _save(img, A, os.path.join(out_dir, "imagesTr", f"{cid}_{c:04d}.nii.gz"), axc)
            _save(lab, A, os.path.join(out_dir, "labelsTr", f"{cid}.nii.gz"), axc)
        meta = {"channel_names": {"0": "MRI", "1": "MRI"},
                "labels": {"background": 0, "outer": 1, "inner": 2},
                "numTraining": n_patients, "file_ending": ".nii.gz"}
        with open(os.path.join(out_dir, "dataset.json"), "w") as f:
            json.dump(meta, f, indent=2)
    return out_dir
