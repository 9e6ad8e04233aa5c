"""Paired statistics (paper Sec. 6.4) and search-dynamics analysis (Sec. 4), as pure functions.

Statistics come from scipy.stats (bootstrap, wilcoxon, permutation_test, combine_pvalues); what scipy does not have is
written in numpy: the two-way bootstrap over seeds and patients, and Holm's adjustment.
Trajectories are the lists of dicts in trajectory.jsonl.
"""
import numpy as np
import torch
from scipy import stats

from common.iac import EDGES, NODES, OPS, edge_scores, op_weights, top2_incoming


# --------------------------------------------------------------------------- statistics
def paired_comparison(ref, other, n_resamples=9999, seed=0, alternative="two-sided"):
    """ΔDice = other − ref per case: mean, 95% paired bootstrap CI, Wilcoxon signed-rank p (`alternative`:
    two-sided, or greater when the claim is a gain of `other`)."""
    ref, other = np.asarray(ref, float), np.asarray(other, float)
    ok = ~(np.isnan(ref) | np.isnan(other))
    d = other[ok] - ref[ok]
    out = {"n": int(ok.sum()), "mean_delta": float(d.mean()) if d.size else float("nan"),
           "ci_low": float("nan"), "ci_high": float("nan"), "wilcoxon_p": float("nan")}
    if d.size >= 2 and np.ptp(d) > 0:
        ci = stats.bootstrap((ref[ok], other[ok]), lambda a, b, axis=-1: np.mean(b - a, axis=axis), paired=True,
                             n_resamples=n_resamples, confidence_level=0.95, method="percentile",
                             rng=np.random.default_rng(seed)).confidence_interval
        out["ci_low"], out["ci_high"] = float(ci.low), float(ci.high)
    out["wilcoxon_p"] = wilcoxon_p(d, alternative)
    return out


def wilcoxon_p(d, alternative="two-sided"):
    """Wilcoxon signed-rank p of the paired differences `d` (scipy.stats.wilcoxon); 1 where every one is 0, NaN
    where there is none."""
    d = np.asarray(d, float)
    if d.size == 0:
        return float("nan")
    return float(stats.wilcoxon(d, alternative=alternative).pvalue) if np.any(d != 0) else 1.0


def backbone_mean(deltas, n_resamples=9999, seed=0):
    """Table 1's mean ΔDice over backbones. `deltas` (n_backbones, n_cases): per backbone, the same test
    cases. 95% CI by a paired bootstrap over patients (a resampled case keeps its ΔDice on every backbone,
    so the dependence between backbones on one patient is kept)."""
    d = np.asarray(deltas, float)
    d = d[:, ~np.isnan(d).any(0)]
    out = {"n": int(d.shape[1]), "mean_delta": float(d.mean()) if d.size else float("nan"),
           "ci_low": float("nan"), "ci_high": float("nan")}
    if d.shape[1] >= 2 and np.ptp(d) > 0:
        ci = stats.bootstrap((d,), lambda x, axis: x.mean(axis=axis).mean(axis=0), axis=-1, n_resamples=n_resamples,
                             confidence_level=0.95, method="percentile",
                             rng=np.random.default_rng(seed)).confidence_interval
        out["ci_low"], out["ci_high"] = float(ci.low), float(ci.high)
    return out


def sign_flip_p(deltas, n_resamples=9999, seed=0, alternative="two-sided"):
    """A combined test across backbones that holds when they share patients: the sign-flip permutation test over
    units of the mean ΔDice over backbones (and seeds). `deltas` (..., n_units): every unit's ΔDice on every
    backbone (and seed); a unit's values are averaged first and its sign flipped as one, so the dependence between
    backbones scored on the same patient is kept (Fisher's combination treats their p-values as independent).
    scipy.stats.permutation_test with one sample flips signs; exact (every flip) where 2^n <= n_resamples."""
    d = np.asarray(deltas, float)
    if d.size == 0:
        return float("nan")
    d = d.reshape(-1, d.shape[-1])
    d = d[:, ~np.isnan(d).any(0)].mean(0)
    if d.size == 0:
        return float("nan")
    if not np.any(d != 0):
        return 1.0
    r = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=n_resamples,
                               alternative=alternative, rng=np.random.default_rng(seed))
    return float(r.pvalue)


