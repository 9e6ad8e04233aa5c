"""A real-MRI benchmark the project makes itself: warped subjects of the MNI152 2009 T1 template.

    python benchmarks/make_mni_dataset.py --out DIR [--subjects 36] [--test 20] [--val 4] [--spacing 2]
        [--slab 64] [--noise 0.08] [--seed 0] [--mni_dir DIR]

In:  the ICBM 2009c MNI152 T1 template and its grey- and white-matter probability maps at 1 mm, which
     ship inside the nilearn wheel (nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_*).
     They are taken from an installed nilearn, from --mni_dir, or from the wheel itself, fetched once
     with `pip download --no-deps nilearn==0.14.1` into --cache (nilearn is never installed).
Out: DIR in the nnU-Net v2 raw layout (imagesTr/mni_XXX_0000.nii.gz, labelsTr/mni_XXX.nii.gz,
     dataset.json: one channel "T1", labels background 0 / GM 1 / WM 2), read by
     `01_preprocess.py --dataset nnunet` and by nnU-Net itself, and DIR/split.json
     ({"train", "val", "test"} subject ids) for `01_preprocess.py --split_file`.

Every subject is the one real volume, changed the way scans of different people and scanners differ:
a smooth random deformation (Gaussian-smoothed displacement noise) and an affine jitter (rotation,
anisotropic scale, shift), resampled at --spacing mm; then a smooth multiplicative bias field, a
random contrast curve (gamma), a mild blur and Rician noise. Labels are the argmax of (1 − GM − WM,
GM, WM) of the tissue maps warped the same way, so image and labels agree voxel by voxel but the
GM/WM boundary is blurred by partial volume, bias and noise. Only an axial slab of --slab mm centred
on the brain is kept (fewer slices per subject: the CPU budget of the study). The split is fixed by
`--seed`: subjects are drawn independently, so any split is as good as another.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import nibabel as nib
import numpy as np
from scipy import ndimage

NILEARN = "nilearn==0.14.1"
FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "iac_lth", "mni152")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (nnU-Net raw layout)")
    p.add_argument("--subjects", type=int, default=36, help="number of warped subjects")
    p.add_argument("--test", type=int, default=20, help="test subjects in split.json")
    p.add_argument("--val", type=int, default=4, help="validation subjects in split.json (the rest train)")
    p.add_argument("--spacing", type=float, default=2.0, help="isotropic output voxel size in mm")
    p.add_argument("--slab", type=float, default=64.0, help="axial slab kept around the brain centre, in mm")
    p.add_argument("--deform_mm", type=float, default=3.0, help="std of the smooth displacement in mm")
    p.add_argument("--noise", type=float, default=0.08, help="Rician noise std as a fraction of the WM intensity")
    p.add_argument("--seed", type=int, default=0, help="seed of the subjects and the split")
    p.add_argument("--mni_dir", default=None, help="a folder holding the three template files")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="where the files from the nilearn wheel are kept")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def find_templates(mni_dir=None, cache=DEFAULT_CACHE):
    """Paths of the T1 / GM / WM templates: --mni_dir, an installed nilearn, the cache, or the wheel."""
    dirs = [mni_dir] if mni_dir else []
    try:
        import nilearn
        dirs.append(os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data"))
    except ImportError:
        pass
    dirs.append(cache)
    for d in dirs:
        paths = {k: os.path.join(d, f) for k, f in FILES.items()}
        if all(os.path.isfile(p) for p in paths.values()):
            return paths
    if mni_dir:
        raise SystemExit(f"error: --mni_dir {mni_dir} lacks {', '.join(FILES.values())}")
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:            # the wheel only: nilearn is never installed
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, NILEARN],
                           capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if r.returncode or not wheels:
            raise SystemExit(f"error: could not fetch the {NILEARN} wheel for the MNI152 templates ({r.stderr[-500:]}); "
                             "pass --mni_dir with the three files or install nilearn")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            for f in FILES.values():
                part = os.path.join(cache, f"{f}.tmp{os.getpid()}")
                with z.open(f"nilearn/datasets/data/{f}") as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(part, os.path.join(cache, f))
    return {k: os.path.join(cache, f) for k, f in FILES.items()}


def load_templates(paths):
    t1 = nib.load(paths["t1"])
    vols = {k: np.asarray(nib.load(p).dataobj, dtype=np.float32) for k, p in paths.items()}
    if not all(v.shape == vols["t1"].shape for v in vols.values()):
        raise SystemExit("error: the MNI152 T1 / GM / WM templates differ in shape")
    return vols, t1.affine


def output_grid(vols, affine, spacing, slab):
    """World coordinates (3, X, Y, Z) of an isotropic grid over the template's brain, a slab in z."""
    brain = (vols["gm"] + vols["wm"]) > 0.5
    idx = np.argwhere(brain)
    lo, hi = affine[:3, :3] @ idx.min(0) + affine[:3, 3], affine[:3, :3] @ idx.max(0) + affine[:3, 3]
    lo, hi = np.minimum(lo, hi) - 4.0, np.maximum(lo, hi) + 4.0        # a margin of 4 mm around the brain
    centre = (lo + hi) / 2
    lo[2], hi[2] = centre[2] - slab / 2 + 8.0, centre[2] + slab / 2 + 8.0   # the slab through the ventricles
    axes = [np.arange(a, b, spacing) for a, b in zip(lo, hi)]
    out_affine = np.diag([spacing, spacing, spacing, 1.0])
    out_affine[:3, 3] = [a[0] for a in axes]
    return np.stack(np.meshgrid(*axes, indexing="ij")), out_affine


