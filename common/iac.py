"""Implantable Adaptive Cells (IAC): the searchable skip cell, its genotype, and θ0.

This file imports only torch (and the standard library) and can be copied into any
project. A cell replaces one U-Net skip connection: it takes the encoder skip tensor
x0 and the decoder tensor x1 (up-sampled to the skip's size) and returns a tensor of
the skip's shape, so a frozen decoder is unchanged (paper Sec. 3.1-3.2, Eq. 1).

    6 nodes: inputs 0 (skip), 1 (up); intermediate nodes 2..5; 14 edges i -> j (i < j)
    7 candidate operations per edge (no `none` op); one genotype for all skip levels,
    each level with its own weights; α (14x7) and β (14) shared by all levels.

Drop it into your own U-Net (the decoder calls `skips(level, skip, up)`):

    from iac import IACSearchSkips, IACSkips, read_genotype
    skips = IACSearchSkips(skip_channels=[64, 128, 256, 512], up_channels=[64, 128, 256, 512])
    # in the decoder, per level:  s = skips(level, enc_feat, upsampled);  x = block(cat([s, upsampled]))
    arch_opt = torch.optim.Adam(skips.arch_parameters(), 1e-3, betas=(0.5, 0.999), weight_decay=1e-3)
    w_opt = torch.optim.SGD(skips.weight_parameters(), 0.01)
    ...
    genotype = skips.derive_genotype()                      # Eq. (12) + top-2 edges per node
    final = IACSkips(genotype, [64, 128, 256, 512], [64, 128, 256, 512])   # full width, affine BN

A frozen decoder that should first see its own skip tensor: `IACSkips(..., output="residual")` (and
`IACSearchSkips(..., output="residual")` for the search) returns skip + the cell's output conv, started at
zero (again after loading θ0); the paper's `replace` is the default.

Volumetric U-Nets: pass `dims=3` to IACSearchSkips, IACSkips and make_theta0 (3-D ops; the genotype
JSON and the θ0 layout are the same as in 2-D).
"""
import contextlib
import functools
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

OPS = ("skip_connect", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
       "dil_conv_5x5")
N_INPUTS = 2
NODES = (2, 3, 4, 5)
EDGES = tuple((i, j) for j in NODES for i in range(j))          # 14 edges: (0,2), (1,2), (0,3), ...
IN_EDGES = {j: [e for e, (i, jj) in enumerate(EDGES) if jj == j] for j in NODES}
OUT_EDGES = {i: [e for e, (ii, j) in enumerate(EDGES) if ii == i] for i in range(N_INPUTS + len(NODES) - 1)}
FULL_GENOTYPE_EDGES = {e: OPS for e in range(len(EDGES))}         # every op on every edge (supernet, θ0)
# How a cell's output enters the decoder: `replace` (paper Sec. 3.1, Eq. 1: the 1x1 conv of the concatenated
# nodes takes the identity skip's place) or `residual` (skip + that conv, the conv starting at zero, so the
# frozen decoder first sees the skip tensor it was trained with; this project's option, not the paper's).
CELL_OUTPUTS = ("replace", "residual")
# checkpoint_edges values that also recompute the whole cell: "cell" (inside it, one region per op of a node's edges
# in the lean step) and "fine" (one region per op of each edge: the least memory, no grouped convolution there)
WHOLE_CELL = ("cell", "fine")


# --------------------------------------------------------------------------- operations
# `dims`: 2 (the paper's 2-D U-Nets) or 3 (volumetric U-Nets, e.g. nnU-Net 3d_fullres); the op names keep
# their 2-D spelling (a "3x3" op is 3x3x3 in 3-D), so a genotype is the same JSON in both.
def conv_nd(dims):
    return {2: nn.Conv2d, 3: nn.Conv3d}[dims]


def bn_nd(dims):
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]


