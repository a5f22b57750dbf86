"""What the shift stage writes: shift.json (scores per corruption and severity, corruption
error, the ensemble's gain) and diversity.json (how the members disagree)."""

from __future__ import annotations

from typing import ClassVar

from ..config.convert import spec
from .ensemble_summary import Calibration
from .records import JsonRecord

SHIFT_FORMAT = "cifar-ensembles/shift-1"
DIVERSITY_FORMAT = "cifar-ensembles/diversity-1"


@spec
class Scores:
    accuracy: float
    nll: float
    brier: float
    ece: float
    scaled: Calibration  # after the temperature fitted on validation


@spec
class SetScores:
    """One (corruption, severity) set; the clean test split is corruption "none", severity 0."""

    corruption: str
    severity: int
    singles: list[Scores]  # one per seed
    single_mean: Scores  # the mean of the singles' scores
    ensemble: Scores  # the chosen ensemble


@spec
class SeverityGain:
    severity: int
    single_accuracy: float  # mean over seeds and corruptions
    ensemble_accuracy: float
    gain: float
    ci: tuple[float, float]  # paired bootstrap over images


@spec
class CorruptionErrors:
    baseline: str
    single: dict[str, float | None]  # corruption -> CE of the mean single model (None: undefined)
    ensemble: dict[str, float | None]
    mce_single: float | None
    mce_ensemble: float | None
    relative_mce_single: float | None
    relative_mce_ensemble: float | None


@spec
class ShiftSummary(JsonRecord):
    FORMAT: ClassVar[str] = SHIFT_FORMAT
    WHAT: ClassVar[str] = "shift summary"

    experiment: str
    seeds: list[int]
    members: list[int]  # the chosen ensemble's
    method: str
    images: int
    corruptions: list[str]
    clean: SetScores
    sets: list[SetScores]
    by_severity: list[SeverityGain]
    corruption_error: CorruptionErrors | None

    def _misfit(self) -> str | None:
        expected = {(c, s) for c in self.corruptions for s in range(1, 6)}
        found = [(x.corruption, x.severity) for x in self.sets]
        if set(found) != expected or len(found) != len(expected):
            return "sets are not one per corruption and severity"
        if any(len(x.singles) != len(self.seeds) for x in [self.clean, *self.sets]):
            return "singles are not one per seed"
        return None


@spec
class DiversityStats:
    disagreement: float  # mean over member pairs
    kl: float
    oracle_accuracy: float
    mean_member_accuracy: float
    mean_member_nll: float
    ensemble_nll: float
    gain: float  # mean member NLL - ensemble NLL


@spec
class DiversitySummary(JsonRecord):
    FORMAT: ClassVar[str] = DIVERSITY_FORMAT
    WHAT: ClassVar[str] = "diversity summary"

    seeds: list[int]
    disagreement: list[list[float]]  # on test, member x member
    kl: list[list[float]]
    test: DiversityStats
    by_severity: dict[str, DiversityStats]  # "1".."5", pooled over corruptions

    def _misfit(self) -> str | None:
        m = len(self.seeds)
        if any(len(matrix) != m or any(len(row) != m for row in matrix)
               for matrix in (self.disagreement, self.kl)):
            return "matrices are not members x members"
        return None

