"""IAC-LTH: operation importance, the per-edge JS stability test and pruning (paper Sec. 5.2-5.5).

This file imports only torch: copy it with common/iac.py into your own project (examples/monai_basicunet.py
does, with MONAI's BasicUNet; examples/smp_unet.py with segmentation_models_pytorch's Unet). Small pure
functions, `LTHState` (which goes into the search checkpoint) and `end_of_epoch`, the whole test of one epoch
on an `iac.IACSearchSkips`.

    I_{e,o}   = softmax(α_e)_o · w'_e                              Eq. (13)/(18), docs/method.md §3
    p_{e,o}   = I_{e,o} / (Σ_o' I_{e,o'} + ε)   (uniform if Σ = 0)  Eq. (19)
    JS(p, q)  = ½ KL(p‖m) + ½ KL(q‖m), m = ½(p + q)                Eq. (20)
    τ0        = κ · median_e JS_e (lower median, over the edges with > 1 op) at the calibration test, which
                prunes nothing: the first test with a previous p and a median > 0 (self-calibrated, below)
    stable    : JS_e(t) < τ_e, else τ_e ← γ τ_e                     Sec. 5.3
    prune     : I < μ − kσ over the edge's active ops, else the lowest one;
                never the last op                                  Eq. (21), Sec. 5.4
    stop      : every edge has one op -> keep the top-2 incoming edges per node   Sec. 5.5

The search loop in your own U-Net (single level: one forward and backward, both optimizers step):

    import iac, lth
    skips = iac.IACSearchSkips(skip_channels, up_channels)   # level 0 = the finest skip the decoder has
    theta0 = iac.make_theta0(skip_channels, up_channels)   # θ0: saved before any update, for stage III
    iac.init_from_theta0(skips, theta0)
    state = lth.LTHState(len(iac.EDGES), tau0_rel=0.2)      # κ = 0.2, γ = 1.1, k = 1, JS over common ops
    a_opt = torch.optim.Adam(skips.arch_parameters(), 1e-3, betas=(0.5, 0.999), weight_decay=1e-3)
    w_opt = torch.optim.SGD(skips.weight_parameters(), 0.01)
    for epoch in range(epochs):
        unet.eval(); skips.train()                           # frozen backbone, cells in train mode
        for x, y in loader:
            loss = loss_fn(net(x), y); w_opt.zero_grad(); a_opt.zero_grad(); loss.backward()
            w_opt.step()
            if epoch >= warmup:
                a_opt.step()                                 # α, β fixed during the warm-up
        info = lth.end_of_epoch(skips, state, epoch, warmup)
        if info["pruned"]:
            w_opt = torch.optim.SGD(skips.weight_parameters(), 0.01)   # rebuild: drop the pruned weights
        if info["stopped"]:
            break
    genotype = skips.derive_genotype()                       # each node's top-2 incoming edges

Contracts a copier must know:
- Levels: `skips(level, skip, up)` with level 0 the finest skip the decoder has, whatever its resolution (full in
  MONAI's BasicUNet; H/2 in smp's Unet, whose last, full-resolution block has no skip), and the coarsest last.
  `skip_channels[level]` is the channel count of the encoder skip tensor, and `up_channels[level]` that of the
  decoder tensor the cell gets beside it, *after* up-sampling to the skip's size (up-sampling happens before
  the cell): where it halves the channels (a transposed conv from 2C to C, as in MONAI's UpCat), the halved
  count. Split the concatenation in your decoder's order (MONAI cat([skip, up]), smp cat([up, skip])) and hand
  the cell (skip, up); iac.probe_levels reads the channels and the order from one dry forward. The cell
  returns the skip's channels.
- A prune deletes the op's module (`IACSearchSkips.prune_op`): an optimizer built before it still holds the
  removed parameters and keeps stepping them. Build the weight optimizer again after every epoch that
  pruned (`info["pruned"]` not empty); SGD without momentum loses nothing by it. α and β stay (Adam's state
  is kept).
- Modes: the backbone stays in eval mode with no gradients; the cells train. If the cells are a submodule of
  the backbone, `unet.eval()` also puts them in eval mode (their BatchNorm then uses running statistics):
  call `skips.train()` after it.
- The test runs on the CPU in float64 whatever device the cells are on; `LTHState.state_dict()` is what a
  checkpoint needs to resume the test exactly.

When τ0 is set (`tau0_rel`): at the first test that has a previous distribution and a positive median JS over
the edges with more than one op; that test prunes nothing. The first test only records p. While the median is
0 (α has not moved: lr_arch 0, say) τ0 stays None, nothing is pruned and the next test tries again. The test
of the last warm-up epoch records p, so the first epoch after warm-up calibrates; with a warm-up of 0 the test
of epoch 0 records p (α has moved already, but there is nothing to compare with) and that of epoch 1
calibrates.

Why τ0 calibrates itself: p_e is softmax(α_e) over the active ops (w'_e cancels), and for small
moves JS_e ≈ ⅛·Var_p(Δα_e). Adam moves α by about its lr per step, so the per-epoch JS scales
with the square of the optimizer steps per epoch: ~1e-6 on a phantom, ~1e-2 on BraTS. An absolute
τ0 is either passed by every edge at once (pruning on a timer) or by none for a long time,
depending on the data set's size. τ0 = κ · median JS of the first test is the same rule on
every data set; `--tau0` stays as an absolute override.

JS support: `common` (default) compares p_t and p_{t−1} renormalised over the ops active in
both epochs, so that a prune is not read as instability; `all` compares the whole 7-vectors
(a pruned op's probability mass moving to the others counts as change).
"""
import torch

