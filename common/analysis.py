"""Paired statistics (paper Sec. 6.4) and search-dynamics analysis (Sec. 4), as pure functions.

Statistics come from scipy.stats (bootstrap, wilcoxon, combine_pvalues); nothing is
re-implemented. Trajectories are the lists of dicts in trajectory.jsonl.
"""
import numpy as np
from scipy import stats

from common.iac import EDGES, NODES, OPS


# --------------------------------------------------------------------------- statistics
def paired_comparison(ref, other, n_resamples=9999, seed=0):
    """ΔDice = other − ref per case: mean, 95% paired bootstrap CI, Wilcoxon signed-rank p."""
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
    if d.size >= 1 and np.any(d != 0):
        out["wilcoxon_p"] = float(stats.wilcoxon(other[ok], ref[ok]).pvalue)
    elif d.size >= 1:
        out["wilcoxon_p"] = 1.0
    return out


def fisher_combined(pvalues):
    p = [x for x in pvalues if np.isfinite(x)]
    if not p:
        return float("nan")
    return float(stats.combine_pvalues(p, method="fisher").pvalue)


# --------------------------------------------------------------------------- dynamics
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
    """(T, E, O) binary masks: op among the k highest on its edge (ties broken by op order)."""
    I = np.asarray(I, float)
    order = np.argsort(-I, axis=-1, kind="stable")[..., :k]
    M = np.zeros_like(I, dtype=bool)
    np.put_along_axis(M, order, True, axis=-1)
    return M


def hamming_similarity_matrix(M):
    """Fraction of equal entries between the binary masks of every pair of epochs."""
    F = M.reshape(len(M), -1)
    return (F[:, None, :] == F[None, :, :]).mean(-1)


def _edge_set(imp_t, node):
    """Top-2 incoming edges of a node by max_o importance (the discretisation rule)."""
    cand = [e for e, (i, j) in enumerate(EDGES) if j == node]
    return set(sorted(cand, key=lambda e: -imp_t[e].max())[:2])


def first_entry_epochs(traj, genotype):
    """For each edge of the final genotype: the first epoch its op is in the edge's top-3, top-2,
    top-1, and the first epoch its node's top-2 incoming edges equal the final set (None: never)."""
    I, epochs = importance_tensor(traj)
    masks = {k: topk_masks(I, k) for k in (1, 2, 3)}
    final_sets = {j: {EDGES.index((s, d)) for _, s, d in genotype["edges"] if d == j} for j in NODES}
    rows = []
    for op, s, d in genotype["edges"]:
        e, o = EDGES.index((s, d)), OPS.index(op)
        row = {"edge": f"{s}->{d}", "op": op}
        for k in (3, 2, 1):
            hit = np.flatnonzero(masks[k][:, e, o])
            row[f"top{k}"] = int(epochs[hit[0]]) if hit.size else None
        hit = [t for t in range(len(I)) if _edge_set(I[t], d) == final_sets[d]]
        row["edge_set"] = int(epochs[hit[0]]) if hit else None
        rows.append(row)
    return rows
