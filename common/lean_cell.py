"""The search step the scripts run: common/iac.py's supernet regrouped and recomputed for speed and memory.

The same mathematics as the reference cell in common/iac.py (Eq. 4 and 9, edge by edge), pinned to it by
tests/test_lean_cell.py in float64, in eval mode and under bf16 autocast; the same parameters, buffers and state-dict
keys, so checkpoints and θ0 move freely between the two.

    skips = LeanSearchSkips(skip_channels, up_channels, checkpoint_edges="cell")   # instead of iac.IACSearchSkips
    skips.set_checkpointing([False, True, "cell", "fine"])                        # or one mode per level

The lean step (`lean=True`, `--lean_step on`): Eq. (4) + (9) regrouped by the node an edge starts from. Every edge
leaving node i sees the same C/K channels xa_i, so the parameter-free ops (skip, pools and their non-affine BN) and
the first ReLU of the convolution ops are computed once per node, and each convolution op runs once for all edges
leaving i (their weights concatenated: grouped convolutions, the same sums per channel). The channel shuffle is a
fixed permutation, so Σ_e w'_e·shuffle(cat(op_e, xb_e)) = shuffle(cat(Σ_e w'_e·op_e, Σ_e w'_e·xb_e)): one
concatenation and shuffle per node instead of one per edge. Only in training mode: in eval mode a cell runs the
reference step (BatchNorm from running statistics, nothing updated).

Recomputation (`checkpoint_edges`, per level; `--checkpoint_edges`): False keeps every activation; True keeps only
what enters each checkpointed region and recomputes it in the backward pass (torch.utils.checkpoint; the same
gradients and BatchNorm statistics); "cell" also recomputes the whole cell around those regions (only skip and up are
kept); "fine" is "cell" with one region per op of each edge (no grouped convolution there: the smallest
recomputation). Lean and checkpointed, the pre-processing is recomputed too, each op of a node is its own region, and
the output conv is a sum over the nodes (no 4C-wide concatenation is kept). common/memory.py counts what each mode
keeps through checkpoint_hook().

Under autocast (bf16 on CUDA, and on the CPU with --amp on) the running statistics stay in their buffers' dtype
(float32): the statistics computed here for BatchNorms that share one input are taken in that dtype.
"""
import contextlib
import contextvars
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.iac import EDGES, N_INPUTS, NODES, OPS, Cell, IACSearchSkips, channel_shuffle

WHOLE_CELL = ("cell", "fine")                  # checkpoint_edges values that also recompute the whole cell
OUT_EDGES = {i: [e for e, (ii, j) in enumerate(EDGES) if ii == i] for i in range(N_INPUTS + len(NODES) - 1)}
_CHECKPOINT = contextvars.ContextVar("iac_checkpoint", default=checkpoint)


@contextlib.contextmanager
def checkpoint_hook(fn):
    """While inside, every checkpointed region of this module runs as fn(region, *args, **kwargs) instead of
    torch.utils.checkpoint.checkpoint (common/memory.py counts what each region keeps this way, in the forward
    pass). A context variable: a region recomputed in the backward pass, which autograd may run in a worker thread
    (on CUDA), sees torch's checkpoint for the regions nested in it, not `fn`."""
    token = _CHECKPOINT.set(fn)
    try:
        yield
    finally:
        _CHECKPOINT.reset(token)


def _recomputed(fn, *args, modules):
    """fn(*args) as a checkpointed region: only its inputs are kept; recomputed in backward with the BatchNorms of
    `modules` leaving their running statistics as the forward pass left them."""
    return _CHECKPOINT.get()(fn, *args, use_reentrant=False,
                             context_fn=functools.partial(_recompute_without_bn_update, *modules))