def smooth_field(rng, shape, sigma_vox, std):
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return f * (std / (f.std() + 1e-8))


def make_subject(rng, vols, affine, world, spacing, deform_mm, noise):
    """One warped subject: (image, label) on the output grid."""
    shape = world.shape[1:]
    centre = world.reshape(3, -1).mean(1)
    ang = np.deg2rad(rng.uniform(-8, 8, 3))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    R = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
         @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    A = R @ np.diag(rng.uniform(0.92, 1.08, 3))
    pts = A @ (world.reshape(3, -1) - centre[:, None]) + centre[:, None] + rng.uniform(-4, 4, (3, 1))
    disp = np.stack([smooth_field(rng, shape, 12.0 / spacing, deform_mm) for _ in range(3)]).reshape(3, -1)
    pts = pts + disp                                                     # template mm for every output voxel
    inv = np.linalg.inv(affine)
    vox = inv[:3, :3] @ pts + inv[:3, 3:]
    warp = {k: ndimage.map_coordinates(v, vox, order=1, mode="constant").reshape(shape) for k, v in vols.items()}
    gm, wm = warp["gm"], warp["wm"]
    label = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.uint8)
    t1 = warp["t1"] / max(float(np.percentile(vols["t1"][vols["wm"] > 0.9], 50)), 1e-6)   # WM ≈ 1
    t1 = np.clip(t1, 0, None) ** rng.uniform(0.7, 1.4)                   # contrast curve
    t1 = t1 * np.exp(smooth_field(rng, shape, 40.0 / spacing, 0.15))    # bias field
    t1 = ndimage.gaussian_filter(t1, rng.uniform(0.3, 0.7))              # partial-volume blur
    s = noise * rng.uniform(0.6, 1.4)
    t1 = np.hypot(t1 + rng.normal(0, s, shape), rng.normal(0, s, shape))   # Rician noise
    return (1000 * t1).astype(np.float32), label


def main(args):
    if os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"error: {args.out} exists; pass --overwrite to replace it")
    if args.test + args.val >= args.subjects:
        raise SystemExit(f"error: --test {args.test} + --val {args.val} leave no training subject of {args.subjects}")
    vols, affine = load_templates(find_templates(args.mni_dir, args.cache))
    world, out_affine = output_grid(vols, affine, args.spacing, args.slab)
    tmp = f"{args.out.rstrip('/')}.tmp{os.getpid()}"                      # written aside, then renamed
    shutil.rmtree(tmp, ignore_errors=True)
    for d in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(tmp, d))
    rng = np.random.default_rng(args.seed)
    ids = [f"mni_{i:03d}" for i in range(args.subjects)]
    for i, cid in enumerate(ids):
        img, lab = make_subject(rng, vols, affine, world, args.spacing, args.deform_mm, args.noise)
        nib.Nifti1Image(img, out_affine).to_filename(os.path.join(tmp, "imagesTr", f"{cid}_0000.nii.gz"))
        nib.Nifti1Image(lab, out_affine).to_filename(os.path.join(tmp, "labelsTr", f"{cid}.nii.gz"))
        print(f"subject {i + 1}/{args.subjects}: {img.shape}, GM {np.mean(lab == 1):.1%} WM {np.mean(lab == 2):.1%}",
              flush=True)
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
        json.dump({"name": "MNI152 warped subjects", "channel_names": {"0": "T1"},
                   "labels": {"background": 0, "GM": 1, "WM": 2}, "numTraining": args.subjects,
                   "file_ending": ".nii.gz",
                   "description": "benchmarks/make_mni_dataset.py " + " ".join(sys.argv[1:]),
                   "source": "ICBM 2009c MNI152 nonlinear symmetric T1, GM and WM templates (from the nilearn wheel)"},
                  f, indent=2)
    order = [ids[i] for i in np.random.default_rng(args.seed + 1).permutation(len(ids))]
    split = {"test": sorted(order[:args.test]), "val": sorted(order[args.test:args.test + args.val]),
             "train": sorted(order[args.test + args.val:])}
    with open(os.path.join(tmp, "split.json"), "w") as f:
        json.dump(split, f, indent=2)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    print(f"{args.subjects} subjects ({len(split['train'])} train / {len(split['val'])} val / {len(split['test'])} "
          f"test) in {args.out}; grid {world.shape[1:]} at {args.spacing} mm")


if __name__ == "__main__":
    main(get_args())
