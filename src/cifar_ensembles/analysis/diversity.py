"""Where an ensemble's gain comes from: how much its members differ.

For members' class probabilities p_1..p_M (arrays M x N x C) and labels y:
- disagreement D_ij: the share of images on which members i and j predict different classes;
- KL_ij: the mean over images of KL(p_i || p_j) = sum_c p_i,c (log p_i,c - log p_j,c);
- oracle accuracy: the share of images that at least one member gets right (an upper bound
  for any vote over these members);
- the NLL gain of averaging: mean_i NLL(p_i) - NLL(mean_i p_i) >= 0 (Jensen's inequality
  for -log); it is zero exactly when the members agree on the true class's probability,
  so it measures the diversity that soft voting turns into a better log-likelihood
  (Lakshminarayanan et al. 2017; Ovadia et al. 2019).
"""

from __future__ import annotations

import numpy as np

from .metrics import _TINY, accuracy, nll


def disagreement_matrix(probs: np.ndarray) -> np.ndarray:
    predictions = probs.argmax(axis=-1)  # (M, N)
    return (predictions[:, None, :] != predictions[None, :, :]).mean(axis=-1)


def kl_matrix(probs: np.ndarray) -> np.ndarray:
    logp = np.log(np.clip(probs.astype(np.float64), _TINY, None))  # (M, N, C)
    p = np.exp(logp)
    # KL_ij = E_n[ sum_c p_i (log p_i - log p_j) ] = E_n[sum p_i log p_i] - E_n[sum p_i log p_j]
    self_term = np.einsum("mnc,mnc->m", p, logp) / probs.shape[1]
    cross = np.einsum("inc,jnc->ij", p, logp) / probs.shape[1]
    return self_term[:, None] - cross


def oracle_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((probs.argmax(axis=-1) == labels[None, :]).any(axis=0)))


def nll_gain(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Mean member NLL, the averaged ensemble's NLL, and their difference (>= 0)."""
    probs = probs.astype(np.float64)  # a gain of float32 rounding is no gain
    member = float(np.mean([nll(p, labels) for p in probs]))
    ensemble = nll(probs.mean(axis=0), labels)
    return {"mean_member_nll": member, "ensemble_nll": ensemble, "gain": member - ensemble}


def summary(probs: np.ndarray, labels: np.ndarray, disagreement: np.ndarray | None = None,
            kl: np.ndarray | None = None) -> dict:
    """Mean pairwise disagreement and KL (over i != j; the matrices when already computed),
    oracle accuracy and the NLL gain."""
    m = probs.shape[0]
    off = ~np.eye(m, dtype=bool)
    d = disagreement_matrix(probs) if disagreement is None else disagreement
    k = kl_matrix(probs) if kl is None else kl
    return {"disagreement": float(d[off].mean()) if m > 1 else 0.0,
            "kl": float(k[off].mean()) if m > 1 else 0.0,
            "oracle_accuracy": oracle_accuracy(probs, labels),
            "mean_member_accuracy": accuracy(probs, labels),
            **nll_gain(probs, labels)}
