"""IAC-LTH: operation importance, the per-edge JS stability test and pruning (paper Sec. 5.2-5.5).

Small pure functions plus `LTHState`, which goes into the search checkpoint.

    I_{e,o}   = softmax(α_e)_o · w'_e                              Eq. (13)/(18), SPEC §3
    p_{e,o}   = I_{e,o} / (Σ_o' I_{e,o'} + ε)   (uniform if Σ = 0)  Eq. (19)
    JS(p, q)  = ½ KL(p‖m) + ½ KL(q‖m), m = ½(p + q)                Eq. (20)
    stable    : JS_e(t) < τ_e, else τ_e ← γ τ_e                     Sec. 5.3
    prune     : I < μ − kσ over the edge's active ops, else the lowest one;
                never the last op                                  Eq. (21), Sec. 5.4
    stop      : every edge has one op -> keep the top-2 incoming edges per node   Sec. 5.5
"""
import torch


def importance_distribution(I, eps=1e-8):
    """Eq. (19), row-wise over the last dim; rows summing to 0 become uniform."""
    s = I.sum(dim=-1, keepdim=True)
    p = I / (s + eps)
    return torch.where(s > 0, p, torch.full_like(I, 1.0 / I.shape[-1]))


def js_divergence(p, q, eps=1e-8):
    """Eq. (20), natural log, on ε-smoothed and renormalised distributions (row-wise)."""
    p = (p + eps) / (p + eps).sum(dim=-1, keepdim=True)
    q = (q + eps) / (q + eps).sum(dim=-1, keepdim=True)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


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
    counts = op_mask.sum(dim=1)
    if edge_mask is not None:
        counts = counts[edge_mask]
    return bool((counts == 1).all())


class LTHState:
    """Per-edge thresholds τ and the previous epoch's distributions; checkpointable."""

    def __init__(self, n_edges, tau0=1e-3, gamma=1.1, k_std=1.0, eps=1e-8):
        self.tau = torch.full((n_edges,), float(tau0), dtype=torch.float64)
        self.gamma, self.k_std, self.eps = gamma, k_std, eps
        self.prev = None

    def step(self, I, op_mask):
        """One end-of-epoch test. Returns (js (E,) or None, tau used (E,), [(edge, op), ...] to prune)."""
        I = I.detach().double().cpu()
        op_mask = op_mask.cpu()
        p = importance_distribution(I, self.eps)
        tau_used = self.tau.clone()
        if self.prev is None:
            self.prev = p
            return None, tau_used, []
        js = js_divergence(self.prev, p, self.eps)                            # Eq. (20)
        prune = []
        for e in range(I.shape[0]):
            if int(op_mask[e].sum()) <= 1:
                continue
            if js[e] < self.tau[e]:                                           # stable edge
                prune += [(e, o) for o in ops_to_prune(I[e], op_mask[e], self.k_std)]
            else:
                self.tau[e] *= self.gamma                                     # τ_e ← γ τ_e
        self.prev = p
        return js, tau_used, prune

    def state_dict(self):
        return {"tau": self.tau, "prev": self.prev, "gamma": self.gamma, "k_std": self.k_std, "eps": self.eps}

    def load_state_dict(self, d):
        self.tau, self.prev = d["tau"].clone(), None if d["prev"] is None else d["prev"].clone()
        self.gamma, self.k_std, self.eps = d["gamma"], d["k_std"], d["eps"]
