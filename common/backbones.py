"""2-D U-Nets whose encoder is a plain U-Net encoder or a torchvision model (paper Sec. 6.2).

    model = UNet("resnet50", in_channels=1, num_classes=4, skip="ref")
    logits = model(x)                                    # (B, in, H, W) -> (B, K, H, W)

Encoders: `base` (plain U-Net: 5 levels of double 3x3 conv, widths w, 2w, ..., 16w),
`vgg16` (torchvision vgg16_bn), `resnet50`, `mobilenet_v3_large`, `efficientnet_v2_s`,
`efficientnet_v2_m` (torchvision, not re-implemented). The encoder is split into
stages; the last output at each resolution is a feature level. The deepest level is
the bottleneck, every other level has a skip connection (4 skips for every encoder).
H and W must be divisible by 32.

Where a skip module plugs in (one place per level, the same for every skip type):

    features = self.skips.prepare(features)
    for level in reversed(range(n_skips)):
        up = upsample(x, to=features[level])             # decoder tensor at the skip's size
        s  = self.skips(level, features[level], up)      # <- ref / att / nested / resatt / IAC
        x  = self.decoder[level](cat([s, up]))

`model.skip_channels[l]` and `model.up_channels[l]` give the channels of `skip` and `up`
at level l, which is all a skip module needs to know (see common/skips.py, common/iac.py).
`model.set_skips(new)` swaps the skip modules; `model.freeze_backbone()` freezes every
weight that is not a skip module and keeps those modules in eval mode; frozen, the decoder
blocks and the head keep only their ReLU masks for the backward pass (common/frozen.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common.frozen import frozen_apply
from common.skips import ConvBlock, build_skips
from common.utils import InputError, require_file

ENCODERS = ("base", "vgg16", "resnet50", "mobilenet_v3_large", "efficientnet_v2_s", "efficientnet_v2_m")
_TV_NAME = {"vgg16": "vgg16_bn", "resnet50": "resnet50", "mobilenet_v3_large": "mobilenet_v3_large",
            "efficientnet_v2_s": "efficientnet_v2_s", "efficientnet_v2_m": "efficientnet_v2_m"}


def _replace_first_conv(module, in_channels):
    """Give the first conv `in_channels` inputs; RGB weights are averaged and repeated."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            if child.in_channels == in_channels:
                return True
            new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                            child.dilation, child.groups, child.bias is not None)
            with torch.no_grad():
                w = child.weight.mean(dim=1, keepdim=True) * (child.in_channels / in_channels)
                new.weight.copy_(w.repeat(1, in_channels, 1, 1))
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            setattr(module, name, new)
            return True
        if _replace_first_conv(child, in_channels):
            return True
    return False


def _torchvision_stages(encoder, weights_path):
    model = getattr(torchvision.models, _TV_NAME[encoder])(weights=None)
    if weights_path:
        require_file(weights_path, "--encoder_weights", f"a torchvision {_TV_NAME[encoder]} state dict")
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            missing = model.load_state_dict(state, strict=False).missing_keys
        except Exception as e:  # not a state dict at all, or one with other shapes
            raise InputError(f"--encoder_weights {weights_path}: not a torchvision {_TV_NAME[encoder]} state dict "
                             f"({type(e).__name__})") from e
        enc_missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
        if enc_missing:
            raise InputError(f"--encoder_weights {weights_path}: not a torchvision {_TV_NAME[encoder]} state dict "
                             f"(missing e.g. {enc_missing[:3]})")
    if encoder == "resnet50":
        m = model
        return [nn.Sequential(m.conv1, m.bn1, m.relu), nn.Sequential(m.maxpool, m.layer1), m.layer2, m.layer3, m.layer4]
    stages = list(model.features.children())
    if encoder == "vgg16":
        stages = stages[:-1]                      # the last max-pool would only halve the bottleneck
    return stages


def _base_stages(in_channels, width):
    chans = [width * 2 ** i for i in range(5)]
    stages = [ConvBlock(in_channels, chans[0])]
    for i in range(1, 5):
        stages.append(nn.Sequential(nn.MaxPool2d(2), ConvBlock(chans[i - 1], chans[i])))
    return stages


