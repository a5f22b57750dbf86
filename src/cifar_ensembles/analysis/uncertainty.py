"""Uncertainty scores of (ensembles of) class probabilities, out-of-distribution detection
metrics and selective prediction (docs/study.md, sections 5.9 and 5.10).

Probabilities come as members x N x C (one member: a single model). Every score is computed
per image from the saved probabilities:

- `msp`: the maximum softmax probability of the averaged prediction p = mean_m p_m
  (a confidence: higher = more in-distribution);
- `entropy`: the predictive entropy H(p) = -sum_c p_c log p_c (nats; an uncertainty);
- `aleatoric`: the mean member entropy mean_m H(p_m) (expected entropy);
- `epistemic`: the mutual information H(p) - mean_m H(p_m) >= 0 (Jensen), exactly 0 for
  one member;
- `disagreement`: the share of member pairs (i < j) whose top classes differ (0 for one
  member).

Detection metrics (`detection_metrics`) follow one stated convention: in-distribution is the
positive class and the detector's input is a confidence (MSP, or minus an uncertainty);
AUROC and AUPR-In are scikit-learn's on (in = 1, confidence), AUPR-Out is scikit-learn's
average precision on (out = 1, uncertainty = -confidence), FPR95 is the share of OOD images
whose confidence reaches the threshold that keeps 95% of the in-distribution images (the
first point of scikit-learn's ROC curve with TPR >= 0.95). `bootstrap_detection` gives the
same four numbers on many resamples at once, in- and out-of-distribution images resampled
independently; it is tested against scikit-learn with the resample counts as sample weights.
"""

from __future__ import annotations

import numpy as np

# name -> (what it measures, whether a higher value means in-distribution)
SCORES = {
    "msp": ("maximum softmax probability of the averaged prediction", True),
    "entropy": ("predictive entropy of the averaged prediction (total)", False),
    "aleatoric": ("mean member entropy (aleatoric)", False),
    "epistemic": ("mutual information: total minus aleatoric (epistemic)", False),
    "disagreement": ("mean pairwise disagreement of the members' top classes", False),
}
SINGLE_SCORES = ("msp", "entropy")  # the others are constant (or equal to these) for one model
METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")
TPR_LEVEL = 0.95


# ------------------------------------------------------------------ scores
def entropy(probs: np.ndarray) -> np.ndarray:
    """-sum_c p_c log p_c over the last axis, with 0 log 0 = 0 (nats, float64)."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=-1)


def disagreement(probs: np.ndarray) -> np.ndarray:
    """Per image, the share of member pairs (i < j) with different top classes (0 for one member)."""
    m = probs.shape[0]
    if m < 2:
        return np.zeros(probs.shape[1])
    top = probs.argmax(axis=-1)  # M x N
    i, j = np.triu_indices(m, k=1)
    return (top[i] != top[j]).mean(axis=0)


def uncertainty_scores(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Every score of `SCORES` per image (probs: members x N x C)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(f"expected members x N x C probabilities, got shape {probs.shape}")
    mean = probs.mean(axis=0)
    total = entropy(mean)
    if probs.shape[0] == 1:
        aleatoric, epistemic = total.copy(), np.zeros_like(total)
    else:
        aleatoric = entropy(probs).mean(axis=0)
        epistemic = np.maximum(total - aleatoric, 0.0)  # >= 0 up to rounding
    return {"msp": mean.max(axis=-1), "entropy": total, "aleatoric": aleatoric,
            "epistemic": epistemic, "disagreement": disagreement(probs)}


def confidence(name: str, score: np.ndarray) -> np.ndarray:
    """The score as a confidence (higher = more in-distribution): MSP itself, minus the others."""
    return score if SCORES[name][1] else -score


# ------------------------------------------------------------------ detection
def _labels(n_in: int, n_out: int) -> np.ndarray:
    return np.r_[np.ones(n_in, dtype=np.int64), np.zeros(n_out, dtype=np.int64)]


def detection_metrics(conf_in: np.ndarray, conf_out: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR95 by scikit-learn (conventions in the module docstring)."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = _labels(len(conf_in), len(conf_out))
    conf = np.r_[conf_in, conf_out].astype(np.float64)
    fpr, tpr, _ = roc_curve(y, conf, drop_intermediate=False)
    return {"auroc": float(roc_auc_score(y, conf)),
            "aupr_in": float(average_precision_score(y, conf)),
            "aupr_out": float(average_precision_score(1 - y, -conf)),
            "fpr95": float(fpr[np.searchsorted(tpr, TPR_LEVEL, side="left")])}


def roc_points(conf_in: np.ndarray, conf_out: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """TPR (in-distribution accepted) at each FPR of `grid` (OOD accepted), from scikit-learn's
    ROC curve, interpolated: a curve of fixed length for the figures."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(_labels(len(conf_in), len(conf_out)), np.r_[conf_in, conf_out],
                            drop_intermediate=False)
    return np.interp(grid, fpr, tpr)


