"""Segmentation loss of the paper, Eq. (22)-(24), following nnU-Net conventions.

    L = L_CE + L_Dice                                          # Eq. (22)
    L_Dice = 1 - 1/|K| sum_{k in K} (2 sum_i p_ik g_ik + s) / (sum_i p_ik + sum_i g_ik + s)   # Eq. (23)
    K = foreground classes (background excluded), s = 1e-5      # Eq. (24)

The Dice sums run over all pixels of the batch (nnU-Net's batch Dice for 2-D).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_dice_loss(logits, target, smooth=1e-5):
    """Eq. (23): 1 - macro-average soft Dice over foreground classes. logits (B,K,H,W), target (B,H,W)."""
    K = logits.shape[1]
    p = torch.softmax(logits.float(), dim=1)                              # (B, K, H, W)
    g = F.one_hot(target.long(), K).permute(0, 3, 1, 2).to(p.dtype)        # (B, K, H, W)
    dims = (0, 2, 3)
    inter = (p * g).sum(dims)
    denom = p.sum(dims) + g.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)                        # (K,)
    return 1 - dice[1:].mean()


class SegLoss(nn.Module):
    """Eq. (22): cross-entropy + soft Dice."""

    def __init__(self, smooth=1e-5):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits, target):
        return F.cross_entropy(logits.float(), target.long()) + soft_dice_loss(logits, target, self.smooth)
