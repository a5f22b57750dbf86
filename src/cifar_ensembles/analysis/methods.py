"""Methods: named groups of an experiment's members, scored alike, and the Pareto front of
what they cost against what they buy (docs/study.md 5.11).

Each training run (one seed) gives one or more *variants* of its predictions: `plain` (its
final model), `tta` (the final model averaged over test-time views), `swa` (the averaged
weights) and `snapshots` (its kept snapshots and its final model). A method is either a
variant of one run (`single`, `single_tta`, `swa`, `snapshot_ensemble`: scored per seed, then
averaged over the seeds) or a variant pooled over the first k runs (`deep_ensemble`,
`deep_ensemble_tta`, `deep_ensemble_swa`, `deep_snapshot_ensemble`, k = 2..n, first k as the
report took them). Members combine by averaging their class probabilities (soft voting), the
only vote that gives probabilities to score NLL and calibration on.

Members are rows of one stacked array: the n final models in seed order, then the extra
members (`extras`: (seed index, name) pairs) in the order the predict jobs wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# variant -> (method of one run, method of the first k runs)
VARIANTS = {
    "plain": ("single", "deep_ensemble"),
    "tta": ("single_tta", "deep_ensemble_tta"),
    "swa": ("swa", "deep_ensemble_swa"),
    "snapshots": ("snapshot_ensemble", "deep_snapshot_ensemble"),
}


@dataclass(frozen=True)
class Group:
    """One method: its instances (one per seed for a method of one run, one for a pooled one),
    each the member rows whose probabilities it averages."""

    method: str
    variant: str
    seeds: int  # runs trained for one instance
    instances: tuple[tuple[int, ...], ...]

    @property
    def members(self) -> int:
        return len(self.instances[0])


def variant_rows(n_seeds: int, extras: list[tuple[int, str]]) -> dict[str, list[tuple[int, ...]]]:
    """Per variant present, the member rows of each seed (seed order)."""
    rows: dict[str, list[tuple[int, ...]]] = {"plain": [(i,) for i in range(n_seeds)]}
    by_seed: dict[int, dict[str, int]] = {}
    for row, (seed_index, name) in enumerate(extras, start=n_seeds):
        if not 0 <= seed_index < n_seeds:
            raise ValueError(f"extra member {name!r} of seed index {seed_index}: only {n_seeds} seeds")
        by_seed.setdefault(seed_index, {})[name] = row
    names = {name for _, name in extras}
    for variant, name in (("tta", "tta"), ("swa", "swa")):
        if name in names:
            rows[variant] = [(by_seed[i][name],) for i in range(n_seeds)]
    snapshots = sorted({n for n in names if n.startswith("epoch")}, key=lambda n: int(n[5:]))
    if snapshots:
        rows["snapshots"] = [tuple(by_seed[i][n] for n in snapshots) + (i,) for i in range(n_seeds)]
    return rows


def method_groups(n_seeds: int, extras: list[tuple[int, str]]) -> list[Group]:
    """Every method the members allow: each variant of one run, then pooled over 2..n runs."""
    groups = []
    for variant, per_seed in variant_rows(n_seeds, extras).items():
        one, pooled = VARIANTS[variant]
        groups.append(Group(one, variant, 1, tuple(per_seed)))
        for k in range(2, n_seeds + 1):
            groups.append(Group(pooled, variant, k, (tuple(r for rows in per_seed[:k] for r in rows),)))
    return groups


def pareto_front(costs, values, higher_is_better: bool) -> np.ndarray:
    """Which points no other point dominates: none costs at most as much and is at least as
    good, better in one of the two (equal points are all on the front)."""
    cost = np.asarray(costs, dtype=np.float64)
    value = np.asarray(values, dtype=np.float64) * (1.0 if higher_is_better else -1.0)
    no_worse = (cost[None, :] <= cost[:, None]) & (value[None, :] >= value[:, None])  # [i, j]: j vs i
    better = (cost[None, :] < cost[:, None]) | (value[None, :] > value[:, None])
    return ~np.any(no_worse & better, axis=1)


def best_by_budget(costs, values, higher_is_better: bool) -> list[int]:
    """The point with the best value among those costing at most each budget, for the budgets
    where it changes (ascending cost): the front read as a table. Ties go to the cheaper."""
    cost = np.asarray(costs, dtype=np.float64)
    value = np.asarray(values, dtype=np.float64) * (1.0 if higher_is_better else -1.0)
    order = np.lexsort((-value, cost))  # by cost, then best first
    chosen, best = [], -np.inf
    for i in order:
        if value[i] > best:
            chosen.append(int(i))
            best = value[i]
    return chosen