class SepConv(nn.Sequential):
    """(ReLU -> depthwise k x k -> 1x1 -> BN) twice (PC-DARTS)."""

    def __init__(self, C, k, affine, dims=2):
        p, Conv, BN = k // 2, conv_nd(dims), bn_nd(dims)
        super().__init__(nn.ReLU(), Conv(C, C, k, padding=p, groups=C, bias=False),
                         Conv(C, C, 1, bias=False), BN(C, affine=affine),
                         nn.ReLU(), Conv(C, C, k, padding=p, groups=C, bias=False),
                         Conv(C, C, 1, bias=False), BN(C, affine=affine))


class DilConv(nn.Sequential):
    """ReLU -> depthwise k x k, dilation 2 -> 1x1 -> BN (PC-DARTS)."""

    def __init__(self, C, k, affine, dims=2):
        Conv = conv_nd(dims)
        super().__init__(nn.ReLU(), Conv(C, C, k, padding=k - 1, dilation=2, groups=C, bias=False),
                         Conv(C, C, 1, bias=False), bn_nd(dims)(C, affine=affine))


def make_op(name, C, search, dims=2):
    """One candidate op at width C; search ops have non-affine BN, pools get a BN in search."""
    affine = not search
    if name == "skip_connect":
        return nn.Identity()
    if name in ("max_pool_3x3", "avg_pool_3x3"):
        pool = ({2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims](3, 1, 1) if name == "max_pool_3x3" else
                {2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](3, 1, 1, count_include_pad=False))
        return nn.Sequential(pool, bn_nd(dims)(C, affine=False)) if search else pool
    if name in ("sep_conv_3x3", "sep_conv_5x5"):
        return SepConv(C, int(name[-1]), affine, dims)
    if name in ("dil_conv_3x3", "dil_conv_5x5"):
        return DilConv(C, int(name[-1]), affine, dims)
    raise ValueError(f"unknown operation {name!r}; known: {', '.join(OPS)}")


