"""Implantable Adaptive Cells (IAC): the searchable skip cell of the paper, its genotype and θ0. Imports only torch:
copy this file (and common/lth.py for the LTH search) into any project. A cell replaces one U-Net skip connection:
from the encoder skip x0 and the decoder tensor x1 (up-sampled to the skip's size) it returns a tensor of the skip's
shape, so a frozen decoder is unchanged (Sec. 3.1-3.2, Eq. 1). Nodes 0 (skip), 1 (up) and 2..5; 14 edges i -> j
(i < j); 7 ops per edge (no `none`). One genotype for all levels, each level with its own weights; α, β shared.

    skips = IACSearchSkips(skip_channels=[32, 64, 128], up_channels=[32, 64, 128])
    # in the decoder, at each level:  s = skips(level, enc_feat, upsampled);  x = block(cat([s, upsampled]))
    arch_opt = torch.optim.Adam(skips.arch_parameters(), 1e-3, betas=(0.5, 0.999), weight_decay=1e-3)
    w_opt = torch.optim.SGD(skips.weight_parameters(), 0.01)      # build it again after every prune
    genotype = skips.derive_genotype()                             # Eq. (12) + top-2 edges per node
    final = IACSkips(genotype, [32, 64, 128], [32, 64, 128])      # full width, affine BN

Contracts (examples/monai_basicunet.py follows them in MONAI's BasicUNet, examples/smp_unet.py in smp's Unet):
- Level 0 is the finest skip the decoder HAS, whatever its resolution (full in BasicUNet, H/2 in smp's Unet, whose
  last block has no skip), the last level the coarsest. `skip_channels[l]`: channels of the encoder tensor at level
  l; `up_channels[l]`: channels of the decoder tensor handed to the cell there, after up-sampling (halved, if the
  up-sampling halves them). Up-sampling happens before the cell: up has the skip's spatial size (else ValueError).
- Order: split the concatenation in your decoder's order (BasicUNet cat([skip, up]), smp cat([up, skip])), hand
  the cell (skip, up) and put its output in the skip's place. A swap is a ValueError where the channels differ; where
  they are equal only `probe_levels` (one dry forward, optional) tells which end is the encoder's tensor.
- `prepare(x)`: this project's hook over the encoder features (its UNet++ skips rewrite them there). The cells return
  x unchanged; a search supernet also computes α, β's weights once for the levels that follow (without it each level
  computes them: the same values). A copier does not need it; if used, call it at the start of every forward.
- `prune_op` / `prune_edge` delete modules: build the weight optimizer again over `weight_parameters()`.
- `unet.eval()` (to freeze a backbone) puts the cells in eval mode too: call `skips.train()` while they learn.
- `output="residual"` (our option; `replace` is the paper's): skip + the output conv, started at zero (again after
  θ0). `dims=3`: volumetric cells, with the same genotype JSON and θ0 layout.
- `write_genotype(path, genotype, search_info)`: search_info, any JSON dict, is the file's "search" block (below).
This is the reference step, edge by edge as Eq. (4) and (9) read; common/lean_cell.py regroups and recomputes the same
mathematics for memory, pinned to this file by tests/test_lean_cell.py.
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

OPS = ("skip_connect", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
       "dil_conv_5x5")
N_INPUTS = 2
NODES = (2, 3, 4, 5)
EDGES = tuple((i, j) for j in NODES for i in range(j))          # 14 edges: (0,2), (1,2), (0,3), ...
IN_EDGES = {j: [e for e, (i, jj) in enumerate(EDGES) if jj == j] for j in NODES}
FULL_GENOTYPE_EDGES = {e: OPS for e in range(len(EDGES))}         # every op on every edge (supernet, θ0)
CELL_OUTPUTS = ("replace", "residual")                            # paper Eq. (1) / skip + Eq. (1), see above


# --------------------------------------------------------------------------- operations
# `dims`: 2 (the paper's 2-D U-Nets) or 3 (volumetric U-Nets, e.g. nnU-Net 3d_fullres); the op names keep
# their 2-D spelling (a "3x3" op is 3x3x3 in 3-D), so a genotype is the same JSON in both.
CONV = {2: nn.Conv2d, 3: nn.Conv3d}
BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {"max_pool_3x3": {2: nn.MaxPool2d, 3: nn.MaxPool3d}, "avg_pool_3x3": {2: nn.AvgPool2d, 3: nn.AvgPool3d}}


class SepConv(nn.Sequential):
    """(ReLU -> depthwise k x k -> 1x1 -> BN) twice (PC-DARTS)."""

    def __init__(self, C, k, affine, dims=2):
        p, Conv, Norm = k // 2, CONV[dims], BN[dims]
        super().__init__(nn.ReLU(), Conv(C, C, k, padding=p, groups=C, bias=False),
                         Conv(C, C, 1, bias=False), Norm(C, affine=affine),
                         nn.ReLU(), Conv(C, C, k, padding=p, groups=C, bias=False),
                         Conv(C, C, 1, bias=False), Norm(C, affine=affine))


class DilConv(nn.Sequential):
    """ReLU -> depthwise k x k, dilation 2 -> 1x1 -> BN (PC-DARTS)."""

    def __init__(self, C, k, affine, dims=2):
        super().__init__(nn.ReLU(), CONV[dims](C, C, k, padding=k - 1, dilation=2, groups=C, bias=False),
                         CONV[dims](C, C, 1, bias=False), BN[dims](C, affine=affine))


def make_op(name, C, search, dims=2):
    """One candidate op at width C; search ops have non-affine BN, pools get a BN in search."""
    if name == "skip_connect":
        return nn.Identity()
    if name in POOL:
        pool = POOL[name][dims](3, 1, 1, **({"count_include_pad": False} if name == "avg_pool_3x3" else {}))
        return nn.Sequential(pool, BN[dims](C, affine=False)) if search else pool
    if name in ("sep_conv_3x3", "sep_conv_5x5"):
        return SepConv(C, int(name[-1]), not search, dims)
    if name in ("dil_conv_3x3", "dil_conv_5x5"):
        return DilConv(C, int(name[-1]), not search, dims)
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
    """What ranks a node's incoming edges: `w` = w'_e (Sec. 3.4, Eq. 6-8, the default) or `max_importance` =
    max_o softmax(α_e)_o · w'_e (PC-DARTS)."""
    if rule not in EDGE_RULES:
        raise ValueError(f"unknown edge rule {rule!r}; known: {', '.join(EDGE_RULES)}")
    return edge_w if rule == "w" else (op_w * edge_w[..., None]).max(dim=-1).values


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
        out = sum(weights[OPS.index(o)] * op(xa) for o, op in self.ops.items())     # Eq. (3), softmax weights
        return channel_shuffle(torch.cat([out, xb], dim=1), self.k) if self.k > 1 else out


