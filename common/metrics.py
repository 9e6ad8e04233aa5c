"""Patient-level metrics. Dice (docs/method.md §5): TP, FP, FN summed over all slices of a case, per class.
Surface metrics on whole volumes, spacing-aware (mm): HD95 and NSD (normalised surface Dice).

A class absent from both ground truth and prediction gives NaN and is left out of
means (nnU-Net convention). Mean foreground Dice = nanmean over the foreground classes.

Surface conventions (`region_metrics`), the same as MONAI's compute_hausdorff_distance /
compute_surface_dice without sub-voxels, which the tests check against:
- the surface of a mask is the mask minus its binary erosion (scipy's 6-/4-connected element,
  voxels on the volume border count as surface);
- HD95 = max over the two directions of the 95th percentile (linear) of the distances from one
  surface's voxels to the other surface (Euclidean, in mm, `distance_transform_edt(sampling=)`);
- NSD(τ) = (#pred surface voxels within τ of the true surface + #true surface voxels within τ of
  the predicted one) / (#pred + #true surface voxels).
Empty masks: both empty -> Dice, HD95 and NSD are NaN (left out of means), or with `both_empty=1`
(the BraTS rule) Dice 1, HD95 0, NSD 1; exactly one empty -> Dice 0, NSD 0 and HD95 = the
diagonal of the volume in mm (the largest distance possible in it, finite so that means stay
defined; BraTS uses 373.13 mm, the diagonal of its 240x240x155 1-mm grid, the same way).
"""
import numpy as np
from scipy import ndimage


def confusion_counts(pred, gt, num_classes):
    """TP, FP, FN per class (K,) for integer label arrays of any shape."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    gt = np.asarray(gt).ravel().astype(np.int64)
    cm = np.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp = np.diag(cm).astype(np.int64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    return tp, fp, fn


def dice_from_counts(tp, fp, fn):
    """2TP / (2TP + FP + FN) per class; NaN where the class is in neither volume."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)


class CaseDice:
    """Accumulates counts slice batch by slice batch for one case."""

    def __init__(self, num_classes):
        self.K = num_classes
        self.tp = np.zeros(num_classes, np.int64)
        self.fp = np.zeros(num_classes, np.int64)
        self.fn = np.zeros(num_classes, np.int64)

    def update(self, pred, gt):
        tp, fp, fn = confusion_counts(pred, gt, self.K)
        self.tp += tp
        self.fp += fp
        self.fn += fn

    def dice(self):
        """Per foreground class (K-1,), NaN for absent classes."""
        return dice_from_counts(self.tp, self.fp, self.fn)[1:]


def patient_dice(pred, gt, num_classes):
    """Foreground Dice per class for one case given its full slice stacks."""
    acc = CaseDice(num_classes)
    acc.update(pred, gt)
    return acc.dice()


def mean_foreground(dice):
    """nanmean over classes; NaN if every class is absent."""
    d = np.asarray(dice, dtype=np.float64)
    return float(np.nanmean(d)) if np.any(~np.isnan(d)) else float("nan")


# --------------------------------------------------------------------------- whole-volume regions
METRICS = ("dice", "hd95", "nsd")


def _surface(mask):
    return mask & ~ndimage.binary_erosion(mask)


def _bbox(mask, margin=1):
    """Slices of the bounding box of `mask` grown by `margin` (clipped to the volume)."""
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)


def surface_distances(pred, gt, spacing):
    """(distances of pred's surface voxels to gt's surface, and of gt's to pred's), in mm; both masks non-empty.
    Computed inside the joint bounding box (plus one voxel), which leaves every distance unchanged."""
    box = _bbox(pred | gt)
    p, g = _surface(pred[box]), _surface(gt[box])
    d_to_g = ndimage.distance_transform_edt(~g, sampling=spacing)
    d_to_p = ndimage.distance_transform_edt(~p, sampling=spacing)
    return d_to_g[p], d_to_p[g]


def region_metrics(pred, gt, spacing, tolerance, both_empty=np.nan):
    """Dice, HD95 (mm) and NSD at `tolerance` mm of two boolean volumes (module docstring: conventions)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape or len(spacing) != pred.ndim:
        raise ValueError(f"prediction {pred.shape}, label {gt.shape} and spacing {tuple(spacing)} do not match")
    n_p, n_g = int(pred.sum()), int(gt.sum())
    if n_p == 0 and n_g == 0:
        return {"dice": both_empty, "hd95": 0.0 if both_empty == 1 else np.nan, "nsd": both_empty}
    if n_p == 0 or n_g == 0:
        return {"dice": 0.0, "hd95": float(np.linalg.norm(np.array(pred.shape) * np.asarray(spacing))), "nsd": 0.0}
    dice = 2 * int((pred & gt).sum()) / (n_p + n_g)
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    hd95 = max(float(np.percentile(d_pg, 95)), float(np.percentile(d_gp, 95)))
    nsd = (int((d_pg <= tolerance).sum()) + int((d_gp <= tolerance).sum())) / (len(d_pg) + len(d_gp))
    return {"dice": float(dice), "hd95": hd95, "nsd": float(nsd)}


def case_metrics(pred, gt, spacing, regions, tolerance, both_empty=np.nan):
    """Every region of one case: [(region, metric, value)]; `regions` maps a name to its label indices."""
    rows = []
    for name, labels in regions.items():
        r = region_metrics(np.isin(pred, labels), np.isin(gt, labels), spacing, tolerance, both_empty)
        rows += [(name, m, r[m]) for m in METRICS]
    return rows