class LeanCell(Cell):
    """iac.Cell (search) with the lean step and recomputation; the same modules, so the same state dict."""

    def __init__(self, *args, checkpoint_edges=False, lean=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_edges, self.lean = checkpoint_edges, lean and self.search

    def forward(self, skip, up, op_w=None, edge_w=None):
        if not self.training:                                                # eval: the reference step, exact
            return super().forward(skip, up, op_w, edge_w)
        if self.checkpoint_edges in WHOLE_CELL and torch.is_grad_enabled():
            return _recomputed(self._forward, skip, up, op_w, edge_w, modules=(self,))
        return self._forward(skip, up, op_w, edge_w)

    def _forward(self, skip, up, op_w, edge_w):
        if not self.lean:                                                    # edge by edge (edge_term may recompute)
            return super().forward(skip, up, op_w, edge_w)
        states = [self._pre(self.pre0, skip), self._pre(self.pre1, up)]      # x0, x1
        return self._lean_output(skip, self._lean_nodes(states, op_w, edge_w))

    def _checkpointing(self):
        return self.checkpoint_edges and torch.is_grad_enabled()

    def edge_term(self, e, x, op_w, edge_w):
        if self._checkpointing():                                            # the edge recomputed in backward
            return _recomputed(super().edge_term, e, x, op_w, edge_w, modules=(self.edges[str(e)],))
        return super().edge_term(e, x, op_w, edge_w)

    def _pre(self, pre, x):
        return _recomputed(pre, x, modules=(pre,)) if self._checkpointing() else pre(x)

    def _lean_output(self, skip, states):
        """Eq. (1) as Σ_j conv(x_j, W_j) + b over the nodes' slices W_j of the 1x1 conv's weight: the same sum as the
        conv of the concatenation, without keeping the concatenation for the backward pass."""
        conv = F.conv2d if isinstance(self.out, nn.Conv2d) else F.conv3d
        weights = self.out.weight.chunk(len(NODES), dim=1)
        out = conv(states[N_INPUTS], weights[0], self.out.bias)
        for x, w in zip(states[N_INPUTS + 1:], weights[1:]):
            out = out + conv(x, w)
        return skip + out if self.residual else out

    def _lean_nodes(self, states, op_w, edge_w):
        coef = op_w * edge_w[:, None]                                        # w'_e · softmax(α_e)_o, Eq. (2), (9)
        acc = {j: None for j in NODES}                                       # node j: (Σ w'·op(xa), Σ w'·xb)
        for i in OUT_EDGES:
            if i >= N_INPUTS:                                                # every edge into i has been summed
                states.append(self._merge(acc[i], states[0]))
            edges = [e for e in OUT_EDGES[i] if str(e) in self.edges]
            if not edges:
                continue
            c = states[i].shape[1] // self.k
            xa, xb = states[i][:, :c], states[i][:, c:]                      # Eq. (4): C/K channels in
            ys = self._from_node_recomputed(xa, coef, edges) if self._checkpointing() else \
                self._from_node(xa, coef, edges)
            for e, y in zip(edges, ys):
                j = EDGES[e][1]
                term = (y, edge_w[e] * xb)
                acc[j] = term if acc[j] is None else (acc[j][0] + term[0], acc[j][1] + term[1])
        states.append(self._merge(acc[NODES[-1]], states[0]))
        return states

    def _from_node_recomputed(self, xa, coef, edges):
        """_from_node with one checkpointed region per op of the node's edges ("fine": per op of each edge)."""
        ys = {e: None for e in edges}
        for name in OPS:
            for chunk in [[e] for e in edges] if self.checkpoint_edges == "fine" else [edges]:
                mods = [self.edges[str(e)].ops[name] for e in chunk if name in self.edges[str(e)].ops]
                if not mods:
                    continue
                if name == "skip_connect":                                   # nothing to recompute
                    part = self._from_node(xa, coef, chunk, (name,))
                else:
                    part = _recomputed(self._from_node, xa, coef, chunk, (name,), modules=mods)
                for e, p in zip(chunk, part):
                    ys[e] = ys[e] if p is None else p if ys[e] is None else ys[e] + p
        return [ys[e] for e in edges]

    def _merge(self, acc, like):
        if acc is None:                                                      # a node whose edges were all pruned
            return torch.zeros_like(like)
        return channel_shuffle(torch.cat(acc, dim=1), self.k) if self.k > 1 else acc[0]

    def _from_node(self, xa, coef, edges, names=OPS):
        """Σ_o w'_e·w_{e,o}·op_o(xa) over the ops `names` for every edge e leaving one node (a list in the order of
        `edges`; None for an edge without any of them)."""
        out = [None] * len(edges)
        relu = None
        for o, name in enumerate(OPS):
            if name not in names:
                continue
            has = [n for n, e in enumerate(edges) if name in self.edges[str(edges[n])].ops]
            if not has:
                continue
            mods = [self.edges[str(edges[n])].ops[name] for n in has]
            if name == "skip_connect":
                ys = [xa] * len(has)
            elif name in ("max_pool_3x3", "avg_pool_3x3"):
                y = mods[0][0](xa)                                           # one pool and BN for all edges
                ys = [_shared_batch_norm(y, [m[1] for m in mods])] * len(has)
            else:
                relu = F.relu(xa) if relu is None else relu                  # the ReLU each conv op begins with
                ys = _batched_conv_op(mods, relu)
            for n, y in zip(has, ys):
                term = coef[edges[n], o] * y
                out[n] = term if out[n] is None else out[n] + term
        return out


def _shared_batch_norm(y, bns):
    """The training-mode BatchNorm of `y` for several BN modules that see the same input: normalised once, every
    module's running statistics updated as its own forward would update them (statistics taken in the buffers' dtype:
    under bf16 autocast `y` is bf16, the buffers float32)."""
    out = bns[0](y)
    if len(bns) > 1:
        with torch.no_grad():
            dtype = bns[0].running_mean.dtype
            var, mean = torch.var_mean(y.to(dtype), dim=[d for d in range(y.dim()) if d != 1], correction=1)
            for bn in bns[1:]:
                bn.running_mean.lerp_(mean, bn.momentum)
                bn.running_var.lerp_(var, bn.momentum)
                bn.num_batches_tracked.add_(1)
    return out


# The layers of SepConv / DilConv after their first ReLU, in order: depthwise conv, 1x1 conv, BN (and again for
# SepConv). _batched_conv_op runs them position by position; a layer of another kind is a programming error.
_CONV_LAYERS = (nn.Conv2d, nn.Conv3d)


def _batched_conv_op(mods, x):
    """One convolution op (SepConv / DilConv, after its first ReLU) of several edges on the same input `x`, run as
    one grouped convolution chain over their concatenated weights; returns each edge's output."""
    if len(mods) == 1:
        for layer in list(mods[0])[1:]:
            x = layer(x)
        return [x]
    n = len(mods)
    y = x.repeat(1, n, *[1] * (x.dim() - 2))                                 # (B, n·C/K, *spatial)
    for layers in zip(*[list(m)[1:] for m in mods]):
        first = layers[0]
        if isinstance(first, nn.ReLU):
            y = F.relu(y)
        elif isinstance(first, nn.modules.batchnorm._BatchNorm):            # training mode (see LeanCell.forward)
            rm = torch.cat([b.running_mean for b in layers])
            rv = torch.cat([b.running_var for b in layers])
            y = F.batch_norm(y, rm, rv, None, None, True, first.momentum, first.eps)
            with torch.no_grad():
                for b, m, v in zip(layers, rm.chunk(n), rv.chunk(n)):
                    b.running_mean.copy_(m)
                    b.running_var.copy_(v)
                    b.num_batches_tracked.add_(1)
        elif isinstance(first, _CONV_LAYERS) and first.bias is None:        # depthwise or 1x1 conv
            conv = F.conv2d if isinstance(first, nn.Conv2d) else F.conv3d
            y = conv(y, torch.cat([c.weight for c in layers]), None, first.stride, first.padding, first.dilation,
                     first.groups * n)
        else:
            raise TypeError(f"lean step: unexpected layer {type(first).__name__} in a convolution op")
    return list(y.chunk(n, dim=1))


@contextlib.contextmanager
def _bn_stats_frozen(*modules):
    """While a region is recomputed in the backward pass, its BatchNorms must not update their running statistics a
    second time: momentum 0 leaves them as the forward pass left them, and their batch counts are put back."""
    bns = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _recompute_without_bn_update(*modules):
    return contextlib.nullcontext(), _bn_stats_frozen(*modules)


class LeanSearchSkips(IACSearchSkips):
    """iac.IACSearchSkips with LeanCells: `lean` (the regrouped step) and `checkpoint_edges` (one mode for every
    level, or one per level; see the module docstring). Everything else is the reference supernet's."""

    def __init__(self, skip_channels, up_channels, cell_channels=None, pc_k=4, beta_fn="tanh", dims=2,
                 output="replace", checkpoint_edges=False, lean=True):
        super().__init__(skip_channels, up_channels, cell_channels, pc_k, beta_fn, dims, output,
                         make_cell=functools.partial(LeanCell, lean=lean))
        self.set_checkpointing(checkpoint_edges)

    def set_checkpointing(self, plan):
        """One --checkpoint_edges mode (False, True, "cell", "fine") for every level, or a list with one per level."""
        plan = list(plan) if isinstance(plan, (list, tuple)) else [plan] * len(self.cells)
        for cell, mode in zip(self.cells, plan):
            cell.checkpoint_edges = mode