class Encoder(nn.Module):
    """Runs the stages in order and returns the last output at each resolution."""

    def __init__(self, encoder, in_channels, width=32, weights_path=None):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; choose one of {ENCODERS}")
        stages = _base_stages(in_channels, width) if encoder == "base" else _torchvision_stages(encoder, weights_path)
        self.stages = nn.ModuleList(stages)
        if encoder != "base":
            _replace_first_conv(self.stages, in_channels)
        for m in self.modules():                  # torchvision's MobileNetV3 / EfficientNet use BN momentum
            if isinstance(m, nn.BatchNorm2d):     # 0.01, too slow for eval-mode statistics after short or
                m.momentum = 0.1                  # from-scratch training; use PyTorch's default everywhere
        with torch.no_grad():                     # find the feature taps with one small dry run
            was = self.training
            self.eval()
            x, sizes, chans = torch.zeros(1, in_channels, 64, 64), [], []
            for s in self.stages:
                x = s(x)
                sizes.append(x.shape[-1])
                chans.append(x.shape[1])
            self.train(was)
        self.taps = [i for i in range(len(sizes)) if i == len(sizes) - 1 or sizes[i + 1] != sizes[i]]
        self.channels = [chans[i] for i in self.taps]
        self.strides = [64 // sizes[i] for i in self.taps]

    def forward(self, x):
        feats = []
        for i, s in enumerate(self.stages):
            x = s(x)
            if i in self.taps:
                feats.append(x)
        return feats


class UNet(nn.Module):
    def __init__(self, encoder="base", in_channels=1, num_classes=2, skip="ref", width=32, encoder_weights=None):
        super().__init__()
        self.config = {"encoder": encoder, "in_channels": in_channels, "num_classes": num_classes,
                       "skip": skip, "width": width}
        self.encoder = Encoder(encoder, in_channels, width, encoder_weights)
        enc_ch = self.encoder.channels
        n_skips = len(enc_ch) - 1
        dec_ch = [width * 2 ** l for l in range(n_skips)]                  # decoder width per level
        center_ch = min(enc_ch[-1], 16 * width)
        self.center = nn.Sequential(nn.Conv2d(enc_ch[-1], center_ch, 1, bias=False), nn.BatchNorm2d(center_ch),
                                    nn.ReLU(inplace=True))
        self.skip_channels = enc_ch[:-1]
        self.up_channels = [dec_ch[l + 1] if l + 1 < n_skips else center_ch for l in range(n_skips)]
        self.decoder = nn.ModuleList([ConvBlock(self.skip_channels[l] + self.up_channels[l], dec_ch[l])
                                      for l in range(n_skips)])
        self.final_up = None
        if self.encoder.strides[0] > 1:          # shallowest feature at stride 2: one more stage
            self.final_up = ConvBlock(dec_ch[0], dec_ch[0])
        self.head = nn.Conv2d(dec_ch[0], num_classes, 1)
        self.skips = build_skips(skip, self.skip_channels, self.up_channels, center_ch)
        self.backbone_frozen = False

    def set_skips(self, skips):
        self.skips = skips

    def backbone_modules(self):
        return [m for name, m in self.named_children() if name != "skips" and m is not None]

    def freeze_backbone(self):
        for m in self.backbone_modules():
            m.requires_grad_(False)
        self.backbone_frozen = True
        self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if self.backbone_frozen:                 # frozen BN statistics stay as pre-trained
            for m in self.backbone_modules():
                m.eval()
        return self

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % 32 or W % 32:
            raise ValueError(f"input size {H}x{W} must be divisible by 32")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            feats = self.encoder(x)                                  # [(B, C_l, H/s_l, W/s_l)]
        feats = self.skips.prepare(feats)
        x = self.center(feats[-1])
        for level in reversed(range(len(self.decoder))):
            skip = feats[level]
            up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            s = self.skips(level, skip, up)                          # the skip module's place
            x = frozen_apply(self.decoder[level], torch.cat([s, up], dim=1))    # decoder[level](...)
        if self.final_up is not None:
            x = frozen_apply(self.final_up, F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False))
        return frozen_apply(self.head, x)                            # (B, K, H, W)


def build_unet(config, encoder_weights=None):
    """A UNet from the `config` dict a checkpoint stores."""
    return UNet(config["encoder"], config["in_channels"], config["num_classes"], config["skip"],
                config["width"], encoder_weights)
