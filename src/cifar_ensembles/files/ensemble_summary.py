"""What the ensemble stage writes: ensemble.json (one experiment's votes, subsets, greedy
selection and calibration) and comparisons.json (paired tests between experiments)."""

from __future__ import annotations

from typing import ClassVar

from ..config.convert import spec
from .records import JsonRecord

SUMMARY_FORMAT = "cifar-ensembles/ensemble-1"
COMPARISONS_FORMAT = "cifar-ensembles/comparisons-1"


@spec
class Calibration:
    accuracy: float
    nll: float
    brier: float
    ece: float


@spec
class Calibrated:
    """Calibration on test before and after a temperature fitted on validation."""

    temperature: float
    before: Calibration
    after: Calibration


@spec
class SingleModel:
    seed: int
    val_accuracy: float
    test_accuracy: float
    test_ci: tuple[float, float]
    calibration: Calibrated


@spec
class VoteCurves:
    hard: list[float]
    soft: list[float]


@spec
class Spread:
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]


@spec
class SubsetCurves:
    soft: Spread
    hard: Spread
    subsets: list[int]
    exhaustive: list[bool]


@spec
class Greedy:
    order: list[int]
    val_nll: list[float]
    chosen_size: int
    members: list[int]
    val_accuracy: float
    test_accuracy: float
    test_ci: tuple[float, float]


@spec
class SingleStats:
    mean: float
    std: float
    min: float
    max: float
    ci_of_mean: tuple[float, float]


@spec
class Bootstrap:
    resamples: int
    seed: int
    level: float


@spec
class EnsembleSummary(JsonRecord):
    FORMAT: ClassVar[str] = SUMMARY_FORMAT
    WHAT: ClassVar[str] = "ensemble summary"

    seeds: list[int]
    method: str
    chosen_on: str
    chosen_k: int
    members: list[int]
    val_accuracy: float
    test_accuracy: float
    test_ci: tuple[float, float]
    calibration: Calibrated
    first_k: dict[str, VoteCurves]  # "val", "test"
    subsets: dict[str, SubsetCurves]
    greedy: Greedy
    singles: list[SingleModel]
    best_single_seed: int
    single_test_accuracy: SingleStats
    bootstrap: Bootstrap

    def _misfit(self) -> str | None:
        misfit = self._parts_misfit()
        return f"its parts do not fit together: {misfit}" if misfit else None

    def _parts_misfit(self) -> str | None:
        """What does not fit the seeds in a summary whose fields each have the right type."""
        seeds, m = self.seeds, len(self.seeds)
        if not 1 <= self.chosen_k <= m:
            return f"chosen_k {self.chosen_k} for {m} seeds"
        if self.members != seeds[:self.chosen_k]:
            return "members are not the first chosen_k seeds"
        if [s.seed for s in self.singles] != seeds:
            return "singles are not one per seed, in seed order"
        if self.best_single_seed not in seeds:
            return f"best_single_seed {self.best_single_seed} is not one of the seeds"
        for name, curves in (("first_k", self.first_k), ("subsets", self.subsets)):
            if set(curves) != {"val", "test"}:
                return f"{name} must have val and test curves"
        for split, c in self.first_k.items():
            if not len(c.soft) == len(c.hard) == m:
                return f"first_k.{split} curves are not one value per ensemble size"
        for split, c in self.subsets.items():
            spreads = [v for s in (c.soft, c.hard) for v in (s.mean, s.std, s.min, s.max)]
            lengths = {len(c.subsets), len(c.exhaustive), *(len(v) for v in spreads)}
            if lengths != {m}:
                return f"subsets.{split} curves are not one value per ensemble size"
        g = self.greedy
        if (sorted(g.order) != sorted(seeds) or len(g.val_nll) != m or not 1 <= g.chosen_size <= m
                or sorted(g.members) != sorted(g.order[:g.chosen_size])):
            return "greedy selection does not fit the seeds"
        return None



# ------------------------------------------------------------------ comparisons.json
@spec
class SeedComparison:
    seed: int
    accuracy_a: float
    accuracy_b: float
    b: int
    c: int
    p_value: float


@spec
class EnsembleComparison:
    accuracy_a: float
    accuracy_b: float
    b: int
    c: int
    p_value: float


@spec
class PairComparison:
    a: str
    b: str
    shared_seeds: list[int]
    per_seed: list[SeedComparison]
    ensemble: EnsembleComparison
    mean_single_difference: float


@spec
class Comparisons(JsonRecord):
    FORMAT: ClassVar[str] = COMPARISONS_FORMAT
    WHAT: ClassVar[str] = "comparison file"

    test: str
    pairs: list[PairComparison]
