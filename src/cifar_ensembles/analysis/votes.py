"""Voting over ensemble members and accuracy as a function of ensemble size.

Probabilities come as one array of shape (members, N, classes). Soft voting takes the
argmax of the mean probability. Hard voting takes the most frequent member prediction;
ties go to the tied class with the larger summed probability, then to the lower index.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def soft_vote(probs: np.ndarray) -> np.ndarray:
    return np.argmax(probs.sum(axis=0, dtype=np.float64), axis=-1)


def _hard_vote_from(counts: np.ndarray, summed: np.ndarray, members: int) -> np.ndarray:
    # counts are integers and summed <= members, so counts * (members + 1) + summed orders
    # first by count, then by summed probability; argmax keeps the lowest index on exact ties.
    return np.argmax(counts * (members + 1.0) + summed, axis=-1)


def vote_counts(probs: np.ndarray) -> np.ndarray:
    """(N, C) number of members predicting each class."""
    m, n, c = probs.shape
    counts = np.zeros((n, c), dtype=np.int64)
    np.add.at(counts, (np.arange(n)[None, :].repeat(m, 0), probs.argmax(axis=-1)), 1)
    return counts


def hard_vote(probs: np.ndarray) -> np.ndarray:
    return _hard_vote_from(vote_counts(probs), probs.sum(axis=0, dtype=np.float64), probs.shape[0])


VOTES = {"soft": soft_vote, "hard": hard_vote}  # ensemble.method -> how members combine


def first_k_accuracy(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy of the ensembles of the first k members, k = 1..M, for both votes.

    Cumulative sums make every k cost one pass, not k passes.
    """
    m, n, c = probs.shape
    cum_probs = np.cumsum(probs, axis=0, dtype=np.float64)
    onehot_votes = np.eye(c, dtype=np.int64)[probs.argmax(axis=-1)]  # (M, N, C)
    cum_votes = np.cumsum(onehot_votes, axis=0)
    soft = np.array([np.mean(np.argmax(cum_probs[k], axis=-1) == labels) for k in range(m)])
    hard = np.array([np.mean(_hard_vote_from(cum_votes[k], cum_probs[k], k + 1) == labels)
                     for k in range(m)])
    return {"hard": hard, "soft": soft}


def choose_size(val_curve: np.ndarray) -> int:
    """The ensemble size with the best validation accuracy; the smallest such size on ties."""
    return int(np.argmax(val_curve)) + 1


def member_subsets(m: int, k: int, max_subsets: int, seed: int) -> tuple[np.ndarray, bool]:
    """(n, k) member indices: every k-subset when there are at most `max_subsets`, else that
    many distinct ones drawn with a fixed seed. Returns the subsets and whether they are all."""
    total = math.comb(m, k)
    if total <= max_subsets:
        return np.array(list(itertools.combinations(range(m), k)), dtype=np.int64).reshape(-1, k), True
    rng = np.random.default_rng([seed, m, k])
    seen: set[tuple[int, ...]] = set()
    while len(seen) < max_subsets:
        seen.add(tuple(sorted(rng.choice(m, size=k, replace=False).tolist())))
    return np.array(sorted(seen), dtype=np.int64), False


def subset_accuracies(probs: np.ndarray, labels: np.ndarray, subsets: np.ndarray,
                      chunk: int = 64) -> dict[str, np.ndarray]:
    """Soft- and hard-vote accuracy of each member subset, as matrix products over members.

    Subset sums are W @ P with W the (subsets x members) indicator matrix, so all subsets of
    one size cost a few BLAS calls instead of a Python loop per subset or per image.
    """
    m, n, c = probs.shape
    k = subsets.shape[1]
    # float64: the hard-vote tie-break must see probability differences as small as float32's
    flat_probs = probs.reshape(m, n * c).astype(np.float64)
    flat_votes = np.eye(c, dtype=np.float64)[probs.argmax(axis=-1)].reshape(m, n * c)
    soft, hard = [], []
    for start in range(0, len(subsets), chunk):
        block = subsets[start:start + chunk]
        w = np.zeros((len(block), m), dtype=np.float64)
        np.put_along_axis(w, block, 1.0, axis=1)
        summed = (w @ flat_probs).reshape(-1, n, c)
        counts = (w @ flat_votes).reshape(-1, n, c)
        soft.append(np.mean(summed.argmax(axis=-1) == labels, axis=1))
        hard.append(np.mean(_hard_vote_from(counts, summed, k) == labels, axis=1))
    return {"soft": np.concatenate(soft), "hard": np.concatenate(hard)}


def subset_curve(probs: np.ndarray, labels: np.ndarray, max_subsets: int,
                 seed: int) -> dict[str, dict[str, list[float]]]:
    """Accuracy vs ensemble size over random member subsets: mean, std, min, max per k."""
    m = probs.shape[0]
    out = {vote: {"mean": [], "std": [], "min": [], "max": []} for vote in ("soft", "hard")}
    out["subsets"], out["exhaustive"] = [], []
    for k in range(1, m + 1):
        subsets, exhaustive = member_subsets(m, k, max_subsets, seed)
        acc = subset_accuracies(probs, labels, subsets)
        for vote in ("soft", "hard"):
            out[vote]["mean"].append(float(acc[vote].mean()))
            out[vote]["std"].append(float(acc[vote].std()))
            out[vote]["min"].append(float(acc[vote].min()))
            out[vote]["max"].append(float(acc[vote].max()))
        out["subsets"].append(len(subsets))
        out["exhaustive"].append(exhaustive)
    return out


def greedy_selection(probs: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[float]]:
    """Forward selection without replacement: repeatedly add the member whose addition gives
    the lowest NLL of the averaged probabilities. Returns the order and the NLL after each add."""
    m, n, _ = probs.shape
    true_class = probs[:, np.arange(n), labels].astype(np.float64)  # (M, N): only p_true matters
    chosen: list[int] = []
    nlls: list[float] = []
    running = np.zeros(n)
    for size in range(1, m + 1):
        rest = [i for i in range(m) if i not in chosen]
        candidate = (running[None, :] + true_class[rest]) / size
        scores = -np.mean(np.log(np.clip(candidate, 1e-12, None)), axis=1)
        best = int(np.argmin(scores))
        chosen.append(rest[best])
        nlls.append(float(scores[best]))
        running += true_class[rest[best]]
    return chosen, nlls