def channel_shuffle(x, groups):
    """(B, C, *spatial): interleave the channels of `groups` groups (PC-DARTS), in 2-D and 3-D."""
    B, C, *spatial = x.shape
    return x.view(B, groups, C // groups, *spatial).transpose(1, 2).reshape(B, C, *spatial)


# --------------------------------------------------------------------------- weights
def cap_edge_weights(w, eps=1e-8):
    """Eq. (6)-(8) on the last dim: if max w > 0.5, set it to 0.5 and rescale the rest to sum 0.5."""
    w_m, m = w.max(dim=-1, keepdim=True)
    is_m = F.one_hot(m.squeeze(-1), w.shape[-1]).bool()
    S = w.sum(dim=-1, keepdim=True) - w_m                                 # Eq. (7)
    capped = torch.where(is_m, torch.full_like(w, 0.5), 0.5 * w / (S + eps))   # Eq. (8)
    return torch.where(w_m > 0.5, capped, w)                              # Eq. (6)


def edge_weights(beta, edge_mask, beta_fn="tanh"):
    """Eq. (5)-(8): w'_{i->j} for every edge (14,), computed node by node over active edges."""
    f = torch.tanh if beta_fn == "tanh" else (lambda b: b)
    out = torch.zeros_like(beta)
    for j in NODES:
        idx = [e for e in IN_EDGES[j] if edge_mask[e]]
        z = f(beta[idx])
        w = torch.softmax(z - z.max(), dim=0)                               # Eq. (5)
        out = out.index_put((torch.tensor(idx, device=beta.device),), cap_edge_weights(w))
    return out


EDGE_RULES = ("w", "max_importance")


def edge_scores(op_w, edge_w, rule="w"):
    """What ranks a node's incoming edges: `w` = w'_e (paper Sec. 3.4, Eq. 6-8, the default) or
    `max_importance` = max_o softmax(α_e)_o · w'_e (PC-DARTS). The same for single-op edges."""
    if rule == "w":
        return edge_w
    if rule == "max_importance":
        return (op_w * edge_w[..., None]).max(dim=-1).values
    raise ValueError(f"unknown edge rule {rule!r}; known: {', '.join(EDGE_RULES)}")


def top2_incoming(score, edge_mask=None):
    """Sec. 3.4 / 5.5: for every node, its two (active) incoming edges with the largest score;
    ties go to the lower edge index. Returns the kept edge indices, node by node."""
    keep = []
    for j in NODES:
        cand = [e for e in IN_EDGES[j] if edge_mask is None or bool(edge_mask[e])]
        keep += sorted(sorted(cand, key=lambda e: -float(score[e]))[:2])
    return keep


def op_weights(alpha, op_mask):
    """Eq. (2): softmax of α over each edge's active ops; pruned ops get 0."""
    return torch.softmax(alpha.masked_fill(~op_mask, float("-inf")), dim=-1)


# --------------------------------------------------------------------------- cell
class Edge(nn.Module):
    """The ops of one edge. In search: the partial-channel mixed op of Eq. (4)."""

    def __init__(self, C, op_names, search, pc_k, dims=2):
        super().__init__()
        self.search, self.k = search, (pc_k if search else 1)
        self.ops = nn.ModuleDict({o: make_op(o, C // self.k, search, dims) for o in op_names})

    def forward(self, x, weights=None):
        if not self.search:
            return sum(op(x) for op in self.ops.values())
        c = x.shape[1] // self.k
        xa, xb = x[:, :c], x[:, c:]                                          # Eq. (4): C/K channels in
        out = sum(weights[OPS.index(o)] * op(xa) for o, op in self.ops.items())
        return channel_shuffle(torch.cat([out, xb], dim=1), self.k) if self.k > 1 else out


class Cell(nn.Module):
    """One IAC at one skip level. `edges` maps edge index -> op names on that edge."""

    def __init__(self, c_skip, c_up, C, edges, search, pc_k=4, checkpoint_edges=False, dims=2, output="replace",
                 lean=False):
        super().__init__()
        if output not in CELL_OUTPUTS:
            raise ValueError(f"unknown cell output {output!r}; known: {', '.join(CELL_OUTPUTS)}")
        if search and C % pc_k:
            raise ValueError(f"cell width {C} is not divisible by the partial-channel K={pc_k}")
        affine, Conv, BN = not search, conv_nd(dims), bn_nd(dims)
        self.search, self.checkpoint_edges, self.lean, self.k = search, checkpoint_edges, lean and search, pc_k
        self.pre0 = nn.Sequential(nn.ReLU(), Conv(c_skip, C, 1, bias=False), BN(C, affine=affine))
        self.pre1 = nn.Sequential(nn.ReLU(), Conv(c_up, C, 1, bias=False), BN(C, affine=affine))
        self.edges = nn.ModuleDict({str(e): Edge(C, ops, search, pc_k, dims) for e, ops in sorted(edges.items())})
        self.out = Conv(len(NODES) * C, c_skip, 1)                           # Eq. (1)
        self.residual = output == "residual"
        if self.residual:                                                    # starts as the identity skip
            zero_output(self)

    def forward(self, skip, up, op_w=None, edge_w=None):
        if self.search and self.checkpoint_edges in WHOLE_CELL and torch.is_grad_enabled():
            # the whole cell recomputed in backward (its edges checkpointed inside): only skip and up are kept
            return checkpoint(self._forward, skip, up, op_w, edge_w, use_reentrant=False,
                              context_fn=functools.partial(_recompute_without_bn_update, self))
        return self._forward(skip, up, op_w, edge_w)

    def _forward(self, skip, up, op_w=None, edge_w=None):
        if self.lean:
            return self._lean_output(skip, self._lean_nodes([self._pre(self.pre0, skip), self._pre(self.pre1, up)],
                                                            op_w, edge_w))
        states = [self.pre0(skip), self.pre1(up)]                            # x0, x1: (B, C, *spatial)
        for j in NODES:
            terms = []
            for e in IN_EDGES[j]:
                if str(e) not in self.edges:
                    continue
                i = EDGES[e][0]
                edge = self.edges[str(e)]
                if self.search and self.checkpoint_edges and torch.is_grad_enabled():   # recomputed in backward
                    terms.append(checkpoint(_weighted_edge, edge, states[i], op_w[e], edge_w[e], use_reentrant=False,
                                            context_fn=functools.partial(_recompute_without_bn_update, edge)))
                elif self.search:
                    terms.append(_weighted_edge(edge, states[i], op_w[e], edge_w[e]))          # Eq. (9)
                else:
                    terms.append(edge(states[i]))
            states.append(sum(terms))
        return self._output(skip, states)

    def _output(self, skip, states):
        out = self.out(torch.cat(states[N_INPUTS:], dim=1))                # Eq. (1): (B, C_skip, *spatial)
        return skip + out if self.residual else out

    # ----------------------------------------------------------------- the lean search step (same math)
    # Eq. (4) + (9) regrouped by the node an edge starts from, not edge by edge: every edge leaving node i sees the
    # same C/K channels xa_i, so the parameter-free ops (skip, pools and their non-affine BN) and the first ReLU of
    # the convolution ops are computed once per node, and each convolution op runs once for all edges leaving i
    # (their weights concatenated, grouped convolutions: the same sums per channel). The channel shuffle is a
    # fixed permutation, so Σ_e w'_e·shuffle(cat(op_e, xb_e)) = shuffle(cat(Σ_e w'_e·op_e, Σ_e w'_e·xb_e)): one
    # concatenation and shuffle per node instead of one per edge. Parameters and buffers stay where they are.
    # Checkpointed (edges or the whole cell), the lean step keeps less than the edge-by-edge one and recomputes in
    # smaller pieces: the pre-processing is recomputed too (only skip and up are kept, not its ReLU and conv
    # outputs), each op of a node is its own region (the backward recomputes one op of the edges leaving a node at a
    # time, not all seven; with "fine", one op of one edge), and the output conv is a sum over the nodes (no 4C-wide
    # concatenation is kept).
    def _pre(self, pre, x):
        if self.checkpoint_edges and torch.is_grad_enabled():                # recomputed in backward
            return checkpoint(pre, x, use_reentrant=False,
                              context_fn=functools.partial(_recompute_without_bn_update, pre))
        return pre(x)

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
            if self.checkpoint_edges and torch.is_grad_enabled():           # one region per op, see above
                ys = {e: None for e in edges}
                # "fine": one region per op of each edge (no grouped convolution across the node's edges)
                for name in OPS:
                    for chunk in [[e] for e in edges] if self.checkpoint_edges == "fine" else [edges]:
                        mods = [self.edges[str(e)].ops[name] for e in chunk if name in self.edges[str(e)].ops]
                        if not mods:
                            continue
                        if name == "skip_connect":                           # nothing to recompute
                            part = self._from_node(xa, coef, chunk, (name,))
                        else:
                            part = checkpoint(self._from_node, xa, coef, chunk, (name,), use_reentrant=False,
                                              context_fn=functools.partial(_recompute_without_bn_update, *mods))
                        for e, p in zip(chunk, part):
                            ys[e] = ys[e] if p is None else p if ys[e] is None else ys[e] + p
                ys = [ys[e] for e in edges]
            else:
                ys = self._from_node(xa, coef, edges)
            for e, y in zip(edges, ys):
                j = EDGES[e][1]
                term = (y, edge_w[e] * xb)
                acc[j] = term if acc[j] is None else (acc[j][0] + term[0], acc[j][1] + term[1])
        states.append(self._merge(acc[NODES[-1]], states[0]))
        return states

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


@torch.no_grad()
def zero_output(cell):
    """A residual cell's output conv at zero: the cell returns its skip tensor until it has learnt otherwise."""
    cell.out.weight.zero_()
    cell.out.bias.zero_()


def _shared_batch_norm(y, bns):
    """The training-mode BatchNorm of `y` for several BN modules that see the same input: normalised once, every
    module's running statistics updated as its own forward would update them."""
    out = bns[0](y)
    if len(bns) > 1:
        with torch.no_grad():
            var, mean = torch.var_mean(y, dim=[d for d in range(y.dim()) if d != 1], correction=1)
            for bn in bns[1:]:
                bn.running_mean.lerp_(mean, bn.momentum)
                bn.running_var.lerp_(var, bn.momentum)
                bn.num_batches_tracked.add_(1)
    return out


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
        elif isinstance(first, nn.modules.batchnorm._BatchNorm):
            rm = torch.cat([b.running_mean for b in layers])
            rv = torch.cat([b.running_var for b in layers])
            y = F.batch_norm(y, rm, rv, None, None, True, first.momentum, first.eps)
            with torch.no_grad():
                for b, m, v in zip(layers, rm.chunk(n), rv.chunk(n)):
                    b.running_mean.copy_(m)
                    b.running_var.copy_(v)
                    b.num_batches_tracked.add_(1)
        else:                                                                # depthwise or 1x1 conv, no bias
            conv = F.conv2d if isinstance(first, nn.Conv2d) else F.conv3d
            y = conv(y, torch.cat([c.weight for c in layers]), None, first.stride, first.padding, first.dilation,
                     first.groups * n)
    return list(y.chunk(n, dim=1))


def _weighted_edge(edge, x, op_w, edge_w):
    return edge_w * edge(x, op_w)                                            # Eq. (9): w'_e · mixed op


@contextlib.contextmanager
def _bn_stats_frozen(*modules):
    """While an edge is recomputed in the backward pass, its BatchNorms must not update their running
    statistics a second time: momentum 0 leaves them as the forward pass left them, and their batch counts
    are put back."""
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


def _widths(skip_channels, cell_channels):
    if cell_channels is None:
        return list(skip_channels)                  # SPEC §1: C = skip channels at that level
    if isinstance(cell_channels, int):
        return [cell_channels] * len(skip_channels)
    return list(cell_channels)


class IACSearchSkips(nn.Module):
    """The supernet: one search cell per skip level, α and β shared by all levels.

    Called as `skips(level, skip, up)`; `prepare(features)` is the identity. `checkpoint_edges` (one value, or one
    per level): True keeps only each edge's input and recomputes its ops in the backward pass (torch.utils.checkpoint):
    the same gradients and BatchNorm statistics for several times less activation memory, for a second forward of the
    ops; "cell" also recomputes the whole cell around those edge checkpoints (only its inputs are kept; a third
    forward of the ops); "fine" is "cell" with, in the lean step, one recomputed region per op of each edge instead of
    per op of a node's edges (its grouped convolutions given up there: the smallest recomputation; edge by edge, the
    same as "cell").
    `dims`: 2 or 3 (volumetric cells: 3-D convolutions and pools, the same α, β, genotype and θ0 layout).
    `output`: how each cell's output enters the decoder (CELL_OUTPUTS); `residual` searches from the identity skip.
    `lean`: the step regrouped by source node (Cell._lean_nodes: shared parameter-free ops, grouped convolutions,
    one merge per node), the same math as `lean=False`, edge by edge as Eq. (4) and (9) are written; checkpointed, it
    also recomputes the pre-processing, one op of a node's edges at a time, and keeps no output concatenation."""

    def __init__(self, skip_channels, up_channels, cell_channels=None, pc_k=4, beta_fn="tanh",
                 checkpoint_edges=False, dims=2, output="replace", lean=True):
        super().__init__()
        self.pc_k, self.beta_fn = pc_k, beta_fn
        self.alpha = nn.Parameter(torch.zeros(len(EDGES), len(OPS)))     # constant init (paper)
        self.beta = nn.Parameter(torch.zeros(len(EDGES)))
        self.register_buffer("op_mask", torch.ones(len(EDGES), len(OPS), dtype=torch.bool))
        self.register_buffer("edge_mask", torch.ones(len(EDGES), dtype=torch.bool))
        widths = _widths(skip_channels, cell_channels)
        ckpt = list(checkpoint_edges) if isinstance(checkpoint_edges, (list, tuple)) else \
            [checkpoint_edges] * len(skip_channels)                          # one flag for all levels, or per level
        self.cells = nn.ModuleList([Cell(cs, cu, C, FULL_GENOTYPE_EDGES, True, pc_k, ck, dims, output, lean)
                                    for cs, cu, C, ck in zip(skip_channels, up_channels, widths, ckpt)])

    def arch_parameters(self):
        return [self.alpha, self.beta]

    def weight_parameters(self):
        return list(self.cells.parameters())

    def op_weights(self):
        return op_weights(self.alpha, self.op_mask)                          # Eq. (2)

    def edge_weights(self):
        return edge_weights(self.beta, self.edge_mask, self.beta_fn)        # Eq. (5)-(8)

    def importance(self):
        """I_{e,o} = softmax(α_e)_o · w'_e (SPEC §3; Eq. 13/18); 0 for pruned ops and edges."""
        return self.op_weights() * self.edge_weights()[:, None] * self.edge_mask[:, None]

    def prune_op(self, e, o):
        """Remove op o from edge e in every level: its module, compute and memory are gone."""
        if int(self.op_mask[e].sum()) <= 1:
            raise ValueError(f"edge {e} has one op left; it cannot be pruned")
        self.op_mask[e, o] = False
        for cell in self.cells:
            del cell.edges[str(e)].ops[OPS[o]]

    def prune_edge(self, e):
        self.edge_mask[e] = False
        for cell in self.cells:
            del cell.edges[str(e)]

    def apply_masks(self, op_mask, edge_mask):
        """Rebuild the pruned structure (for resuming) before load_state_dict."""
        for e in range(len(EDGES)):
            if not edge_mask[e] and self.edge_mask[e]:
                self.prune_edge(e)
            elif edge_mask[e]:
                for o in range(len(OPS)):
                    if not op_mask[e, o] and self.op_mask[e, o]:
                        self.prune_op(e, o)
        self.op_mask.copy_(op_mask)

    def prepare(self, features):
        """Called once per network forward: α and β are turned into weights once for all levels."""
        self._weights = (self.op_weights(), self.edge_weights())
        return features

    def forward(self, level, skip, up):
        op_w, edge_w = self._weights if getattr(self, "_weights", None) else (self.op_weights(), self.edge_weights())
        if level == 0:
            self._weights = None                  # the decoder's last level: never reuse stale weights
        return self.cells[level](skip, up, op_w, edge_w)

    @torch.no_grad()
    def derive_genotype(self, edge_rule="w"):
        """Eq. (12): each edge's argmax op; each node keeps its top-2 incoming edges (Sec. 3.4, `edge_rule`)."""
        p, w = self.op_weights(), self.edge_weights()
        keep = top2_incoming(edge_scores(p, w, edge_rule), self.edge_mask)
        return {"ops": list(OPS), "edges": [[OPS[int(p[e].argmax())], *EDGES[e]] for e in keep],
                "concat": list(NODES)}


class IACSkips(nn.Module):
    """The discrete cell of a genotype at full width (affine BN), one per skip level."""

    def __init__(self, genotype, skip_channels, up_channels, cell_channels=None, dims=2, output="replace"):
        super().__init__()
        validate_genotype(genotype)
        edges = {EDGES.index((src, dst)): [op] for op, src, dst in genotype["edges"]}
        self.cells = nn.ModuleList([Cell(cs, cu, C, edges, False, dims=dims, output=output) for cs, cu, C in
                                    zip(skip_channels, up_channels, _widths(skip_channels, cell_channels))])

    def prepare(self, features):
        return features

    def forward(self, level, skip, up):
        return self.cells[level](skip, up)


# --------------------------------------------------------------------------- θ0


def make_theta0(skip_channels, up_channels, cell_channels=None, dims=2):
    """θ0: every candidate op on every edge at full width, freshly initialised (a state dict)."""
    full = nn.ModuleList([Cell(cs, cu, C, FULL_GENOTYPE_EDGES, False, dims=dims) for cs, cu, C in
                          zip(skip_channels, up_channels, _widths(skip_channels, cell_channels))])
    return {f"cells.{k}": v.detach().clone() for k, v in full.state_dict().items()}


@torch.no_grad()
def init_from_theta0(skips, theta0, strict_shapes=False):
    """Load θ0 into a search supernet (partial-channel ops take the leading slices) or into a
    discrete IACSkips (every key must be present at full width). θ0's output conv was drawn for `replace`:
    a residual cell's output conv is set to zero again, so it starts as the identity skip."""
    own = skips.state_dict()
    for k, v in own.items():
        if k in ("alpha", "beta", "op_mask", "edge_mask"):
            continue
        if k not in theta0:
            if isinstance(skips, IACSkips):
                raise KeyError(f"θ0 has no entry {k}: it was saved for another backbone or cell width")
            continue                                   # search-only BN buffers after pools
        src = theta0[k]
        if src.dim() != v.dim() or any(a < b for a, b in zip(src.shape, v.shape)) or \
                (strict_shapes and src.shape != v.shape):
            raise ValueError(f"θ0 entry {k} has shape {tuple(src.shape)}, the cell needs {tuple(v.shape)}")
        v.copy_(src[tuple(slice(0, n) for n in v.shape)])
    for cell in skips.cells:
        if cell.residual:
            zero_output(cell)


# --------------------------------------------------------------------------- genotype files
class GenotypeError(ValueError):
    """A genotype file that cannot be used: the message names the file and what is wrong."""


def validate_genotype(g, source="genotype"):
    """Raise GenotypeError naming what is wrong: unknown ops, bad node indices, nodes without 2 inputs."""
    if not isinstance(g, dict) or "edges" not in g:
        raise GenotypeError(f"{source}: not a genotype (no 'edges' list)")
    counts = {j: 0 for j in NODES}
    seen = set()
    for item in g["edges"]:
        if not (isinstance(item, (list, tuple)) and len(item) == 3):
            raise GenotypeError(f"{source}: edge {item!r} is not [op, src, dst]")
        op, src, dst = item
        if op not in OPS:
            raise GenotypeError(f"{source}: unknown operation {op!r} on edge {src}->{dst}; known: {', '.join(OPS)}")
        if not (isinstance(src, int) and isinstance(dst, int)) or dst not in NODES or not 0 <= src < dst:
            raise GenotypeError(f"{source}: bad node indices {src}->{dst}; nodes are 0-1 (inputs) and 2-5, src < dst")
        if (src, dst) in seen:
            raise GenotypeError(f"{source}: edge {src}->{dst} appears twice")
        seen.add((src, dst))
        counts[dst] += 1
    bad = {j: n for j, n in counts.items() if n != 2}
    if bad:
        raise GenotypeError(f"{source}: every node needs exactly 2 inputs; "
                            + ", ".join(f"node {j} has {n}" for j, n in bad.items()))
    if list(g.get("concat", NODES)) != list(NODES):
        raise GenotypeError(f"{source}: concat must be {list(NODES)}")


def write_genotype(path, genotype, search_info):
    validate_genotype(genotype)
    g = {"ops": list(OPS), "edges": genotype["edges"], "concat": list(NODES), "search": search_info}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(g, f, indent=2)
    os.replace(tmp, path)


def read_genotype(path):
    try:
        with open(path) as f:
            g = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise GenotypeError(f"{path}: cannot read genotype ({e})") from e
    validate_genotype(g, source=path)
    return g