class Cell(nn.Module):
    """One IAC at one skip level. `edges` maps edge index -> op names on that edge."""

    def __init__(self, c_skip, c_up, C, edges, search, pc_k=4, dims=2, output="replace"):
        super().__init__()
        if output not in CELL_OUTPUTS:
            raise ValueError(f"unknown cell output {output!r}; known: {', '.join(CELL_OUTPUTS)}")
        if search and C % pc_k:
            raise ValueError(f"cell width {C} is not divisible by the partial-channel K={pc_k}")
        affine, Conv, Norm = not search, CONV[dims], BN[dims]
        self.search, self.k, self.c_skip, self.c_up = search, pc_k, c_skip, c_up
        self.pre0 = nn.Sequential(nn.ReLU(), Conv(c_skip, C, 1, bias=False), Norm(C, affine=affine))   # x0
        self.pre1 = nn.Sequential(nn.ReLU(), Conv(c_up, C, 1, bias=False), Norm(C, affine=affine))     # x1
        self.edges = nn.ModuleDict({str(e): Edge(C, ops, search, pc_k, dims) for e, ops in sorted(edges.items())})
        self.out = Conv(len(NODES) * C, c_skip, 1)                           # Eq. (1)
        self.residual = output == "residual"
        if self.residual:                                                    # starts as the identity skip
            zero_output(self)

    def forward(self, skip, up, op_w=None, edge_w=None):
        states = [self.pre0(skip), self.pre1(up)]                            # x0, x1: (B, C, *spatial)
        for j in NODES:
            terms = [self.edge_term(e, states[EDGES[e][0]], op_w, edge_w) for e in IN_EDGES[j] if str(e) in self.edges]
            states.append(sum(terms))                                      # Eq. (9): x_j = Σ_i w'_ij · ō_ij(x_i)
        return self.output(skip, states)

    def edge_term(self, e, x, op_w, edge_w):
        if not self.search:
            return self.edges[str(e)](x)
        return edge_w[e] * self.edges[str(e)](x, op_w[e])                   # Eq. (9): w'_e · mixed op (Eq. 4)

    def output(self, skip, states):
        out = self.out(torch.cat(states[N_INPUTS:], dim=1))                # Eq. (1): (B, C_skip, *spatial)
        return skip + out if self.residual else out

    def check_inputs(self, level, skip, up):
        """The contract above, with an error a copier can act on."""
        if skip.shape[2:] != up.shape[2:]:
            raise ValueError(f"IAC level {level}: skip {tuple(skip.shape)} and up {tuple(up.shape)} differ in size; "
                             "up-sample the decoder tensor to the skip's size before the cell")
        if (skip.shape[1], up.shape[1]) != (self.c_skip, self.c_up):
            swapped = (up.shape[1], skip.shape[1]) == (self.c_skip, self.c_up)
            raise ValueError(f"IAC level {level}: skip / up have {skip.shape[1]} / {up.shape[1]} channels, the cell "
                             f"was built for {self.c_skip} / {self.c_up} " + ("(skip and up may be swapped: split "
                             "your decoder's concatenation in its order; probe_levels tells)" if swapped else
                             "(level 0 is the finest skip)"))