JS_SUPPORTS = ("common", "all")


def importance_distribution(I, eps=1e-8):
    """Eq. (19), row-wise over the last dim; rows summing to 0 become uniform."""
    s = I.sum(dim=-1, keepdim=True)
    p = I / (s + eps)
    return torch.where(s > 0, p, torch.full_like(I, 1.0 / I.shape[-1]))


def js_divergence(p, q, eps=1e-8, support=None):
    """Eq. (20), natural log, on ε-smoothed and renormalised distributions (row-wise).

    `support` (bool, same shape): compare only these entries, both rows renormalised over them."""
    if support is None:
        support = torch.ones_like(p, dtype=torch.bool)
    p = torch.where(support, p + eps, torch.zeros_like(p))
    q = torch.where(support, q + eps, torch.zeros_like(q))
    p, q = p / p.sum(dim=-1, keepdim=True), q / q.sum(dim=-1, keepdim=True)
    m = 0.5 * (p + q)
    kl_pm = torch.where(support, p * (p / m).log(), torch.zeros_like(p))
    kl_qm = torch.where(support, q * (q / m).log(), torch.zeros_like(q))
    return 0.5 * kl_pm.sum(-1) + 0.5 * kl_qm.sum(-1)


def ops_to_prune(I_e, active_e, k_std):
    """Eq. (21) on one edge: outliers below μ − kσ, else the single lowest; never all of them."""
    act = [o for o in range(len(active_e)) if bool(active_e[o])]
    if len(act) <= 1:
        return []
    v = torch.stack([I_e[o] for o in act]).double()
    mu, sigma = v.mean(), v.std(unbiased=False)
    out = [o for o, x in zip(act, v) if x < mu - k_std * sigma]               # outlier pruning
    if not out:
        out = [act[int(v.argmin())]]                                          # fallback pruning
    if len(out) == len(act):                                                  # keep-one
        keep = act[int(v.argmax())]
        out = [o for o in out if o != keep]
    return sorted(out)


def all_edges_single(op_mask, edge_mask=None):
    """The stop rule (Sec. 5.5): every (active) edge has exactly one op left."""
    counts = op_mask.sum(dim=1)
    if edge_mask is not None:
        counts = counts[edge_mask]
    return bool((counts == 1).all())


