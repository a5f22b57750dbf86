"""What the OOD stage writes: ood.json (out-of-distribution detection per OOD set and score,
single models against the chosen ensemble and against ensemble size) and selective.json
(risk-coverage curves on clean and corrupted test images)."""

from __future__ import annotations

from typing import ClassVar

from ..analysis.uncertainty import METRICS, SINGLE_SCORES
from ..config.convert import spec
from .ensemble_summary import Bootstrap, Spread
from .records import JsonRecord

OOD_FORMAT = "cifar-ensembles/ood-1"
SELECTIVE_FORMAT = "cifar-ensembles/selective-1"


@spec
class SingleMetric:
    """One metric of the single models: over seeds, and a bootstrap interval of their mean."""

    mean: float
    std: float  # over seeds (0 for one seed)
    per_seed: list[float]
    ci: tuple[float, float]  # of the mean over seeds, images resampled


@spec
class EnsembleMetric:
    value: float
    ci: tuple[float, float]


@spec
class ScoreResult:
    single: dict[str, SingleMetric] | None  # None: the score needs several members
    ensemble: dict[str, EnsembleMetric]


@spec
class RocCurves:
    """TPR (in-distribution kept) at fixed FPRs (OOD kept), per score."""

    fpr: list[float]
    single: dict[str, list[float]]  # mean over seeds at each FPR
    ensemble: dict[str, list[float]]


@spec
class SizeCurve:
    """AUROC against ensemble size k = 1..M: the first k seeds, and random k-subsets."""

    first_k: list[float]
    subsets: Spread
    subset_counts: list[int]


@spec
class OodSetResult:
    set: str
    kind: str
    images: int
    scores: dict[str, ScoreResult]
    roc: RocCurves
    by_size: dict[str, SizeCurve]


@spec
class OodSummary(JsonRecord):
    FORMAT: ClassVar[str] = OOD_FORMAT
    WHAT: ClassVar[str] = "OOD summary"

    experiment: str
    seeds: list[int]
    members: list[int]  # the chosen ensemble's
    method: str
    in_distribution: str  # what the positive images are
    in_images: int
    positive_class: dict[str, str]  # metric -> its positive class and score direction
    score_names: dict[str, str]  # score -> what it measures
    bootstrap: Bootstrap
    sets: list[OodSetResult]

    def _misfit(self) -> str | None:
        m = len(self.seeds)
        for s in self.sets:
            if set(s.scores) != set(self.score_names) or set(s.by_size) != set(self.score_names):
                return f"set {s.set}: scores and by_size must name every score of score_names"
            singles = {n for n, r in s.scores.items() if r.single is not None}
            if singles != set(SINGLE_SCORES) or set(s.roc.single) != singles or \
                    set(s.roc.ensemble) != set(self.score_names):
                return f"set {s.set}: ROC curves do not fit the scores"
            curves = [*s.roc.single.values(), *s.roc.ensemble.values()]
            if any(len(curve) != len(s.roc.fpr) for curve in curves):
                return f"set {s.set}: ROC curves are not one value per FPR"
            for name, score in s.scores.items():
                if score.single is not None and set(score.single) != set(METRICS):
                    return f"set {s.set}: score {name}: the single models lack metrics"
                if set(score.ensemble) != set(METRICS):
                    return f"set {s.set}: score {name} lacks metrics"
                if score.single is not None and any(len(v.per_seed) != m for v in score.single.values()):
                    return f"set {s.set}: score {name}: singles are not one per seed"
            if any(len(c.first_k) != m for c in s.by_size.values()):
                return f"set {s.set}: by_size is not one value per ensemble size"
        return None


@spec
class MeanStd:
    mean: float
    std: float
    per_seed: list[float]


@spec
class SingleSelective:
    accuracy: MeanStd  # at full coverage
    aurc: MeanStd
    accuracy_at: dict[str, MeanStd]  # coverage -> accuracy of the most confident
    risk: list[float]  # mean over seeds, at the coverages of `grid`


@spec
class EnsembleSelective:
    accuracy: float
    aurc: float
    optimal_aurc: float  # a confidence that ranks every error last
    accuracy_at: dict[str, float]
    risk: list[float]


@spec
class SelectiveCurve:
    set: str  # "clean", or "severity s" (pooled over corruptions)
    severity: int  # 0: clean
    images: int
    single: SingleSelective
    ensemble: EnsembleSelective


@spec
class SelectiveSummary(JsonRecord):
    FORMAT: ClassVar[str] = SELECTIVE_FORMAT
    WHAT: ClassVar[str] = "selective prediction summary"

    experiment: str
    seeds: list[int]
    members: list[int]
    method: str
    confidence: str  # what ranks the images
    corruptions: list[str]
    grid: list[float]  # coverages of the stored curves
    curves: list[SelectiveCurve]

    def _misfit(self) -> str | None:
        n = len(self.grid)
        if any(len(c.single.risk) != n or len(c.ensemble.risk) != n for c in self.curves):
            return "curves are not one value per coverage of grid"
        if any(len(c.single.aurc.per_seed) != len(self.seeds) for c in self.curves):
            return "singles are not one per seed"
        return None