@torch.no_grad()
def zero_output(cell):
    """A residual cell's output conv at zero: the cell returns its skip tensor until it has learnt otherwise."""
    cell.out.weight.zero_()
    cell.out.bias.zero_()


def _widths(skip_channels, cell_channels):
    """Cell width C per level: the skip's channels (docs/method.md §1), else one int or one width per level."""
    if cell_channels is None:
        return list(skip_channels)
    return [cell_channels] * len(skip_channels) if isinstance(cell_channels, int) else list(cell_channels)


class IACSearchSkips(nn.Module):
    """The supernet: one search cell per skip level, α and β shared by all levels. Called as `skips(level, skip, up)`;
    `prepare(features)` (the identity) turns α, β into weights once per network forward. `make_cell`: the Cell class
    (or a factory with its signature) each level is built with."""

    def __init__(self, skip_channels, up_channels, cell_channels=None, pc_k=4, beta_fn="tanh", dims=2,
                 output="replace", make_cell=Cell):
        super().__init__()
        self.pc_k, self.beta_fn = pc_k, beta_fn
        self.alpha = nn.Parameter(torch.zeros(len(EDGES), len(OPS)))     # constant init (paper)
        self.beta = nn.Parameter(torch.zeros(len(EDGES)))
        self.register_buffer("op_mask", torch.ones(len(EDGES), len(OPS), dtype=torch.bool))
        self.register_buffer("edge_mask", torch.ones(len(EDGES), dtype=torch.bool))
        self.cells = nn.ModuleList([make_cell(cs, cu, C, FULL_GENOTYPE_EDGES, True, pc_k, dims, output) for cs, cu, C
                                    in zip(skip_channels, up_channels, _widths(skip_channels, cell_channels))])

    def arch_parameters(self):
        return [self.alpha, self.beta]

    def weight_parameters(self):
        return list(self.cells.parameters())

    def op_weights(self):
        return op_weights(self.alpha, self.op_mask)                          # Eq. (2)

    def edge_weights(self):
        return edge_weights(self.beta, self.edge_mask, self.beta_fn)        # Eq. (5)-(8)

    def importance(self):
        """I_{e,o} = softmax(α_e)_o · w'_e (docs/method.md §3; Eq. 13/18); 0 for pruned ops and edges."""
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

    def prepare(self, features):
        self._weights = (self.op_weights(), self.edge_weights())
        return features

    def forward(self, level, skip, up):
        op_w, edge_w = self._weights if getattr(self, "_weights", None) else (self.op_weights(), self.edge_weights())
        if level == 0:
            self._weights = None                  # the last level a decoder calls: no stale weights
        self.cells[level].check_inputs(level, skip, up)
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
        self.cells[level].check_inputs(level, skip, up)
        return self.cells[level](skip, up)


