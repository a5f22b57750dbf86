"""What the frontier stage writes: methods.json (per experiment, every method of its members
scored alike) and frontier.json (every method of every experiment with its cost, and which
points are on the Pareto front of training cost against accuracy, NLL and ECE)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from ..analysis.methods import VARIANTS
from ..config.convert import spec
from .records import JsonRecord

METHODS_FORMAT = "cifar-ensembles/methods-1"
FRONTIER_FORMAT = "cifar-ensembles/frontier-1"
METHOD_NAMES = tuple(name for pair in VARIANTS.values() for name in pair)
FRONT_METRICS = {"accuracy": True, "nll": False, "ece": False}  # metric -> higher is better


@spec
class Paired:
    """Exact McNemar test of the method against the experiment's first single model, on test:
    b images only the method gets right, c only the single model."""

    b: int
    c: int
    p_value: float


@spec
class ShiftScores:
    """Means over every corrupted set (corruption x severity) of the shift stage."""

    accuracy: float
    nll: float
    ece: float
    sets: int


@spec
class MethodScores:
    method: str
    variant: str
    seeds: Annotated[int, Field(ge=1)]  # runs one instance trains
    members: Annotated[int, Field(ge=1)]  # models one instance averages
    views: Annotated[int, Field(ge=1)]  # test-time views per member
    instances: Annotated[int, Field(ge=1)]  # averaged over (one per seed for a method of one run)
    val_accuracy: float
    test_accuracy: float
    test_ci: tuple[float, float]  # 95% bootstrap interval (of the mean over instances)
    test_nll: float
    test_ece: float
    temperature: float  # fitted on validation (mean over instances)
    test_ece_temperature: float  # ECE after temperature scaling
    vs_single: Paired
    shift: ShiftScores | None  # None: the shift stage is off
    ood_auroc: dict[str, float]  # per OOD set: AUROC of the predictive entropy ({}: OOD stage off)


@spec
class MethodsSummary(JsonRecord):
    FORMAT: ClassVar[str] = METHODS_FORMAT
    WHAT: ClassVar[str] = "methods summary"

    experiment: str
    seeds: list[int]
    tta_views: int
    methods: list[MethodScores]

    def _misfit(self) -> str | None:
        for m in self.methods:
            if m.method not in METHOD_NAMES:
                return f"unknown method {m.method!r}"
            if m.seeds > len(self.seeds):
                return f"{m.method} pools {m.seeds} seeds of {len(self.seeds)}"
        return None


@spec
class FrontierPoint:
    experiment: str
    method: str
    seeds: int
    members: int
    train_passes: int  # forward-backward passes over images (SAM/ASAM: two per step), all runs
    train_seconds: float  # the training jobs' measured seconds (Snakemake benchmark), all runs
    predict_passes: int  # forward passes per image predicted: members x test-time views
    test_accuracy: float
    test_ci: tuple[float, float]
    test_nll: float
    test_ece: float
    pareto: dict[str, bool]  # per FRONT_METRICS: on the front of training passes against it


@spec
class Frontier(JsonRecord):
    FORMAT: ClassVar[str] = FRONTIER_FORMAT
    WHAT: ClassVar[str] = "frontier"

    cost: str  # what the cost axis counts
    points: list[FrontierPoint]

    def _misfit(self) -> str | None:
        for p in self.points:
            if set(p.pareto) != set(FRONT_METRICS):
                return f"{p.experiment}/{p.method}: pareto must name {', '.join(FRONT_METRICS)}"
        return None