class LTHState:
    """Per-edge thresholds τ and the previous epoch's distributions; checkpointable.

    Give either `tau0` (absolute) or `tau0_rel` (κ: τ0 = κ · median JS over the multi-op edges at the first
    test that has a previous p and a median > 0; that test prunes nothing, and while the median is 0 every
    test only tries again). `tau0` and `tau` are None until the threshold is set."""

    def __init__(self, n_edges, tau0=None, tau0_rel=None, gamma=1.1, k_std=1.0, eps=1e-8, js_support="common"):
        if (tau0 is None) == (tau0_rel is None):
            raise ValueError("give exactly one of tau0 (absolute) and tau0_rel (κ, self-calibrating)")
        if js_support not in JS_SUPPORTS:
            raise ValueError(f"js_support must be one of {JS_SUPPORTS}, not {js_support!r}")
        self.n_edges, self.tau0_rel, self.gamma, self.k_std, self.eps = n_edges, tau0_rel, gamma, k_std, eps
        self.js_support = js_support
        self.tau0 = None if tau0 is None else float(tau0)
        self.tau = None if tau0 is None else torch.full((n_edges,), self.tau0, dtype=torch.float64)
        self.prev, self.prev_mask = None, None

    def settings(self):
        """What decides the test, for genotype.json and trajectory.jsonl (τ0: the value in force)."""
        return {"tau0_rel": self.tau0_rel, "tau0": self.tau0, "gamma": self.gamma, "k_std": self.k_std,
                "eps": self.eps, "js_support": self.js_support}

    def step(self, I, op_mask):
        """One end-of-epoch test. Returns (js (E,) or None, τ used (E,) or None, [(edge, op), ...] to prune)."""
        I = I.detach().double().cpu()
        op_mask = op_mask.cpu()
        p = importance_distribution(I, self.eps)                              # Eq. (19)
        prev, prev_mask = self.prev, self.prev_mask
        self.prev, self.prev_mask = p, op_mask.clone()
        if prev is None:
            return None, self.tau, []
        support = (prev_mask & op_mask) if self.js_support == "common" else None
        js = js_divergence(prev, p, self.eps, support)                         # Eq. (20)
        multi = op_mask.sum(dim=1) > 1
        if self.tau is None:                                                  # calibration test: no pruning
            med = float(js[multi].median()) if bool(multi.any()) else 0.0
            if med > 0:                                                       # (α has moved)
                self.tau0 = self.tau0_rel * med
                self.tau = torch.full((self.n_edges,), self.tau0, dtype=torch.float64)
            return js, None, []
        tau_used = self.tau.clone()
        prune = []
        for e in range(I.shape[0]):
            if not multi[e]:
                continue
            if js[e] < self.tau[e]:                                           # stable edge
                prune += [(e, o) for o in ops_to_prune(I[e], op_mask[e], self.k_std)]   # Eq. (21)
            else:
                self.tau[e] *= self.gamma                                     # τ_e ← γ τ_e
        return js, tau_used, prune

    def state_dict(self):
        return {"tau": self.tau, "tau0": self.tau0, "prev": self.prev, "prev_mask": self.prev_mask,
                "settings": self.settings()}

    def load_state_dict(self, d):
        mine, theirs = self.settings(), d["settings"]
        if self.tau0_rel is not None:
            mine["tau0"] = theirs["tau0"]                                     # calibrated, not a setting
        if mine != theirs:
            raise ValueError(f"the checkpoint's LTH settings {theirs} differ from these {mine}")
        clone = (lambda t: None if t is None else t.cpu().clone())          # the test runs on the CPU
        self.tau, self.tau0, self.prev, self.prev_mask = clone(d["tau"]), d["tau0"], clone(d["prev"]), \
            clone(d["prev_mask"])


@torch.no_grad()
def end_of_epoch(skips, state, epoch, warmup):
    """The LTH test after search epoch `epoch` (0-based) of a search whose first `warmup` epochs train only the
    cell weights: importance (Eq. 13/18), the JS test (Eq. 20) and pruning (Eq. 21) on `skips` (an
    iac.IACSearchSkips, or anything with `importance()`, an `op_mask` buffer (E, O) and `prune_op(e, o)`).

    The test starts at the last warm-up epoch (it only records p there: α, β have not moved yet), or at epoch 0
    with `warmup=0`; the next test calibrates τ0 when `state` is self-calibrating (if the median JS is > 0, else
    a later one: LTHState) and prunes nothing.
    Returns {"importance": I (E, O), "js": (E,) or None, "tau": τ used (E,) or None, "pruned": [(e, o), ...],
    "stopped": every edge has one op}. After a prune, rebuild the weight optimizer (module docstring)."""
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more epochs, not {warmup}")
    I = skips.importance()
    js, tau, pruned = None, state.tau, []
    if epoch >= warmup - 1:
        js, tau, pruned = state.step(I, skips.op_mask)                       # Eq. (19)-(21)
        for e, o in pruned:
            skips.prune_op(e, o)                                             # the op's module is removed
    return {"importance": I, "js": js, "tau": tau, "pruned": pruned, "stopped": all_edges_single(skips.op_mask)}