def hierarchical_bootstrap(deltas, n_resamples=9999, seed=0, confidence_level=0.95):
    """95% CI of the mean ΔDice that includes seed-to-seed variation: a two-way bootstrap over seeds and patients.

    In:  `deltas` (n_seeds, n_units): ΔDice = other − ref of every paired unit (patient, or case) under every
         training seed; units with a NaN under any seed are left out.
    Out: {"seeds", "n", "mean_delta", "ci_low", "ci_high"}; the mean is the mean over seeds of the mean over units.
    Seeds and patients are crossed, not nested: every seed's models are scored on the same test patients, so a
    patient's effect is shared by all seeds. Each resample therefore draws n_units units with replacement once and
    n_seeds seeds with replacement, and takes the mean of the (drawn seeds x drawn units) block (paired: a drawn
    unit keeps both methods' Dice of each drawn seed); the CI is the percentile interval of those means (as
    scipy's method="percentile"). Drawing the units anew for every drawn seed (a nested bootstrap) would average
    n_seeds independent patient draws and shrink the patient variance n_seeds-fold: a CI narrower than the
    patient-only one. scipy.stats.bootstrap resamples one level only, so the two draws are written here in numpy.
    The unit indices are drawn before the seed indices, so with one seed every resample is the one
    scipy.stats.bootstrap(paired=True) draws from the same `seed`, and the CI is that patient bootstrap's.
    With few seeds (3) the seed draw is coarse: it can only draw the seeds there are, and understates their
    variance by a factor (n_seeds − 1) / n_seeds."""
    d = np.asarray(deltas, float)
    d = d[:, ~np.isnan(d).any(0)]
    S, P = d.shape
    out = {"seeds": int(S), "n": int(P), "mean_delta": float(d.mean()) if d.size else float("nan"),
           "ci_low": float("nan"), "ci_high": float("nan")}
    if S == 0 or P < 2 or np.ptp(d) == 0:
        return out
    rng = np.random.default_rng(seed)
    units = rng.integers(0, P, (n_resamples, P))                # the same drawn units under every drawn seed
    seeds = rng.integers(0, S, (n_resamples, S))
    theta = d[seeds[:, :, None], units[:, None, :]].mean((-2, -1))   # (n_resamples,) mean of the drawn block
    alpha = (1 - confidence_level) / 2
    out["ci_low"], out["ci_high"] = (float(q) for q in np.quantile(theta, [alpha, 1 - alpha]))
    return out


def holm(pvalues):
    """Holm's step-down adjustment of a family of p-values (NaN entries are not part of the family and stay NaN):
    the i-th smallest of m p-values becomes max_{j <= i} min(1, (m − j + 1) p_(j)), j = 1..m (Holm 1979).
    scipy.stats.false_discovery_control is Benjamini-Hochberg (FDR), not a family-wise correction."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])   # (m − j + 1) p_(j), j = 1..m
    out[order] = np.maximum.accumulate(adjusted)                # step-down: never below an earlier one
    return out


MIN_UNITS = 6      # the fewest paired units with which a two-sided Wilcoxon test can reach p < 0.05 (2 / 2^6)
ALPHA = 0.05       # the family-wise error rate of the calls (Holm within each family of comparisons)


def verdict(ci_low, ci_high, n, holm_p, alternative="two-sided", alpha=ALPHA):
    """The call on one comparison: gain or loss only where both hold, else "no clear difference":
    - its test, Holm-adjusted within the row's family, has p < `alpha` (the family-wise error rate the table
      states: a call is made at that level, never at the unadjusted one), and
    - its seed-inclusive CI (ci_low, ci_high) excludes zero, on the side called.
    Over fewer than MIN_UNITS paired units no call is made: a bootstrap CI over 3 patients excludes zero as easily
    as it includes it. With `alternative` "greater" (a one-sided test for a gain) a loss is never called.
    "No clear difference" is not equivalence: the CI's ends bound the loss and the gain the data allow."""
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return ""
    if n < MIN_UNITS:
        return f"too few units (n < {MIN_UNITS})"
    if not (np.isfinite(holm_p) and holm_p < alpha):
        return "no clear difference"
    if ci_low > 0:
        return "gain"
    if ci_high < 0 and alternative == "two-sided":
        return "loss"
    return "no clear difference"