def auroc(conf_in: np.ndarray, conf_out: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(_labels(len(conf_in), len(conf_out)), np.r_[conf_in, conf_out]))


def _group_counts(groups: np.ndarray, resamples: np.ndarray, n_groups: int) -> np.ndarray:
    """(R, G): how often each resample draws an image of each score group."""
    r = resamples.shape[0]
    flat = (groups[resamples] + n_groups * np.arange(r)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n_groups).reshape(r, n_groups).astype(np.float64)


def _precision_weighted(pos: np.ndarray, tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """sum over thresholds of (positives it adds) x precision there: average precision times
    the positives. A threshold that adds no positive adds nothing, whatever its precision."""
    total = tp + fp
    precision = np.divide(tp, total, out=np.zeros_like(tp), where=total > 0)
    return np.einsum("rg,rg->r", pos, precision)


def _from_counts(pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray]:
    """The four metrics of R resamples from per-group counts (R x G, groups in descending
    confidence; positives = in-distribution). With TP, FP the cumulative counts:
    AUROC = sum_g neg_g (TP_g - pos_g / 2) / (P N) (the trapezoids of the ROC curve),
    AUPR = sum_g pos_g precision_g / P (recall steps times precision)."""
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    auroc_ = np.einsum("rg,rg->r", neg, tp - pos / 2) / (n_pos * n_neg)
    aupr_in = _precision_weighted(pos, tp, fp) / n_pos
    # OOD positive, descending uncertainty = ascending confidence: the groups reversed
    neg_rev, pos_rev = neg[:, ::-1], pos[:, ::-1]
    aupr_out = _precision_weighted(neg_rev, np.cumsum(neg_rev, axis=1), np.cumsum(pos_rev, axis=1)) / n_neg
    first = np.argmax(tp >= TPR_LEVEL * n_pos[:, None], axis=1)  # the last group reaches it
    fpr95 = fp[np.arange(len(pos)), first] / n_neg
    return {"auroc": auroc_, "aupr_in": aupr_in, "aupr_out": aupr_out, "fpr95": fpr95}


def bootstrap_detection(conf_in: np.ndarray, conf_out: np.ndarray, boot_in: np.ndarray,
                        boot_out: np.ndarray, chunk: int = 100) -> dict[str, np.ndarray]:
    """The four metrics on each resample (boot_in: R x n_in and boot_out: R x n_out indices,
    drawn independently), computed from one sort of the scores."""
    conf = np.r_[conf_in, conf_out].astype(np.float64)
    values, inverse = np.unique(-conf, return_inverse=True)  # groups of equal confidence, descending
    groups_in, groups_out = inverse[:len(conf_in)], inverse[len(conf_in):]
    out = {m: [] for m in METRICS}
    for start in range(0, len(boot_in), chunk):
        pos = _group_counts(groups_in, boot_in[start:start + chunk], len(values))
        neg = _group_counts(groups_out, boot_out[start:start + chunk], len(values))
        for name, value in _from_counts(pos, neg).items():
            out[name].append(value)
    return {m: np.concatenate(v) for m, v in out.items()}


def percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(values, dtype=np.float64), [tail, 1.0 - tail])
    return float(lo), float(hi)


# ------------------------------------------------------------------ selective prediction
def risk_coverage(conf: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Selective risk at coverage n/N for n = 1..N: the error rate of the n most confident
    images. Images of equal confidence cannot be ordered, so within a tie the risk is its
    expectation over their orders (the tie's errors spread evenly over its images): the curve
    does not depend on the order the images happen to come in."""
    conf = np.asarray(conf, dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    ranked, errors = conf[order], 1.0 - np.asarray(correct, dtype=np.float64)[order]
    first = np.r_[True, ranked[1:] != ranked[:-1]]  # each tie's first position
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(ranked)]
    cumulative = np.r_[0.0, np.cumsum(errors)]
    before, inside = cumulative[starts], cumulative[ends] - cumulative[starts]
    tie = np.cumsum(first) - 1
    position = np.arange(1, len(ranked) + 1) - starts[tie]  # 1.. within the tie
    expected = before[tie] + position * inside[tie] / (ends - starts)[tie]
    return expected / np.arange(1, len(ranked) + 1)


def aurc(risks: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean selective risk over coverages 1/N..1."""
    return float(np.mean(risks))


def optimal_aurc(correct: np.ndarray) -> float:
    """The AURC of a confidence that ranks every correct image above every error."""
    correct = np.asarray(correct, dtype=bool)
    return aurc(risk_coverage(correct.astype(np.float64), correct))


def accuracy_at(risks: np.ndarray, coverage: float) -> float:
    """Accuracy of the ceil(coverage x N) most confident images."""
    n = max(int(np.ceil(coverage * len(risks) - 1e-9)), 1)
    return float(1.0 - risks[n - 1])


def risk_at(risks: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The curve at fixed coverages (for the figures): the risk of the ceil(c x N) most confident."""
    n = np.maximum(np.ceil(np.asarray(grid) * len(risks) - 1e-9).astype(int), 1)
    return risks[n - 1]