# --------------------------------------------------------------------------- a copier's U-Net
@torch.no_grad()
def probe_levels(model, x, points, encoder):
    """Optional: what each skip level of a built U-Net concatenates, from one dry forward of `model` on `x` (in eval
    mode: no statistics change). `points[l]`: the module whose input is level l's concatenation of the encoder skip
    and the up-sampled decoder tensor, level 0 (the finest) first; `encoder`: the module(s) whose outputs hold the
    skip tensors (a tensor, list or tuple each). The skip is the end of the concatenation equal to an encoder output,
    so a split in the wrong order shows even where skip and up have the same channels; probe before the cells go in.
    Returns, level 0 first, {"skip": C_skip, "up": C_up, "size": spatial size, "skip_first": cat([skip, up])}."""
    cats, feats = {}, []
    hooks = [p.register_forward_pre_hook(lambda m, a, l=l: cats.setdefault(l, a[0])) for l, p in enumerate(points)]
    hooks += [e.register_forward_hook(lambda m, a, out: feats.extend(out if isinstance(out, (list, tuple)) else [out]))
              for e in (encoder if isinstance(encoder, (list, tuple)) else [encoder])]
    training = model.training
    try:
        model.eval()(x)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    levels = []
    for l in range(len(points)):
        if l not in cats:
            raise ValueError(f"IAC level {l}: points[{l}] was not called in a forward of the model")
        t = cats[l]                                                          # (B, C_skip + C_up, *spatial)
        ends = {(f.shape[1], first) for f in feats for first in (True, False) if f.shape[1] < t.shape[1] and
                (f.shape[0], *f.shape[2:]) == (t.shape[0], *t.shape[2:]) and
                torch.equal(f, t[:, :f.shape[1]] if first else t[:, t.shape[1] - f.shape[1]:])}
        if len(ends) != 1:
            raise ValueError(f"IAC level {l}: {'no' if not ends else 'more than one'} end of the concatenation "
                             f"{tuple(t.shape)} is an encoder output; does points[{l}] take cat(skip, up)?")
        (c, first), = ends
        levels.append({"skip": c, "up": t.shape[1] - c, "size": tuple(t.shape[2:]), "skip_first": first})
        if l and any(a > b for a, b in zip(levels[l]["size"], levels[l - 1]["size"])):
            raise ValueError(f"IAC level {l} is finer than level {l - 1}: give the points finest first")
    return levels


# --------------------------------------------------------------------------- θ0
def make_theta0(skip_channels, up_channels, cell_channels=None, dims=2):
    """θ0: every candidate op on every edge at full width, freshly initialised (a state dict)."""
    full = nn.ModuleList([Cell(cs, cu, C, FULL_GENOTYPE_EDGES, False, dims=dims) for cs, cu, C in
                          zip(skip_channels, up_channels, _widths(skip_channels, cell_channels))])
    return {f"cells.{k}": v.detach().clone() for k, v in full.state_dict().items()}


@torch.no_grad()
def init_from_theta0(skips, theta0, strict_shapes=False):
    """Load θ0 into a search supernet (partial-channel ops take the leading slices) or into a discrete IACSkips (every
    key must be present at full width). A residual cell's output conv is set to zero again (the identity skip)."""
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
    pairs = []
    for item in g["edges"]:
        if not (isinstance(item, (list, tuple)) and len(item) == 3):
            raise GenotypeError(f"{source}: edge {item!r} is not [op, src, dst]")
        op, src, dst = item
        if op not in OPS:
            raise GenotypeError(f"{source}: unknown operation {op!r} on edge {src}->{dst}; known: {', '.join(OPS)}")
        if not (isinstance(src, int) and isinstance(dst, int)) or dst not in NODES or not 0 <= src < dst:
            raise GenotypeError(f"{source}: bad node indices {src}->{dst}; nodes are 0-1 (inputs) and 2-5, src < dst")
        if (src, dst) in pairs:
            raise GenotypeError(f"{source}: edge {src}->{dst} appears twice")
        pairs.append((src, dst))
    bad = {j: n for j in NODES if (n := sum(d == j for _, d in pairs)) != 2}
    if bad:
        raise GenotypeError(f"{source}: every node needs exactly 2 inputs; "
                            + ", ".join(f"node {j} has {n}" for j, n in bad.items()))
    if list(g.get("concat", NODES)) != list(NODES):
        raise GenotypeError(f"{source}: concat must be {list(NODES)}")


def write_genotype(path, genotype, search_info):
    """The genotype as JSON with `search_info` (any JSON dict) as its "search" block, written to a temporary name and
    renamed. read_genotype and validate_genotype ignore that block; this project's scripts write and read "mode"
    ("lth": 04_finetune resets the cell to θ0 by default), "geometry" {"skip_channels", "up_channels", "cell_channels"}
    (04 and the nnU-Net trainer refuse a backbone with other channels), "epochs_run", "epochs_cap", "stopped_early",
    "seconds", "lth" (LTHState.settings(), τ0 included), "settings" (the search flags; 05 reads "edge_rule", else
    "max_importance", and "cell_output"), "dataset", "encoder", "seed" (05's search tables, which also need
    trajectory.jsonl beside the file), "backbone" and "backbone_sha256" (the searched backbone's path and weights
    hash: 04 and the nnU-Net cell trainers train the cell in that backbone and refuse another). All optional here;
    the examples write mode, geometry and epochs_run to lth."""
    validate_genotype(genotype)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"ops": list(OPS), "edges": genotype["edges"], "concat": list(NODES), "search": search_info}, f,
                  indent=2)
    os.replace(tmp, path)


def read_genotype(path):
    try:
        with open(path) as f:
            g = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise GenotypeError(f"{path}: cannot read genotype ({e})") from e
    validate_genotype(g, source=path)
    return g