def fisher_combined(pvalues):
    """Fisher's combination of per-backbone p-values (one-sided ones when the claim is a gain), as the paper's
    Table 1. It assumes independent p-values; backbones scored on the same patients are not, so the combined p is
    anti-conservative there (sign_flip_p is the test that holds)."""
    p = [x for x in pvalues if np.isfinite(x)]
    if not p:
        return float("nan")
    return float(stats.combine_pvalues(p, method="fisher").pvalue)


def format_p(p):
    """p-values as tables print them: `< 1e-4` below that, never 0.0000."""
    return "" if not np.isfinite(p) else "< 1e-4" if p < 1e-4 else f"{p:.4f}"


# --------------------------------------------------------------------------- dynamics
def arch_epochs(traj):
    """The records after warm-up: during warm-up α = β = 0, every op and edge is tied, and the
    top-k, Hamming and first-entry statistics would only measure the tie-breaking order."""
    return [r for r in traj if any(map(any, r["alpha"])) or any(r["beta"])]


def importance_tensor(traj):
    """(T, 14, 7) importance per epoch and the epoch numbers."""
    return np.array([r["importance"] for r in traj], dtype=float), [r["epoch"] for r in traj]


def cosine_matrix(X):
    """Cosine similarity between the rows of (T, D)."""
    X = np.asarray(X, float).reshape(len(X), -1)
    n = np.linalg.norm(X, axis=1, keepdims=True)
    Y = X / np.where(n > 0, n, 1)
    return Y @ Y.T


def topk_masks(I, k):
    """(T, E, O) binary masks: op strictly among the k highest on its edge. An op is in the top-k
    only if its value beats the (k+1)-th largest, so a tie at the boundary (or an all-tied edge)
    counts as not in the top-k; pruned ops (0) never are."""
    I = np.asarray(I, float)
    kth = -np.sort(-I, axis=-1)[..., k:k + 1]                        # the (k+1)-th largest value
    return (I > kth) & (I > 0)


def hamming_similarity_matrix(M):
    """Fraction of equal entries between the binary masks of every pair of epochs."""
    F = M.reshape(len(M), -1)
    return (F[:, None, :] == F[None, :, :]).mean(-1)


def _genotype_at(rec, edge_rule):
    """The discrete genotype one trajectory record would give: each edge's argmax op (Eq. 12) and
    the top-2 incoming edges per node by `edge_rule` (Sec. 3.4). Returns {edge: op}."""
    op_w = op_weights(torch.tensor(rec["alpha"]), torch.tensor(rec["op_mask"]).bool())
    keep = top2_incoming(edge_scores(op_w, torch.tensor(rec["w"]), edge_rule))
    return {e: int(op_w[e].argmax()) for e in keep}


def genotype_masks(traj, edge_rule="w"):
    """(T, E, O) masks of the discrete genotype at every epoch (Fig. 4, "final discrete genotype")."""
    M = np.zeros((len(traj), len(EDGES), len(OPS)), dtype=bool)
    for t, rec in enumerate(traj):
        for e, o in _genotype_at(rec, edge_rule).items():
            M[t, e, o] = True
    return M


FIRST_ENTRY_COLUMNS = ["edge", "op", "top3", "top2", "top1", "edge_set"]


def first_entry_epochs(traj, genotype, edge_rule="w"):
    """For each edge of the final genotype: the first epoch after warm-up its op is in the edge's
    top-3, top-2, top-1 (ties excluded), and the first epoch its node's top-2 incoming edges equal
    the final set (None: never)."""
    traj = arch_epochs(traj)
    I, epochs = importance_tensor(traj)
    masks = {k: topk_masks(I, k) for k in (1, 2, 3)}
    final_sets = {j: {EDGES.index((s, d)) for _, s, d in genotype["edges"] if d == j} for j in NODES}
    edge_sets = [set(_genotype_at(rec, edge_rule)) for rec in traj]
    rows = []
    for op, s, d in genotype["edges"]:
        e, o = EDGES.index((s, d)), OPS.index(op)
        row = {"edge": f"{s}->{d}", "op": op}
        for k in (3, 2, 1):
            hit = np.flatnonzero(masks[k][:, e, o]) if len(traj) else []
            row[f"top{k}"] = int(epochs[hit[0]]) if len(hit) else None
        hit = [t for t in range(len(traj)) if {x for x in edge_sets[t] if EDGES[x][1] == d} == final_sets[d]]
        row["edge_set"] = int(epochs[hit[0]]) if hit else None
        rows.append(row)
    return rows
