"""Patient-level Dice (SPEC §5): TP, FP, FN summed over all slices of a case, per class.

A class absent from both ground truth and prediction gives NaN and is left out of
means (nnU-Net convention). Mean foreground Dice = nanmean over the foreground classes.
"""
import numpy as np


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
