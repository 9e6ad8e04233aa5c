"""Skip-connection modules plugged into the U-Net of common/backbones.py.

The interface (the same for every skip type, the IAC cell included):

    skips = SkipSet subclass
    features = skips.prepare(features)      # hook over all encoder features (only UNet++ uses it)
    s = skips(level, skip, up)              # skip: encoder tensor (B, C_skip, H, W)
                                            # up:   decoder tensor up-sampled to (H, W)
                                            # s:    a tensor of the skip's shape
Baselines:
    ref     identity skip (Ronneberger et al., MICCAI 2015)
    att     additive attention gates, decoder tensor as gating signal
            (Oktay et al., "Attention U-Net", MIDL 2018)
    nested  UNet++ dense nested skip pathways (Zhou et al., DLMIA 2018)
    resatt  residual attention, (1 + M(x)) * T(x) with a trunk residual block T and a
            bottom-up/top-down soft mask branch M (Wang et al., CVPR 2017)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBlock(nn.Sequential):
    """(conv 3x3 -> BN -> ReLU) x 2."""

    def __init__(self, c_in, c_out):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SkipSet(nn.Module):
    """Base class: one module per skip level behind `forward(level, skip, up)`."""

    def prepare(self, features):
        return features

    def forward(self, level, skip, up):
        raise NotImplementedError


class PerLevel(SkipSet):
    """A SkipSet made of one `module(skip, up)` per level."""

    def __init__(self, modules):
        super().__init__()
        self.levels = nn.ModuleList(modules)

    def forward(self, level, skip, up):
        return self.levels[level](skip, up)


class Identity(nn.Module):
    def forward(self, skip, up):
        return skip


class AttentionGate(nn.Module):
    """Oktay et al. 2018: alpha = sigmoid(psi(ReLU(W_x x + W_g g))), output x * alpha."""

    def __init__(self, c_skip, c_up, c_int=None):
        super().__init__()
        c_int = c_int or max(c_skip // 2, 1)
        self.W_x = nn.Sequential(nn.Conv2d(c_skip, c_int, 1, bias=False), nn.BatchNorm2d(c_int))
        self.W_g = nn.Sequential(nn.Conv2d(c_up, c_int, 1, bias=True), nn.BatchNorm2d(c_int))
        self.psi = nn.Sequential(nn.Conv2d(c_int, 1, 1, bias=True), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, skip, up):
        alpha = self.psi(F.relu(self.W_x(skip) + self.W_g(up)))   # (B, 1, H, W)
        return skip * alpha


class ResidualAttention(nn.Module):
    """Wang et al. 2017 attention-residual learning on the skip: (1 + M(x)) * T(x)."""

    def __init__(self, c_skip, c_up=None):
        super().__init__()
        c = c_skip
        self.trunk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                   nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.mask_down = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(c, c, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.mask_out = nn.Sequential(nn.Conv2d(c, c, 1), nn.Sigmoid())

    def forward(self, skip, up):
        t = F.relu(skip + self.trunk(skip))                                          # residual trunk T(x)
        m = F.interpolate(self.mask_down(skip), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return (1 + self.mask_out(m)) * t                                           # (1 + M(x)) * T(x)


class NestedSkips(SkipSet):
    """UNet++ skip pathways: X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})]).

    With S skip levels, level i has S-1-i intermediate nodes; its last node replaces the
    plain skip (level S-1 keeps the identity). Node widths equal the level's skip width,
    so the decoder is the same as with `ref` skips."""

    def __init__(self, skip_channels, bottleneck_channels):
        super().__init__()
        S = len(skip_channels)
        chans = list(skip_channels) + [bottleneck_channels]
        self.n_nodes = [S - 1 - i for i in range(S)]
        self.nodes = nn.ModuleDict()
        for i in range(S):
            for j in range(1, self.n_nodes[i] + 1):
                self.nodes[f"{i}_{j}"] = ConvBlock(chans[i] * j + chans[i + 1], chans[i])

    def prepare(self, features):
        X = {(i, 0): f for i, f in enumerate(features)}
        S = len(self.n_nodes)
        for j in range(1, S):                       # column by column, as in UNet++
            for i in range(S - j):
                up = F.interpolate(X[(i + 1, j - 1)], size=X[(i, 0)].shape[-2:], mode="bilinear", align_corners=False)
                X[(i, j)] = self.nodes[f"{i}_{j}"](torch.cat([X[(i, k)] for k in range(j)] + [up], dim=1))
        return [X[(i, self.n_nodes[i])] for i in range(S)] + list(features[S:])

    def forward(self, level, skip, up):
        return skip


SKIP_TYPES = ("ref", "att", "nested", "resatt")


def build_skips(kind, skip_channels, up_channels, bottleneck_channels):
    if kind == "ref":
        return PerLevel([Identity() for _ in skip_channels])
    if kind == "att":
        return PerLevel([AttentionGate(cs, cu) for cs, cu in zip(skip_channels, up_channels)])
    if kind == "resatt":
        return PerLevel([ResidualAttention(cs, cu) for cs, cu in zip(skip_channels, up_channels)])
    if kind == "nested":
        return NestedSkips(skip_channels, bottleneck_channels)
    raise ValueError(f"unknown skip type {kind!r}; choose one of {SKIP_TYPES}")
