"""A frozen block's backward pass keeping only what its input's gradient needs (#21: memory of the search step).

With the backbone frozen (03_search.py, 04_finetune.py) every decoder block is a fixed chain of convolutions,
eval-mode BatchNorms and ReLUs, and the cells' gradients flow through it. Autograd still keeps each convolution's
input and each BatchNorm's input, for weight gradients nobody asks for: the base U-Net's level-0 decoder block keeps
6 GiB at batch 128, 256x256, bf16, of which the input's gradient needs the ReLU masks only.

    y = frozen_apply(block, x)        # block(x), value for value; backward keeps one bool mask per ReLU

The backward pass, layer by layer in reverse (the same formulas autograd uses):
    ReLU            dx = dy where y > 0, else 0                     (threshold_backward)
    BatchNorm, eval dx = dy · γ / sqrt(running_var + ε)             (an affine map per channel)
    Conv            dx = the convolution's input gradient from W      (torch.nn.grad.conv{2,3}d_input)
Anything else (a block in training mode, a trainable weight, another layer type, no gradient wanted) runs as the
plain `block(x)`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

_CONV = (nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm2d, nn.BatchNorm3d)
_INPUT_GRAD = {nn.Conv2d: F.grad.conv2d_input, nn.Conv3d: F.grad.conv3d_input}


def _layers(module):
    return list(module) if isinstance(module, nn.Sequential) else [module]


def supported(module):
    """Whether `module` is a frozen chain this backward handles: convolutions (not transposed, zero padding), eval
    BatchNorms and ReLUs, starting with a convolution, no trainable parameter, nothing in training mode."""
    layers = _layers(module)
    return (bool(layers) and isinstance(layers[0], _CONV) and not module.training
            and all(isinstance(m, (*_CONV, *_BN, nn.ReLU)) for m in layers)
            and all(m.padding_mode == "zeros" and not isinstance(m.padding, str)
                    for m in layers if isinstance(m, _CONV))
            and all(m.track_running_stats for m in layers if isinstance(m, _BN))
            and not any(p.requires_grad for p in module.parameters()))


class _FrozenChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layers):
        shapes, masks = [], []
        for layer in layers:
            if isinstance(layer, _CONV):
                shapes.append(x.shape)
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                masks.append(x > 0)
        ctx.layers, ctx.shapes = layers, shapes
        ctx.save_for_backward(*masks)
        return x

    @staticmethod
    def backward(ctx, g):
        masks, shapes = list(ctx.saved_tensors), list(ctx.shapes)
        for layer in reversed(ctx.layers):
            if isinstance(layer, nn.ReLU):
                g = torch.where(masks.pop(), g, 0)
            elif isinstance(layer, _BN):
                scale = torch.rsqrt(layer.running_var + layer.eps)
                if layer.weight is not None:
                    scale = scale * layer.weight
                g = (g * scale.view(1, -1, *[1] * (g.dim() - 2))).to(g.dtype)
            else:
                g = _INPUT_GRAD[type(layer)](shapes.pop(), layer.weight.to(g.dtype), g, layer.stride, layer.padding,
                                             layer.dilation, layer.groups)
        return g, None


def frozen_apply(module, x):
    """module(x); when `module` is a supported frozen chain and x needs a gradient, its backward keeps only the
    ReLUs' masks (see the module's docstring)."""
    if not (torch.is_grad_enabled() and x.requires_grad and supported(module)):
        return module(x)
    return _FrozenChain.apply(x, tuple(_layers(module)))
